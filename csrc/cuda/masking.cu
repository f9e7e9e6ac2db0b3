// CUDA kernels of the masking ops: referring_mask and the row copies behind masked_gather,
// masked_scatter and apply_mask_token.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "common/box_math.h"
#include "cuda/launch.h"
#include "cuda/vec.cuh"

namespace oneref {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSizeRows = 32;

template <typename scalar_t>
using NoiseAcc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One block per sample. Both noise rows are staged in shared memory; every cell counts the
// cells it competes with that have smaller noise (ties broken by index, a stable order):
// all cells for the whole-grid draw, the cells of the grown box for the in-box re-draw.
// O(L^2 / threads) per block, L = G * G (576 for OneRef): a few microseconds.
template <typename scalar_t>
__global__ void referring_mask_kernel(const double* __restrict__ boxes,
                                      const scalar_t* __restrict__ noise,
                                      bool* __restrict__ out, int grid, int64_t keep_outside,
                                      double inside_ratio) {
  using acc_t = NoiseAcc<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int cells = grid * grid;
  acc_t* outside = reinterpret_cast<acc_t*>(smem);
  acc_t* inside = outside + cells;
  const int64_t b = blockIdx.x;
  const scalar_t* sample_noise = noise + b * 2 * cells;
  for (int i = threadIdx.x; i < 2 * cells; i += blockDim.x) {
    outside[i] = static_cast<acc_t>(sample_noise[i]);
  }
  __syncthreads();

  const double* box = boxes + 4 * b;
  const CellRect region = grown_box_region(box[0], box[1], box[2], box[3], grid);
  const int64_t keep_inside = keep_count(region.area(), inside_ratio);
  for (int i = threadIdx.x; i < cells; i += blockDim.x) {
    const int col = i % grid, row = i / grid;
    bool masked;
    if (region.contains(col, row)) {
      const acc_t v = inside[i];
      int rank = 0;
      for (int r = region.y1; r < region.y2; ++r) {
        for (int c = region.x1; c < region.x2; ++c) {
          const int j = r * grid + c;
          const acc_t u = inside[j];
          rank += (u < v) || (u == v && j < i);
        }
      }
      masked = rank >= keep_inside;
    } else {
      const acc_t v = outside[i];
      int rank = 0;
      for (int j = 0; j < cells; ++j) {
        const acc_t u = outside[j];
        rank += (u < v) || (u == v && j < i);
      }
      masked = rank >= keep_outside;
    }
    out[b * cells + i] = masked;
  }
}

// One warp per row; each lane copies vec_t-sized chunks (16 B when the row size and the
// pointers allow it). Grid-stride over rows.
template <typename vec_t, RowOp kOp>
__global__ void masked_rows_kernel(const vec_t* __restrict__ src, const vec_t* __restrict__ token,
                                   const bool* __restrict__ mask,
                                   const int64_t* __restrict__ positions, vec_t* __restrict__ dst,
                                   int64_t total_rows, int64_t num_rows, int64_t vecs_per_row) {
  const int lane = threadIdx.x % kWarpSizeRows;
  const int64_t warps_per_block = blockDim.x / kWarpSizeRows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarpSizeRows; row < total_rows;
       row += stride) {
    const bool selected = mask[row];
    const vec_t* from = nullptr;  // nullptr: write zeros
    vec_t* to = dst + row * vecs_per_row;
    if constexpr (kOp == RowOp::kGather) {
      const int64_t out_row = positions[row] - 1;
      if (!selected || out_row >= num_rows) continue;
      from = src + row * vecs_per_row;
      to = dst + out_row * vecs_per_row;
    } else if constexpr (kOp == RowOp::kScatter) {
      const int64_t in_row = positions[row] - 1;
      if (selected && in_row < num_rows) from = src + in_row * vecs_per_row;
    } else {
      from = selected ? token : src + row * vecs_per_row;
    }
    for (int64_t k = lane; k < vecs_per_row; k += kWarpSizeRows) {
      to[k] = from != nullptr ? from[k] : vec_t{};
    }
  }
}

template <typename vec_t>
void launch_rows(RowOp op, const void* src, const void* token, const bool* mask,
                 const int64_t* positions, void* dst, int64_t total_rows, int64_t num_rows,
                 int64_t row_bytes, cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int warps = kThreads / kWarpSizeRows;
  const int64_t blocks = std::min<int64_t>((total_rows + warps - 1) / warps, 65536);
  auto s = static_cast<const vec_t*>(src);
  auto t = static_cast<const vec_t*>(token);
  auto d = static_cast<vec_t*>(dst);
  switch (op) {
    case RowOp::kGather:
      masked_rows_kernel<vec_t, RowOp::kGather><<<blocks, kThreads, 0, stream>>>(
          s, t, mask, positions, d, total_rows, num_rows, vecs);
      break;
    case RowOp::kScatter:
      masked_rows_kernel<vec_t, RowOp::kScatter><<<blocks, kThreads, 0, stream>>>(
          s, t, mask, positions, d, total_rows, num_rows, vecs);
      break;
    case RowOp::kToken:
      masked_rows_kernel<vec_t, RowOp::kToken><<<blocks, kThreads, 0, stream>>>(
          s, t, mask, positions, d, total_rows, num_rows, vecs);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t referring_mask_smem_bytes(int grid, bool double_noise) {
  return 2 * static_cast<int64_t>(grid) * grid * (double_noise ? 8 : 4);
}

template <typename scalar_t>
void referring_mask(const double* boxes, const scalar_t* noise, bool* out, int64_t batch,
                    int grid, int64_t keep_outside, double inside_ratio, cudaStream_t stream) {
  if (batch == 0) return;
  const int64_t smem = referring_mask_smem_bytes(grid, std::is_same_v<scalar_t, double>);
  referring_mask_kernel<scalar_t><<<batch, kThreads, smem, stream>>>(
      boxes, noise, out, grid, keep_outside, inside_ratio);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define ONEREF_INSTANTIATE(T)                                                             \
  template void referring_mask<T>(const double*, const T*, bool*, int64_t, int, int64_t, \
                                  double, cudaStream_t);
ONEREF_INSTANTIATE(float)
ONEREF_INSTANTIATE(double)
ONEREF_INSTANTIATE(c10::Half)
ONEREF_INSTANTIATE(c10::BFloat16)
#undef ONEREF_INSTANTIATE

void masked_rows(RowOp op, const void* src, const void* token, const bool* mask,
                 const int64_t* positions, void* dst, int64_t total_rows, int64_t num_rows,
                 int64_t row_bytes, cudaStream_t stream) {
  if (total_rows == 0 || row_bytes == 0) return;
  // Widest access that divides the row size and keeps every pointer aligned.
  uintptr_t width = 16;
  while (width > 1 &&
         (row_bytes % width != 0 || !is_aligned(src, width) || !is_aligned(dst, width) ||
          (token != nullptr && !is_aligned(token, width)))) {
    width /= 2;
  }
#define ONEREF_LAUNCH_ROWS(vec_t) \
  launch_rows<vec_t>(op, src, token, mask, positions, dst, total_rows, num_rows, row_bytes, stream)
  switch (width) {
    case 16: ONEREF_LAUNCH_ROWS(uint4); break;
    case 8: ONEREF_LAUNCH_ROWS(uint2); break;
    case 4: ONEREF_LAUNCH_ROWS(uint32_t); break;
    case 2: ONEREF_LAUNCH_ROWS(uint16_t); break;
    default: ONEREF_LAUNCH_ROWS(uint8_t); break;
  }
#undef ONEREF_LAUNCH_ROWS
}

}  // namespace cuda
}  // namespace oneref
