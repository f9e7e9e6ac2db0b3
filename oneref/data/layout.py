"""Where the files of a real dataset live, and the datasets built from them (docs/data.md).

Three roots, named as in the reference code, and one for your own data:

* ``data_root``: the image tree; each image collection sits in a fixed sub-folder
  (:data:`IMAGE_DIRS`), so one root serves every dataset and a mixup file finds each tuple's
  images by its source.
* ``split_root``: split files ``{split_root}/{dataset}/{dataset}_{split}.pth``.
* ``refer_root``: the refer-toolkit layout ``{refer_root}/{refcoco,refcoco+,refcocog}/``
  (``instances.json`` + ``refs(split_by).p``), the other way RefCOCO is held.
* ``annotations``: your own data, ``{annotations}/{split}.jsonl``
  (:mod:`oneref.data.annotations`), its images under ``data_root`` itself.

:func:`resolve` checks the roots, the dataset, the split and the split file's presence and
returns a :class:`SplitSource`; :func:`build_split` reads its records, checks that every
image they name is there (one error naming the folder and what is missing) and returns a
:class:`~oneref.data.refer.ReferringDataset`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from oneref.data.annotations import SUFFIX, annotation_splits, load_annotations
from oneref.data.records import RefRecord
from oneref.data.refer import ReferringDataset
from oneref.data.refer_toolkit import DEFAULT_SPLIT_BY, load_refer
from oneref.data.splitfiles import load_split_file
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import TestTransform, TrainTransform

__all__ = ["IMAGE_DIRS", "DATASETS", "REFER_DATASETS", "DatasetInfo", "SplitSource",
           "dataset_info", "resolve", "build_split"]

log = logging.getLogger(__name__)

#: Image collection -> folder under ``data_root`` (the reference code's layout).
IMAGE_DIRS = {
    "coco": "other/images/mscoco/images/train2014",
    "referit": "referit/images",
    "flickr": "Flickr30k/flickr30k-images",
}


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset: its splits, the image collections its records use, whether its records
    carry segmentations, and the splits evaluated by default (all but the training ones)."""

    name: str
    splits: tuple[str, ...]
    sources: tuple[str, ...]
    masks: bool

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits if s not in ("train", "trainval"))


_COCO_SPLITS = ("train", "val", "trainval", "testA", "testB")
_THREE_SPLITS = ("train", "val", "test")
#: Split-file datasets. Mixup files mix COCO entries (with polygons) and ReferIt / Flickr
#: entries (without).
DATASETS = {info.name: info for info in (
    DatasetInfo("unc", _COCO_SPLITS, ("coco",), True),
    DatasetInfo("unc+", _COCO_SPLITS, ("coco",), True),
    DatasetInfo("gref", ("train", "val"), ("coco",), True),
    DatasetInfo("gref_umd", _THREE_SPLITS, ("coco",), True),
    DatasetInfo("referit", ("train", "val", "trainval", "test"), ("referit",), False),
    DatasetInfo("flickr", _THREE_SPLITS, ("flickr",), False),
    DatasetInfo("mixup", _THREE_SPLITS, ("coco", "referit", "flickr"), True),
)}
#: Refer-toolkit (dataset, split_by) -> the split-file dataset with the same splits. A
#: split-file name given with ``refer_root`` means the same pair (``unc`` = refcoco, unc).
REFER_DATASETS = {("refcoco", "unc"): "unc", ("refcoco+", "unc"): "unc+",
                  ("refcocog", "google"): "gref", ("refcocog", "umd"): "gref_umd"}
_REFER_BY_NAME = {name: pair for pair, name in REFER_DATASETS.items()}


def dataset_info(dataset: str, refer: bool = False, split_by: str = "",
                 annotations: str = "") -> DatasetInfo:
    """The :class:`DatasetInfo` of ``dataset`` (a refer-toolkit name when ``refer``; any
    name for the annotation files in the folder ``annotations``, whose splits they are)."""
    if annotations:
        folder = _existing_dir(annotations, "--annotations")
        return DatasetInfo(dataset, annotation_splits(folder), ("own",), True)
    if refer:
        name, split_by = _refer_pair(dataset, split_by)
        known = REFER_DATASETS.get((name, split_by))
        if known is None:
            return DatasetInfo(name, (), ("coco",), True)  # splits read from the refs file
        return DATASETS[known]
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; split files exist for "
                         f"{', '.join(DATASETS)} (or use the refer-toolkit layout with "
                         f"--refer-root and --dataset {'|'.join(DEFAULT_SPLIT_BY)})")
    return DATASETS[dataset]


def _refer_pair(dataset: str, split_by: str) -> tuple[str, str]:
    if dataset in _REFER_BY_NAME:
        name, default_by = _REFER_BY_NAME[dataset]
        if split_by and split_by != default_by:
            raise ValueError(f"--dataset {dataset} means {name} split by {default_by}, not "
                             f"--split-by {split_by}; pass --dataset {name} --split-by "
                             f"{split_by}")
        return name, default_by
    if dataset not in DEFAULT_SPLIT_BY:
        raise ValueError(f"unknown refer-toolkit dataset {dataset!r}; choose from "
                         f"{', '.join(DEFAULT_SPLIT_BY)} (or {', '.join(_REFER_BY_NAME)})")
    return dataset, split_by or DEFAULT_SPLIT_BY[dataset]


@dataclass(frozen=True)
class SplitSource:
    """One split of one dataset, resolved to files: a split file, or a refer-toolkit
    folder and ``split_by``; and the image folder of each collection."""

    dataset: str
    split: str
    image_dirs: dict[str, str]
    split_file: str = ""
    annotation_file: str = ""
    refer_root: str = ""
    refer_dataset: str = ""
    split_by: str = ""

    @property
    def name(self) -> str:
        return (self.split_file or self.annotation_file
                or f"{self.refer_root}/{self.refer_dataset}/refs({self.split_by}).p")

    def records(self, on_error: str = "raise", trust: bool = False) -> list[RefRecord]:
        """The split's records (``trust``: unpickle any object in the files)."""
        if self.annotation_file:
            return load_annotations(self.annotation_file, on_error=on_error)
        if self.split_file:
            return load_split_file(self.split_file, dataset=self.dataset, on_error=on_error,
                                   trust=trust)
        return load_refer(self.refer_root, self.refer_dataset, self.split,
                          split_by=self.split_by, on_error=on_error, trust=trust)


def _existing_dir(path: str, flag: str) -> str:
    if not path:
        raise ValueError(f"{flag} is required for real data")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is not a folder")
    return path


def resolve(dataset: str, split: str, data_root: str, split_root: str = "",
            refer_root: str = "", split_by: str = "", annotations: str = "") -> SplitSource:
    """Check the roots and find the files of ``dataset``/``split``; ValueError naming the
    flag, the path and what was expected."""
    if sum(map(bool, (split_root, refer_root, annotations))) != 1:
        raise ValueError("real data needs exactly one of --split-root (split files "
                         "{dataset}/{dataset}_{split}.pth), --refer-root (refer-toolkit "
                         "layout) and --annotations (your own {split}.jsonl files)")
    data_root = _existing_dir(data_root, "--data-root")
    info = dataset_info(dataset, refer=bool(refer_root), split_by=split_by,
                        annotations=annotations)
    if annotations:
        folder = _existing_dir(annotations, "--annotations")
        if split not in info.splits:
            raise ValueError(f"--annotations {folder}: no split file {split}{SUFFIX} (the "
                             f"splits there: {', '.join(info.splits) or 'none'}); name "
                             f"another: oneref eval --split NAME; training reads "
                             f"data.train_split, data.eval_split (validation) and, with "
                             f"final_test, data.test_split: --set data.eval_split=NAME")
        return SplitSource(dataset, split, {"own": data_root},
                           annotation_file=os.path.join(folder, split + SUFFIX))
    if info.splits and split not in info.splits:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; its splits are "
                         f"{', '.join(info.splits)}")
    image_dirs = {source: os.path.join(data_root, IMAGE_DIRS[source]) for source in info.sources}
    if refer_root:
        root = _existing_dir(refer_root, "--refer-root")
        name, by = _refer_pair(dataset, split_by)  # checked by dataset_info above
        folder = os.path.join(root, name)
        for file in ("instances.json", f"refs({by}).p"):
            if not os.path.isfile(os.path.join(folder, file)):
                raise ValueError(f"--refer-root {root}: {os.path.join(folder, file)} does not "
                                 f"exist (expected {name}/instances.json and {name}/refs({by}).p)")
        return SplitSource(dataset, split, image_dirs, refer_root=root, refer_dataset=name,
                           split_by=by)
    root = _existing_dir(split_root, "--split-root")
    path = os.path.join(root, dataset, f"{dataset}_{split}.pth")
    if not os.path.isfile(path):
        raise ValueError(f"--split-root {root}: split file {path} does not exist (expected "
                         f"{{split_root}}/{dataset}/{dataset}_{split}.pth)")
    return SplitSource(dataset, split, image_dirs, split_file=path)


def _check_images(source: SplitSource, records: list[RefRecord], on_error: str) -> None:
    """One ValueError per image folder that is missing or, unless ``on_error`` is ``skip``
    (the dataset then skips and counts their records), lacks files the records name."""
    by_source: dict[str, dict[str, str]] = {}  # collection -> file -> first record naming it
    for record in records:
        by_source.setdefault(record.source, {}).setdefault(record.image_file, record.where)
    for collection, files in sorted(by_source.items()):
        folder = source.image_dirs.get(collection)
        if folder is None:
            raise ValueError(f"{source.name}: records from {collection!r} images, which "
                             f"dataset {source.dataset!r} does not use")
        if not os.path.isdir(folder):
            raise ValueError(f"--data-root: image folder {folder} does not exist; "
                             f"{source.name} names {len(files)} {collection} images "
                             f"(expected {{data_root}}/{IMAGE_DIRS[collection]})")
        if on_error == "skip":  # the dataset's header check names and counts them
            continue
        missing = sorted(f for f in files if not os.path.isfile(os.path.join(folder, f)))
        if missing:
            first = f"{missing[0]}, {files[missing[0]]}" if files[missing[0]] else missing[0]
            raise ValueError(f"image folder {folder} lacks {len(missing)} of the {len(files)} "
                             f"images {source.name} names (first: {first})")


def build_split(source: SplitSource, tokenizer: Tokenizer, img_size: int, max_text_len: int,
                train: bool, use_masks: bool, on_error: str = "raise", seed: int = 0,
                trust: bool = False, sts_labels: bool = False) -> ReferringDataset:
    """The dataset of one resolved split: the paper's train transform when ``train``, else
    the test transform; segmentations decoded when ``use_masks`` (RES, or REC's mask
    constraint from masks); ``trust`` unpickles any object in the annotation files;
    ``sts_labels``: samples carry the records' STS labels (split files' 6th element)."""
    if sts_labels and not (source.split_file or source.annotation_file):
        raise ValueError(f"{source.name}: STS labels are read from split files (6th tuple "
                         f"element) or annotation files ('sts'), and the refer-toolkit layout "
                         f"has none: label split files or annotation files (oneref "
                         f"sts-labels) and train with --split-root or --annotations")
    records = source.records(on_error, trust)
    if not records:
        raise ValueError(f"{source.name}: no records in split {source.split!r}")
    _check_images(source, records, on_error)
    if use_masks:
        with_masks = sum(r.polygons is not None or r.rle is not None for r in records)
        if with_masks == 0:
            raise ValueError(f"{source.name}: no record carries a segmentation, but masks were "
                             f"asked for (--task res or --seg-mask)")
        if with_masks < len(records):
            log.warning("%s: %d of %d records have no segmentation; their rasterised box "
                        "stands in", source.name, len(records) - with_masks, len(records))
    if cut := tokenizer.longer_than([r.phrase for r in records], max_text_len):
        log.warning("%s: %d of %d expressions are longer than the model's %d tokens "
                    "(max_text_len, <s> and </s> included): the model reads their beginnings",
                    source.name, cut, len(records), max_text_len)
    transform = TrainTransform(img_size) if train else TestTransform(img_size)
    return ReferringDataset(records, source.image_dirs, tokenizer, img_size=img_size,
                            max_text_len=max_text_len, transform=transform, use_masks=use_masks,
                            on_error=on_error, seed=seed, name=source.name,
                            sts_labels=sts_labels, stand_in=train)
