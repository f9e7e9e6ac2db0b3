"""Backend registry and dispatch for the fused ops.

Three backends implement the ops of :mod:`oneref.ops` with one signature:

* ``cuda``   - the compiled extension ``oneref._C`` (CUDA kernels on GPU tensors, its C++
  kernels on CPU tensors);
* ``triton`` - the Triton kernels of :mod:`oneref.kernels` (GPU tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported);
* ``torch``  - :mod:`oneref.ops.reference`, always available.

``auto`` walks cuda -> triton -> torch and takes the first backend that implements the op
and supports the inputs; on CPU tensors it always takes ``torch`` (the compiled and
interpreted kernels are for checking, not for speed there). The choice is overridable per
call (``backend=``), by the :func:`use_backend` context manager and by ``ONEREF_BACKEND``.
An explicit backend that cannot run raises with its reasons; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Callable, Iterator

import torch

__all__ = [
    "BACKENDS",
    "register",
    "use_backend",
    "current_backend",
    "resolve",
    "backend_status",
    "unavailable_reasons",
]

BACKENDS = ("cuda", "triton", "torch")
_CHOICES = ("auto",) + BACKENDS
# Modules that register each backend's implementations when imported (lazily, so that
# `import oneref` never imports triton or loads the extension).
_BACKEND_MODULES = {
    "torch": "oneref.ops.torch_backend",
    "triton": "oneref.ops.triton_backend",
    "cuda": "oneref.ops.cuda_backend",
}

_registry: dict[str, dict[str, Callable]] = {}
_load_errors: dict[str, str] = {}
_backend_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("oneref_backend",
                                                                          default=None)


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: record ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")

    def decorator(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        return fn

    return decorator


def _validate(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {_CHOICES}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``ONEREF_BACKEND``,
    else ``auto``."""
    name = _backend_var.get()
    if name is not None:
        return name
    return _validate(os.environ.get("ONEREF_BACKEND", "auto"), "ONEREF_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``auto``, cuda, triton, torch)."""
    token = _backend_var.set(_validate(name, "use_backend"))
    try:
        yield
    finally:
        _backend_var.reset(token)


def _load(backend: str) -> None:
    """Import the backend's module once; remember its import error ("" when it loaded)."""
    if backend in _load_errors:
        return
    try:
        importlib.import_module(_BACKEND_MODULES[backend])
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        _load_errors[backend] = f"{type(exc).__name__}: {exc}"
    else:
        _load_errors.setdefault(backend, "")


def unavailable_reasons(backend: str, op: str | None = None,
                        device: torch.device | str | None = None) -> list[str]:
    """Plain-language reasons why ``backend`` cannot run ``op`` on ``device`` (empty: it can)."""
    _load(backend)
    if _load_errors.get(backend):
        return [f"{backend} backend failed to load ({_load_errors[backend]})"]
    module = importlib.import_module(_BACKEND_MODULES[backend])
    reasons = list(module.unavailable_reasons(torch.device(device) if device else None))
    if op is not None and backend not in _registry.get(op, {}):
        reasons.append(f"{backend} backend does not implement {op}")
    return reasons


def resolve(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to run on ``device``."""
    name = _validate(backend, "backend=") if backend is not None else current_backend()
    if name != "auto":
        reasons = unavailable_reasons(name, op, device)
        if reasons:
            raise RuntimeError(f"oneref.ops.{op}: backend {name!r} cannot run here: "
                               + "; ".join(reasons))
        return _registry[op][name]
    candidates = ("cuda", "triton") if device.type == "cuda" else ()
    for candidate in candidates:
        if not unavailable_reasons(candidate, op, device):
            return _registry[op][candidate]
    _load("torch")
    return _registry[op]["torch"]


def backend_status(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """For every backend, the reasons it is unavailable on ``device`` (empty list: available)."""
    return {name: unavailable_reasons(name, device=device) for name in BACKENDS}
