// CUDA kernels of the loss ops: vts_loss and box_mask_loss, forward and backward.
//
// Math in acc_t: float32, float64 for float64 inputs (as the reference).
// Forward passes reduce deterministically: per-block (vts) or per-sample (box mask) partial
// sums, then one block sums the partials in a fixed order. The incoming gradient of the
// scalar loss is read on the device (no host synchronisation).
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "common/box_math.h"
#include "common/focal_dice.h"
#include "cuda/launch.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace oneref {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------ vts loss
// Row r = b * L + i holds the 4 predicted scores of cell i of sample b.
template <typename scalar_t, bool kAligned>
__global__ void vts_loss_partials_kernel(const scalar_t* __restrict__ pred,
                                         const acc_of<scalar_t>* __restrict__ boxes,
                                         acc_of<scalar_t>* __restrict__ partials, int64_t rows,
                                         int grid) {
  using acc_t = acc_of<scalar_t>;
  const int cells = grid * grid;
  acc_t acc[1] = {acc_t(0)};
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = r / cells;
    const int i = static_cast<int>(r % cells);
    const acc_t* box = boxes + 4 * b;
    const VtsBox<acc_t> vb = vts_box<acc_t>(box[0], box[1], box[2], box[3], grid);
    acc_t p[4];
    load4<scalar_t, kAligned>(pred + 4 * r, p);
    acc[0] += math_abs(p[0] - vb.dx(i % grid)) + math_abs(p[1] - vb.dy(i / grid)) +
              math_abs(p[2] - vb.inv_w) + math_abs(p[3] - vb.inv_h);
  }
  block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc[0];
}

template <typename T>
__device__ __forceinline__ T sign_of(T v) {
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}

template <typename scalar_t, bool kAligned>
__global__ void vts_loss_backward_kernel(const acc_of<scalar_t>* __restrict__ grad,
                                         const scalar_t* __restrict__ pred,
                                         const acc_of<scalar_t>* __restrict__ boxes,
                                         scalar_t* __restrict__ grad_pred, int64_t rows,
                                         int grid) {
  using acc_t = acc_of<scalar_t>;
  const int cells = grid * grid;
  // d mean / d row = g / (B L); d |p - t| / d p = sign(p - t) (0 at 0, as torch.abs).
  const acc_t scale = grad[0] / static_cast<acc_t>(rows);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = r / cells;
    const int i = static_cast<int>(r % cells);
    const acc_t* box = boxes + 4 * b;
    const VtsBox<acc_t> vb = vts_box<acc_t>(box[0], box[1], box[2], box[3], grid);
    acc_t p[4];
    load4<scalar_t, kAligned>(pred + 4 * r, p);
    const acc_t g[4] = {sign_of(p[0] - vb.dx(i % grid)) * scale,
                        sign_of(p[1] - vb.dy(i / grid)) * scale,
                        sign_of(p[2] - vb.inv_w) * scale, sign_of(p[3] - vb.inv_h) * scale};
    store4<scalar_t, kAligned>(grad_pred + 4 * r, g);
  }
}

int64_t row_blocks(int64_t rows, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>((rows + kThreads - 1) / kThreads, cap));
}

// ------------------------------------------------------------------------- box mask loss
// Per-sample sums of one (G, G) logit map: focal, intersection, sum p, sum t.
template <typename scalar_t>
__device__ __forceinline__ void box_mask_sums(const scalar_t* __restrict__ x,
                                              const GridEdges& edges, int grid,
                                              acc_of<scalar_t> (&sums)[4]) {
  using acc_t = acc_of<scalar_t>;
  sums[0] = sums[1] = sums[2] = sums[3] = acc_t(0);
  for (int i = threadIdx.x; i < grid * grid; i += blockDim.x) {
    const acc_t t = edges.contains(i % grid, i / grid) ? acc_t(1) : acc_t(0);
    const FocalTerm<acc_t> f = focal_term(static_cast<acc_t>(x[i]), t);
    sums[0] += f.focal;
    sums[1] += f.prob * t;
    sums[2] += f.prob;
    sums[3] += t;
  }
  block_sum(sums);
}

// One block per sample: writes focal_weight * mean focal + dice_weight * dice.
template <typename scalar_t>
__global__ void box_mask_loss_sample_kernel(const scalar_t* __restrict__ logits,
                                            const float* __restrict__ boxes,
                                            acc_of<scalar_t>* __restrict__ per_sample, int grid,
                                            acc_of<scalar_t> focal_weight,
                                            acc_of<scalar_t> dice_weight) {
  using acc_t = acc_of<scalar_t>;
  const int64_t b = blockIdx.x;
  const float* box = boxes + 4 * b;
  const GridEdges edges = box_grid_edges(box[0], box[1], box[2], box[3], grid);
  acc_t sums[4];
  box_mask_sums(logits + b * grid * grid, edges, grid, sums);
  if (threadIdx.x == 0) {
    per_sample[b] = focal_weight * sums[0] / static_cast<acc_t>(grid * grid) +
                    dice_weight * dice_from_sums(sums[1], sums[2], sums[3]);
  }
}

// One block per sample: the dice sums first, then the gradient of every pixel.
template <typename scalar_t>
__global__ void box_mask_loss_backward_kernel(const acc_of<scalar_t>* __restrict__ grad,
                                              const scalar_t* __restrict__ logits,
                                              const float* __restrict__ boxes,
                                              scalar_t* __restrict__ grad_logits,
                                              int64_t batch, int grid,
                                              acc_of<scalar_t> focal_weight,
                                              acc_of<scalar_t> dice_weight) {
  using acc_t = acc_of<scalar_t>;
  const int64_t b = blockIdx.x;
  const int cells = grid * grid;
  const float* box = boxes + 4 * b;
  const GridEdges edges = box_grid_edges(box[0], box[1], box[2], box[3], grid);
  const scalar_t* x = logits + b * cells;
  acc_t sums[4];
  box_mask_sums(x, edges, grid, sums);
  const acc_t g = grad[0];
  const acc_t focal_scale = focal_weight * g / static_cast<acc_t>(batch * cells);
  const acc_t dice_scale = dice_weight * g / static_cast<acc_t>(batch);
  for (int i = threadIdx.x; i < cells; i += blockDim.x) {
    const acc_t t = edges.contains(i % grid, i / grid) ? acc_t(1) : acc_t(0);
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t p = stable_sigmoid(xi);
    grad_logits[b * cells + i] = static_cast<scalar_t>(
        focal_scale * focal_grad(xi, t) + dice_scale * dice_grad(p, t, sums[1], sums[2], sums[3]));
  }
}

}  // namespace

template <typename scalar_t>
void vts_loss_forward(const scalar_t* pred, const acc_of<scalar_t>* boxes,
                      acc_of<scalar_t>* workspace, acc_of<scalar_t>* out, int64_t batch,
                      int grid, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int64_t rows = batch * grid * grid;
  const int64_t blocks = row_blocks(rows, kMaxPartials);
  if (is_aligned(pred, 4 * sizeof(scalar_t))) {
    vts_loss_partials_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
        pred, boxes, workspace, rows, grid);
  } else {
    vts_loss_partials_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
        pred, boxes, workspace, rows, grid);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_divide_kernel<acc_t><<<1, 1024, 0, stream>>>(workspace, blocks, static_cast<acc_t>(rows),
                                                   out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void vts_loss_backward(const acc_of<scalar_t>* grad, const scalar_t* pred,
                       const acc_of<scalar_t>* boxes, scalar_t* grad_pred, int64_t batch,
                       int grid, cudaStream_t stream) {
  const int64_t rows = batch * grid * grid;
  const int64_t blocks = row_blocks(rows, 65536);
  if (is_aligned(pred, 4 * sizeof(scalar_t)) && is_aligned(grad_pred, 4 * sizeof(scalar_t))) {
    vts_loss_backward_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
        grad, pred, boxes, grad_pred, rows, grid);
  } else {
    vts_loss_backward_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
        grad, pred, boxes, grad_pred, rows, grid);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void box_mask_loss_forward(const scalar_t* logits, const float* boxes,
                           acc_of<scalar_t>* workspace, acc_of<scalar_t>* out, int64_t batch,
                           int grid, double focal_weight, double dice_weight,
                           cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  box_mask_loss_sample_kernel<scalar_t><<<batch, kThreads, 0, stream>>>(
      logits, boxes, workspace, grid, static_cast<acc_t>(focal_weight),
      static_cast<acc_t>(dice_weight));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_divide_kernel<acc_t><<<1, 1024, 0, stream>>>(workspace, batch, static_cast<acc_t>(batch),
                                                   out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void box_mask_loss_backward(const acc_of<scalar_t>* grad, const scalar_t* logits,
                            const float* boxes, scalar_t* grad_logits, int64_t batch, int grid,
                            double focal_weight, double dice_weight, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  box_mask_loss_backward_kernel<scalar_t><<<batch, kThreads, 0, stream>>>(
      grad, logits, boxes, grad_logits, batch, grid, static_cast<acc_t>(focal_weight),
      static_cast<acc_t>(dice_weight));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define ONEREF_INSTANTIATE(T)                                                                \
  template void vts_loss_forward<T>(const T*, const acc_of<T>*, acc_of<T>*, acc_of<T>*,      \
                                    int64_t, int, cudaStream_t);                             \
  template void vts_loss_backward<T>(const acc_of<T>*, const T*, const acc_of<T>*, T*,       \
                                     int64_t, int, cudaStream_t);                            \
  template void box_mask_loss_forward<T>(const T*, const float*, acc_of<T>*, acc_of<T>*,     \
                                         int64_t, int, double, double, cudaStream_t);        \
  template void box_mask_loss_backward<T>(const acc_of<T>*, const T*, const float*, T*,      \
                                          int64_t, int, double, double, cudaStream_t);
ONEREF_INSTANTIATE(float)
ONEREF_INSTANTIATE(double)
ONEREF_INSTANTIATE(c10::Half)
ONEREF_INSTANTIATE(c10::BFloat16)
#undef ONEREF_INSTANTIATE

}  // namespace cuda
}  // namespace oneref
