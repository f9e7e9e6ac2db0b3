"""FLOP formulas that :class:`torch.utils.flop_counter.FlopCounterMode` lacks.

A counter copies the formula registry when it is created, so these are registered when
:mod:`oneref.ops` is imported, before any counter exists.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

__all__ = ["register_cpu_attention_flops"]


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                         out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape,
                                                 value_shape)


def register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the GPU SDPA kernels but not the CPU flash kernel that masked
    SDPA runs on CPU tensors; count it with the same formulas."""
    aten = torch.ops.aten
    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_forward_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward_flops,
    }
    for name, formula in formulas.items():
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)
