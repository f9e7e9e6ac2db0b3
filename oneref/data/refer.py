"""Real referring data (RefCOCO family, ReferIt, Flickr30k) as samples of the Data contract.

    ds = ReferringDataset.from_split_file("data/unc_val.pth", image_root="coco/train2014",
                                          tokenizer=Tokenizer("beit3.spm"), img_size=384)
    ds = ReferringDataset.from_refer("refer/data", "refcoco", "testA", image_root=...,
                                     tokenizer=tok)

Images are checked when the dataset is built (header only: missing or unreadable files and
boxes outside the image are reported with the record, or skipped and counted with
``on_error="skip"``; with ``use_masks``, a segmentation that covers no pixel of its image, or
none of its box's area, is dropped with a warning and the rasterised box stands in). An
image that fails to decode later (a truncated file passes the header check) raises an error
naming the split, the record and the file, or, with ``on_error="skip"``, is logged once and
replaced by the next record that loads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from oneref.data.collate import make_sample, unpack_index
from oneref.data.parsing import subject_object_words
from oneref.data.records import (ErrorPolicy, RecordError, RefRecord, check_box_inside,
                                 check_sts_labels)
from oneref.data.refer_toolkit import load_refer
from oneref.data.splitfiles import load_split_file
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import Example, TestTransform

__all__ = ["ReferringDataset", "decode_segmentation", "image_size"]

log = logging.getLogger(__name__)


def _segmentation_rle(record: RefRecord, height: int, width: int) -> dict | None:
    """The record's polygons or RLE as one compressed COCO RLE, None if neither."""
    if record.polygons is None and record.rle is None:
        return None
    from pycocotools import mask as mask_utils

    if record.polygons is not None:
        return mask_utils.merge(mask_utils.frPyObjects(record.polygons, height, width))
    rle = record.rle
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(rle, *rle["size"])
    if isinstance(rle.get("counts"), str):
        return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return rle


def _segmentation_problem(record: RefRecord, height: int, width: int
                          ) -> tuple[str, str] | None:
    """Why the record's segmentation cannot stand for its referent in a ``width`` x
    ``height`` image, as (``"empty"`` or ``"apart"``, reason): it covers no pixel, or its
    extent shares no area with the record's box (the two name different objects). None when
    it is usable (or there is none). Run-length only: no mask is decoded."""
    rle = _segmentation_rle(record, height, width)
    if rle is None:
        return None
    from pycocotools import mask as mask_utils

    if mask_utils.area(rle) == 0:
        if record.polygons is not None:
            return "empty", f"its polygons lie outside the {width}x{height} image"
        return "empty", "its RLE covers no pixel"
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    x1, y1, x2, y2 = record.box
    if x >= x2 or x + w <= x1 or y >= y2 or y + h <= y1:
        extent = [round(v, 1) for v in (x, y, x + w, y + h)]
        return "apart", (f"its segmentation (extent x1y1x2y2 {extent}) does not overlap its "
                         f"box {[round(float(v), 1) for v in record.box]}")
    return None


def decode_segmentation(record: RefRecord, height: int, width: int) -> np.ndarray | None:
    """(H, W) uint8 mask from the record's polygons or RLE (pycocotools), None if neither."""
    rle = _segmentation_rle(record, height, width)
    if rle is None:
        return None
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        # pycocotools' decoder trips numpy 2's copy-keyword deprecation; nothing to act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_utils.decode(rle)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != (height, width):
        raise ValueError(f"{record.where}: segmentation is {mask.shape[1]}x{mask.shape[0]} but "
                         f"the image is {width}x{height}")
    return mask.astype(np.uint8)


def _open_image(path: str) -> Image.Image:
    """The image file opened, its header read; ValueError naming the file when it is missing
    or unreadable."""
    if not os.path.isfile(path):
        raise ValueError(f"image file {path!r} does not exist")
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image file {path!r}: {err}") from err


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header; ValueError naming the file."""
    with _open_image(path) as image:
        return image.size


def _read_rgb(path: str) -> Image.Image:
    """The decoded RGB image; ValueError naming the file and saying whether it is missing,
    unreadable or truncated/corrupt (the header can be fine while the pixel data is not)."""
    with _open_image(path) as handle:
        try:
            return handle.convert("RGB")
        except (OSError, SyntaxError, EOFError, ValueError) as err:
            raise ValueError(f"image file {path!r} is truncated or corrupt: {err}") from None


class ReferringDataset(Dataset):
    """Samples (Data contract dict) from :class:`RefRecord` lists.

    Args:
        records: parsed records (see :func:`load_split_file`, :func:`load_refer`).
        image_root: folder of the images, or a dict {source: folder} for mixed files
            ("coco", "referit", "flickr").
        tokenizer: a :class:`Tokenizer`.
        img_size: S; max_text_len: T.
        transform: ``transform(Example, rng) -> Transformed``; default the test pipeline.
        mask_root: folder of per-sample mask files (older TransVG files), optional.
        use_masks: decode segmentations (else the box is rasterised as the mask).
        parse_words: subject/object words from spaCy when installed (else -1).
        check_images: read every image header now (missing/corrupt files, boxes outside;
            with ``use_masks``, segmentations covering no pixel, or none of their box, are
            dropped with a warning).
        on_error: "raise" or "skip" for records failing those checks, and for records whose
            files fail to load later: "skip" logs each such file once and returns the next
            record that loads instead (indices kept per process in ``unloadable``).
        seed: seeds the per-sample augmentation stream (with the index and epoch).
        sts_labels: samples carry ``sts_targets`` (T,) from each record's 6th element (STS
            labels, one per token; every record must have them).
        stand_in: with "skip", a record failing to load is replaced by the next one (a
            training set); False raises instead (an evaluation set, where the stand-in would
            be scored twice).
    """

    def __init__(self, records: list[RefRecord], image_root, tokenizer: Tokenizer,
                 img_size: int = 384, max_text_len: int = 64, transform=None,
                 mask_root: str | None = None, use_masks: bool = True,
                 parse_words: bool = True, check_images: bool = True,
                 on_error: str = "raise", seed: int = 0, name: str = "dataset",
                 sts_labels: bool = False, stand_in: bool = True):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a oneref Tokenizer, got {type(tokenizer).__name__}")
        self.image_root = image_root
        self.tokenizer = tokenizer
        self.img_size = img_size
        self.max_text_len = max_text_len
        self.transform = transform if transform is not None else TestTransform(img_size)
        self.mask_root = mask_root
        self.use_masks = use_masks
        self.parse_words = parse_words
        self.seed = seed
        self.epoch = 0
        self.name = name
        self.on_error = on_error
        self.stand_in = stand_in
        policy = ErrorPolicy(on_error, name)
        self.records = self._check(records, policy) if check_images else list(records)
        self.unloadable: dict[int, str] = {}
        self._warned_files: set[str] = set()
        if not self.records:
            raise ValueError(f"{name}: no usable records")
        self.sts_labels = sts_labels
        if sts_labels:
            check_sts_labels(self.records, name)

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_split_file(cls, path, image_root, tokenizer: Tokenizer, dataset: str | None = None,
                        box_format: str | None = None, on_error: str = "raise", **kwargs):
        """From a ``{dataset}_{split}.pth`` file (see :mod:`oneref.data.splitfiles`)."""
        records = load_split_file(path, dataset=dataset, box_format=box_format,
                                  on_error=on_error)
        return cls(records, image_root, tokenizer, on_error=on_error, name=os.fspath(path),
                   **kwargs)

    @classmethod
    def from_refer(cls, root, dataset: str, split: str, image_root, tokenizer: Tokenizer,
                   split_by: str | None = None, on_error: str = "raise", **kwargs):
        """From the refer-toolkit layout (see :mod:`oneref.data.refer_toolkit`)."""
        records = load_refer(root, dataset, split, split_by=split_by, on_error=on_error)
        return cls(records, image_root, tokenizer, on_error=on_error,
                   name=f"{os.fspath(root)}/{dataset}", **kwargs)

    def image_path(self, record: RefRecord) -> str:
        root = self.image_root
        if isinstance(root, dict):
            if record.source not in root:
                raise ValueError(f"{record.where}: no image root for source {record.source!r}; "
                                 f"image_root has {sorted(root)}")
            root = root[record.source]
        return os.path.join(os.fspath(root), record.image_file)

    def _check(self, records, policy: ErrorPolicy) -> list[RefRecord]:
        sizes: dict[str, tuple[int, int] | str] = {}
        kept = []
        unusable: dict[str, list[str]] = {"empty": [], "apart": []}
        other_size = []
        for index, record in enumerate(records):
            try:
                path = self.image_path(record)
                if path not in sizes:
                    try:
                        sizes[path] = image_size(path)
                    except ValueError as err:
                        sizes[path] = str(err)
                size = sizes[path]
                if isinstance(size, str):
                    raise ValueError(size)
                if record.size is not None and tuple(record.size) != size[::-1]:
                    other_size.append(f"{record.where or f'record {index}'}: recorded "
                                      f"{record.size[1]}x{record.size[0]}, {path} is "
                                      f"{size[0]}x{size[1]}")
                record.box = check_box_inside(record.box, *size)
                if self.use_masks and record.rle is not None and (
                        list(record.rle["size"]) != [size[1], size[0]]):
                    raise ValueError(f"RLE segmentation of size {list(record.rle['size'])} "
                                     f"(height, width), but {path} is {size[0]}x{size[1]}")
                problem = (_segmentation_problem(record, size[1], size[0]) if self.use_masks
                           else None)
            except ValueError as err:
                policy.fail(record.where or f"record {index}", str(err))
                continue
            if problem:
                kind, why = problem
                unusable[kind].append(f"{record.where or f'record {index}'}: {why}")
                record = dataclasses.replace(record, polygons=None, rle=None)
            kept.append(record)
        policy.report()
        for kind, what in (("empty", "an empty segmentation mask"),
                           ("apart", "a segmentation apart from their box (the two name "
                                     "different objects)")):
            if unusable[kind]:
                log.warning("%s: %d record(s) have %s; their rasterised box stands in; "
                            "first: %s", policy.source, len(unusable[kind]), what,
                            unusable[kind][0])
        if other_size:
            log.warning("%s: %d record(s) give an image size other than their file's; their "
                        "boxes and masks are in the recorded image's pixels, so a resized "
                        "image folder misplaces them (use the original images); first: %s",
                        policy.source, len(other_size), other_size[0])
        return kept

    # ---- samples ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _load_from(self, index: int) -> tuple[int, Example]:
        """(index, example) of record ``index``. A record that fails to load raises a
        :class:`RecordError` naming the dataset, the record and the file; with
        ``on_error="skip"`` it is remembered in ``unloadable`` and the next record (wrapping
        around) that loads is returned instead, the same one in every process."""
        size = len(self.records)
        for candidate in ((index + step) % size for step in range(size)):
            if candidate in self.unloadable:
                continue
            try:
                return candidate, self._load(self.records[candidate])
            except ValueError as err:
                message = f"{self.name}: {err}"
                if self.on_error == "raise":
                    raise RecordError(message) from None
                if not self.stand_in:
                    raise RecordError(f"{message} (an evaluation set does not skip at load "
                                      "time: a stand-in would be scored twice; fix or remove "
                                      "the file)") from None
                self._skip(candidate, message)
        first = self.unloadable[min(self.unloadable)]
        raise RecordError(f"{self.name}: none of the {size} records loads; first: {first}")

    def _skip(self, index: int, message: str) -> None:
        """Count record ``index`` as unloadable; warn once per image file."""
        self.unloadable[index] = message
        path = self.image_path(self.records[index])
        if path not in self._warned_files:
            self._warned_files.add(path)
            log.warning("%s; skipped with on_error=skip, the next record that loads stands "
                        "in (%d record(s) skipped while loading in this process)", message,
                        len(self.unloadable))

    def _load(self, record: RefRecord) -> Example:
        path = self.image_path(record)
        try:
            image = _read_rgb(path)
        except ValueError as err:
            raise ValueError(f"{record.where}: {err}") from None
        width, height = image.size
        try:
            box = np.array(check_box_inside(record.box, width, height), dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"{record.where}: {err} ({path})") from None
        mask = None
        if self.use_masks:
            mask = decode_segmentation(record, height, width)
            if mask is None and record.mask_file and self.mask_root is not None:
                mask = self._mask_file(record, width, height)
        return Example(image, box, mask, record.phrase)

    def _mask_file(self, record: RefRecord, width: int, height: int) -> np.ndarray:
        path = os.path.join(self.mask_root, record.mask_file)
        try:
            with Image.open(path) as handle:
                mask = (np.asarray(handle.convert("L")) > 0).astype(np.uint8)
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{record.where}: cannot read mask file {path!r}: {err}") from err
        if mask.shape != (height, width):
            raise ValueError(f"{record.where}: mask file {path!r} is {mask.shape[1]}x"
                             f"{mask.shape[0]}, image is {width}x{height}")
        return mask

    def __getitem__(self, item) -> dict:
        """Sample ``item``: an index, or an ``(index, epoch)`` pair (the augmentation epoch).
        With ``on_error="skip"``, a record that fails to load gives the sample of the next
        one that loads (its ``index`` says which)."""
        index, epoch = unpack_index(item, self.epoch)
        size = len(self.records)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a ReferringDataset of size {size}")
        index %= size  # a negative index would be an invalid seed for the random draws
        index, example = self._load_from(index)
        record = self.records[index]
        rng = np.random.default_rng([self.seed, index, epoch])
        out = self.transform(example, rng)
        words = subject_object_words(out.text) if self.parse_words else (-1, -1)
        sample = make_sample(out, self.tokenizer, self.max_text_len, words, index)
        if self.sts_labels:
            sample["sts_targets"] = self._sts_targets(record, int(sample["text_length"]))
        return sample

    def _sts_targets(self, record: RefRecord, length: int) -> torch.Tensor:
        """The record's STS labels, one per token, zero-padded to ``max_text_len``."""
        values = torch.as_tensor(np.asarray(record.extra, dtype=np.float32))
        if len(values) != length:
            raise ValueError(f"{record.where}: {len(values)} STS labels for an expression of "
                             f"{length} tokens: they were made with another tokenizer or text "
                             f"length (remake them with oneref sts-labels)")
        labels = torch.zeros(self.max_text_len)
        labels[:length] = values
        return labels
