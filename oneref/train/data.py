"""Datasets and loaders for training and evaluation.

RefShapes comes from :mod:`oneref.data.synthetic`; real RefCOCO-family splits from the
files named by the data config (:mod:`oneref.data.layout`, docs/data.md). Loaders keep
shapes fixed (text padded to ``max_text_len`` by the datasets, ``drop_last`` on train), pin
memory on CUDA and keep worker processes alive between epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch
from torch.utils.data import DataLoader, Dataset

from oneref.config import ModelConfig
from oneref.data import collate, layout
from oneref.data.synthetic import RefShapes
from oneref.data.tokenizer import Tokenizer, open_tokenizer
from oneref.sts import load_refshapes_labels
from oneref.train.config import DataConfig, TrainConfig
from oneref.train.interrupt import ignore_interrupts
from oneref.train.sampler import ResumableSampler, ShardSampler

__all__ = ["build_dataset", "dataset_info", "check_data", "train_loader", "eval_loader",
           "loader_workers", "load_tokenizer", "split_source", "recorded_data",
           "recorded_paths", "check_sizes"]

log = logging.getLogger(__name__)


def check_sizes(data: DataConfig, flag: str) -> None:
    """ValueError when ``flag`` (a RefShapes split size the user gave; "" for none) comes
    with data read from files, where it would be ignored."""
    if flag and data.real:
        raise ValueError(f"{flag} sizes the built-in RefShapes splits; dataset "
                         f"{data.dataset!r} reads every sample of its split files")


#: The DataConfig path fields and their flags.
_PATH_FLAGS = {"root": "--data-root", "split_root": "--split-root", "refer_root": "--refer-root",
               "annotations": "--annotations", "tokenizer": "--tokenizer"}


@contextlib.contextmanager
def recorded_paths(train_config: dict, changes: dict):
    """A ValueError inside that finds no file or folder at a path the run recorded (one not
    given now) says so, and which flag points elsewhere: the files may have moved since."""
    try:
        yield
    except ValueError as err:
        recorded, message = train_config.get("data", {}), str(err)
        if "does not exist" not in message and "is not a folder" not in message:
            raise
        named = [flag for field, flag in _PATH_FLAGS.items()
                 if recorded.get(field) and field not in changes and flag in message]
        if not named:
            raise
        raise ValueError(f"{err} (the run's recorded {', '.join(named)}; give "
                         f"{' / '.join(named)} for where the files are now)") from err


def recorded_data(train_config: dict, changes: dict, **fields) -> DataConfig:
    """The data config a run recorded (``train_config``: its ``train_config.json``, empty
    for weights without a run), with ``changes`` (flag values) and ``fields`` applied. A
    bare checkpoint needs ``changes`` to name the dataset."""
    if not train_config and "dataset" not in changes:
        raise ValueError("the checkpoint records no data: name it with --dataset (and "
                         "--data-root, --split-root, --tokenizer for real data)")
    base = TrainConfig.from_record(train_config).data if train_config else DataConfig()
    data = dataclasses.replace(base, **changes, **fields)
    data.validate()  # e.g. --tokenizer with RefShapes, --split-by without --refer-root
    return data


def load_tokenizer(data: DataConfig, model: ModelConfig) -> Tokenizer:
    """The sentencepiece tokenizer of a real dataset, checked against the model's vocabulary."""
    if not data.tokenizer:
        raise ValueError(f"dataset {data.dataset!r} needs a sentencepiece model: pass "
                         f"--tokenizer beit3.spm (data.tokenizer)")
    return open_tokenizer(data.tokenizer).check_fits(model.vocab_size)


def split_source(data: DataConfig, split: str) -> layout.SplitSource:
    """The files of one real split (docs/data.md)."""
    return layout.resolve(data.dataset, split, data.root, data.split_root, data.refer_root,
                          data.split_by, data.annotations)


def check_data(data: DataConfig, splits) -> None:
    """Resolve every split's files now (roots, dataset, split names, split files), so a
    wrong path stops a run before any model is built."""
    if data.real:
        for split in splits:
            split_source(data, split)


def dataset_info(data: DataConfig) -> layout.DatasetInfo:
    """The splits, image collections and masks of the real dataset ``data`` names."""
    return layout.dataset_info(data.dataset, refer=bool(data.refer_root), split_by=data.split_by,
                               annotations=data.annotations)


def build_dataset(data: DataConfig, model: ModelConfig, split: str, task: str = "rec",
                  tokenizer: Tokenizer | None = None, train: bool = False, sts: bool = False,
                  sts_labels: str = "") -> Dataset:
    """The dataset of ``split`` (``train``/``val``/``test`` or a real split name). Real data
    takes the paper's training augmentation when ``train`` (RefShapes none: its 200,000
    scenes are each seen about once) and decodes segmentations for RES and for REC with
    ``data.seg_mask``. With ``sts`` samples carry STS labels: a real split file's 6th tuple
    elements, or for RefShapes the side file ``sts_labels`` (:mod:`oneref.sts`)."""
    if not data.real:
        sizes = {"train": data.train_size, "val": data.eval_size, "test": data.test_size}
        if split not in sizes:
            raise ValueError(f"RefShapes split must be train, val or test, got {split!r}")
        dataset = RefShapes(split=split, size=sizes[split], img_size=model.img_size,
                            max_text_len=model.max_text_len, seed=data.seed)
        if sts:
            if not sts_labels:
                raise ValueError("--sts needs teacher scores: RefShapes reads them from "
                                 "--sts-labels FILE (pretrain.sts_labels), made by oneref "
                                 "sts-labels --teacher RUN --out FILE")
            dataset.sts_labels = load_refshapes_labels(sts_labels, dataset)
        return dataset
    if sts_labels:
        raise ValueError(f"--sts-labels {sts_labels} is RefShapes' side file; the split files "
                         f"of dataset {data.dataset!r} carry STS labels as their 6th element "
                         f"(annotation files under 'sts')")
    use_masks = task == "res" or data.seg_mask
    if use_masks and not dataset_info(data).masks:
        raise ValueError(f"dataset {data.dataset!r} has no segmentation masks; --task res and "
                         f"--seg-mask need unc, unc+, gref, gref_umd, mixup, --refer-root or "
                         f"--annotations with segmentations")
    return layout.build_split(split_source(data, split), tokenizer or load_tokenizer(data, model),
                              model.img_size, model.max_text_len, train=train,
                              use_masks=use_masks, on_error=data.on_error, seed=data.seed,
                              trust=data.trust, sts_labels=sts)


def loader_workers(data: DataConfig, device: torch.device, local_world_size: int = 1) -> int:
    """``data.num_workers``, or for -1 (auto) this process's share of the usable cores on a
    GPU run and 0 (the main process) on a CPU run, where workers would take the cores the
    step computes on."""
    if data.num_workers >= 0:
        return data.num_workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size) - 1)


def _loader(dataset: Dataset, sampler, batch_size: int, data: DataConfig, device: torch.device,
            drop_last: bool, generator: torch.Generator | None = None) -> DataLoader:
    workers = loader_workers(data, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    kwargs = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=data.prefetch_factor,
                      worker_init_fn=ignore_interrupts)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=device.type == "cuda",
                      drop_last=drop_last, generator=generator, **kwargs)


def train_loader(dataset: Dataset, batch_size: int, data: DataConfig, device: torch.device,
                 rank: int, world_size: int, seed: int, accumulate: int = 1
                 ) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled, sharded, drop-last loader and its resumable sampler.

    With ``accumulate`` > 1 the sampler counts in optimizer steps of ``accumulate`` loader
    batches each (epochs end on a whole step; a resume starts at one): the samples of a step
    are those of one batch ``accumulate`` times larger, in the same order.

    The loader owns a generator (seeded from ``seed``) so that creating an iterator never
    draws from the global torch RNG: the model's RNG stream is the same with or without a
    resume in between.
    """
    sampler = ResumableSampler(len(dataset), batch_size * accumulate, rank, world_size,
                               seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return _loader(dataset, sampler, batch_size, data, device, True, generator), sampler


def eval_loader(dataset: Dataset, data: DataConfig, device: torch.device, rank: int,
                world_size: int) -> DataLoader:
    """Dataset order, each rank a disjoint shard, nothing padded or dropped."""
    sampler = ShardSampler(len(dataset), rank, world_size)
    return _loader(dataset, sampler, data.eval_batch_size, data, device, False,
                   torch.Generator().manual_seed(0))
