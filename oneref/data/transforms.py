"""Train and test pipelines of docs/method.md, "Fine-tuning recipe", applied jointly to image,
box, mask and text.

Input: an :class:`Example` (PIL RGB image, box x1y1x2y2 in pixels, optional uint8 mask,
expression). Output: a :class:`Transformed` whose image is ImageNet-normalised and
zero-padded to S x S, whose box is normalised (cx, cy, w, h) on that padded canvas and whose
mask is the segmentation (or the rasterised box when none is known) on the same canvas.

Sizes in docs/data.md are given for S = 384 and scale with S here (long sides
{384, 352, ..., 192} -> S * {12, 11, ..., 6} / 12; short sides {400, 500, 600} and crop
sizes 384..600 -> times S / 384).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Example", "Transformed", "TestTransform",
           "TrainTransform", "swap_left_right", "has_spatial_word", "box_to_mask"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (pixel / 255 - mean) / std as one multiply-add per value: (3, 1, 1) scale and shift.
_SCALE = (1.0 / (255.0 * np.array(IMAGENET_STD))).astype(np.float32)[:, None, None]
_SHIFT = (-np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)).astype(np.float32)[:, None, None]
_SPATIAL = ("left", "right", "top", "bottom", "middle")
_SWAP = re.compile(r"left|right")


@dataclass
class Example:
    """image: PIL RGB (W x H); box: (4,) float x1, y1, x2, y2 pixels; mask: (H, W) uint8 or
    None; text: the expression."""

    image: Image.Image
    box: np.ndarray
    mask: np.ndarray | None
    text: str


@dataclass
class Transformed:
    """image (3, S, S) float normalised; box (4,) float cx, cy, w, h in [0, 1];
    mask (S, S) float {0, 1}; has_mask: whether ``mask`` is a segmentation."""

    image: torch.Tensor
    box: torch.Tensor
    mask: torch.Tensor
    has_mask: bool
    text: str


def has_spatial_word(text: str) -> bool:
    """True when the phrase mentions left/right/top/bottom/middle (substring test, so
    "leftmost" counts): such phrases never take the crop branch."""
    lower = text.lower()
    return any(word in lower for word in _SPATIAL)


def swap_left_right(text: str) -> str:
    """"left" <-> "right" (also inside "leftmost"/"rightmost"), for a horizontal flip."""
    return _SWAP.sub(lambda m: "right" if m.group(0) == "left" else "left", text)


def box_to_mask(box, size: int) -> np.ndarray:
    """(size, size) uint8 mask of the pixels covered by box x1y1x2y2 (rounded)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    mask[max(y1, 0):max(min(y2, size), 0), max(x1, 0):max(min(x2, size), 0)] = 1
    return mask


def _resize(ex: Example, new_w: int, new_h: int) -> Example:
    w, h = ex.image.size
    new_w, new_h = max(1, new_w), max(1, new_h)
    if (new_w, new_h) == (w, h):
        return ex
    image = ex.image.resize((new_w, new_h), Image.BILINEAR)
    mask = None
    if ex.mask is not None:
        mask = np.asarray(Image.fromarray(ex.mask).resize((new_w, new_h), Image.NEAREST))
    scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h])
    return Example(image, ex.box * scale, mask, ex.text)


def _resize_long(ex: Example, long_side: int) -> Example:
    w, h = ex.image.size
    ratio = long_side / max(w, h)
    return _resize(ex, round(w * ratio), round(h * ratio))


def _resize_short(ex: Example, short_side: int) -> Example:
    w, h = ex.image.size
    ratio = short_side / min(w, h)
    return _resize(ex, round(w * ratio), round(h * ratio))


def _crop(ex: Example, left: int, top: int, width: int, height: int) -> Example:
    image = ex.image.crop((left, top, left + width, top + height))
    mask = None if ex.mask is None else ex.mask[top:top + height, left:left + width]
    box = ex.box - np.array([left, top, left, top], dtype=np.float64)
    return Example(image, box, mask, ex.text)


def _random_size_crop(ex: Example, rng: np.random.Generator, min_size: int, max_size: int,
                      tries: int = 20) -> Example:
    """A random crop (side lengths in [min_size, max_size]) that contains the whole box;
    the input unchanged when none of ``tries`` draws does."""
    w, h = ex.image.size
    x1, y1, x2, y2 = ex.box
    for _ in range(tries):
        cw = int(rng.integers(min(min_size, w), min(w, max_size) + 1))
        ch = int(rng.integers(min(min_size, h), min(h, max_size) + 1))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        if x1 >= left and y1 >= top and x2 <= left + cw and y2 <= top + ch:
            return _crop(ex, left, top, cw, ch)
    return ex


def _colour_jitter(image: Image.Image, rng: np.random.Generator, strengths) -> Image.Image:
    """Brightness, contrast, saturation factors in [1 - s, 1 + s], in random order."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i in rng.permutation(3).tolist():
        s = strengths[i]
        if s > 0:
            image = enhancers[i](image).enhance(float(rng.uniform(1 - s, 1 + s)))
    return image


def _flip(ex: Example) -> Example:
    w = ex.image.size[0]
    image = ex.image.transpose(Image.FLIP_LEFT_RIGHT)
    mask = None if ex.mask is None else np.ascontiguousarray(ex.mask[:, ::-1])
    x1, y1, x2, y2 = ex.box
    box = np.array([w - x2, y1, w - x1, y2], dtype=np.float64)
    return Example(image, box, mask, swap_left_right(ex.text))


def _finish(ex: Example, size: int, offset: tuple[int, int] | None,
            rng: np.random.Generator | None) -> Transformed:
    """Normalise, zero-pad to size x size (at ``offset``, random when None and rng given,
    else centred) and express the box on the padded canvas."""
    w, h = ex.image.size
    if w > size or h > size:
        raise ValueError(f"image of {w}x{h} does not fit the {size}x{size} canvas")
    if offset is None:
        if rng is not None:
            offset = (int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)))
        else:
            offset = ((size - w) // 2, (size - h) // 2)
    ox, oy = offset
    pixels = np.asarray(ex.image, dtype=np.uint8).transpose(2, 0, 1)
    # numpy throughout (small torch ops pay thread-pool overhead inside loader workers).
    image = np.zeros((3, size, size), dtype=np.float32)
    np.multiply(pixels, _SCALE, out=image[:, oy:oy + h, ox:ox + w])
    image[:, oy:oy + h, ox:ox + w] += _SHIFT
    box = np.asarray(ex.box, dtype=np.float64) + np.array([ox, oy, ox, oy])
    box = np.clip(box, 0, size)
    if ex.mask is not None:
        mask_np = np.zeros((size, size), dtype=np.uint8)
        mask_np[oy:oy + h, ox:ox + w] = ex.mask
        has_mask = True
    else:
        mask_np = box_to_mask(box, size)
        has_mask = False
    cxcywh = torch.tensor([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2,
                           box[2] - box[0], box[3] - box[1]], dtype=torch.float32) / size
    return Transformed(torch.from_numpy(image), cxcywh,
                       torch.from_numpy(mask_np.astype(np.float32)), has_mask, ex.text)


class TestTransform:
    """Resize the long side to S and pad centred (docs/method.md, "Fine-tuning recipe", test)."""

    __test__ = False  # not a pytest class despite the name

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size

    def __call__(self, ex: Example, rng: np.random.Generator | None = None) -> Transformed:
        return _finish(_resize_long(ex, self.size), self.size, None, None)


class TrainTransform:
    """docs/method.md, "Fine-tuning recipe" train pipeline.

    With probability ``crop_prob`` (0.5): resize the short side to one of ``short_sides``,
    crop a random region of side ``crop_range`` that contains the box, then resize the long
    side to one of ``long_sides``; otherwise only the long-side resize. Phrases with a
    spatial word always skip the crop. Then colour jitter (brightness/contrast/saturation
    ``jitter``, probability ``jitter_prob``), a horizontal flip with probability
    ``flip_prob`` (off by default; swaps left/right in the text), ImageNet normalisation and
    zero padding at a random offset (centred when ``random_pad`` is False).
    """

    def __init__(self, size: int, crop_prob: float = 0.5, long_sides=None, short_sides=None,
                 crop_range=None, jitter=(0.4, 0.4, 0.4), jitter_prob: float = 0.8,
                 flip_prob: float = 0.0, random_pad: bool = True):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        for name, p in (("crop_prob", crop_prob), ("jitter_prob", jitter_prob),
                        ("flip_prob", flip_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if len(jitter) != 3 or any(not 0 <= s < 1 for s in jitter):
            raise ValueError(f"jitter must be 3 strengths in [0, 1), got {jitter}")
        self.size = size
        self.crop_prob = crop_prob
        self.long_sides = tuple(long_sides) if long_sides is not None else tuple(
            round(size * k / 12) for k in range(12, 5, -1))
        if any(s > size or s <= 0 for s in self.long_sides):
            raise ValueError(f"long_sides must be in [1, {size}], got {self.long_sides}")
        self.short_sides = tuple(short_sides) if short_sides is not None else tuple(
            round(size * s / 384) for s in (400, 500, 600))
        self.crop_range = tuple(crop_range) if crop_range is not None else (
            size, round(size * 600 / 384))
        self.jitter = tuple(jitter)
        self.jitter_prob = jitter_prob
        self.flip_prob = flip_prob
        self.random_pad = random_pad

    def __call__(self, ex: Example, rng: np.random.Generator) -> Transformed:
        if rng.random() < self.crop_prob and not has_spatial_word(ex.text):
            ex = _resize_short(ex, int(rng.choice(self.short_sides)))
            ex = _random_size_crop(ex, rng, *self.crop_range)
        ex = _resize_long(ex, int(rng.choice(self.long_sides)))
        if rng.random() < self.jitter_prob:
            ex = Example(_colour_jitter(ex.image, rng, self.jitter), ex.box, ex.mask, ex.text)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            ex = _flip(ex)
        return _finish(ex, self.size, None, rng if self.random_pad else None)
