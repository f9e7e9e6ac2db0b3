"""MRefM masking: the referring MLM text rule and referring-aware image masking (docs/method.md,
"MRefM pre-training").

Text: ``n_mask = max(1, min(round((n - 1) * ratio), n - 1))`` positions out of the
``[1, n - 1]`` range (n counts ``<s>`` and ``</s>``; both ends inclusive, so ``</s>`` can be
chosen and ``<s>`` never is). The subject word is taken first, then the object word, then
uniform positions. Each chosen position becomes ``<mask>`` (80%), stays (10%) or becomes a
random id in ``[3, V - 1]`` (10%). All draws come from the given ``torch.Generator``.

Image: :func:`mask_image` draws noise with ``oneref.ops.draw_mask_noise`` and masks through
``oneref.ops.referring_mask`` (beta 0.35 over the grid, gamma 0.75 inside the grown box).
:func:`random_mask_like` is vanilla masked image modelling's control: as many patches per
sample, chosen uniformly.
"""

from __future__ import annotations

import torch

from oneref import ops

__all__ = ["mask_count", "mask_text", "mask_image", "random_mask_like"]


def mask_count(length: int, ratio: float = 0.4) -> int:
    """Masked tokens for a sequence of ``length`` ids (incl. <s>, </s>)."""
    return max(1, min(round((length - 1) * ratio), length - 1))


def _mask_batch(ids: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
                mask_id: int, vocab_size: int, generator: torch.Generator | None,
                ratio: float):
    """Vectorised rule on CPU tensors: ids (B, T), lengths (B,), positions (B, 2)."""
    batch, total = ids.shape
    if bool((lengths < 2).any()) or bool((lengths > total).any()):
        bad = int(lengths[(lengths < 2) | (lengths > total)][0])
        raise ValueError(f"length must be in [2, {total}] (ids of the sample incl. <s> and "
                         f"</s>), got {bad}")
    n_mask = torch.round((lengths - 1).double() * ratio).long()
    n_mask = torch.maximum(torch.minimum(n_mask, lengths - 1), torch.ones_like(lengths))
    cols = torch.arange(total)[None, :]
    valid = (cols >= 1) & (cols <= lengths[:, None] - 1)
    # Lower score = chosen first: subject (-2), object (-1), then uniform draws in [0, 1).
    scores = torch.rand(batch, total, generator=generator, dtype=torch.float64)
    for slot, priority in ((1, -1.0), (0, -2.0)):
        pos = positions[:, slot]
        ok = (pos >= 1) & (pos <= lengths - 1)
        rows = torch.nonzero(ok).flatten()
        scores[rows, pos[rows]] = priority
    scores = scores.masked_fill(~valid, float("inf"))
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen = rank < n_mask[:, None]
    draw = torch.rand(batch, total, generator=generator)
    random_ids = torch.randint(3, vocab_size, (batch, total), generator=generator)
    new = torch.where(draw < 0.8, torch.full_like(ids, mask_id),
                      torch.where(draw < 0.9, ids, random_ids))
    masked = torch.where(chosen, new, ids)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return masked, labels


def mask_text(ids: torch.Tensor, length, word_positions, mask_id: int, vocab_size: int,
              generator: torch.Generator | None = None, ratio: float = 0.4):
    """Referring MLM masking.

    Args:
        ids: (T,) or (B, T) long fairseq ids (``<s>`` at 0, padding after ``length``).
        length: int / 0-d tensor, or (B,) tensor: tokens incl. ``<s>`` and ``</s>``.
        word_positions: (2,) or (B, 2) subject, object token positions (-1 = unknown;
            positions outside [1, length - 1] are ignored).
        mask_id: id of ``<mask>``; vocab_size: V, random replacements come from [3, V - 1].
        generator: CPU torch.Generator for every draw (a (T,) call draws exactly what a
            batch of one would).
        ratio: masking ratio (0.4).

    Returns:
        (masked_ids, labels), both shaped like ``ids`` and on its device; labels hold the
        original id at masked positions and -100 elsewhere.
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() not in (1, 2):
        raise TypeError("ids must be a long tensor of shape (T,) or (B, T)")
    if vocab_size <= 3 or not 0 <= mask_id:
        raise ValueError(f"vocab_size must be > 3 and mask_id >= 0, got {vocab_size}, {mask_id}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    single = ids.dim() == 1
    ids_cpu = ids.cpu()[None] if single else ids.cpu()
    batch = ids_cpu.shape[0]
    lengths = torch.as_tensor(length, dtype=torch.long).cpu().reshape(-1)
    positions = torch.as_tensor(word_positions, dtype=torch.long).cpu()
    if lengths.shape != (batch,):
        raise ValueError(f"length must be a scalar for ids (T,) or have shape ({batch},) for "
                         f"ids (B, T), got {tuple(lengths.shape)}")
    positions = positions.reshape(1, -1) if single else positions
    if positions.shape != (batch, 2):
        raise ValueError(f"word_positions must have shape {'(2,)' if single else (batch, 2)}, "
                         f"got {tuple(torch.as_tensor(word_positions).shape)}")
    masked, labels = _mask_batch(ids_cpu, lengths, positions, mask_id, vocab_size, generator,
                                 ratio)
    if single:
        masked, labels = masked[0], labels[0]
    return masked.to(ids.device), labels.to(ids.device)


def mask_image(boxes: torch.Tensor, grid: int, generator: torch.Generator | None = None,
               outside_ratio: float = 0.35, inside_ratio: float = 0.75) -> torch.Tensor:
    """Referring-aware dynamic image masking. boxes: (B, 4) normalised cx, cy, w, h.
    Returns (B, grid * grid) bool, True = masked. Noise is drawn from ``generator``."""
    noise = ops.draw_mask_noise(boxes.shape[0], grid, generator, device=boxes.device)
    return ops.referring_mask(boxes, noise.to(boxes.dtype), grid, outside_ratio, inside_ratio)


def random_mask_like(mask: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """(B, L) bool: per sample as many masked patches as ``mask`` has, chosen uniformly at
    random (drawn from ``generator``): random masking at the referring mask's ratio."""
    scores = torch.rand(mask.shape, generator=generator,
                        device=generator.device if generator is not None else "cpu")
    rank = scores.to(mask.device).argsort(dim=1).argsort(dim=1)
    return rank < mask.sum(dim=1, keepdim=True)
