// Schemas of the oneref ops (the implementations register per device in
// cpu/register_cpu.cpp and cuda/ops_cuda.cpp; fake tensors and autograd are registered from
// Python in oneref/ops/cuda_backend.py).
#include <torch/library.h>

TORCH_LIBRARY(oneref, m) {
  m.def("referring_mask(Tensor boxes, Tensor noise, int grid, float outside_ratio, "
        "float inside_ratio) -> Tensor");
  // num_rows must equal mask.sum(): the output size is data dependent and the CUDA kernel
  // does not synchronise with the host to count it (the Python wrapper counts once).
  m.def("masked_gather(Tensor x, Tensor mask, SymInt num_rows) -> Tensor");
  m.def("masked_scatter(Tensor rows, Tensor mask) -> Tensor");
  m.def("apply_mask_token(Tensor x, Tensor mask, Tensor token) -> Tensor");
  m.def("vts_loss(Tensor pred, Tensor boxes, int grid) -> Tensor");
  m.def("vts_loss_backward(Tensor grad, Tensor pred, Tensor boxes, int grid) -> Tensor");
  m.def("box_mask_loss(Tensor logits, Tensor boxes, float focal_weight, float dice_weight) "
        "-> Tensor");
  m.def("box_mask_loss_backward(Tensor grad, Tensor logits, Tensor boxes, float focal_weight, "
        "float dice_weight) -> Tensor");
}
