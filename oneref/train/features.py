"""The optional training features, applied in one fixed order and logged, each with the
reason when it is not applied: gradient checkpointing -> FSDP sharding (once, before the
optimizer exists) -> per stage: DDP wrap (after the stage's freeze, since DDP records the
trainable parameters) -> ``torch.compile``."""

from __future__ import annotations

import logging

import torch

from oneref.compile import compile_step
from oneref.train.config import TrainConfig
from oneref.train.distributed import DistInfo, shard_model, wrap_model

__all__ = ["Features", "apply_features"]

log = logging.getLogger(__name__)


class Features:
    """What :func:`apply_features` applied; :meth:`wrap` builds each stage's step module."""

    def __init__(self, config: TrainConfig, info: DistInfo, fsdp: bool):
        self.config = config
        self.info = info
        self.fsdp = fsdp

    def wrap(self, task_module: torch.nn.Module) -> torch.nn.Module:
        """DDP (unless sharded; a single process stays unwrapped), then compile when asked."""
        module = task_module
        if not self.fsdp:
            # Every task leaves some heads (and REC the mask token) without a gradient.
            module = wrap_model(task_module, self.info, find_unused=True)
        if self.config.compile:
            module = compile_step(module, self.info.device)
        return module


def apply_features(task_module: torch.nn.Module, config: TrainConfig,
                   info: DistInfo) -> Features:
    """Gradient checkpointing and FSDP sharding of ``task_module`` (whose ``model`` is the
    OneRef), in place; returns the per-stage wrapper."""
    model = task_module.model
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    wants_fsdp = config.dist.strategy == "fsdp"
    if wants_fsdp and not info.enabled:
        log.warning("FSDP asked for, but this is a single process: nothing to shard over, "
                    "so the model is not sharded (launch with torchrun to shard)")
    fsdp = wants_fsdp and info.enabled
    if fsdp:
        shard_model(task_module, info, model.encoder.blocks)
    parallel = ("FSDP2 over %d ranks" % info.world_size if fsdp else
                "DDP over %d ranks" % info.world_size if info.enabled else "single process")
    log.info("features: grad checkpointing %s -> %s -> compile %s",
             "on" if config.grad_checkpointing else "off", parallel,
             "on (inductor)" if config.compile else "off")
    return Features(config, info, fsdp)
