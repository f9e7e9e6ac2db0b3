"""The one table of ops (docs/ops.md): each op's readable reference, each backend's
implementation, and what each implementation supports.

:data:`OPS` is the source of ``oneref.ops.__all__`` (the dispatched ops), of the dispatcher's
candidates (:mod:`oneref.ops.dispatch`), of :func:`not_supported_reasons`, of the list of
ops the extension must register (``tests/csrc``) and of the conformance tests
(``tests/ops/test_conformance.py``, one per op and backend). Implementations are named by
``"module:attribute"`` and imported on first use, so ``import oneref`` never imports triton
or loads the extension.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Impl", "OpSpec", "OPS", "BACKENDS", "not_supported_reasons"]

BACKENDS = ("cuda", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op.

    target: ``"module:attribute"`` of the function (signature of the reference).
    devices: device types it runs on (a backend may still be unavailable there: see
        :func:`oneref.ops.dispatch.unavailable_reasons`).
    dtypes: floating dtypes of the op's first tensor it accepts (None: any).
    head_dims: head dims it accepts (attention only; None: any).
    """

    target: str
    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None

    def load(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def reasons(self, device_type: str, dtype: torch.dtype | None = None,
                head_dim: int | None = None) -> list[str]:
        """Why this implementation cannot take inputs of this kind (empty: it can). Reads
        metadata only, so it traces under ``torch.compile``."""
        out = []
        if device_type not in self.devices:
            out.append(f"no kernel for {device_type} tensors (runs on {', '.join(self.devices)})")
        if self.dtypes is not None and dtype is not None and dtype.is_floating_point \
                and dtype not in self.dtypes:
            out.append(f"dtype {dtype} is not supported (supported: "
                       f"{', '.join(str(d).replace('torch.', '') for d in self.dtypes)})")
        if self.head_dims is not None and head_dim is not None and head_dim not in self.head_dims:
            out.append(f"head dim {head_dim} is not supported (supported: {self.head_dims})")
        return out


@dataclass(frozen=True)
class OpSpec:
    """An op: its name, its reference (``oneref.ops.reference``), its implementations and
    the op whose policy row it follows until it has its own (the packed attention runs the
    same kernels as ``multiway_attention``, so it takes that op's measured choice until G1
    measures it)."""

    name: str
    impls: dict[str, Impl] = field(default_factory=dict)
    # the policy row it follows until it is measured itself (same kernels); None: its own
    measured_as: str | None = None

    @property
    def policy_key(self) -> str:
        """The op whose row of the policy table this op follows when it has none."""
        return self.measured_as or self.name

    @property
    def reference(self) -> Callable:
        return getattr(importlib.import_module("oneref.ops.reference"), self.name)


def _torch(name: str, composite: bool = False) -> Impl:
    module = "oneref.ops.torch_backend" if composite else "oneref.ops.reference"
    return Impl(f"{module}:{name}", devices=("cpu", "cuda"))


def _triton(module: str, name: str, **kwargs) -> Impl:
    # CPU tensors too: the Triton interpreter (the backend is unavailable there otherwise).
    return Impl(f"oneref.kernels.{module}:{name}", devices=("cuda", "cpu"),
                dtypes=_TRITON_DTYPES, **kwargs)


def _cuda(name: str) -> Impl:
    # The extension has a C++ CPU kernel beside each CUDA kernel.
    return Impl(f"oneref.ops.cuda_backend:{name}", devices=("cuda", "cpu"), dtypes=_CUDA_DTYPES)


def _extension_op(name: str, triton_module: str) -> OpSpec:
    """An op with all three backends: the extension's kernels, Triton's, the reference."""
    return OpSpec(name, {"cuda": _cuda(name), "triton": _triton(triton_module, name),
                         "torch": _torch(name)})


def _attention_op(name: str, measured_as: str | None = None) -> OpSpec:
    """An attention op: the Triton kernels (their head dims) and the SDPA composite."""
    return OpSpec(name, {"triton": _triton("attention", name, head_dims=(16, 32, 64, 128)),
                         "torch": _torch(name, composite=True)}, measured_as)


OPS: dict[str, OpSpec] = {spec.name: spec for spec in (
    _attention_op("multiway_attention"),
    _attention_op("packed_multiway_attention", measured_as="multiway_attention"),
    OpSpec("multiway_linear", {
        "triton": _triton("multiway_linear", "multiway_linear"),
        "torch": _torch("multiway_linear", composite=True)}),
    *(OpSpec(name, {"triton": _triton("layer_norm", name), "torch": _torch(name, composite=True)})
      for name in ("multiway_layer_norm", "multiway_add_layer_norm")),
    *(_extension_op(name, module) for name, module in (
        ("referring_mask", "masking"), ("apply_mask_token", "gather"),
        ("masked_gather", "gather"), ("masked_scatter", "gather"), ("vts_loss", "losses"),
        ("box_mask_loss", "losses"))),
    OpSpec("focal_dice_loss", {
        "triton": _triton("losses", "focal_dice_loss"), "torch": _torch("focal_dice_loss")}),
    OpSpec("linear_cross_entropy", {
        "triton": _triton("cross_entropy", "linear_cross_entropy"),
        "torch": _torch("linear_cross_entropy")}),
    OpSpec("sts_kl", {
        "triton": _triton("losses", "sts_kl"), "torch": _torch("sts_kl")}),
)}


def not_supported_reasons(op: str, backend: str, device_type: str,
                          dtype: torch.dtype | None = None,
                          head_dim: int | None = None) -> list[str]:
    """Why ``backend``'s ``op`` cannot take these inputs (the backend's availability on the
    machine is :func:`oneref.ops.dispatch.unavailable_reasons`)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    impl = OPS[op].impls.get(backend)
    if impl is None:
        return [f"{backend} backend does not implement {op}"]
    return impl.reasons(device_type, dtype, head_dim)
