"""The ``triton`` backend: registers the kernels of :mod:`oneref.kernels` with the dispatcher.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was first imported (the interpreter; slow, used by the tests).
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401 - an ImportError here marks the backend unavailable with its reason

from oneref.ops.dispatch import register

__all__ = ["unavailable_reasons", "interpreter_active"]


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reasons(device: torch.device | None) -> list[str]:
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return [] if torch.cuda.is_available() else ["CUDA is not available"]
    if device.type == "cpu":
        return [] if interpreter_active() else [
            "tensors are on the CPU and TRITON_INTERPRET=1 was not set before importing triton"]
    return [f"triton does not run on {device.type} tensors"]


# Registrations: one line per op, next to the kernel module that implements it.
from oneref.kernels import attention as _attention, multiway_linear as _multiway_linear  # noqa: E402

register("multiway_attention", "triton")(_attention.multiway_attention)
register("multiway_linear", "triton")(_multiway_linear.multiway_linear)

from oneref.kernels import cross_entropy as _cross_entropy, gather as _gather  # noqa: E402
from oneref.kernels import losses as _losses, masking as _masking  # noqa: E402

register("referring_mask", "triton")(_masking.referring_mask)
register("apply_mask_token", "triton")(_gather.apply_mask_token)
register("masked_gather", "triton")(_gather.masked_gather)
register("masked_scatter", "triton")(_gather.masked_scatter)
register("vts_loss", "triton")(_losses.vts_loss)
register("box_mask_loss", "triton")(_losses.box_mask_loss)
register("focal_dice_loss", "triton")(_losses.focal_dice_loss)
register("sts_kl", "triton")(_losses.sts_kl)
register("linear_cross_entropy", "triton")(_cross_entropy.linear_cross_entropy)
