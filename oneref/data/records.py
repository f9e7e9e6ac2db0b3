"""Parsed referring records and the checks shared by the real-data readers.

A :class:`RefRecord` is one (image, box, expression[, segmentation]) sample in a common form:
box x1, y1, x2, y2 in pixels of the original image. Readers report every malformed record
through an :class:`ErrorPolicy`: ``"raise"`` (default) raises ``ValueError`` naming the file,
the record index and the problem; ``"skip"`` drops the record, counts it and logs the count.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RefRecord", "ErrorPolicy", "RecordError", "parse_box", "check_polygons",
           "check_segmentation", "check_phrase", "check_box_inside", "check_sts_labels",
           "is_whole_number", "own_message"]

log = logging.getLogger(__name__)


class RecordError(ValueError):
    """A malformed record; the message names the file, the record and the problem."""


def own_message(exc: BaseException) -> str:
    """The error's message; one a DataLoader worker raised comes back holding the worker's
    traceback, of which the last line is the error itself."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]  # "module.ErrorType: message"
    return last.split(": ", 1)[1] if ": " in last else last


@dataclass
class RefRecord:
    """One referring sample.

    image_file: path relative to the image root (or absolute); box: (x1, y1, x2, y2) pixels;
    phrase: the expression; source: image collection ("coco", "referit", "flickr", "own"
    for annotation files); polygons: COCO polygons [[x, y, x, y, ...], ...] or None; rle:
    COCO RLE dict or None; mask_file: per-sample mask image (older TransVG files) or None;
    size: (height, width) when the file states it; extra: the STS labels (a split file's 6th
    tuple element, an annotation line's ``sts``) kept as they are; where: "file[index]" or
    "file:line" for messages; meta: what else the file says of the record (refer-toolkit
    ids, an annotation line's other keys).
    """

    image_file: str
    box: tuple[float, float, float, float]
    phrase: str
    source: str = "coco"
    polygons: list | None = None
    rle: dict | None = None
    mask_file: str | None = None
    size: tuple[int, int] | None = None
    extra: Any = None
    where: str = ""
    meta: dict = field(default_factory=dict)


class ErrorPolicy:
    """Raise on the first malformed record, or skip and count (``on_error="skip"``)."""

    def __init__(self, on_error: str, source: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.source = source
        self.skipped = 0
        self.first: str | None = None

    def fail(self, where: str, problem: str) -> None:
        """Raise (policy "raise") or count the record at ``where`` as skipped."""
        name = os.path.basename(self.source)  # "file:line" / "file[index]": the path once
        place = (f"{self.source}{where[len(name):]}" if name and where.startswith(name)
                 else f"{self.source}: {where}")
        message = f"{place}: {problem}"
        if self.on_error == "raise":
            raise RecordError(message)
        self.skipped += 1
        if self.first is None:
            self.first = f"{where}: {problem}"

    def report(self) -> None:
        if self.skipped:
            log.warning("%s: skipped %d malformed record(s); first: %s", self.source,
                        self.skipped, self.first)


def parse_box(value, box_format: str) -> tuple[float, float, float, float]:
    """4 finite numbers in ``box_format`` ("xywh" or "xyxy") -> (x1, y1, x2, y2).
    Raises ValueError describing the problem."""
    if isinstance(value, (list, tuple)) and any(isinstance(v, (str, bytes, bool))
                                                for v in value):
        raise ValueError(f"box {value!r} is not 4 numbers")
    try:
        arr = np.asarray(value.tolist() if hasattr(value, "tolist") else value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"box {value!r} is not 4 numbers") from None
    if arr.shape != (4,):
        raise ValueError(f"box {value!r} is not 4 numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"box {arr.tolist()} has a non-finite value")
    x1, y1, a, b = arr.tolist()
    x2, y2 = (x1 + a, y1 + b) if box_format == "xywh" else (a, b)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {arr.tolist()} ({box_format}) has no area")
    return (x1, y1, x2, y2)


def check_box_inside(box, width: int, height: int, tolerance: float = 1.0):
    """The box clipped to the image when it overshoots by at most ``tolerance`` pixels;
    ValueError when it lies further outside."""
    x1, y1, x2, y2 = box
    over = max(-x1, -y1, x2 - width, y2 - height)
    if over > tolerance:
        raise ValueError(f"box x1y1x2y2 {[round(v, 2) for v in box]} is outside the "
                         f"{width}x{height} image by {over:.4g} px (up to {tolerance:g} px is "
                         f"clipped)")
    return (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))


def check_phrase(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expression must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("empty expression")
    return value.strip()


def check_polygons(value) -> list | None:
    """COCO polygons: a list of flat [x, y, ...] lists with >= 3 points each (empty -> None)."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"polygons must be a list of coordinate lists, got "
                         f"{type(value).__name__}")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError("polygons must be a list of coordinate lists [[x, y, x, y, ...], "
                         "...], got one flat list of numbers (wrap it in a list)")
    out = []
    for k, poly in enumerate(value):
        try:
            coords = [float(v) for v in poly]
        except (TypeError, ValueError):
            raise ValueError(f"polygon {k} is not a list of numbers") from None
        if len(coords) < 6 or len(coords) % 2:
            raise ValueError(f"polygon {k} has {len(coords)} coordinates; need an even "
                             f"number >= 6")
        if not all(math.isfinite(c) for c in coords):
            raise ValueError(f"polygon {k} has a non-finite coordinate")
        out.append(coords)
    return out


def check_segmentation(value) -> tuple[list | None, dict | None]:
    """(polygons, rle) of a COCO segmentation field: polygons (see :func:`check_polygons`)
    or an RLE dict with ``counts`` (compressed string, or run lengths that cover the mask)
    and ``size``. A compressed string is decoded when the mask is first used."""
    if isinstance(value, dict):
        if "counts" not in value or "size" not in value:
            raise ValueError("RLE segmentation needs 'counts' and 'size'")
        size, counts = value["size"], value["counts"]
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(is_whole_number(v) and v > 0 for v in size)):
            raise ValueError(f"RLE size {size!r} is not [height, width] in pixels")
        size = [int(v) for v in size]
        value = {**value, "size": size}
        if isinstance(counts, (str, bytes)):
            runs = _compressed_runs(counts.decode("latin-1") if isinstance(counts, bytes)
                                    else counts)
        elif isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                raise ValueError("RLE counts must be non-negative whole run lengths")
            runs = counts
        else:
            raise ValueError(f"RLE counts must be a string (compressed) or a list of run "
                             f"lengths, got {type(counts).__name__}")
        if sum(runs) != size[0] * size[1]:
            raise ValueError(f"RLE run lengths add up to {sum(runs)} pixels, not the "
                             f"{size[0]} x {size[1]} = {size[0] * size[1]} of its size")
        return None, value
    return check_polygons(value), None


def _compressed_runs(counts: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string: each number in 5-bit groups, least
    significant first, as characters 48 + group (+ 32 when another group follows; the last
    group's bit 16 is the sign), each number after the second a difference to the number
    two before it. ValueError for a string that is not one."""
    runs, position = [], 0
    while position < len(counts):
        number, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError("RLE counts string ends inside a number")
            group = ord(counts[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"RLE counts string has {counts[position]!r}, not a "
                                 f"compressed RLE character")
            number |= (group & 0x1F) << shift
            more, position, shift = bool(group & 0x20), position + 1, shift + 5
            if not more and group & 0x10:
                number |= -1 << shift
        if len(runs) > 2:
            number += runs[-2]
        if number < 0:
            raise ValueError("RLE counts string decodes to a negative run length")
        runs.append(number)
    return runs


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_whole_number(value) -> bool:
    """An int, or a float with no fraction (480.0); not a bool."""
    return _is_int(value) or (isinstance(value, (float, np.floating))
                              and float(value).is_integer())


def check_sts_labels(records, where: str) -> None:
    """Every record carries STS labels as its 6th element, or under ``sts`` in an annotation
    file (a non-empty 1-D sequence of finite numbers, one per token: list, tuple or numpy
    array), or a ValueError names the first record that does not."""
    for record in records:
        values = record.extra
        field, root = (("'sts'", "--annotations") if record.source == "own" else
                       ("6th element", "--split-root"))
        if values is None:
            problem = f"has no {field} (STS labels)"
        else:
            try:
                array = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                array = None
            if array is None or array.ndim != 1 or array.size == 0 or isinstance(values, str):
                problem = f"has a {field} {values!r:.40}, not a non-empty list of numbers"
            elif not np.isfinite(array).all():
                problem = "has STS labels that are not finite numbers"
            else:
                continue
        raise ValueError(f"{record.where or where}: {problem}; make them with oneref "
                         f"sts-labels --teacher RUN {root} DATA --out DIR and train with "
                         f"{root} DIR")
