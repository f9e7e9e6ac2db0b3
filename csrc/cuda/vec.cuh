// Vectorised memory access helpers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace oneref {
namespace cuda {

// Four consecutive scalars loaded / stored as one aligned access (16 B for fp32, 8 B for
// fp16 / bf16, 2 x 16 B for fp64). The pointer must be aligned to 4 * sizeof(scalar_t).
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

template <typename scalar_t, bool kAligned, typename acc_t>
__device__ __forceinline__ void load4(const scalar_t* p, acc_t (&out)[4]) {
  if constexpr (kAligned) {
    const Vec4<scalar_t> r = *reinterpret_cast<const Vec4<scalar_t>*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = static_cast<acc_t>(r.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = static_cast<acc_t>(p[k]);
  }
}

template <typename scalar_t, bool kAligned, typename acc_t>
__device__ __forceinline__ void store4(scalar_t* p, const acc_t (&in)[4]) {
  if constexpr (kAligned) {
    Vec4<scalar_t> r;
#pragma unroll
    for (int k = 0; k < 4; ++k) r.v[k] = static_cast<scalar_t>(in[k]);
    *reinterpret_cast<Vec4<scalar_t>*>(p) = r;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) p[k] = static_cast<scalar_t>(in[k]);
  }
}

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace cuda
}  // namespace oneref
