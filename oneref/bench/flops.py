"""FLOP counting.

Convention: **FLOPs = 2 x MACs** (one multiply-add is two FLOPs), as
``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions; GMACs are
printed beside GFLOPs. Element-wise work (LayerNorm, softmax, GELU) is not counted, as in the
paper's table. The engine's custom ops register FLOP formulas with the counter, so a model
running them counts the same as one running the plain torch composites.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch.utils.flop_counter import FlopCounterMode

from oneref.config import ModelConfig

__all__ = ["count_flops", "encoder_layer_flops", "analytic_encoder_flops"]

log = logging.getLogger(__name__)


def count_flops(fn: Callable[[], object]) -> dict:
    """Run ``fn()`` under a FlopCounterMode and return ``{"flops", "gflops", "gmacs",
    "by_op"}`` (by_op: the top-level operator counts, GFLOP)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    total = counter.get_total_flops()
    per_op = counter.get_flop_counts().get("Global", {})
    by_op = {str(op): flops / 1e9 for op, flops in per_op.items()}
    return {"flops": total, "gflops": total / 1e9, "gmacs": total / 2e9, "by_op": by_op}


def encoder_layer_flops(seq: int, dim: int, ffn: int) -> int:
    """Forward FLOPs of one multiway block for one sample, both experts together (each row
    goes through exactly one expert): Q, K, V, out projections 8*S*D^2, FFN 4*S*D*F,
    attention matmuls (QK^T and PV) 4*S^2*D. With F = 4D this is 24*S*D^2 + 4*S^2*D."""
    return 8 * seq * dim * dim + 4 * seq * dim * ffn + 4 * seq * seq * dim


def analytic_encoder_flops(config: ModelConfig) -> dict:
    """Analytic forward FLOPs per sample of the encoder: layers + patch embedding."""
    layers = config.depth * encoder_layer_flops(config.seq_len, config.embed_dim, config.ffn_dim)
    patch = 2 * config.num_patches * config.embed_dim * config.in_chans * config.patch_size ** 2
    return {"layers": layers, "patch_embed": patch, "total": layers + patch}
