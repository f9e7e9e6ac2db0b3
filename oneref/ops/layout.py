"""Memory layout of the joint (B, S, D) hidden states.

The encoder keeps its hidden states *sequence-major*: logically (B, S, D), stored as
(S, B, D). Each expert's row range (the first ``num_vision`` positions, the rest) is then one
contiguous block, so the torch backend's multiway ops run one GEMM or LayerNorm per block
and write their outputs in place, without split or join copies. Kernels that take strides
(the Triton and CUDA backends) read either layout.
"""

from __future__ import annotations

import torch

__all__ = ["sequence_major", "is_sequence_major"]


def is_sequence_major(x: torch.Tensor) -> bool:
    """True when (B, S, ...) ``x`` is stored as a contiguous (S, B, ...) tensor."""
    return x.transpose(0, 1).is_contiguous()


def sequence_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, S, ...) stored sequence-major: ``x`` itself when it already is, else a copy."""
    if is_sequence_major(x):
        return x
    return x.transpose(0, 1).contiguous().transpose(0, 1)
