"""OneRef / TransVG split files ``{dataset}_{split}.pth`` (docs/data.md).

A split file is a ``torch.save``-d list of tuples. Layouts read here:

=========================  ==========================================================
length 3                   ``(img_file, box, phrase)``                (Flickr30k)
length 4                   ``(img_file, second, box, phrase)``
length 5                   ``(img_file, second, box, phrase, fifth)``
length 6                   the same + an STS element (kept as ``RefRecord.extra``)
=========================  ==========================================================

``second`` decides the rest: a dict with "height"/"width" (COCO family; ``fifth`` are COCO
polygons), the source tag "referit" / "flickr" / "coco" (mixup files), or, in older TransVG
files, a mask file name (used when a mask root is given) or anything else (ignored).

Boxes are x1y1x2y2 for ``referit`` and ``flickr`` and xywh for ``unc``, ``unc+``, ``gref``,
``gref_umd`` and ``mixup`` (whatever the source tag).
"""

from __future__ import annotations

import logging
import os

from oneref.data.records import (ErrorPolicy, RefRecord, check_box_inside, check_phrase,
                                 check_polygons, parse_box)
from oneref.io import load_pth

__all__ = ["BOX_FORMATS", "load_split_file", "parse_split_name"]

log = logging.getLogger(__name__)

BOX_FORMATS = {"unc": "xywh", "unc+": "xywh", "gref": "xywh", "gref_umd": "xywh",
               "mixup": "xywh", "referit": "xyxy", "flickr": "xyxy"}
_SOURCE_TAGS = ("referit", "flickr", "coco")


def parse_split_name(path: str) -> tuple[str, str]:
    """``.../gref_umd_val.pth`` -> ("gref_umd", "val")."""
    stem = os.path.basename(os.fspath(path))
    if stem.endswith(".pth"):
        stem = stem[:-4]
    dataset, sep, split = stem.rpartition("_")
    if not sep or not dataset or not split:
        raise ValueError(f"split file name {os.fspath(path)!r} is not '{{dataset}}_{{split}}.pth'")
    return dataset, split


def _load_list(path: str, trust: bool) -> list:
    if not os.path.isfile(path):
        raise ValueError(f"split file {path!r} does not exist")
    data = load_pth(path, trust=trust, what="split file", hint="--trust-data")
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"split file {path!r} holds a {type(data).__name__}, expected a list "
                         f"of tuples")
    return list(data)


def _default_source(dataset: str) -> str:
    return dataset if dataset in ("referit", "flickr") else "coco"


def _parse_record(item, index: int, dataset: str, box_format: str, where: str) -> RefRecord:
    if not isinstance(item, (list, tuple)):
        raise ValueError(f"record is a {type(item).__name__}, expected a tuple")
    n = len(item)
    if n not in (3, 4, 5, 6):
        raise ValueError(f"tuple of length {n}; expected 3, 4, 5 or 6 fields")
    img_file = item[0]
    if not isinstance(img_file, str) or not img_file:
        raise ValueError(f"image file name must be a non-empty str, got {img_file!r}")
    record = RefRecord(img_file, (0.0, 0.0, 1.0, 1.0), "", source=_default_source(dataset),
                       where=where)
    if n == 3:
        box_value, phrase = item[1], item[2]
        second = fifth = None
    else:
        second, box_value, phrase = item[1], item[2], item[3]
        fifth = item[4] if n >= 5 else None
        if n == 6:
            record.extra = item[5]
    record.phrase = check_phrase(phrase)
    record.box = parse_box(box_value, box_format)
    if isinstance(second, dict):
        try:
            height, width = int(second["height"]), int(second["width"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"image-info dict {second!r} needs integer 'height' and "
                             f"'width'") from None
        if height <= 0 or width <= 0:
            raise ValueError(f"image size {width}x{height} is not positive")
        record.size = (height, width)
        record.source = "coco"
        record.polygons = check_polygons(fifth)
        record.box = check_box_inside(record.box, width, height)
    elif isinstance(second, str) and second in _SOURCE_TAGS:
        record.source = second
    elif isinstance(second, str) and second:
        record.mask_file = second
    return record


def load_split_file(path: str | os.PathLike, dataset: str | None = None,
                    box_format: str | None = None, on_error: str = "raise",
                    trust: bool = False) -> list[RefRecord]:
    """Records of one split file.

    Args:
        path: ``{dataset}_{split}.pth``.
        dataset: overrides the name taken from the file name (decides the box format).
        box_format: "xywh" or "xyxy"; default from the dataset (see :data:`BOX_FORMATS`).
        on_error: "raise" (ValueError naming file, index and problem) or "skip" (count, log).
        trust: unpickle any object in the file (it is read with ``weights_only`` and an
            allowlist of numpy types otherwise; see :func:`oneref.io.load_pth`).
    """
    path = os.fspath(path)
    if dataset is None:
        dataset = parse_split_name(path)[0]
    if box_format is None:
        if dataset not in BOX_FORMATS:
            raise ValueError(f"unknown dataset {dataset!r} for {path!r}: pass box_format="
                             f"'xywh' or 'xyxy' (known datasets: {sorted(BOX_FORMATS)})")
        box_format = BOX_FORMATS[dataset]
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    policy = ErrorPolicy(on_error, path)
    records = []
    for index, item in enumerate(_load_list(path, trust)):
        where = f"record {index}"
        try:
            records.append(_parse_record(item, index, dataset, box_format,
                                         f"{os.path.basename(path)}[{index}]"))
        except ValueError as err:
            policy.fail(where, str(err))
    policy.report()
    log.info("%s: %d records (%s boxes)", path, len(records), box_format)
    return records
