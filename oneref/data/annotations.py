"""Your own referring data: one JSON Lines file per split (docs/data.md, "Your own data").

    ANNOTATIONS/train.jsonl   ANNOTATIONS/val.jsonl   ANNOTATIONS/test.jsonl ...

Each line is one object, one expression of one object::

    {"image": "kitchen/0001.jpg", "box": [41, 96, 120, 88], "text": "the red mug"}

``image`` is relative to the image root (``--data-root``) or absolute; ``box`` is the
object in the image's pixels as COCO writes it, x, y, width, height (or ``box_xyxy``:
x1, y1, x2, y2). Optional: ``segmentation`` (COCO polygons or RLE), ``height`` and
``width`` (compared with the image file) and ``sts`` (STS labels, as ``oneref sts-labels``
writes them). Other keys are kept in the record's ``meta`` and named once in a warning,
so a misspelt optional key is not dropped without a word.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path

from oneref.data.records import (ErrorPolicy, RefRecord, check_box_inside, check_phrase,
                                 check_segmentation, is_whole_number, parse_box)
from oneref.io import atomic_write

__all__ = ["SUFFIX", "KEYS", "annotation_splits", "load_annotations", "write_sts_annotations"]

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
#: The keys a line may have; others are kept in ``RefRecord.meta``.
KEYS = ("image", "box", "box_xyxy", "text", "segmentation", "height", "width", "sts")


def annotation_splits(folder: str | os.PathLike) -> tuple[str, ...]:
    """The splits of an annotations folder: the names of its ``*.jsonl`` files, sorted
    (hidden files, such as macOS's ``._train.jsonl``, left out)."""
    return tuple(sorted(name[:-len(SUFFIX)] for name in os.listdir(folder)
                        if name.endswith(SUFFIX) and len(name) > len(SUFFIX)
                        and not name.startswith(".")))


def _lines(path: str) -> list[bytes]:
    """The file's lines as bytes, split at line feeds and carriage returns only (a JSON
    string may hold other line separators), a UTF-8 byte-order mark dropped."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ValueError(f"cannot read annotation file {path!r}: {err.strerror}") from None
    return data.removeprefix(codecs.BOM_UTF8).splitlines()


def _size(item: dict) -> tuple[int, int] | None:
    if "height" not in item and "width" not in item:
        return None
    height, width = item.get("height"), item.get("width")
    if not all(is_whole_number(v) and v > 0 for v in (height, width)):
        raise ValueError(f"'height' and 'width' must both be positive whole numbers, got "
                         f"{height!r} and {width!r}")
    return int(height), int(width)


def _unread(item: dict) -> str:
    """"; keys not read: ..." for a line's keys outside :data:`KEYS` (a misspelt one)."""
    others = [repr(key) for key in item if key not in KEYS]
    return f"; keys not read: {', '.join(others)}" if others else ""


def _parse_line(item, where: str) -> RefRecord:
    if not isinstance(item, dict):
        raise ValueError(f"is a JSON {type(item).__name__}, expected an object")
    image = item.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError(f"'image' must be a non-empty file name, got {image!r}"
                         + _unread(item))
    boxes = [key for key in ("box", "box_xyxy") if key in item]
    if len(boxes) != 1:
        raise ValueError("needs exactly one of 'box' (x, y, width, height) and 'box_xyxy' "
                         "(x1, y1, x2, y2)" + (", not both" if boxes else "") + _unread(item))
    box = parse_box(item[boxes[0]], "xywh" if boxes[0] == "box" else "xyxy")
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise ValueError(f"{boxes[0]} {item[boxes[0]]} is under one pixel wide or tall; boxes "
                         f"are in the image's pixels, not normalised to [0, 1]")
    if "text" not in item:
        raise ValueError("has no 'text' (the referring expression)" + _unread(item))
    phrase = check_phrase(item["text"])
    size = _size(item)
    if size is not None:
        box = check_box_inside(box, size[1], size[0])
    polygons, rle = check_segmentation(item.get("segmentation"))
    meta = {key: value for key, value in item.items() if key not in KEYS}
    return RefRecord(image, box, phrase, source="own", polygons=polygons, rle=rle, size=size,
                     extra=item.get("sts"), where=where, meta=meta)


def load_annotations(path: str | os.PathLike, on_error: str = "raise") -> list[RefRecord]:
    """The records of one ``.jsonl`` split file, in line order (blank lines skipped).

    ``on_error``: "raise" (ValueError naming the file, the line and the problem) or "skip"
    (the line is counted and logged)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    policy = ErrorPolicy(on_error, path)
    records, unknown, seen, repeated = [], {}, {}, []
    for number, raw in enumerate(_lines(path), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw.decode("utf-8"))
            record = _parse_line(item, f"{name}:{number}")
        except ValueError as err:  # JSON and UTF-8 errors are ValueErrors too
            policy.fail(f"line {number}", str(err))
            continue
        for key in record.meta:
            unknown[key] = unknown.get(key, 0) + 1
        same = (record.image_file, record.box, record.phrase)
        if same in seen:
            repeated.append(f"line {number} repeats line {seen[same]}")
        seen.setdefault(same, number)
        records.append(record)
    policy.report()
    if repeated:
        log.warning("%s: %d line(s) repeat an earlier line's image, box and text (each is a "
                    "sample of its own, counted again in an evaluation); first: %s", path,
                    len(repeated), repeated[0])
    if unknown:
        counts = ", ".join(f"{key!r} ({n} of {len(records)} records)"
                           for key, n in unknown.items())
        log.warning("%s: keys that are not read (kept with the records): %s; the keys read "
                    "are %s", path, counts, ", ".join(KEYS))
    log.info("%s: %d records", path, len(records))
    return records


def write_sts_annotations(path: str | os.PathLike, out_root: str | os.PathLike,
                          labels: list[list[float]]) -> Path:
    """A copy of the annotation file ``path`` in the folder ``out_root`` whose lines carry
    ``labels`` (one row per record, in order) under ``sts``, written atomically."""
    path = os.fspath(path)
    lines = [line for line in _lines(path) if line.strip()]
    if len(lines) != len(labels):
        raise ValueError(f"{path}: {len(lines)} records but {len(labels)} label rows")
    target = os.path.join(os.fspath(out_root), os.path.basename(path))
    if os.path.realpath(target) == os.path.realpath(path):
        raise ValueError(f"--out would overwrite the input annotation file {path}; name "
                         f"another folder")
    out = []
    for line, values in zip(lines, labels):
        item = json.loads(line)
        item["sts"] = [float(v) for v in values]
        out.append(json.dumps(item, ensure_ascii=False))  # read back split at line ends only

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("\n".join(out) + "\n")

    return atomic_write(target, write)
