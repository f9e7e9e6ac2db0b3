"""Model-level micro-benchmarks: one REC training step and one REC inference forward, for
the official-style baseline (a) and our engine (d, auto backend). ``tiny`` on a CPU,
``base`` on a GPU (bf16 autocast there). The full comparison with ratios is ``oneref bench``;
these give pytest-benchmark's statistics for the same calls."""

from __future__ import annotations

import pytest
import torch

from oneref.bench.engines import build_engine, infer_step, make_batch, train_step
from oneref.config import get_config

ENGINE_KEYS = ("a", "d")


def _engine(key, preset, device):
    try:
        return build_engine(key, get_config(preset), device)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _batches(preset, device, batch, task):
    return [make_batch(get_config(preset), batch, device, seed=s, task=task) for s in range(3)]


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_bench_rec_train_step(benchmark, timed, key, device, model_preset, rotate):
    engine = _engine(key, model_preset, device)
    batch = 64 if device.type == "cuda" else 8
    nxt = rotate(_batches(model_preset, device, batch, "rec"))
    loss = train_step(engine, "rec", nxt())  # checked before timing
    assert torch.isfinite(loss)
    benchmark.group = f"rec train step {model_preset} B={batch}"
    benchmark.extra_info["engine"] = engine.name
    timed(lambda: train_step(engine, "rec", nxt()), rounds=5, iterations=1, prime=False)


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_bench_rec_inference(benchmark, timed, key, device, model_preset, rotate):
    engine = _engine(key, model_preset, device)
    batch = 256 if device.type == "cuda" else 32
    nxt = rotate(_batches(model_preset, device, batch, "rec_infer"))
    boxes = infer_step(engine, "rec_infer", nxt())
    assert boxes.shape == (batch, 4) and torch.isfinite(boxes).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()
    benchmark.group = f"rec inference {model_preset} B={batch}"
    benchmark.extra_info["engine"] = engine.name
    timed(lambda: infer_step(engine, "rec_infer", nxt()), rounds=5, iterations=1, prime=False)
