"""Timing primitives shared by the cost and kernel tables.

Method (docs/perf.md): warm up, take the median of repeats, rotate through several input sets
(never time one cached input, never time zeros), and repeat the whole measurement twice to
report its spread. Device ceilings (matmul peak, copy bandwidth) are measured in the same
process so every percentage is against this card as it runs now.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["sync", "time_calls", "measure", "peak_memory", "profile_ops", "matmul_peak",
           "copy_bandwidth", "Measurement"]

log = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, inputs: Sequence, device: torch.device, warmup: int,
               repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls ``fn(inputs[i % len(inputs)])`` after ``warmup``
    untimed calls. Each call is synchronised on both sides (the rows timed here are whole
    steps or kernels of >= tens of microseconds, where that costs little)."""
    if not inputs:
        raise ValueError("time_calls needs at least one input set")
    cycle = itertools.cycle(inputs)
    for _ in range(warmup):
        fn(next(cycle))
    sync(device)
    times = []
    for _ in range(repeats):
        args = next(cycle)
        sync(device)
        start = time.perf_counter()
        fn(args)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


class Measurement(dict):
    """``{"median_s", "runs_s": [median of run 1, median of run 2], "spread": (max - min) /
    median of the run medians, "min_s": fastest single call, "repeats"}``; a dict so it
    drops into the JSON unchanged. On a machine shared with other jobs the noise is additive,
    so ``min_s`` is the steadier estimate of the uncontended time."""

    @property
    def median(self) -> float:
        return self["median_s"]


def measure(fn: Callable, inputs: Sequence, device: torch.device, warmup: int = 2,
            repeats: int = 5, runs: int = 2) -> Measurement:
    """Median call time over ``runs`` independent runs of ``repeats`` calls (the second run
    warms up again, so a drift between the runs shows as spread)."""
    all_times = [time_calls(fn, inputs, device, warmup, repeats) for _ in range(runs)]
    medians = [statistics.median(times) for times in all_times]
    mid = statistics.median(medians)
    spread = (max(medians) - min(medians)) / mid if mid > 0 else 0.0
    return Measurement(median_s=mid, runs_s=medians, spread=spread, repeats=repeats,
                       min_s=min(min(times) for times in all_times))


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """Writes ``out["peak_mem_gb"]``: peak allocated GPU memory inside the block (None on CPU:
    the allocator has no per-block peak there)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            sync(device)
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            out["peak_mem_above_start_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
        else:
            out["peak_mem_gb"] = None


def profile_ops(fn: Callable, device: torch.device, calls: int = 2, top: int = 12) -> dict:
    """Where the time of ``fn()`` goes (torch.profiler over ``calls`` calls after one untimed
    call): the ``top`` ops by self time on ``device`` (GPU kernel time on CUDA, CPU time on a
    CPU), each with calls and milliseconds per ``fn`` call and its share of the total, plus
    ``busy_ms`` (that total per call) and ``wall_ms``: a GPU busy for much less than the wall
    time waits on the host."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    fn()
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    ops = [{"op": e.key, "calls": e.count / calls,
            "ms": getattr(e, attr) / 1e3 / calls, "share": getattr(e, attr) / total}
           for e in events[:top]]
    return {"busy_ms": total / 1e3 / calls, "wall_ms": 1e3 * wall / calls, "top": ops}


def _bench(fn: Callable, device: torch.device, repeats: int) -> float:
    """Median seconds of fn(): triton's do_bench on CUDA when triton imports, else timed calls."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=max(repeats * 10, 50), return_mode="median") / 1e3
        except ImportError:
            pass
    return statistics.median(time_calls(lambda _: fn(), [None], device, 2, repeats))


def matmul_peak(device: torch.device, size: int | None = None) -> dict:
    """Measured dense matmul throughput: bf16 8192^3 on CUDA, fp32 on CPU (1024^3). Random
    normal operands (zeros run faster on some cards and would flatter the ceiling)."""
    if device.type == "cuda":
        dtype, size = torch.bfloat16, size or 8192
    else:
        dtype, size = torch.float32, size or 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    seconds = _bench(lambda: torch.mm(a, b), device, repeats=10)
    flops = 2.0 * size ** 3
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "seconds": seconds,
            "tflops": flops / seconds / 1e12}


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Measured device copy bandwidth in GB/s counting bytes read + written (1 GiB on CUDA,
    64 MiB on CPU)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _bench(lambda: dst.copy_(src), device, repeats=10)
    return {"bytes": nbytes, "seconds": seconds, "gbps": 2 * nbytes / seconds / 1e9}
