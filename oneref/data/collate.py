"""Batching of sample dicts (the Data contract of the team notes)."""

from __future__ import annotations

import torch

__all__ = ["collate", "SAMPLE_KEYS"]

# sample key -> batch key
SAMPLE_KEYS = {
    "image": "images", "text_ids": "text_ids", "text_length": "text_lengths", "box": "boxes",
    "mask": "masks", "has_mask": "has_mask", "word_positions": "word_positions",
    "expression": "expressions", "index": "indices",
}


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch.

    Returns a dict: images (B, 3, S, S) float, text_ids (B, T) long, text_lengths (B,) long,
    boxes (B, 4) float cx, cy, w, h, masks (B, S, S) float, has_mask (B,) bool,
    word_positions (B, 2) long, expressions list[str], indices (B,) long.
    """
    if not samples:
        raise ValueError("collate needs at least one sample, got an empty list")
    missing = sorted(set(SAMPLE_KEYS) - set(samples[0]))
    if missing:
        raise ValueError(f"samples lack keys {missing}; a sample needs {sorted(SAMPLE_KEYS)}")
    batch = {
        "images": torch.stack([s["image"] for s in samples]),
        "text_ids": torch.stack([s["text_ids"] for s in samples]).long(),
        "text_lengths": torch.stack([torch.as_tensor(s["text_length"]) for s in samples]).long(),
        "boxes": torch.stack([s["box"] for s in samples]).float(),
        "masks": torch.stack([s["mask"] for s in samples]).float(),
        "has_mask": torch.tensor([bool(s["has_mask"]) for s in samples], dtype=torch.bool),
        "word_positions": torch.stack([torch.as_tensor(s["word_positions"])
                                       for s in samples]).long(),
        "expressions": [s["expression"] for s in samples],
        "indices": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
    }
    return batch
