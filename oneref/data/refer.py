"""Real referring data (RefCOCO family, ReferIt, Flickr30k) as samples of the Data contract.

    ds = ReferringDataset.from_split_file("data/unc_val.pth", image_root="coco/train2014",
                                          tokenizer=Tokenizer("beit3.spm"), img_size=384)
    ds = ReferringDataset.from_refer("refer/data", "refcoco", "testA", image_root=...,
                                     tokenizer=tok)

Images are checked when the dataset is built (header only: missing or unreadable files and
boxes outside the image are reported with the record, or skipped and counted with
``on_error="skip"``); a file that breaks later raises an error naming it.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from oneref.data.collate import make_sample, unpack_index
from oneref.data.parsing import subject_object_words
from oneref.data.records import ErrorPolicy, RefRecord, check_box_inside, check_sts_labels
from oneref.data.refer_toolkit import load_refer
from oneref.data.splitfiles import load_split_file
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import Example, TestTransform

__all__ = ["ReferringDataset", "decode_segmentation"]

log = logging.getLogger(__name__)


def decode_segmentation(record: RefRecord, height: int, width: int) -> np.ndarray | None:
    """(H, W) uint8 mask from the record's polygons or RLE (pycocotools), None if neither."""
    if record.polygons is None and record.rle is None:
        return None
    from pycocotools import mask as mask_utils

    if record.polygons is not None:
        rles = mask_utils.frPyObjects(record.polygons, height, width)
        rle = mask_utils.merge(rles)
    else:
        rle = record.rle
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, *rle["size"])
        elif isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
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


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header; ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"image file {path!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image file {path!r}: {err}") from err


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
        check_images: read every image header now (missing/corrupt files, boxes outside).
        on_error: "raise" or "skip" for records failing those checks.
        seed: seeds the per-sample augmentation stream (with the index and epoch).
        sts_labels: samples carry ``sts_targets`` (T,) from each record's 6th element (STS
            labels, one per token; every record must have them).
    """

    def __init__(self, records: list[RefRecord], image_root, tokenizer: Tokenizer,
                 img_size: int = 384, max_text_len: int = 64, transform=None,
                 mask_root: str | None = None, use_masks: bool = True,
                 parse_words: bool = True, check_images: bool = True,
                 on_error: str = "raise", seed: int = 0, name: str = "dataset",
                 sts_labels: bool = False):
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
        self.records = self._check(records, on_error, name) if check_images else list(records)
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

    def _check(self, records, on_error: str, name: str) -> list[RefRecord]:
        policy = ErrorPolicy(on_error, name)
        sizes: dict[str, tuple[int, int] | str] = {}
        kept = []
        for index, record in enumerate(records):
            try:
                path = self.image_path(record)
                if path not in sizes:
                    try:
                        sizes[path] = _image_size(path)
                    except ValueError as err:
                        sizes[path] = str(err)
                size = sizes[path]
                if isinstance(size, str):
                    raise ValueError(size)
                record.box = check_box_inside(record.box, *size)
            except ValueError as err:
                policy.fail(record.where or f"record {index}", str(err))
                continue
            kept.append(record)
        policy.report()
        return kept

    # ---- samples ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _load(self, record: RefRecord) -> Example:
        path = self.image_path(record)
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except FileNotFoundError:
            raise ValueError(f"{record.where}: image file {path!r} does not exist") from None
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{record.where}: cannot read image file {path!r}: {err}") from err
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
        """Sample ``item``: an index, or an ``(index, epoch)`` pair (the augmentation epoch)."""
        index, epoch = unpack_index(item, self.epoch)
        size = len(self.records)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a ReferringDataset of size {size}")
        index %= size  # a negative index would be an invalid seed for the random draws
        record = self.records[index]
        rng = np.random.default_rng([self.seed, index, epoch])
        out = self.transform(self._load(record), rng)
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
