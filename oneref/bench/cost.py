"""The paper's cost table, one row per (preset, engine), measured in one process.

Per row: parameters (backbone / head / total), GFLOPs and GMACs per sample (REC and RES
forward, counted), fine-tune samples/s (REC, RES and, when asked, MIM / MLM steps),
inference samples/s at batch 1 and a large batch, test time of a 5,657-sample split end to
end (data loading included), peak memory, MFU against the measured matmul peak, and the
ratio of every speed figure to rows (a) and (b) of the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import statistics
from dataclasses import dataclass, field

import torch

from oneref.bench.engines import (ENGINES, TASK_FNS, build_engine, encoder_agreement,
                                  infer_step, make_batch, train_step)
from oneref.bench.flops import analytic_encoder_flops, count_flops
from oneref.ops import use_backend
from oneref.bench.split import SPLIT_SIZE, split_test_time
from oneref.bench.timing import Measurement, measure, peak_memory, profile_ops
from oneref.config import get_config

__all__ = ["CostSettings", "iter_cost_rows", "run_cost_table", "add_ratios", "SPEED_KEYS"]

log = logging.getLogger(__name__)

# Figures where larger is better and a ratio to (a) / (b) is printed.
SPEED_KEYS = ("rec_train_sps", "res_train_sps", "mim_train_sps", "mlm_train_sps",
              "rec_infer_b1_sps", "rec_infer_large_sps", "res_infer_large_sps", "split_sps")


@dataclass
class CostSettings:
    """What the cost table measures. Batches are per preset (``{"tiny": 8, ...}``)."""

    presets: tuple[str, ...] = ("tiny", "small")
    engines: tuple[str, ...] = ("a", "c", "d")
    train_tasks: tuple[str, ...] = ("rec",)
    infer_tasks: tuple[str, ...] = ("rec_infer",)
    train_batch: dict = field(default_factory=lambda: {"tiny": 8, "small": 8, "base": 64,
                                                       "large": 32})
    infer_batch: dict = field(default_factory=lambda: {"tiny": 32, "small": 32, "base": 256,
                                                       "large": 128})
    sweep_batch: dict = field(default_factory=dict)  # preset -> REC inference batches to plot
    split_samples: int | None = 0       # 0: skip; None: the full 5,657; N: N extrapolated
    split_workers: int = 0
    warmup: int = 2
    repeats: int = 5
    input_sets: int = 3
    # passes > 1: measure every engine once per pass (runs=1), alternating the engine order
    # between passes, and combine the passes (the spread is then between passes). On a
    # shared CPU this interleaving keeps load drift from favouring one engine.
    passes: int = 1
    count_flops: bool = True
    profile: bool = False   # also record where one training step's time goes (profile_ops)


def _params(model) -> dict:
    backbone = sum(p.numel() for p in model.backbone_parameters())
    head = sum(p.numel() for p in model.head_parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"backbone_m": backbone / 1e6, "head_m": head / 1e6, "total_m": total / 1e6}


def _check_finite(value, what: str) -> None:
    if not torch.isfinite(value.float()).all():
        raise RuntimeError(f"{what}: non-finite result before timing")


def _count(engine, config, task: str, train: bool) -> dict:
    """FLOPs per sample of ``task`` at batch 1: forward (inference) or forward + backward.
    Counted on the eager function with the torch backend (FLOPs are the model's, whatever
    runs or compiles it; no Triton kernel is compiled for the batch-1 shapes)."""
    batch = make_batch(config, 1, engine.device, seed=123, task=task)
    model = engine.model
    fn_eager = TASK_FNS[task]
    if train:
        model.train()

        def fn():
            with engine.context(), use_backend("torch"):
                loss = fn_eager(model, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        model.eval()

        def fn():
            with torch.no_grad(), engine.context(), use_backend("torch"):
                fn_eager(model, batch)
    return count_flops(fn)


def _flops(engine, config, settings: CostSettings, row: dict) -> float | None:
    """Write the counted GFLOPs / GMACs per sample into ``row``; return the training-step
    FLOPs per sample (None when counting failed: the timings are kept regardless)."""
    try:
        fwd = _count(engine, config, "rec_infer", train=False)
        row["gflops_rec"], row["gmacs_rec"] = fwd["gflops"], fwd["gmacs"]
        row["flops_by_op_rec"] = fwd["by_op"]
        train_flops = _count(engine, config, "rec", train=True)["flops"]
        row["gflops_rec_train"] = train_flops / 1e9
        if "res_infer" in settings.infer_tasks or "res" in settings.train_tasks:
            res = _count(engine, config, "res_infer", train=False)
            row["gflops_res"], row["gmacs_res"] = res["gflops"], res["gmacs"]
        return train_flops
    except Exception as exc:  # noqa: BLE001 - a counting failure must not lose the timings
        log.warning("FLOP count failed for (%s) %s: %s", engine.key, config.name, exc)
        row["flops_error"] = f"{type(exc).__name__}: {exc}"
        return None


def _measure_engine(key: str, preset: str, settings: CostSettings, device: torch.device,
                    peak_tflops: float, runs: int = 2) -> dict:
    config = get_config(preset)
    row = {"preset": preset, "engine": key, "engine_name": ENGINES[key], "device": str(device)}
    try:
        engine = build_engine(key, config, device)
    except RuntimeError as exc:
        row["skipped"] = str(exc)
        log.warning("%s", exc)
        return row
    row["notes"] = list(engine.notes)
    from torch._dynamo.utils import counters  # (imports Dynamo: not when the CLI starts)

    graph_skips = counters["inductor"]["cudagraph_skips"]
    row["dtype"] = str(engine.autocast or torch.float32).replace("torch.", "")
    row.update(_params(engine.model))
    train_flops = _flops(engine, config, settings, row) if settings.count_flops else None

    tb = settings.train_batch.get(preset, 8)
    for task in settings.train_tasks:
        with _captured(row, f"{task}_train_error", device):
            _time_train(engine, config, task, tb, settings, row, train_flops, peak_tflops,
                        runs)
    ib = settings.infer_batch.get(preset, 32)
    for task in settings.infer_tasks:
        with _captured(row, f"{task}_error", device):
            _time_infer(engine, config, task, ib, settings, row, runs)
    with _captured(row, "sweep_error", device):
        _sweep(engine, config, settings.sweep_batch.get(preset, ()), settings, row)
    if settings.split_samples != 0:
        n = SPLIT_SIZE if settings.split_samples is None else settings.split_samples
        with _captured(row, "split_error", device):
            row.update(split_test_time(engine, config, n, batch=ib,
                                       workers=settings.split_workers))

    if engine.cuda_graphs:
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - graph_skips
        if row["cudagraph_skips"]:
            row["notes"].append(f"{row['cudagraph_skips']} graph(s) ran without CUDA graphs "
                                "(the reasons are in the log)")
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


@contextlib.contextmanager
def _captured(row: dict, key: str, device: torch.device):
    """Record a failure of one measurement (out of memory, a kernel error, a compile
    error, which for Triton is not a RuntimeError) in the row under ``key`` and go on with
    the next one."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the other rows still run
        log.warning("%s: %s", key, exc)
        row[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _time_step(step, engine, config, task, batch, seed, settings, runs, what):
    """Time ``step(engine, task, inputs)`` over ``settings.input_sets`` batches of ``batch``
    samples (seeds ``seed``, ``seed + 1``, ...) after checking that one call is finite
    (``what`` names its output in the error). Returns (Measurement, peak memory in GB or
    None on the CPU)."""
    device = engine.device
    inputs = [make_batch(config, batch, device, seed=seed + s, task=task)
              for s in range(settings.input_sets)]
    _check_finite(step(engine, task, inputs[0]), f"({engine.key}) {config.name} {task} {what}")
    mem = {}
    with peak_memory(device, mem):
        m = measure(lambda x: step(engine, task, x), inputs, device,
                    settings.warmup, settings.repeats, runs)
    return m, mem["peak_mem_gb"]


def _time_train(engine, config, task, tb, settings, row, train_flops, peak_tflops, runs):
    m, peak_mem = _time_step(train_step, engine, config, task, tb, 0, settings, runs, "loss")
    if settings.profile:
        inputs = make_batch(config, tb, engine.device, seed=0, task=task)
        row[f"{task}_train_profile"] = profile_ops(lambda: train_step(engine, task, inputs),
                                                   engine.device)
    row[f"{task}_train_batch"] = tb
    row[f"{task}_train_step_s"] = m
    row[f"{task}_train_sps"] = tb / m.median
    row[f"{task}_train_peak_mem_gb"] = peak_mem
    if task == "rec" and train_flops and peak_tflops:
        achieved = train_flops * tb / m.median / 1e12
        row["rec_train_tflops"] = achieved
        row["rec_train_mfu"] = achieved / peak_tflops


def _time_infer(engine, config, task, ib, settings, row, runs):
    short = task.split("_")[0]
    for label, b in (("b1", 1), ("large", ib)):
        if label == "b1" and task != "rec_infer":
            continue
        m, peak_mem = _time_step(infer_step, engine, config, task, b, 10, settings, runs,
                                 "output")
        row[f"{short}_infer_{label}_batch"] = b
        row[f"{short}_infer_{label}_s"] = m
        row[f"{short}_infer_{label}_sps"] = b / m.median
        if label == "b1":
            row["rec_latency_b1_ms"] = 1e3 * m.median
        else:
            row[f"{short}_infer_peak_mem_gb"] = peak_mem


def _sweep(engine, config, batches, settings, row):
    device, sweep = engine.device, {}
    for b in batches:
        inputs = [make_batch(config, b, device, seed=20 + s, task="rec_infer")
                  for s in range(settings.input_sets)]
        m = measure(lambda x: infer_step(engine, "rec_infer", x), inputs, device,
                    settings.warmup, settings.repeats, runs=1)
        sweep[b] = b / m.median
        del inputs
    if sweep:
        row["infer_sweep"] = sweep


def add_ratios(rows: list[dict]) -> None:
    """Add ``<key>_vs_a`` / ``<key>_vs_b`` / ``<key>_vs_b+`` to every row: its figure over the
    same preset's row (a) / (b) / (b+) figure, for each key of :data:`SPEED_KEYS` (speeds:
    > 1 = faster)."""
    for row in rows:
        for ref in ("a", "b", "b+"):
            base = next((r for r in rows if r["preset"] == row["preset"] and r["engine"] == ref
                         and r.get("row") == row.get("row") and "skipped" not in r), None)
            if base is None:
                continue
            for key in SPEED_KEYS:
                if key in row and key in base and base[key]:
                    row[f"{key}_vs_{ref}"] = row[key] / base[key]


def _combine(first: dict, second: dict) -> dict:
    """Row of pass 1 with every timing replaced by the median of both passes' medians (and
    the speeds recomputed); the spread is the difference between the passes."""
    row = dict(first)
    for key, value in first.items():
        other = second.get(key)
        if isinstance(value, dict) and "median_s" in value and isinstance(other, dict):
            runs = list(value["runs_s"]) + list(other["runs_s"])
            mid = statistics.median(runs)
            row[key] = Measurement(median_s=mid, runs_s=runs, repeats=value["repeats"],
                                   spread=(max(runs) - min(runs)) / mid if mid else 0.0,
                                   min_s=min(value["min_s"], other["min_s"]))
    for key in list(row):
        if key.endswith("_sps") and key != "split_sps":
            stem = key[:-4]
            timing = row.get(stem + ("_step_s" if stem.endswith("_train") else "_s"))
            batch = row.get(stem + "_batch")
            if timing and batch:
                row[key] = batch / timing["median_s"]
    if "rec_train_mfu" in row and "rec_train_sps" in first and first["rec_train_sps"]:
        scale = row["rec_train_sps"] / first["rec_train_sps"]
        row["rec_train_mfu"] *= scale
        row["rec_train_tflops"] *= scale
    row["passes"] = 2
    return row


def _agreement(preset: str, settings: CostSettings, device: torch.device) -> dict:
    """Check before timing that (a) and ours compute the same encoder (see
    :func:`oneref.bench.engines.encoder_agreement`); skipped unless both are in the table."""
    if "a" not in settings.engines or not set("cde") & set(settings.engines):
        return {}
    try:
        diff = encoder_agreement(get_config(preset), device)
    except Exception as exc:  # noqa: BLE001 - recorded; the timings still run
        log.warning("encoder agreement check failed for %s: %s", preset, exc)
        return {"encoder_check_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    log.info("%s: encoder outputs of (a) and ours differ by at most %.3g", preset, diff)
    return {"encoder_max_diff_a_vs_ours": diff}


def iter_cost_rows(settings: CostSettings, device: torch.device, peak_tflops: float):
    """Measure every (preset, engine) row of ``settings`` on ``device``, yielding each row
    as soon as it is measured (ratios are added by the caller, over all rows)."""
    for preset in settings.presets:
        analytic = analytic_encoder_flops(get_config(preset))
        agreement = _agreement(preset, settings, device)
        for row in _engine_rows(preset, settings, device, peak_tflops):
            row["analytic_encoder_gflops"] = analytic["total"] / 1e9
            row.update(agreement)
            yield row


def _engine_rows(preset: str, settings: CostSettings, device: torch.device,
                 peak_tflops: float):
    """One preset's engine rows: one after another, or with two passes in alternating
    order (combined, so only after the second pass)."""
    if settings.passes == 1:
        for key in settings.engines:
            log.info("cost table: %s engine (%s)", preset, key)
            yield _measure_engine(key, preset, settings, device, peak_tflops)
        return
    one = dataclasses.replace(settings, passes=1)
    measured = {}
    for i in range(2):
        order = settings.engines if i % 2 == 0 else tuple(reversed(settings.engines))
        for key in order:
            log.info("cost table: %s engine (%s), pass %d", preset, key, i + 1)
            measured.setdefault(key, []).append(_measure_engine(key, preset, one, device,
                                                                peak_tflops, runs=1))
    for key in settings.engines:
        first = measured[key][0]
        yield first if "skipped" in first else _combine(*measured[key])


def run_cost_table(settings: CostSettings, device: torch.device, peak_tflops: float) -> list[dict]:
    """Every row of :func:`iter_cost_rows`, with the ratios between engines."""
    rows = list(iter_cost_rows(settings, device, peak_tflops))
    add_ratios(rows)
    return rows


def gmean(values) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
