"""What the host offers a CPU run: how many cores are free right now, and so how many
intra-op threads a step should use."""

from __future__ import annotations

import os
import time

__all__ = ["auto_threads"]


def _busy_cores(interval: float = 0.3) -> float:
    """Cores busy right now: the non-idle share of ``/proc/stat`` CPU time over ``interval``
    seconds, times the core count. Falls back to the 1-minute load average, which lags (it
    still counts a build that finished a minute ago)."""
    def sample() -> tuple[int, int, int]:
        with open("/proc/stat") as handle:
            lines = handle.read().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]  # the "cpu" line: all cores summed
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle, cpus

    try:
        total0, idle0, cpus = sample()
        time.sleep(interval)
        total1, idle1, _ = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    busy = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
    return busy * cpus


def auto_threads() -> int:
    """Intra-op threads for a CPU run: the cores not busy with other work, at least 1. On a
    shared machine an extra thread that must wait for a busy core makes every parallel op
    wait for it (measured: 2 threads at load 5 on 2 cores ran a step 3-10x slower than 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(1, min(cores, int(cores - _busy_cores() + 0.5)))
