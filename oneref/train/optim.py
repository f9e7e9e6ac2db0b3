"""AdamW parameter groups and the staged learning-rate plan.

The learning rate is a pure function of the global step (:class:`StagePlan.lr_at`), so a
resumed run needs only the step to reproduce the schedule exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from oneref.train.config import OptimConfig, ScheduleConfig, StageConfig

__all__ = ["StageSpan", "StagePlan", "build_optimizer", "set_lr"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpan:
    """A stage laid out on the global step axis: steps ``[start, start + steps)``."""

    index: int
    stage: StageConfig
    start: int
    steps: int
    steps_per_epoch: int

    @property
    def end(self) -> int:
        return self.start + self.steps


class StagePlan:
    """Global-step layout of the stages and the lr schedule of each.

    Args:
        stages: the recipe's stages.
        train_samples: samples in the training split.
        world_size: ranks; a step consumes ``batch_size * grad_accum * world_size`` samples
            (drop_last).
        schedule: cosine / constant, per epoch or per step.
    """

    def __init__(self, stages: list[StageConfig], train_samples: int, world_size: int,
                 schedule: ScheduleConfig) -> None:
        self.schedule = schedule
        self.spans: list[StageSpan] = []
        start = 0
        for i, stage in enumerate(stages):
            per_epoch = train_samples // (stage.samples_per_step * world_size)
            if per_epoch < 1:
                accumulated = f" x {stage.grad_accum} accumulated" if stage.grad_accum > 1 else ""
                raise ValueError(f"stage {stage.name!r}: the training split ({train_samples} "
                                 f"samples) is smaller than one global batch "
                                 f"({stage.batch_size}{accumulated} x {world_size} ranks)")
            steps = stage.steps if stage.steps > 0 else stage.epochs * per_epoch
            self.spans.append(StageSpan(i, stage, start, steps, per_epoch))
            start += steps
        self.total_steps = start

    def locate(self, step: int) -> tuple[StageSpan, int, int]:
        """(stage span, epoch within the stage, batch index within the epoch) of ``step``."""
        for span in self.spans:
            if step < span.end:
                local = step - span.start
                return span, local // span.steps_per_epoch, local % span.steps_per_epoch
        raise ValueError(f"step {step} is past the end of training ({self.total_steps} steps)")

    def lr_at(self, step: int, time_fraction: float | None = None) -> float:
        """Learning rate used for optimizer step ``step`` (0-based).

        ``time_fraction`` (share of a wall-clock budget used, see ``TrainConfig.time_budget_s``)
        moves the cosine of the last stage when it is further along than the steps: the
        schedule ends with whichever of the two ends first.
        """
        span, epoch, _ = self.locate(step)
        stage, local = span.stage, step - span.start
        if local < stage.warmup_steps:
            return stage.lr * (local + 1) / stage.warmup_steps
        if self.schedule.kind == "constant":
            return stage.lr
        if self.schedule.interval == "epoch":
            epochs = max(1, math.ceil(span.steps / span.steps_per_epoch))
            progress = epoch / epochs
        else:
            decay_steps = max(1, span.steps - stage.warmup_steps)
            progress = (local - stage.warmup_steps) / decay_steps
        if time_fraction is not None and span.index == len(self.spans) - 1:
            progress = max(progress, min(1.0, max(0.0, time_fraction)))
        floor = self.schedule.min_lr_ratio * stage.lr
        return floor + (stage.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _groups(named_params, weight_decay: float, no_decay_1d: bool, tag: str) -> list[dict]:
    decay, no_decay = [], []
    for _, param in named_params:
        (no_decay if no_decay_1d and param.dim() < 2 else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "tag": f"{tag}/decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "tag": f"{tag}/no_decay"})
    return groups


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over backbone and head parameters (frozen ones are skipped by AdamW: no grad).

    Uses torch's fused kernel (CUDA and CPU; on a CPU it steps the small model about 4x faster
    than the foreach path).
    """
    if hasattr(model, "backbone_parameters") and hasattr(model, "head_parameters"):
        backbone_ids = {id(p) for p in model.backbone_parameters()}
    else:
        backbone_ids = set()
    named = list(model.named_parameters())
    backbone = [(n, p) for n, p in named if id(p) in backbone_ids]
    heads = [(n, p) for n, p in named if id(p) not in backbone_ids]
    groups = (_groups(backbone, config.weight_decay, config.no_decay_1d, "backbone")
              + _groups(heads, config.weight_decay, config.no_decay_1d, "head"))
    kwargs = {"betas": tuple(config.betas), "eps": config.eps, "lr": 0.0, "fused": True}
    log.info("AdamW: %s", ", ".join(f"{g['tag']}={sum(p.numel() for p in g['params'])}"
                                     for g in groups))
    return torch.optim.AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
