"""Process-group setup, seeding, model wrapping (DDP / FSDP) and rank helpers.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them training runs in a
single process with no process group (every helper here then works as a no-op).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shutdown", "seed_everything", "wrap_model",
           "shard_model", "gradient_sync_off", "gathered", "full_state", "load_full_state",
           "unwrap", "is_main", "main_writes", "several_ranks", "broadcast_object",
           "gather_objects", "all_reduce_mean", "all_reduce_max", "average_batch_norm_stats",
           "resolve_device"]

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


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (``cuda:local_rank``) when available, else CPU; ``cuda`` ->
    ``cuda:local_rank``; any other name or torch.device as it is. ValueError for a name torch
    does not know, and for CUDA on a machine without it."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N, "
                         f"...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available")
    return device


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


def shutdown(finished: bool = False) -> None:
    """End the process group. ``finished`` (every rank completed its work): a barrier first,
    whose wait releases the GIL, so gloo's worker threads finish releasing the last
    collective's tensors while the interpreter is whole. A wrapped model keeps the group
    alive past ``destroy_process_group``, and a worker left to do that during the
    interpreter's teardown aborts the process after the run (pytorch#190489)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def wrap_model(module: torch.nn.Module, info: DistInfo, find_unused: bool = False
               ) -> torch.nn.Module:
    """DDP around ``module`` (``find_unused`` for steps that use only some heads); the module
    itself without a process group."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def shard_model(module: torch.nn.Module, info: DistInfo,
                units: Iterable[torch.nn.Module] = ()) -> torch.nn.Module:
    """FSDP2 full sharding over all ranks, in place: each of ``units`` (the encoder blocks) is
    gathered only around its own forward, the remaining parameters with the root's.

    Parameters become ``DTensor`` shards, so the optimizer must be built afterwards.
    ``requires_grad`` may still change per stage (frozen parameters get no gradient).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    return fully_shard(module, mesh=mesh)


@contextlib.contextmanager
def gradient_sync_off(module: torch.nn.Module):
    """Backward passes inside keep their gradients on this rank, summed into ``.grad`` (every
    micro-batch of an accumulated step but the last): DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync(False)``; nothing for an unwrapped module."""
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    if hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def gathered(root: torch.nn.Module):
    """Full parameters of an FSDP2 ``root`` for calls that bypass its ``forward`` (evaluation
    through ``model.forward_rec``); a no-op for any other module."""
    if not hasattr(root, "unshard"):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[dict, dict]:
    """Unsharded ``(model, optimizer)`` state dicts on the CPU, keyed by parameter name; a
    collective under FSDP (every rank calls it; only rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = _state_options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = ({} if optimizer is None else
                   get_optimizer_state_dict(model, optimizer, options=options))
    return model_state, optim_state


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    model_state: dict, optim_state: dict) -> None:
    """Inverse of :func:`full_state` (each rank passes the full dicts; shards are cut locally)."""
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, model_state, options=_state_options())
    # Parameters that never had a gradient (REC leaves the mask token unused, a frozen stage
    # the backbone) have no AdamW state yet: a missing entry is legitimate, so the load is
    # not strict. The loader first creates state for every parameter with a zero-gradient
    # step; drop it again where the checkpoint had none, or such a parameter's first real
    # step would see a step count of 2 and a different bias correction.
    set_optimizer_state_dict(model, optimizer, optim_state, options=_state_options(strict=False))
    saved = set(optim_state.get("state", {}))
    for name, param in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)


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


def main_writes(write: Callable[[], None]) -> None:
    """Run ``write`` on rank 0 only, then tell every rank how it went (a collective that
    replaces a barrier): when it raised, rank 0 raises that error and every other rank an
    OSError naming it, so no rank waits at the next collective for one that has stopped.
    The outcome is agreed by an all-reduce, which every rank leaves together, as it would
    a barrier; only a failure's message is broadcast after it."""
    failure = None
    if is_main():
        try:
            write()
        except Exception as err:
            if not several_ranks():
                raise
            failure = err
    if not several_ranks() or not all_reduce_max(torch.tensor([float(failure is not None)])):
        return
    message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    raise OSError(f"rank 0 stopped writing the run's files ({message}); this rank stops too")


def several_ranks() -> bool:
    """Whether this process is one of a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (a picklable object; unchanged without a process
    group)."""
    if not several_ranks():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value) -> list:
    """Every rank's ``value`` (a picklable object) in rank order, on every rank (a
    collective); ``[value]`` without a process group."""
    if not several_ranks():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of a tensor over ranks (a copy on the tensor's device; unchanged
    without a process group). NCCL reduces a CPU tensor through the current CUDA device."""
    if not several_ranks():
        return values
    reduced = values.clone()
    if dist.get_backend() == "nccl" and reduced.device.type != "cuda":
        reduced = reduced.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(values.device)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; unchanged without a process group)."""
    if several_ranks():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def average_batch_norm_stats(module: torch.nn.Module) -> None:
    """Average the BatchNorm running statistics (the RES head's) over ranks, in place.

    Each rank's training forwards update its own copy (DDP broadcasts rank 0's only at the
    start of a forward; FSDP not at all), so without this each rank would evaluate with
    other statistics than the model rank 0 saves. Called before every evaluation and
    checkpoint, so a resumed run continues from the same state as an unbroken one."""
    if not several_ranks():
        return
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
             torch.nn.SyncBatchNorm)
    for norm in module.modules():
        if isinstance(norm, norms) and norm.running_mean is not None:
            for stats in (norm.running_mean, norm.running_var):
                stats.copy_(all_reduce_mean(stats))
