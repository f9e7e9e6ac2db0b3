"""The ``torch`` backend: PyTorch on any device.

Most ops run their readable definition from :mod:`oneref.ops.reference`. Two hot paths use a
faster PyTorch composite with the same contract (tested against the reference):

* ``multiway_attention`` runs :func:`torch.nn.functional.scaled_dot_product_attention` with a
  bool key-padding mask (fused CPU flash kernel; memory-efficient or cuDNN kernel on GPU)
  instead of materialising the fp32 score matrix.
* ``multiway_linear`` runs each expert as one 2-D GEMM with the bias fused (``addmm``) over
  the flattened rows of its range, instead of a batched matmul plus a separate bias add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oneref.ops import reference
from oneref.ops.dispatch import register

REFERENCE_OPS = (
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

for _op in REFERENCE_OPS:
    register(_op, "torch")(getattr(reference, _op))


@register("multiway_attention", "torch")
def multiway_attention(q, k, v, text_lengths, num_vision: int, scale: float | None = None):
    """SDPA over (B, H, S, Dh) views with a (B, 1, 1, S) bool mask (True = attend)."""
    valid = reference.key_padding_mask(text_lengths, num_vision, q.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale,
    )
    return out.transpose(1, 2)


def _expert_linear(x, weight, bias):
    """x: (B, R, Din) row range of one expert -> (B, R, Dout) through one 2-D GEMM."""
    rows = x.reshape(-1, x.shape[-1])
    return F.linear(rows, weight, bias).view(*x.shape[:2], weight.shape[0])


@register("multiway_linear", "torch")
def multiway_linear(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                    activation: str = "none"):
    y = torch.cat([_expert_linear(x[:, :num_vision], weight_a, bias_a),
                   _expert_linear(x[:, num_vision:], weight_b, bias_b)], dim=1)
    return F.gelu(y) if activation == "gelu" else y


def unavailable_reasons(device: torch.device | None) -> list[str]:
    return []
