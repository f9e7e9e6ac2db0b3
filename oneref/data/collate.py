"""Batching of sample dicts (the sample layout of :mod:`oneref.data`)."""

from __future__ import annotations

import torch

__all__ = ["collate", "make_sample", "unpack_index", "SAMPLE_KEYS"]

# sample key -> batch key
SAMPLE_KEYS = {
    "image": "images", "text_ids": "text_ids", "text_length": "text_lengths", "box": "boxes",
    "mask": "masks", "has_mask": "has_mask", "word_positions": "word_positions",
    "expression": "expressions", "index": "indices",
}


def unpack_index(item, epoch: int) -> tuple[int, int]:
    """A dataset key: an index, or the ``(index, epoch)`` pair a training sampler yields
    (``epoch`` is the dataset's own for a bare index)."""
    if isinstance(item, tuple):
        index, epoch = item
        return int(index), int(epoch)
    return item, epoch


def make_sample(out, tokenizer, max_text_len: int, word_indices, index: int) -> dict:
    """The sample dict of one transformed example (see :mod:`oneref.data`).

    ``out``: a :class:`oneref.data.transforms.Transformed`; its text is tokenised with
    ``tokenizer`` (padded to ``max_text_len``) and ``word_indices`` (subject, object word
    indices of the text, -1 unknown) become token ``word_positions``.
    """
    text_ids, length = tokenizer.encode_padded(out.text, max_text_len)
    positions = tokenizer.word_positions(out.text, word_indices, max_text_len)
    return {
        "image": out.image,
        "text_ids": text_ids,
        "text_length": torch.tensor(length, dtype=torch.long),
        "box": out.box,
        "mask": out.mask,
        "has_mask": out.has_mask,
        "word_positions": torch.tensor(positions, dtype=torch.long),
        "expression": out.text,
        "index": index,
    }


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch.

    Returns a dict: images (B, 3, S, S) float, text_ids (B, T) long, text_lengths (B,) long,
    boxes (B, 4) float cx, cy, w, h, masks (B, S, S) float, has_mask (B,) bool,
    word_positions (B, 2) long, expressions list[str], indices (B,) long; and sts_targets
    (B, T) float when the samples carry STS labels.
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
    with_sts = ["sts_targets" in s for s in samples]
    if any(with_sts):
        if not all(with_sts):
            raise ValueError(f"sample {samples[with_sts.index(False)]['index']} has no "
                             f"'sts_targets' while others in its batch do")
        batch["sts_targets"] = torch.stack([s["sts_targets"] for s in samples]).float()
    return batch
