// Deterministic block reductions (fixed thread -> value assignment, fixed order).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace oneref {
namespace cuda {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sums each of the N values over the block; every thread receives the totals. All threads
// of the block must call it (blockDim.x a multiple of 32, at most 1024).
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N]) {
  __shared__ T partial[N][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = warp_sum(lane < num_warps ? partial[k][lane] : T(0));
  }
  __syncthreads();  // `partial` may be reused by the next call
}

// out[0] = sum(values[0:n]) / divisor; launch one block (deterministic final reduction of
// per-block or per-sample partial sums).
template <typename T>
__global__ void sum_divide_kernel(const T* values, int64_t n, T divisor, T* out) {
  T acc[1] = {T(0)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc[0] += values[i];
  block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc[0] / divisor;
}

}  // namespace cuda
}  // namespace oneref
