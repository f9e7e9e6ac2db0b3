"""The ``torch`` backend: the reference implementations, on any device."""

from __future__ import annotations

import torch

from oneref.ops import reference
from oneref.ops.dispatch import register

OPS = (
    "multiway_attention",
    "multiway_linear",
    "referring_mask",
    "apply_mask_token",
    "masked_gather",
    "masked_scatter",
    "vts_loss",
    "box_mask_loss",
    "focal_dice_loss",
    "linear_cross_entropy",
    "sts_kl",
)

for _op in OPS:
    register(_op, "torch")(getattr(reference, _op))


def unavailable_reasons(device: torch.device | None) -> list[str]:
    return []
