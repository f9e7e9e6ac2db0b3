"""Small input sets for every op of the registry, drawn from a seed: what the conformance
tests run each backend on against the reference (``tests/ops/test_conformance.py``).

``CASES[op](seed, device, dtype)`` returns the positional arguments of the op (the
reference's signature); odd sizes on purpose (9 tokens with 6 vision rows, 7-row linear
inputs, 12-wide LayerNorm rows, a 5-row cross-entropy with an ignored row).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["CASES", "boxes"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def boxes(gen: torch.Generator, n: int, device) -> torch.Tensor:
    """(n, 4) normalised cx, cy, w, h inside the canvas."""
    wh = 0.15 + 0.5 * torch.rand(n, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([centre, wh], dim=1).to(device)


def _mask(gen, batch: int, rows: int, device) -> torch.Tensor:
    mask = torch.rand(batch, rows, generator=gen) < 0.5
    mask[:, 0] = True  # at least one row per sample
    return mask.to(device)


def _attention(seed, device, dtype):
    gen = _gen(seed)
    q, k, v = (_randn(gen, 2, 9, 2, 16, device=device, dtype=dtype) for _ in range(3))
    return q, k, v, torch.tensor([1, 3], device=device), 6, None


def _linear(seed, device, dtype):
    gen = _gen(seed)
    x = _randn(gen, 2, 7, 16, device=device, dtype=dtype)
    wa, wb = (_randn(gen, 8, 16, device=device, dtype=dtype) * 0.25 for _ in range(2))
    ba, bb = (_randn(gen, 8, device=device, dtype=dtype) for _ in range(2))
    return x, 4, wa, ba, wb, bb, "gelu"


def _norm_params(gen, width, device, dtype):
    return [_randn(gen, width, device=device, dtype=dtype) * 0.5 + offset
            for offset in (1.0, 0.0, 1.0, 0.0)]


def _layer_norm(seed, device, dtype):
    gen = _gen(seed)
    x = _randn(gen, 3, 9, 12, device=device, dtype=dtype) * 2 + 0.5
    return x, 6, *_norm_params(gen, 12, device, dtype), 1e-5, "gelu", dtype


def _add_layer_norm(seed, device, dtype):
    gen = _gen(seed)
    x, branch = (_randn(gen, 3, 9, 12, device=device, dtype=dtype) for _ in range(2))
    scale = torch.tensor([0.0, 1.25, 1.25], device=device, dtype=dtype)
    return x, branch, 6, *_norm_params(gen, 12, device, dtype), 1e-5, scale, dtype


def _referring_mask(seed, device, dtype):
    gen = _gen(seed)
    return boxes(gen, 3, device), torch.rand(3, 2, 36, generator=gen).to(device, dtype), 6, \
        0.35, 0.75


def _apply_mask_token(seed, device, dtype):
    gen = _gen(seed)
    return (_randn(gen, 2, 5, 8, device=device, dtype=dtype), _mask(gen, 2, 5, device),
            _randn(gen, 8, device=device, dtype=dtype))


def _masked_gather(seed, device, dtype):
    gen = _gen(seed)
    return _randn(gen, 2, 5, 8, device=device, dtype=dtype), _mask(gen, 2, 5, device)


def _masked_scatter(seed, device, dtype):
    gen = _gen(seed)
    mask = _mask(gen, 2, 5, device)
    return _randn(gen, int(mask.sum()), 8, device=device, dtype=dtype), mask


def _vts(seed, device, dtype):
    gen = _gen(seed)
    return _randn(gen, 2, 16, 4, device=device, dtype=dtype), boxes(gen, 2, device), 4


def _box_mask(seed, device, dtype):
    gen = _gen(seed)
    return _randn(gen, 2, 4, 4, device=device, dtype=dtype) * 3, boxes(gen, 2, device), 20.0, 2.0


def _focal_dice(seed, device, dtype):
    gen = _gen(seed)
    logits = _randn(gen, 2, 6, 6, device=device, dtype=dtype) * 3
    target = (torch.rand(2, 6, 6, generator=gen) > 0.6).to(device=device, dtype=dtype)
    return logits, target, 20.0, 2.0


def _linear_ce(seed, device, dtype):
    gen = _gen(seed)
    x = _randn(gen, 5, 16, device=device, dtype=dtype)
    weight = _randn(gen, 11, 16, device=device, dtype=dtype) * 0.25
    target = torch.tensor([0, 10, -100, 3, 7], device=device)
    return x, weight, target, _randn(gen, 11, device=device, dtype=dtype), -100, 0.1, "mean"


def _sts(seed, device, dtype):
    gen = _gen(seed)
    pred, target = (_randn(gen, 2, 6, device=device, dtype=dtype) for _ in range(2))
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[0, 1:5], valid[1, 1:3] = True, True
    return pred, target, valid.to(device)


CASES: dict[str, Callable] = {
    "multiway_attention": _attention, "multiway_linear": _linear,
    "multiway_layer_norm": _layer_norm, "multiway_add_layer_norm": _add_layer_norm,
    "referring_mask": _referring_mask, "apply_mask_token": _apply_mask_token,
    "masked_gather": _masked_gather, "masked_scatter": _masked_scatter, "vts_loss": _vts,
    "box_mask_loss": _box_mask, "focal_dice_loss": _focal_dice,
    "linear_cross_entropy": _linear_ce, "sts_kl": _sts,
}
