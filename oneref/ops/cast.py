"""Casting an op's operands to the compute dtype together (docs/perf.md, "Launches").

Under bf16 autocast every multiway op casts its fp32 master parameters (and any fp32
activation) to bf16, and autograd casts their gradients back: one kernel per tensor each
way, several hundred launches of a OneRef-B training step. :func:`cast_floating` casts an
op's operands with one ``torch._foreach_copy_`` per source dtype, and their gradients back
with one more. On CUDA that is one multi-tensor kernel when every tensor is dense (no gaps,
no overlaps) and each pair has the same sizes and strides, which the casts here are given;
a non-dense tensor (a strided slice, an expanded gradient) gets a contiguous cast, and
CUDA then copies the group tensor by tensor. Compiled steps keep plain casts, which
inductor schedules itself.
"""

from __future__ import annotations

import torch

__all__ = ["cast_floating", "compute_dtype"]


class _CastTogether(torch.autograd.Function):
    """The tensors (all of one dtype) cast to ``dtype`` by one ``_foreach_copy_``; their
    gradients cast back to the tensors' dtype the same way (so twice differentiable). The
    cast of a tensor that needs no gradient does not require one either, as with ``t.to``."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.source_dtype = tensors[0].dtype
        ctx.set_materialize_grads(False)
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(out, tensors)
        ctx.mark_non_differentiable(*(o for o, needs in zip(out, ctx.needs_input_grad[1:])
                                      if not needs))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        wanted = [g if g is not None and needs else None
                  for g, needs in zip(grads, ctx.needs_input_grad[1:])]
        present = [g for g in wanted if g is not None]
        cast = iter(_CastTogether.apply(ctx.source_dtype, *present) if present else ())
        return (None, *(None if g is None else next(cast) for g in wanted))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs compute ``t`` in: the autocast dtype when autocast is on for its
    device, else its own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def cast_floating(tensors, dtype: torch.dtype) -> tuple:
    """``tensors`` with every floating-point one not already of ``dtype`` cast to it (None
    and the others as they are): one cast per source dtype, differentiable, as ``t.to``.
    Compiling, each is ``t.to``: inductor fuses casts into its own kernels, which the
    grouped copies only constrain (OneRef-B's compiled step: 48 kernels more)."""
    todo = [i for i, t in enumerate(tensors)
            if t is not None and t.is_floating_point() and t.dtype != dtype]
    out = list(tensors)
    if torch.compiler.is_compiling():
        for i in todo:
            out[i] = tensors[i].to(dtype)
        return tuple(out)
    by_source: dict[torch.dtype, list[int]] = {}
    for i in todo:
        by_source.setdefault(tensors[i].dtype, []).append(i)
    for indices in by_source.values():
        for i, cast in zip(indices, _CastTogether.apply(dtype, *(tensors[i] for i in indices))):
            out[i] = cast
    return tuple(out)
