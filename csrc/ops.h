// The ops of oneref._C: one CPU and one CUDA implementation each, registered in
// library.cpp (schemas), cpu/register_cpu.cpp and cuda/ops_cuda.cpp.
//
// Shapes: B = batch, G = grid side, L = G * G cells (or any row count for the row ops),
// D = feature size. Semantics are those of oneref/ops/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

namespace oneref {

// referring_mask: boxes (B, 4) cx cy w h, noise (B, 2, G*G) -> (B, G*G) bool, True = masked.
at::Tensor referring_mask_cpu(const at::Tensor& boxes, const at::Tensor& noise, int64_t grid,
                              double outside_ratio, double inside_ratio);
// masked_gather: x (B, L, D), mask (B, L) bool, num_rows = mask.sum() -> (num_rows, D).
at::Tensor masked_gather_cpu(const at::Tensor& x, const at::Tensor& mask, int64_t num_rows);
// masked_scatter: rows (N, D), mask (B, L) bool -> (B, L, D), zeros where mask is False.
at::Tensor masked_scatter_cpu(const at::Tensor& rows, const at::Tensor& mask);
// apply_mask_token: x (B, L, D), mask (B, L) bool, token (D,) -> (B, L, D).
at::Tensor apply_mask_token_cpu(const at::Tensor& x, const at::Tensor& mask,
                                const at::Tensor& token);
// vts_loss: pred (B, G*G, 4), boxes (B, 4) -> () float32; backward -> (B, G*G, 4).
at::Tensor vts_loss_cpu(const at::Tensor& pred, const at::Tensor& boxes, int64_t grid);
at::Tensor vts_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                 const at::Tensor& boxes, int64_t grid);
// box_mask_loss: logits (B, G, G), boxes (B, 4) -> () float32; backward -> (B, G, G).
at::Tensor box_mask_loss_cpu(const at::Tensor& logits, const at::Tensor& boxes,
                             double focal_weight, double dice_weight);
at::Tensor box_mask_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& boxes, double focal_weight,
                                      double dice_weight);

}  // namespace oneref
