"""RefShapes scenes: coloured shapes placed without overlap, drawn with PIL.

A scene is a list of :class:`Shape` (kind, colour, size class, pixel box) on an S x S canvas.
Sizes are given for a 128-pixel canvas and scaled with S, so shapes stay large relative to
a 16-pixel patch (about 22 / 32 / 44 px at S = 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["KINDS", "COLOURS", "SIZES", "Shape", "sample_scene", "render_scene", "render_mask"]

KINDS = ("circle", "square", "triangle", "diamond")
# Base RGB per colour name; each shape gets a small per-channel jitter on top.
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 205, 35),
    "purple": (140, 55, 175),
}
# Size class -> nominal extent (px) on a 128-pixel canvas. Classes are ~1.4x apart.
SIZES = {"small": 22, "medium": 32, "large": 44}
SIZE_ORDER = ("small", "medium", "large")
_COLOUR_NAMES = tuple(COLOURS)
_SIZE_JITTER = 2      # +- px (at 128) around the nominal extent
_GAP = 3              # minimum empty pixels between two shapes' boxes (at 128)
_COLOUR_JITTER = 18   # +- per RGB channel


@dataclass(frozen=True)
class Shape:
    """One shape: ``box`` is (x1, y1, x2, y2) in pixels, exclusive on the right/bottom."""

    kind: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]

    @property
    def cx(self) -> float:
        return 0.5 * (self.box[0] + self.box[2])

    @property
    def cy(self) -> float:
        return 0.5 * (self.box[1] + self.box[3])

    @property
    def size_rank(self) -> int:
        return SIZE_ORDER.index(self.size)


def _place(extents: list[int], img_size: int, rng: np.random.Generator,
           tries: int = 40) -> list[tuple[int, int, int, int] | None]:
    """Non-overlapping square boxes for the given extents (largest first); None if no room."""
    gap = max(1, round(_GAP * img_size / 128))
    order = np.argsort([-e for e in extents], kind="stable")
    placed: list[tuple[int, int, int, int]] = []
    boxes: list[tuple[int, int, int, int] | None] = [None] * len(extents)
    for i in order:
        ext = extents[i]
        limit = img_size - ext
        if limit < 0:
            continue
        xs = rng.integers(0, limit + 1, size=tries)
        ys = rng.integers(0, limit + 1, size=tries)
        for x, y in zip(xs.tolist(), ys.tolist()):
            box = (x, y, x + ext, y + ext)
            if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap
                   or b[1] >= box[3] + gap for b in placed):
                placed.append(box)
                boxes[i] = box
                break
    return boxes


def sample_scene(rng: np.random.Generator, img_size: int = 128, min_shapes: int = 3,
                 max_shapes: int = 6) -> list[Shape]:
    """Draw a scene of ``min_shapes..max_shapes`` shapes.

    Each scene uses a restricted palette (2-3 colours, 2-3 kinds) so shapes share
    attributes: a single attribute rarely identifies the referent on its own.
    """
    while True:
        count = int(rng.integers(min_shapes, max_shapes + 1))
        colours = rng.permutation(len(_COLOUR_NAMES))[: int(rng.integers(2, 4))].tolist()
        kinds = rng.permutation(len(KINDS))[: int(rng.integers(2, 4))].tolist()
        # One vectorised draw per scene (python-level draws dominate the cost otherwise).
        picks = rng.integers(0, 1 << 30, size=(count, 4)).tolist()
        rgb_jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=(count, 3)).tolist()
        specs = []
        for (c, k, z, j), dj in zip(picks, rgb_jitter):
            colour = _COLOUR_NAMES[colours[c % len(colours)]]
            kind = KINDS[kinds[k % len(kinds)]]
            size = SIZE_ORDER[z % 3]
            jitter = j % (2 * _SIZE_JITTER + 1) - _SIZE_JITTER
            extent = max(4, round((SIZES[size] + jitter) * img_size / 128))
            rgb = tuple(min(255, max(0, b + d)) for b, d in zip(COLOURS[colour], dj))
            specs.append((kind, colour, size, extent, rgb))
        boxes = _place([s[3] for s in specs], img_size, rng)
        shapes = [Shape(kind, colour, size, box, rgb)
                  for (kind, colour, size, _, rgb), box in zip(specs, boxes) if box is not None]
        if len(shapes) >= min_shapes:
            return shapes


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x1, y1, x2, y2 = shape.box
    # PIL boxes are inclusive: the last pixel column/row is x2 - 1 / y2 - 1.
    r, b = x2 - 1, y2 - 1
    if shape.kind == "circle":
        draw.ellipse((x1, y1, r, b), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x1, y1, r, b), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x1, b), (r, b), ((x1 + r) / 2, y1)], fill=fill)
    elif shape.kind == "diamond":
        mx, my = (x1 + r) / 2, (y1 + b) / 2
        draw.polygon([(mx, y1), (r, my), (mx, b), (x1, my)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; known: {KINDS}")


def render_scene(shapes: list[Shape], img_size: int, background: tuple[int, int, int]
                 ) -> Image.Image:
    """RGB PIL image (img_size x img_size) of the scene."""
    image = Image.new("RGB", (img_size, img_size), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw(draw, shape, shape.rgb)
    return image


def render_mask(shape: Shape, img_size: int) -> np.ndarray:
    """(img_size, img_size) uint8 {0, 1}: the exact pixels of ``shape`` (drawn alone, so the
    mask equals the shape's pixels in the scene: shapes never overlap)."""
    mask = Image.new("L", (img_size, img_size), 0)
    _draw(ImageDraw.Draw(mask), shape, 1)
    return np.asarray(mask, dtype=np.uint8)
