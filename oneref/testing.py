"""Helpers shared by the test suite (``tests/``) and the micro-benchmarks (``benchmarks/``)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

__all__ = ["seed_everything", "skip_gpu_items"]


def seed_everything(seed: int = 0) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def skip_gpu_items(items, reason: str) -> None:
    """Mark every collected item carrying the ``gpu`` marker as skipped when CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
