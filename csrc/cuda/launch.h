// Host-side launchers of the CUDA kernels. Plain pointers and a stream: the .cu files do not
// include the ATen headers (fast nvcc builds); cuda/ops_cuda.cpp validates the tensors,
// sets the device guard and the current stream, allocates, and calls these.
// Every launcher checks its launches (C10_CUDA_KERNEL_LAUNCH_CHECK) and never synchronises.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

namespace oneref {
namespace cuda {

// Shared memory the referring_mask kernel needs for one sample (both noise rows).
int64_t referring_mask_smem_bytes(int grid, bool double_noise);
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// boxes: (B, 4) fp64; noise: (B, 2, G*G); out: (B, G*G) bool.
template <typename scalar_t>
void referring_mask(const double* boxes, const scalar_t* noise, bool* out, int64_t batch,
                    int grid, int64_t keep_outside, double inside_ratio, cudaStream_t stream);

enum class RowOp { kGather, kScatter, kToken };

// Row copies between (B*L, row_bytes) and (N, row_bytes) buffers. positions: inclusive prefix
// sum of mask (int64, B*L). kGather: dst[pos - 1] = src[r] for masked r; kScatter:
// dst[r] = masked ? src[pos - 1] : 0; kToken: dst[r] = masked ? token : src[r]. Rows whose
// position is >= num_rows are skipped (never out of bounds, whatever num_rows says).
void masked_rows(RowOp op, const void* src, const void* token, const bool* mask,
                 const int64_t* positions, void* dst, int64_t total_rows, int64_t num_rows,
                 int64_t row_bytes, cudaStream_t stream);

// Precision of the loss kernels: float64 for float64 inputs, else float32.
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Number of partial sums the vts forward may write (size of its `workspace`).
constexpr int kMaxPartials = 1024;

// pred: (B, G*G, 4); boxes: (B, 4) in acc_t; out: () acc_t; workspace: kMaxPartials acc_t.
template <typename scalar_t>
void vts_loss_forward(const scalar_t* pred, const acc_of<scalar_t>* boxes,
                      acc_of<scalar_t>* workspace, acc_of<scalar_t>* out, int64_t batch,
                      int grid, cudaStream_t stream);
// grad: () acc_t on the device; grad_pred: (B, G*G, 4).
template <typename scalar_t>
void vts_loss_backward(const acc_of<scalar_t>* grad, const scalar_t* pred,
                       const acc_of<scalar_t>* boxes, scalar_t* grad_pred, int64_t batch,
                       int grid, cudaStream_t stream);

// logits: (B, G, G); boxes (B, 4) float32 (rasterised in float32); workspace: B acc_t;
// out: () acc_t.
template <typename scalar_t>
void box_mask_loss_forward(const scalar_t* logits, const float* boxes,
                           acc_of<scalar_t>* workspace, acc_of<scalar_t>* out, int64_t batch,
                           int grid, double focal_weight, double dice_weight,
                           cudaStream_t stream);
template <typename scalar_t>
void box_mask_loss_backward(const acc_of<scalar_t>* grad, const scalar_t* logits,
                            const float* boxes, scalar_t* grad_logits, int64_t batch, int grid,
                            double focal_weight, double dice_weight, cudaStream_t stream);

}  // namespace cuda
}  // namespace oneref
