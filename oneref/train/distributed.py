"""Process-group setup, seeding, model wrapping (DDP / FSDP) and rank helpers.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them training runs in a
single process with no process group (every helper here then works as a no-op).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shutdown", "seed_everything", "wrap_model",
           "unwrap", "is_main", "barrier", "all_reduce_mean", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (``cuda:local_rank``) when available, else CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_name: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group (NCCL on GPU, gloo on CPU) if launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.info("process group: %s, rank %d/%d, device %s", backend, rank, world, device)
    elif dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, local_rank, world, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def wrap_model(module: torch.nn.Module, info: DistInfo, strategy: str,
               find_unused: bool = False) -> torch.nn.Module:
    """DDP (``find_unused`` for steps that use only some heads) or FSDP full sharding."""
    if not info.enabled:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        kwargs = {"device_id": info.device} if info.device.type == "cuda" else {}
        return FSDP(module, use_orig_params=True, **kwargs)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
            module = module.module
        else:
            return module


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; unchanged without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values
