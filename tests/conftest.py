"""Shared test setup: Triton interpreter on CPU-only machines, one thread, fixed seeds, and a
GPU marker that skips without CUDA."""

import os

import pytest
import torch

# triton.jit decides at decoration time whether kernels run in the interpreter, so this must
# happen before any test module imports oneref.kernels.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# GPU test runs launch each kernel with its first config (the default) instead of autotuning
# every config for every test shape (minutes of compilation).
os.environ.setdefault("ONEREF_AUTOTUNE", "0")

from oneref.testing import seed_everything, skip_gpu_items  # noqa: E402 - after the env

# Unit tests use small tensors: one thread avoids oversubscribing the 2-core CI machines
# (several threads on tiny ops ran ~50x slower there).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    seed_everything(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu_items(items, reason="needs a CUDA device")
