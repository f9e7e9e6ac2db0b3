"""The ``triton`` backend's availability: the kernels of :mod:`oneref.kernels` (named op by
op in :mod:`oneref.ops.registry`).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was first imported (the interpreter; slow, used by the tests).
"""

from __future__ import annotations

import torch
import triton  # noqa: F401 - an ImportError here marks the backend unavailable with its reason

from oneref.kernels.utils import interpreter_active

__all__ = ["unavailable_reasons"]


def unavailable_reasons(device: torch.device | None) -> list[str]:
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return [] if torch.cuda.is_available() else ["CUDA is not available"]
    if device.type == "cpu":
        return [] if interpreter_active() else [
            "tensors are on the CPU and TRITON_INTERPRET=1 was not set before importing triton"]
    return [f"triton does not run on {device.type} tensors"]
