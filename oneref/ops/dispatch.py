"""Dispatch of the fused ops to a backend (docs/ops.md).

Three backends implement the ops of :mod:`oneref.ops` with one signature (the table is
:mod:`oneref.ops.registry`):

* ``cuda``   - the compiled extension ``oneref._C`` (CUDA kernels on GPU tensors, its C++
  kernels on CPU tensors);
* ``triton`` - the Triton kernels of :mod:`oneref.kernels` (GPU tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported);
* ``torch``  - PyTorch composites and :mod:`oneref.ops.reference`, always available.

``auto`` on CUDA tensors runs, per op and per pass (training when autograd is recording,
else inference), the backend that the committed policy (:mod:`oneref.ops.policy`) measured
fastest on this GPU generation, and the torch composite where nothing was measured; on CPU
tensors it runs ``torch``. Inputs the chosen backend does not support (a dtype, a head dim)
go to ``torch``. The setting is overridable per call (``backend=``), by the
:func:`use_backend` context manager and by ``ONEREF_BACKEND``, each for every op or per op;
an explicit backend that cannot run raises with its reasons, nothing falls back
silently.

Resolution is cached per (op, device type, setting, pass): inside a step it is a dict
lookup and metadata checks, which ``torch.compile`` folds into the graph. The first
resolution imports the backend; :func:`prepare` does all of them up front (the trainer and
the benchmarks call it before compiling).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Mapping
from typing import Callable, Iterator

import torch

from oneref.ops.policy import choice as policy_choice, generation
from oneref.ops.registry import BACKENDS, OPS, Impl

__all__ = ["BACKENDS", "BackendUnavailableError", "use_backend", "current_backend", "resolve",
           "prepare", "choices", "backend_status", "unavailable_reasons"]

log = logging.getLogger(__name__)

_CHOICES = ("auto",) + BACKENDS
# Each backend's module: its availability check, and (cuda) the op registrations it makes
# with torch.library when imported.
_BACKEND_MODULES = {
    "torch": "oneref.ops.torch_backend",
    "triton": "oneref.ops.triton_backend",
    "cuda": "oneref.ops.cuda_backend",
}
_load_errors: dict[str, str] = {}
# The settings of the open use_backend blocks, innermost last: a backend for every op, or
# {op: backend} for some. A plain list, not a ContextVar: Dynamo traces a module global on
# every torch version this package supports.
_settings: list[str | dict[str, str]] = []
# ONEREF_BACKEND comma lists -> their parsed (default, {op: backend}), parsed once each.
_environment_settings: dict[str, tuple[str, dict[str, str]]] = {}
# (op, device type, setting, training) -> candidates [(backend, impl, function)], in order.
_candidates: dict[tuple[str, str, str, bool], tuple[tuple[str, Impl, Callable], ...]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend set explicitly cannot run an op on this device or take its inputs."""


def _validate(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {_CHOICES}")
    return name


def _per_op(mapping, source: str) -> dict[str, str]:
    """``mapping`` checked: every key an op, every value a backend choice."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{source}: expected a backend name or {{op: backend}}, got "
                        f"{type(mapping).__name__}")
    unknown = [op for op in mapping if op not in OPS]
    if unknown:
        raise ValueError(f"{source}: unknown op(s) {', '.join(map(repr, unknown))}; ops: "
                         f"{', '.join(OPS)}")
    return {op: _validate(backend, f"{source}[{op!r}]") for op, backend in mapping.items()}


def _parse_environment(value: str) -> tuple[str, dict[str, str]]:
    """``ONEREF_BACKEND``'s comma list: at most one backend for every op (default
    ``auto``) and ``op=backend`` items for some, e.g. ``auto,multiway_layer_norm=triton``.
    Empty items are skipped, so an empty value means ``auto``."""
    defaults, per_op = [], {}
    for item in value.split(","):
        name, sep, backend = item.partition("=")
        name, backend = name.strip(), backend.strip()
        if sep and not (name and backend):
            raise ValueError(f"ONEREF_BACKEND item {item.strip()!r}: write op=backend")
        if sep and name in per_op:
            raise ValueError(f"ONEREF_BACKEND={value!r} sets {name!r} twice")
        if sep:
            per_op[name] = backend
        elif name in OPS:
            raise ValueError(f"ONEREF_BACKEND item {name!r} is an op: write {name}=backend")
        elif name:
            defaults.append(name)
    if len(defaults) > 1:
        raise ValueError(f"ONEREF_BACKEND={value!r} names {len(defaults)} backends for every "
                         "op; name one, and op=backend for the others")
    default = _validate(defaults[0] if defaults else "auto", "ONEREF_BACKEND")
    return default, _per_op(per_op, "ONEREF_BACKEND")


def current_backend(op: str | None = None) -> str:
    """The backend in force for ``op``: the innermost :func:`use_backend` that sets it,
    else ``ONEREF_BACKEND``, else ``auto``. With no op: the setting of the ops that no
    per-op setting names."""
    for setting in reversed(_settings):
        if isinstance(setting, str):
            return setting
        if op in setting:
            return setting[op]
    value = os.environ.get("ONEREF_BACKEND", "auto")
    if value in _CHOICES:
        return value
    parsed = _environment_settings.get(value)
    if parsed is None:
        parsed = _environment_settings[value] = _parse_environment(value)
    default, per_op = parsed
    return per_op.get(op, default)


def _source_of(op: str, call_backend: str | None) -> str:
    """Where the backend setting of ``op`` comes from (``call_backend``: the call's
    ``backend=``), for error messages."""
    if call_backend is not None:
        return "backend="
    if any(isinstance(s, str) or op in s for s in _settings):
        return "use_backend"
    return f"ONEREF_BACKEND={os.environ.get('ONEREF_BACKEND', '')!r}"


@contextlib.contextmanager
def use_backend(name: str | Mapping[str, str]) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``auto``, cuda, triton, torch), or
    with ``{op: backend}`` only the ops it names, the others as outside the block."""
    _settings.append(_validate(name, "use_backend") if isinstance(name, str)
                     else _per_op(name, "use_backend"))
    try:
        yield
    finally:
        _settings.pop()


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
    if op is not None and backend not in OPS[op].impls:
        reasons.append(f"{backend} backend does not implement {op}")
    return reasons


def _entry(op: str, backend: str) -> tuple[str, Impl, Callable]:
    impl = OPS[op].impls[backend]
    return backend, impl, impl.load()


def choices(op: str, device: torch.device, training: bool) -> list[tuple[str, str]]:
    """``auto``'s candidates for ``op`` on ``device`` as (backend, why), in order."""
    if device.type != "cuda":
        return [("torch", f"{device.type} tensors: the torch composite")]
    gen = generation(torch.cuda.get_device_capability(device))
    backend, why = policy_choice(op, gen, training)
    if backend != "torch":
        reasons = unavailable_reasons(backend, op, device)
        if reasons:
            log.warning("oneref.ops.%s: the policy picks %s on %s, which cannot run here (%s); "
                        "using the torch composite", op, backend, gen, "; ".join(reasons))
            return [("torch", f"{backend} unavailable: {'; '.join(reasons)}")]
        return [(backend, why), ("torch", "inputs the policy's backend does not support")]
    return [("torch", why)]


def _resolve_candidates(op: str, device: torch.device, setting: str, training: bool,
                        call_backend: str | None = None):
    if torch.compiler.is_compiling():
        log.warning("oneref.ops.%s resolved while compiling (a graph break): call "
                    "oneref.ops.prepare(device) before torch.compile", op)
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if setting != "auto":
        reasons = unavailable_reasons(setting, op, device)
        if reasons:
            raise BackendUnavailableError(
                f"oneref.ops.{op}: backend {setting!r} ({_source_of(op, call_backend)}) cannot run "
                f"here: {'; '.join(reasons)}")
        return (_entry(op, setting),)
    _load("torch")
    return tuple(_entry(op, backend) for backend, _ in choices(op, device, training))


def resolve(op: str, device: torch.device, backend: str | None = None,
            dtype: torch.dtype | None = None, head_dim: int | None = None) -> Callable:
    """The implementation of ``op`` to run on ``device`` for inputs of ``dtype`` (and
    ``head_dim`` for attention)."""
    setting = _validate(backend, "backend=") if backend is not None else current_backend(op)
    key = (op, device.type, setting, torch.is_grad_enabled())
    found = _candidates.get(key)
    if found is None:
        found = _candidates[key] = _resolve_candidates(op, device, *key[2:], backend)
    for name, impl, function in found:
        reasons = impl.reasons(device.type, dtype, head_dim)
        if not reasons:
            return function
        if setting != "auto":
            raise BackendUnavailableError(
                f"oneref.ops.{op}: backend {name!r} ({_source_of(op, backend)}) cannot take "
                f"these inputs: {'; '.join(reasons)}")
    raise RuntimeError(f"oneref.ops.{op}: no backend takes {device.type} {dtype} inputs")


def prepare(device: torch.device | str) -> None:
    """Resolve every op for ``device`` under its current setting, for training and
    inference, so no resolution happens inside a compiled step."""
    device = torch.device(device)
    for op in OPS:
        setting = current_backend(op)
        for training in (True, False):
            key = (op, device.type, setting, training)
            if key not in _candidates:
                _candidates[key] = _resolve_candidates(op, device, setting, training)


def backend_status(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """For every backend, the reasons it is unavailable on ``device`` (empty list: available)."""
    return {name: unavailable_reasons(name, device=device) for name in BACKENDS}
