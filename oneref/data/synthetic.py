"""RefShapes: the built-in synthetic referring dataset (no downloads).

Every sample is a scene of 3-6 coloured shapes and one expression that resolves to exactly
one of them (checked by evaluating the expression against the scene). Sample ``i`` of a
split depends only on ``(seed, split, i)``, so splits are disjoint streams, any subset can be
generated in any order, and two processes see the same data.

    ds = RefShapes("train", size=20000, img_size=128, max_text_len=24)
    sample = ds[0]          # dict, see oneref.data (Data contract)
    ds.scene(0)             # Scene: all shapes (kind, colour, size, box), target, expression
    colour_guess_accuracy(RefShapes("test"))   # baseline: random shape of the mentioned colour
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from oneref.data.build_refshapes_spm import ASSET_PATH
from oneref.data.collate import make_sample, unpack_index
from oneref.data.grammar import CATEGORIES, Expression, make_expression
from oneref.data.shapes import Shape, render_mask, render_scene, sample_scene
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import Example, TestTransform, TrainTransform
from oneref.eval.metrics import RESAccumulator

__all__ = ["RefShapes", "Scene", "refshapes_tokenizer", "refshapes_train_transform",
           "colour_guess_accuracy", "colour_guess_masks", "DEFAULT_MIX", "DEFAULT_SIZES"]

log = logging.getLogger(__name__)

SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 20000, "val": 1000, "test": 1000}
# Share of each expression category. Relations need two shapes located and compared;
# superlatives need a comparison over a set; attributes need a conjunction of properties.
DEFAULT_MIX = {"attribute": 0.45, "superlative": 0.3, "relation": 0.25}
# Spatial comparisons closer than this (fraction of the canvas) are never asked about.
_MARGIN = 0.06


@functools.lru_cache(maxsize=None)
def refshapes_tokenizer() -> Tokenizer:
    """The word-level tokenizer of the RefShapes grammar (shipped ``assets/refshapes.model``;
    every id < 32, ``mask_id`` = 29)."""
    return Tokenizer(ASSET_PATH)


def refshapes_train_transform(img_size: int, flip_prob: float = 0.5) -> TrainTransform:
    """A light augmentation for RefShapes: no crop (shapes must stay whole), long side S or
    11/12 S (keeps the size classes apart) at a random pad offset, brightness/contrast
    jitter 0.3 without saturation (keeps colour names true), horizontal flip that swaps
    left/right in the text."""
    return TrainTransform(img_size, crop_prob=0.0,
                          long_sides=(img_size, round(img_size * 11 / 12)),
                          jitter=(0.3, 0.3, 0.0), jitter_prob=0.8, flip_prob=flip_prob,
                          random_pad=True)


@dataclass(frozen=True)
class Scene:
    """One RefShapes sample before drawing: shapes (kind, colour, size class, pixel box
    x1y1x2y2), the index of the referent, its expression and the background grey."""

    shapes: tuple[Shape, ...]
    target: int
    expression: Expression
    background: tuple[int, int, int]

    @property
    def text(self) -> str:
        return self.expression.text

    @property
    def category(self) -> str:
        return self.expression.category


class RefShapes(Dataset):
    """Synthetic referring dataset.

    Args:
        split: "train", "val" or "test".
        size: number of samples (default 20000 / 1000 / 1000).
        img_size: canvas side S (shapes scale with it).
        max_text_len: T, text ids are padded/truncated to it.
        seed: dataset seed; the split is mixed into every sample's random stream.
        tokenizer: default :func:`refshapes_tokenizer`.
        transform: called as ``transform(Example, rng)``, returns a ``Transformed``
            (see :mod:`oneref.data.transforms`); default: normalisation only. Random
            transforms draw from a stream seeded by (seed, split, index, epoch).
        mix: category weights, default :data:`DEFAULT_MIX`.

    Attributes:
        sts_labels: None, or the (size, max_text_len) STS labels of
            :func:`oneref.sts.load_refshapes_labels`; samples then carry row ``index`` as
            ``sts_targets``.
    """

    def __init__(self, split: str = "train", size: int | None = None, img_size: int = 128,
                 max_text_len: int = 24, seed: int = 0, tokenizer: Tokenizer | None = None,
                 transform=None, mix: dict | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        size = DEFAULT_SIZES[split] if size is None else size
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if img_size < 48:
            raise ValueError(f"img_size must be >= 48 for shapes to fit, got {img_size}")
        if max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3, got {max_text_len}")
        mix = dict(DEFAULT_MIX if mix is None else mix)
        unknown = sorted(set(mix) - set(CATEGORIES))
        if unknown or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix must map categories {CATEGORIES} to non-negative weights "
                             f"with a positive sum, got {mix}")
        self.split = split
        self.size = size
        self.img_size = img_size
        self.max_text_len = max_text_len
        self.seed = seed
        self.tokenizer = tokenizer if tokenizer is not None else refshapes_tokenizer()
        self.transform = transform if transform is not None else TestTransform(img_size)
        self.mix = mix
        self._categories = [c for c in CATEGORIES if mix.get(c, 0) > 0]
        weights = np.array([mix[c] for c in self._categories], dtype=np.float64)
        self._cum_weights = np.cumsum(weights / weights.sum())
        self.sts_labels: torch.Tensor | None = None
        self.epoch = 0
        self._scenes: dict[int, Scene] = {}

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Changes the random transform draws (not the scenes) for a new epoch."""
        self.epoch = int(epoch)

    def _check_index(self, index: int) -> int:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for RefShapes {self.split} of "
                             f"size {self.size}")
        return index % self.size

    def scene(self, index: int) -> Scene:
        """The scene of sample ``index`` (generated on first use, then cached)."""
        index = self._check_index(index)
        scene = self._scenes.get(index)
        if scene is None:
            scene = self._make_scene(index)
            self._scenes[index] = scene
        return scene

    def _make_scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        pick = int(np.searchsorted(self._cum_weights, rng.random(), side="right"))
        category = self._categories[min(pick, len(self._categories) - 1)]
        margin = _MARGIN * self.img_size
        for _ in range(1000):
            shapes = sample_scene(rng, self.img_size)
            found = make_expression(shapes, category, rng, margin)
            if found is not None:
                grey = int(rng.integers(200, 246))
                return Scene(tuple(shapes), found[0], found[1], (grey, grey, grey))
        raise RuntimeError(f"no {category} expression found for RefShapes sample {index}")

    def __getitem__(self, item) -> dict:
        """Sample ``item``: an index, or an ``(index, epoch)`` pair (the augmentation epoch)."""
        index, epoch = unpack_index(item, self.epoch)
        index = self._check_index(index)
        scene = self.scene(index)
        image = render_scene(list(scene.shapes), self.img_size, scene.background)
        mask = render_mask(scene.shapes[scene.target], self.img_size)
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, epoch, 1])
        out = self.transform(Example(image, box, mask, scene.text), rng)
        expr = scene.expression
        sample = make_sample(out, self.tokenizer, self.max_text_len,
                             [expr.subject_word, expr.object_word], index)
        if self.sts_labels is not None:
            sample["sts_targets"] = self.sts_labels[index]
        return sample


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _colour_guesses(dataset: RefShapes, seed: int):
    """Per sample: (scene, the candidate shapes of the expression's first mentioned colour
    (all shapes when none is mentioned), the index of the one a seeded random pick takes)."""
    if not isinstance(dataset, RefShapes):
        raise TypeError(f"dataset must be a RefShapes, got {type(dataset).__name__}")
    rng = np.random.default_rng(seed)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        colours = scene.expression.colour_mentions()
        pool = ([s for s in scene.shapes if s.colour == colours[0]] if colours
                else list(scene.shapes))
        yield scene, pool, int(rng.integers(len(pool)))


def colour_guess_accuracy(dataset: RefShapes, seed: int = 0, expected: bool = False) -> float:
    """Acc@0.5 of a baseline that picks a random shape of the expression's first mentioned
    colour (any shape when no colour is mentioned), on the same samples as ``dataset``.

    With ``expected=True`` the exact expectation over the random pick is returned instead of
    one seeded draw.
    """
    total = 0.0
    for scene, pool, pick in _colour_guesses(dataset, seed):
        target_box = scene.shapes[scene.target].box
        hits = [_iou(s.box, target_box) >= 0.5 for s in pool]
        total += sum(hits) / len(hits) if expected else float(hits[pick])
    return total / len(dataset)


def colour_guess_masks(dataset: RefShapes, seed: int = 0) -> dict[str, float]:
    """RES metrics (mIoU, oIoU, Prec@0.5..0.9) of the colour-guess baseline: the mask of the
    shape :func:`colour_guess_accuracy` picks against the referent's mask."""
    metrics = RESAccumulator()
    for scene, pool, pick in _colour_guesses(dataset, seed):
        guess = render_mask(pool[pick], dataset.img_size)
        target = render_mask(scene.shapes[scene.target], dataset.img_size)
        metrics.update(torch.tensor(guess)[None], torch.tensor(target)[None])
    return metrics.compute()
