"""Run a model over a loader and compute the task's metrics (reduced over all ranks)."""

from __future__ import annotations

import contextlib

import torch

from oneref.eval.metrics import RECAccumulator, RESAccumulator
from oneref.train.config import AMP_MODES

__all__ = ["evaluate", "autocast_context", "check_amp", "precision_for", "move_batch"]


def check_amp(amp: str) -> str:
    """``amp`` itself; ValueError naming the choices for anything else."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be auto, bf16 or fp32, got {amp!r}")
    return amp


def precision_for(device: torch.device, amp: str) -> str:
    """``"bf16"`` where ``amp`` runs bf16 autocast on ``device`` (bf16 on CUDA or the CPU,
    auto on CUDA), else ``"fp32"``."""
    check_amp(amp)
    if device.type == "cuda":
        return "fp32" if amp == "fp32" else "bf16"
    return "bf16" if amp == "bf16" and device.type == "cpu" else "fp32"


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast where :func:`precision_for` says bf16; no autocast otherwise."""
    if precision_for(device, amp) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors of a collated batch to ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, task: str, device: torch.device,
             amp: str = "auto", min_batches: int = 0, recorder=None) -> dict[str, float]:
    """Metrics of ``model`` (a ``OneRef``) on every batch of ``loader``.

    ``task="rec"``: ``{"acc@0.5", "miou_box", "n"}``; ``task="res"``: ``{"miou", "oiou",
    "prec@0.5".."prec@0.9", "n"}``. Each rank sees its shard; sums are reduced over ranks.
    ``min_batches``: forward the last batch again (not counted) until this many forwards
    ran, for sharded models whose ranks must run the same number of forwards.
    ``recorder``: a :class:`~oneref.eval.samples.SampleRecorder` that also gets every
    batch's output.
    """
    was_training = model.training
    model.eval()
    acc = RECAccumulator() if task == "rec" else RESAccumulator()
    batch, forwards = None, 0
    try:
        for batch in loader:
            batch = move_batch(batch, device)
            out = _predict(model, batch, task, device, amp)
            _update(acc, out, batch, task)
            if recorder is not None:
                recorder.update(out, batch)
            forwards += 1
        if forwards < min_batches and batch is None:
            raise ValueError(f"this rank's evaluation shard is empty but {min_batches} "
                             f"forwards are needed; use at least one sample per rank")
        for _ in range(forwards, min_batches):
            _predict(model, batch, task, device, amp)
    finally:
        model.train(was_training)
    return acc.compute()


def _predict(model, batch: dict, task: str, device: torch.device, amp: str):
    with autocast_context(device, amp):
        forward = model.forward_rec if task == "rec" else model.forward_res
        return forward(batch["images"], batch["text_ids"], batch["text_lengths"])


def _update(acc, out, batch: dict, task: str) -> None:
    if task == "rec":
        acc.update(out.boxes.float(), batch["boxes"].float())
    else:
        acc.update(out.mask_logits.float() > 0, batch["masks"] > 0.5)
