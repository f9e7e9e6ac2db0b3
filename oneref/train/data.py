"""Datasets and loaders for training and evaluation.

RefShapes comes from :mod:`oneref.data.synthetic`; real RefCOCO-family splits from the
readers of :mod:`oneref.data` (``build_dataset`` when the data package provides it). Loaders
keep shapes fixed (text padded to ``max_text_len`` by the datasets, ``drop_last`` on train),
pin memory on CUDA and keep worker processes alive between epochs.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset

from oneref.config import ModelConfig
from oneref.train.config import DataConfig
from oneref.train.sampler import ResumableSampler, ShardSampler

__all__ = ["build_dataset", "train_loader", "eval_loader", "collate_fn"]

log = logging.getLogger(__name__)


def collate_fn(samples):
    from oneref.data import collate

    return collate(samples)


def build_dataset(data: DataConfig, model: ModelConfig, split: str) -> Dataset:
    """The dataset of ``split`` (``train``/``val``/``test`` or a real split name)."""
    if data.dataset == "refshapes":
        from oneref.data.synthetic import RefShapes

        sizes = {"train": data.train_size, "val": data.eval_size, "test": data.test_size}
        if split not in sizes:
            raise ValueError(f"RefShapes split must be train, val or test, got {split!r}")
        return RefShapes(split=split, size=sizes[split], img_size=model.img_size,
                         max_text_len=model.max_text_len, seed=data.seed)
    try:
        from oneref.data import build_dataset as build_real
    except ImportError as exc:
        raise ValueError(f"dataset {data.dataset!r}: real-data readers are not available in "
                         f"oneref.data ({exc}); use dataset 'refshapes'") from exc
    if not data.root:
        raise ValueError(f"dataset {data.dataset!r} needs data.root (split files and images)")
    return build_real(data.dataset, root=data.root, split=split, img_size=model.img_size,
                      max_text_len=model.max_text_len, tokenizer=data.tokenizer or None,
                      train=split == data.train_split)


def _loader(dataset: Dataset, sampler, batch_size: int, data: DataConfig, device: torch.device,
            drop_last: bool, generator: torch.Generator | None = None) -> DataLoader:
    workers = data.num_workers
    kwargs = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=data.prefetch_factor)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, pin_memory=device.type == "cuda",
                      drop_last=drop_last, generator=generator, **kwargs)


def train_loader(dataset: Dataset, batch_size: int, data: DataConfig, device: torch.device,
                 rank: int, world_size: int, seed: int) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled, sharded, drop-last loader and its resumable sampler.

    The loader owns a generator (seeded from ``seed``) so that creating an iterator never
    draws from the global torch RNG: the model's RNG stream is the same with or without a
    resume in between.
    """
    sampler = ResumableSampler(len(dataset), batch_size, rank, world_size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return _loader(dataset, sampler, batch_size, data, device, True, generator), sampler


def eval_loader(dataset: Dataset, data: DataConfig, device: torch.device, rank: int,
                world_size: int) -> DataLoader:
    """Dataset order, each rank a disjoint shard, nothing padded or dropped."""
    sampler = ShardSampler(len(dataset), rank, world_size)
    return _loader(dataset, sampler, data.eval_batch_size, data, device, False,
                   torch.Generator().manual_seed(0))
