// CUDA implementations of the oneref ops: validation, device guard, current stream,
// allocation, then the launchers of cuda/*.cu. Nothing here synchronises with the host.
#include <ATen/Dispatch.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/box_math.h"
#include "common/validate.h"
#include "cuda/launch.h"

namespace oneref {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Inclusive prefix sum of the flattened mask: the output row of each masked input row + 1.
at::Tensor mask_positions(const at::Tensor& mask) {
  return at::cumsum(mask.reshape({-1}), 0, at::kLong);
}

at::Tensor referring_mask_cuda(const at::Tensor& boxes, const at::Tensor& noise, int64_t grid,
                               double outside_ratio, double inside_ratio) {
  validate_referring_mask(boxes, noise, grid, outside_ratio, inside_ratio);
  const bool double_noise = noise.scalar_type() == at::kDouble;
  const int64_t smem = cuda::referring_mask_smem_bytes(static_cast<int>(grid), double_noise);
  TORCH_CHECK(smem <= cuda::kMaxSharedBytes, "oneref::referring_mask: grid ", grid,
              " needs ", smem, " bytes of shared memory, the CUDA kernel supports at most ",
              cuda::kMaxSharedBytes, " (grid <= 78 for fp32 noise, <= 55 for fp64)");
  c10::cuda::CUDAGuard guard(boxes.device());
  auto out = at::empty({boxes.size(0), grid * grid}, boxes.options().dtype(at::kBool));
  const auto boxes64 = boxes.to(at::kDouble);
  const int64_t keep_outside = keep_count(grid * grid, outside_ratio);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(),
                                  "referring_mask_cuda", [&] {
    cuda::referring_mask<scalar_t>(boxes64.data_ptr<double>(), noise.data_ptr<scalar_t>(),
                                   out.data_ptr<bool>(), boxes.size(0), static_cast<int>(grid),
                                   keep_outside, inside_ratio, current_stream());
  });
  return out;
}

at::Tensor masked_gather_cuda(const at::Tensor& x, const at::Tensor& mask, int64_t num_rows) {
  validate_masked_gather(x, mask, num_rows);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({num_rows, x.size(2)}, x.options());
  const auto positions = mask_positions(mask);
  cuda::masked_rows(cuda::RowOp::kGather, x.data_ptr(), nullptr, mask.data_ptr<bool>(),
                    positions.data_ptr<int64_t>(), out.data_ptr(), mask.numel(), num_rows,
                    x.size(2) * x.element_size(), current_stream());
  return out;
}

at::Tensor masked_scatter_cuda(const at::Tensor& rows, const at::Tensor& mask) {
  validate_masked_scatter(rows, mask);
  c10::cuda::CUDAGuard guard(rows.device());
  auto out = at::empty({mask.size(0), mask.size(1), rows.size(1)}, rows.options());
  const auto positions = mask_positions(mask);
  cuda::masked_rows(cuda::RowOp::kScatter, rows.data_ptr(), nullptr, mask.data_ptr<bool>(),
                    positions.data_ptr<int64_t>(), out.data_ptr(), mask.numel(), rows.size(0),
                    rows.size(1) * rows.element_size(), current_stream());
  return out;
}

at::Tensor apply_mask_token_cuda(const at::Tensor& x, const at::Tensor& mask,
                                 const at::Tensor& token) {
  validate_apply_mask_token(x, mask, token);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  cuda::masked_rows(cuda::RowOp::kToken, x.data_ptr(), token.data_ptr(), mask.data_ptr<bool>(),
                    nullptr, out.data_ptr(), mask.numel(), mask.numel(),
                    x.size(2) * x.element_size(), current_stream());
  return out;
}

at::Tensor vts_loss_cuda(const at::Tensor& pred, const at::Tensor& boxes, int64_t grid) {
  validate_vts_loss(pred, boxes, grid);
  c10::cuda::CUDAGuard guard(pred.device());
  const auto acc = vts_acc_type(pred, boxes);
  // float64 boxes with a low-precision pred: pred is upcast (the reference's promotion).
  const auto p = acc == at::kDouble ? pred.to(at::kDouble) : pred;
  const auto box = boxes.to(acc);
  auto out = at::empty({}, pred.options().dtype(acc));
  auto workspace = at::empty({cuda::kMaxPartials}, pred.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "vts_loss_cuda", [&] {
    using acc_t = cuda::acc_of<scalar_t>;
    cuda::vts_loss_forward<scalar_t>(p.data_ptr<scalar_t>(), box.data_ptr<acc_t>(),
                                     workspace.data_ptr<acc_t>(), out.data_ptr<acc_t>(),
                                     p.size(0), static_cast<int>(grid), current_stream());
  });
  return out;
}

at::Tensor vts_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred,
                                  const at::Tensor& boxes, int64_t grid) {
  validate_vts_loss(pred, boxes, grid);
  const auto acc = vts_acc_type(pred, boxes);
  validate_scalar_grad("oneref::vts_loss_backward", grad, pred.device(), acc);
  c10::cuda::CUDAGuard guard(pred.device());
  const auto p = acc == at::kDouble ? pred.to(at::kDouble) : pred;
  const auto box = boxes.to(acc);
  auto grad_pred = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(),
                                  "vts_loss_backward_cuda", [&] {
    using acc_t = cuda::acc_of<scalar_t>;
    cuda::vts_loss_backward<scalar_t>(grad.data_ptr<acc_t>(), p.data_ptr<scalar_t>(),
                                      box.data_ptr<acc_t>(), grad_pred.data_ptr<scalar_t>(),
                                      p.size(0), static_cast<int>(grid), current_stream());
  });
  return grad_pred.to(pred.scalar_type());
}

at::Tensor box_mask_loss_cuda(const at::Tensor& logits, const at::Tensor& boxes,
                              double focal_weight, double dice_weight) {
  validate_box_mask_loss(logits, boxes);
  c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_type(logits);
  auto out = at::empty({}, logits.options().dtype(acc));
  auto workspace = at::empty({logits.size(0)}, logits.options().dtype(acc));
  const auto boxes32 = boxes.to(at::kFloat);  // rasterised in float32 (reference)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "box_mask_loss_cuda", [&] {
    using acc_t = cuda::acc_of<scalar_t>;
    cuda::box_mask_loss_forward<scalar_t>(
        logits.data_ptr<scalar_t>(), boxes32.data_ptr<float>(), workspace.data_ptr<acc_t>(),
        out.data_ptr<acc_t>(), logits.size(0), static_cast<int>(logits.size(1)), focal_weight,
        dice_weight, current_stream());
  });
  return out;
}

at::Tensor box_mask_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                       const at::Tensor& boxes, double focal_weight,
                                       double dice_weight) {
  validate_box_mask_loss(logits, boxes);
  validate_scalar_grad("oneref::box_mask_loss_backward", grad, logits.device(),
                       acc_type(logits));
  c10::cuda::CUDAGuard guard(logits.device());
  auto grad_logits = at::empty_like(logits);
  const auto boxes32 = boxes.to(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "box_mask_loss_backward_cuda", [&] {
    using acc_t = cuda::acc_of<scalar_t>;
    cuda::box_mask_loss_backward<scalar_t>(
        grad.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), boxes32.data_ptr<float>(),
        grad_logits.data_ptr<scalar_t>(), logits.size(0), static_cast<int>(logits.size(1)),
        focal_weight, dice_weight, current_stream());
  });
  return grad_logits;
}

}  // namespace
}  // namespace oneref

TORCH_LIBRARY_IMPL(oneref, CUDA, m) {
  m.impl("referring_mask", &oneref::referring_mask_cuda);
  m.impl("masked_gather", &oneref::masked_gather_cuda);
  m.impl("masked_scatter", &oneref::masked_scatter_cuda);
  m.impl("apply_mask_token", &oneref::apply_mask_token_cuda);
  m.impl("vts_loss", &oneref::vts_loss_cuda);
  m.impl("vts_loss_backward", &oneref::vts_loss_backward_cuda);
  m.impl("box_mask_loss", &oneref::box_mask_loss_cuda);
  m.impl("box_mask_loss_backward", &oneref::box_mask_loss_backward_cuda);
}
