"""``oneref.info()``: which op backends can run here, and why the others cannot.

Modelled on ``python -m xformers.info``: one line per backend (available, or the reasons it
is not), then the versions that matter (torch, CUDA, triton), how the native extension
``oneref._C`` was built, and the backend ``auto`` runs each op on per GPU generation, with
the measurement behind it (docs/ops.md).
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any, TextIO

import torch

from oneref import _native
from oneref.ops import policy
from oneref.ops.dispatch import BACKENDS, backend_status
from oneref.ops.registry import OPS

__all__ = ["collect", "format_report", "info"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(devices: tuple[str, ...] = ("cuda", "cpu")) -> dict[str, Any]:
    """Backend availability on each device type (``backends[device][backend]`` is the list of
    reasons it cannot run, empty when it can) and build facts, as a dict."""
    native = _native.status()
    return {
        "backends": {device: backend_status(torch.device(device)) for device in devices},
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "extension_built": native.loaded,
        "extension_with_cuda": native.with_cuda,
        "extension_cuda_version": native.cuda_version,
        "extension_error": native.error,
        "gpu_generation": (policy.generation(torch.cuda.get_device_capability())
                           if torch.cuda.is_available() else None),
        "policy": {gen: {op: {p: policy.choice(op, gen, p == "train") for p in policy.PASSES}
                         for op in OPS} for gen in sorted(policy.load_policy())},
    }


def format_report(data: dict[str, Any]) -> str:
    """The human-readable report of :func:`collect`'s dict."""
    lines = []
    for device, status in data["backends"].items():
        lines.append(f"oneref op backends for {device} tensors:")
        for name in BACKENDS:
            reasons = status[name]
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"  {name:<7} {state}")
    cuda = data["torch_cuda"] or "none (CPU-only build)"
    lines.append(f"torch {data['torch']} (CUDA {cuda}; GPU available: {data['cuda_available']}"
                 + (f", {data['gpu']}" if data["gpu"] else "") + ")")
    lines.append(f"triton {data['triton'] or 'not installed'}")
    if data["extension_built"]:
        kernels = (f"CPU + CUDA kernels (CUDA {data['extension_cuda_version']})"
                   if data["extension_with_cuda"] else "CPU kernels only")
        lines.append(f"oneref._C: built with {kernels}")
    else:
        lines.append(f"oneref._C: not built ({data['extension_error']})")
    for gen, choices in data["policy"].items():
        here = " (this GPU)" if gen == data["gpu_generation"] else ""
        lines.append(f"auto on CUDA {gen}{here}, per op: training | inference backend (why)")
        width = max(map(len, choices), default=0)
        for op, passes in choices.items():
            (train, why_train), (infer, why_infer) = passes["train"], passes["infer"]
            why = why_train if why_train == why_infer else f"{why_train}; {why_infer}"
            lines.append(f"  {op:<{width}} {train:<6} | {infer:<6} ({why})")
    if data["gpu_generation"] and data["gpu_generation"] not in data["policy"]:
        lines.append(f"auto on CUDA {data['gpu_generation']} (this GPU): nothing measured, "
                     f"every op on the torch composite")
    return "\n".join(lines)


def info(file: TextIO | None = None) -> dict[str, Any]:
    """Write the backend report to ``file`` (default stdout) and return it as a dict
    (see :func:`collect`)."""
    data = collect()
    (file or sys.stdout).write(format_report(data) + "\n")
    return data
