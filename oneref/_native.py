"""Loader of the native extension ``oneref._C`` (CPU and CUDA kernels of the fused ops).

Importing ``oneref._C`` registers the ops ``torch.ops.oneref.*`` (TORCH_LIBRARY). The
extension is optional: a package installed with ``ONEREF_SKIP_EXT=1`` (or whose build was
skipped) works without it, and :func:`load` says why it is missing.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

import torch  # noqa: F401 - libtorch must be loaded before the extension

__all__ = ["NativeStatus", "load", "status", "BUILD_HINT"]

BUILD_HINT = ("build it by installing from source with `pip install --no-build-isolation .` "
              "(-e for development; torch installed first; CUDA_HOME or nvcc on PATH for the "
              "CUDA kernels)")


@dataclass(frozen=True)
class NativeStatus:
    """What is known about the extension: loaded, built with CUDA, or why it failed."""

    loaded: bool
    with_cuda: bool = False
    cuda_version: str | None = None
    error: str | None = None


@functools.lru_cache(maxsize=None)
def _import() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("oneref._C"), None
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def load() -> ModuleType | None:
    """The imported extension module, or None when it is not built or fails to load."""
    return _import()[0]


def status() -> NativeStatus:
    module, error = _import()
    if module is None:
        return NativeStatus(loaded=False, error=error)
    return NativeStatus(loaded=True, with_cuda=bool(module.built_with_cuda()),
                        cuda_version=module.cuda_version())
