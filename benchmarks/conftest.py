"""Shared setup of the pytest-benchmark micro-benchmarks (``pytest benchmarks/ --benchmark-only``).

* ``gpu`` marker: skipped without CUDA (kernel benchmarks are GPU rows);
* ``device`` fixture: ``cuda`` when available, else ``cpu``;
* ``model_preset``: ``base`` on a GPU, ``tiny`` on a CPU;
* ``rotate(inputs)``: a callable cycling through input sets, so a benchmark never times one
  cached input;
* ``timed(fn, *args, rounds=, iterations=)``: pytest-benchmark's pedantic run of ``fn(*args)``
  with a device synchronisation in every call;
* fixed seeds before every benchmark.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from oneref.testing import seed_everything, skip_gpu_items


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 cores")


def pytest_collection_modifyitems(config, items):
    skip_gpu_items(items, reason="GPU benchmark: needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed_everything():
    seed_everything(0)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def model_preset(device) -> str:
    return "base" if device.type == "cuda" else "tiny"


@pytest.fixture
def rotate():
    """``rotate(inputs)`` -> a zero-argument callable returning the next input set."""
    def make(inputs):
        if not inputs:
            raise ValueError("rotate needs at least one input set")
        cycle = itertools.cycle(inputs)
        return lambda: next(cycle)
    return make


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn, *args, rounds, iterations, prime=True)``: times ``fn(*args)`` followed by a
    synchronisation of ``device`` (a call is timed whole, its kernels included) with
    ``benchmark.pedantic`` and 2 warm-up rounds; ``prime`` makes one untimed call first
    (compilation, autotuning). Returns the last result of ``fn``."""
    def run_timed(fn, *args, rounds: int, iterations: int, prime: bool = True):
        def run():
            out = fn(*args)
            synchronize(device)
            return out

        if prime:
            run()
        return benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=2)
    return run_timed


def synchronize(device: torch.device) -> None:
    """Wait for the device (benchmarks time whole calls, kernels included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
