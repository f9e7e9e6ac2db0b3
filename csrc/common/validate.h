// Input validation shared by the CPU and CUDA implementation of each op: both backends
// accept exactly the same inputs and fail with the same messages.
#pragma once

#include "common/checks.h"

namespace oneref {

inline void validate_boxes(const char* kOp, const at::Tensor& boxes, int64_t batch,
                           const c10::Device& device) {
  ONEREF_CHECK_DEVICE(boxes, device);
  ONEREF_CHECK_FLOATING(boxes);
  ONEREF_CHECK_SHAPE(boxes, batch, 4);
  ONEREF_CHECK_CONTIGUOUS(boxes);
}

inline void validate_referring_mask(const at::Tensor& boxes, const at::Tensor& noise,
                                    int64_t grid, double outside_ratio, double inside_ratio) {
  constexpr const char* kOp = "oneref::referring_mask";
  TORCH_CHECK(grid > 0, kOp, ": grid must be positive, got ", grid);
  ONEREF_CHECK_DIM(boxes, 2);
  validate_boxes(kOp, boxes, boxes.size(0), boxes.device());
  ONEREF_CHECK_DEVICE(noise, boxes.device());
  ONEREF_CHECK_FLOATING(noise);
  ONEREF_CHECK_SHAPE(noise, boxes.size(0), 2, grid * grid);
  ONEREF_CHECK_CONTIGUOUS(noise);
  TORCH_CHECK(outside_ratio >= 0.0 && outside_ratio <= 1.0, kOp,
              ": outside_ratio must be in [0, 1], got ", outside_ratio);
  TORCH_CHECK(inside_ratio >= 0.0 && inside_ratio <= 1.0, kOp,
              ": inside_ratio must be in [0, 1], got ", inside_ratio);
}

inline void validate_row_mask(const char* kOp, const at::Tensor& mask,
                              const c10::Device& device) {
  ONEREF_CHECK_DEVICE(mask, device);
  ONEREF_CHECK_DTYPE(mask, at::kBool);
  ONEREF_CHECK_DIM(mask, 2);
  ONEREF_CHECK_CONTIGUOUS(mask);
}

inline void validate_masked_gather(const at::Tensor& x, const at::Tensor& mask,
                                   int64_t num_rows) {
  constexpr const char* kOp = "oneref::masked_gather";
  ONEREF_CHECK_DIM(x, 3);
  ONEREF_CHECK_CONTIGUOUS(x);
  validate_row_mask(kOp, mask, x.device());
  ONEREF_CHECK_SHAPE(mask, x.size(0), x.size(1));
  TORCH_CHECK(num_rows >= 0 && num_rows <= mask.numel(), kOp, ": num_rows must be in [0, ",
              mask.numel(), "] (the number of True entries of mask), got ", num_rows);
}

inline void validate_masked_scatter(const at::Tensor& rows, const at::Tensor& mask) {
  constexpr const char* kOp = "oneref::masked_scatter";
  ONEREF_CHECK_DIM(rows, 2);
  ONEREF_CHECK_CONTIGUOUS(rows);
  validate_row_mask(kOp, mask, rows.device());
  TORCH_CHECK(rows.size(0) <= mask.numel(), kOp, ": rows has ", rows.size(0),
              " rows but mask has only ", mask.numel(), " entries");
}

inline void validate_apply_mask_token(const at::Tensor& x, const at::Tensor& mask,
                                      const at::Tensor& token) {
  constexpr const char* kOp = "oneref::apply_mask_token";
  ONEREF_CHECK_DIM(x, 3);
  ONEREF_CHECK_CONTIGUOUS(x);
  validate_row_mask(kOp, mask, x.device());
  ONEREF_CHECK_SHAPE(mask, x.size(0), x.size(1));
  ONEREF_CHECK_DEVICE(token, x.device());
  ONEREF_CHECK_DTYPE(token, x.scalar_type());
  ONEREF_CHECK_SHAPE(token, x.size(2));
  ONEREF_CHECK_CONTIGUOUS(token);
}

inline void validate_vts_loss(const at::Tensor& pred, const at::Tensor& boxes, int64_t grid) {
  constexpr const char* kOp = "oneref::vts_loss";
  TORCH_CHECK(grid > 0, kOp, ": grid must be positive, got ", grid);
  ONEREF_CHECK_FLOATING(pred);
  ONEREF_CHECK_DIM(pred, 3);
  ONEREF_CHECK_SHAPE(pred, pred.size(0), grid * grid, 4);
  ONEREF_CHECK_CONTIGUOUS(pred);
  TORCH_CHECK(pred.size(0) > 0, kOp, ": pred must hold at least one sample");
  validate_boxes(kOp, boxes, pred.size(0), pred.device());
}

inline void validate_box_mask_loss(const at::Tensor& logits, const at::Tensor& boxes) {
  constexpr const char* kOp = "oneref::box_mask_loss";
  ONEREF_CHECK_FLOATING(logits);
  ONEREF_CHECK_DIM(logits, 3);
  ONEREF_CHECK_SHAPE(logits, logits.size(0), logits.size(1), logits.size(1));
  ONEREF_CHECK_CONTIGUOUS(logits);
  TORCH_CHECK(logits.size(0) > 0 && logits.size(1) > 0, kOp,
              ": logits must be non-empty (B, G, G), got ", logits.sizes());
  validate_boxes(kOp, boxes, logits.size(0), logits.device());
}

// The incoming gradient of a scalar loss: a one-element tensor of the loss dtype on the op's
// device. It is read inside the kernels (no host synchronisation).
inline void validate_scalar_grad(const char* kOp, const at::Tensor& grad,
                                 const c10::Device& device, at::ScalarType dtype) {
  ONEREF_CHECK_DEVICE(grad, device);
  ONEREF_CHECK_DTYPE(grad, dtype);
  TORCH_CHECK(grad.numel() == 1, kOp, ": grad must hold one value (the loss is a scalar), got "
              "shape ", grad.sizes());
}

// Precision of the loss ops, as in the reference (`_acc`): float64 when the (relevant)
// input is float64, else float32. The loss is returned in this dtype.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// vts targets are computed from the boxes and subtracted from pred: float64 if either is.
inline at::ScalarType vts_acc_type(const at::Tensor& pred, const at::Tensor& boxes) {
  return (pred.scalar_type() == at::kDouble || boxes.scalar_type() == at::kDouble) ? at::kDouble
                                                                                   : at::kFloat;
}

}  // namespace oneref
