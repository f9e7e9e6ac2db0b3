"""What the kernels of an op read and write, for the counters of ``oneref bench --cost``
(docs/perf.md, "Bytes" and "Launches"): the bytes of its tensors, and the further kernels
of the ops whose GPU implementation launches more than one (every other op call is one
kernel reading its arguments and writing its outputs)."""

from __future__ import annotations

import torch

from oneref.kernels.geometry import norm_backward_programs, norm_rows_per_program

__all__ = ["GPU_SMS", "touched_bytes", "further_kernels"]

#: SMs of the counted cards (H100 and H200 SXM).
GPU_SMS = 132


def touched_bytes(values) -> int:
    """Bytes a kernel touches: each tensor's elements over its non-broadcast dims (a
    stride-0 expanded dim is read once)."""
    total = 0
    for t in values:
        if isinstance(t, torch.Tensor):
            elements = 1
            for size, stride in zip(t.shape, t.stride()):
                elements *= size if stride != 0 else 1
            total += elements * t.element_size()
    return total


def further_kernels(name: str, values: dict) -> tuple[int, int, int]:
    """(launches, bytes read, bytes written) that op ``name`` (``namespace.op``, with its
    arguments ``values`` by schema name) adds to one kernel of its arguments and outputs.

    * ``aten.native_layer_norm_backward``: CUDA writes the input gradient in one kernel and
      the parameter gradients in a second (``layer_norm_kernel.cu``, ``GammaBetaBackward``),
      each reading the output gradient and the input. The CPU kernel takes one pass. Over
      65,536 rows of a narrow width (fewer than 32 columns per two SMs: 768 on an H100, not
      3,072), recent PyTorch also sums partials in small launches of their own, uncounted
      here: OneRef-B's vision rows pass that bound at batch 114.
    * ``oneref_triton.multiway_norm_backward``: its kernel also writes one fp32 (4, width)
      partial of the parameter gradients per program, and a sum reads them
      (``kernels/layer_norm.py``), on a GPU of :data:`GPU_SMS` SMs. The programs grow with
      the rows up to two per SM, which OneRef-B's rows reach at the counted batches 2 and 3,
      so its line through them holds at any batch; for narrow presets (``tiny``, ``small``)
      it stays under the cap at those batches, and the extrapolated partials are low."""
    if name == "aten.native_layer_norm_backward":
        needs_input, needs_weight, needs_bias = values["output_mask"]
        if needs_input and (needs_weight or needs_bias):
            return 1, touched_bytes([values["grad_out"], values["input"]]), 0
    elif name == "oneref_triton.multiway_norm_backward":
        src = values["src"]
        width = src.shape[-1]
        programs = norm_backward_programs(src.numel() // max(width, 1),
                                          norm_rows_per_program(width), 2 * GPU_SMS)
        parts = programs * 4 * width * 4  # fp32
        return 1, parts, parts
    return 0, 0, 0
