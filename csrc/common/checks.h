// Argument checks for the ops of oneref._C (FlashAttention style).
//
// Every message names the op, the argument and what is wrong, e.g.
//   "oneref::vts_loss: pred must have shape [2, 576, 4], got [2, 575, 4]".
// The macros expect a `constexpr const char* kOp` naming the op in the calling scope.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <vector>

namespace oneref {

inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const c10::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", device,
              " was expected (all inputs must be on the same device)");
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.sizes().equals(c10::IntArrayRef(shape)), op, ": ", name,
              " must have shape ", c10::IntArrayRef(shape), ", got ", t.sizes());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous (call .contiguous() first), got strides ", t.strides());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ",
              t.sizes());
}

// The kernels support fp32, fp64, fp16 and bf16 inputs (computing in fp32 or fp64).
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

}  // namespace oneref

#define ONEREF_CHECK_DEVICE(x, device) ::oneref::check_device(kOp, #x, x, device)
#define ONEREF_CHECK_SHAPE(x, ...) ::oneref::check_shape(kOp, #x, x, {__VA_ARGS__})
#define ONEREF_CHECK_CONTIGUOUS(x) ::oneref::check_contiguous(kOp, #x, x)
#define ONEREF_CHECK_DIM(x, d) ::oneref::check_dim(kOp, #x, x, d)
#define ONEREF_CHECK_FLOATING(x) ::oneref::check_floating(kOp, #x, x)
#define ONEREF_CHECK_DTYPE(x, dtype) ::oneref::check_dtype(kOp, #x, x, dtype)
