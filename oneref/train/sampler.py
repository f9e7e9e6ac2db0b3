"""Resumable, rank-sharded samplers.

:class:`ResumableSampler` gives the same global order as ``DistributedSampler`` (a permutation
from ``seed + epoch``, rank ``r`` takes every ``world``-th index starting at ``r``) and can
start in the middle of an epoch, so ``--resume`` continues with exactly the batches an
uninterrupted run would have seen. With ``world_size = 1`` and a batch ``world`` times larger,
one process sees the same samples per step as a ``world``-rank run.

Training samplers yield ``(index, epoch)`` pairs: the datasets draw their augmentation from
both, so every epoch augments anew, also inside persistent workers, whose dataset copies
never see a ``set_epoch`` of the main process.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "ShardSampler"]


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled, sharded, drop-last order with a start offset.

    Args:
        num_samples: size of the dataset.
        batch_size: per-rank batch; each epoch yields whole global batches only.
        rank, world_size: this process and the number of processes.
        seed: order seed (epoch ``e`` uses the permutation of ``seed + e``).
        shuffle: False keeps dataset order (still sharded).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(f"dataset of {num_samples} samples is smaller than one global "
                             f"batch ({batch_size} x {world_size})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_batch`` batches."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], "
                             f"got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        return order[: self.batches_per_epoch * self.batch_size * self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.global_order()[self.rank::self.world_size]
        return iter([(index, self.epoch) for index in mine[self.start_batch * self.batch_size:]])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}


class ShardSampler(Sampler[int]):
    """Evaluation order: dataset order, rank ``r`` takes indices ``r, r + world, ...`` with no
    padding, so per-rank sums add up to exactly the whole split."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

