"""Helpers shared by the Triton kernels of :mod:`oneref.kernels` (generic, op-independent).

* :func:`interpreter_active` - are kernels running in the CPU interpreter?
* :func:`tuned` - a kernel autotuned over a config list on the GPU, or launched with one small
  fixed config in the interpreter (autotuning there would only multiply the run time).
* :func:`dot_precision` - the ``tl.dot`` input precision matching PyTorch for a dtype.
* :func:`tl_dtype` - the Triton element type of a torch dtype.
* :func:`check_supported` - uniform errors for unsupported dtypes / sizes.
* :func:`num_sms` - streaming multiprocessors of a device (1 off the GPU).
* :func:`erf_gelu`, :func:`erf_gelu_grad` - exact GELU and its derivative, in kernels.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "interpreter_active",
    "autotune_requested",
    "tuned",
    "TunedKernel",
    "dot_precision",
    "tl_dtype",
    "check_supported",
    "num_sms",
    "erf_gelu",
    "erf_gelu_grad",
    "KERNEL_DTYPES",
]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_requested() -> bool:
    """``ONEREF_AUTOTUNE=1``: tune every kernel over its configs (off by default)."""
    return os.environ.get("ONEREF_AUTOTUNE", "0") == "1"


class TunedKernel:
    """A ``@triton.jit`` kernel plus how to launch it here.

    On a GPU the kernel launches with its first config, a fixed launch setting (no tuning:
    a first step compiles one kernel per shape, not every config). ``ONEREF_AUTOTUNE=1``
    wraps it in ``triton.autotune(configs, key)`` instead, on request. In the interpreter it
    is launched with the single ``interpret`` config (its kwargs are passed as constexprs,
    ``num_warps``/``num_stages`` are dropped).
    Launch with ``kernel[grid](*args, **kwargs)``; ``grid`` may be a callable of the meta dict.
    """

    def __init__(self, fn, configs: Sequence[triton.Config], key: Sequence[str],
                 interpret: dict, **autotune_kwargs) -> None:
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.interpret = dict(interpret)
        self._autotune_kwargs = autotune_kwargs
        self._tuned = None

    def _kernel(self):
        if interpreter_active():
            return None
        if not autotune_requested():
            return self._fixed()
        if self._tuned is None:
            self._tuned = triton.autotune(configs=self.configs, key=self.key,
                                          **self._autotune_kwargs)(self.fn)
        return self._tuned

    def _fixed(self):
        """The first config without tuning (the default: autotuning compiles and times
        every config for every new shape, minutes on a first step)."""
        config = self.configs[0]
        fn = self.fn

        class _Fixed:
            def __getitem__(self, grid):
                meta = dict(config.kwargs)
                launch = fn[grid if not callable(grid) else grid(meta)]

                def run(*args, **kwargs):
                    return launch(*args, **kwargs, **meta, num_warps=config.num_warps,
                                  num_stages=config.num_stages)

                return run

        return _Fixed()

    def __getitem__(self, grid) -> Callable:
        tuned_kernel = self._kernel()
        if tuned_kernel is not None:
            return tuned_kernel[grid]
        meta = self.interpret
        launch = self.fn[grid if not callable(grid) else grid(meta)]

        def run(*args, **kwargs):
            return launch(*args, **kwargs, **meta)

        return run


def tuned(configs: Sequence[triton.Config], key: Sequence[str], interpret: dict,
          **autotune_kwargs) -> Callable[[Callable], TunedKernel]:
    """Decorator over a ``@triton.jit`` function: see :class:`TunedKernel`."""

    def wrap(fn) -> TunedKernel:
        return TunedKernel(fn, configs, key, interpret, **autotune_kwargs)

    return wrap


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: "ieee" for fp32 (PyTorch does not use TF32 by default, and
    the tests hold kernels to fp32 accuracy), "tf32" otherwise (ignored for 16-bit inputs)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tl_dtype(dtype: torch.dtype):
    """Triton element type of a torch floating dtype."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"no Triton kernel for dtype {dtype}; supported: "
                        f"{', '.join(str(d) for d in KERNEL_DTYPES)}") from None


def check_supported(op: str, name: str, tensor: torch.Tensor,
                    dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    """Raise TypeError when ``tensor`` (argument ``name`` of ``op``) has a dtype the kernel
    does not implement, ValueError when it is on a device Triton cannot run on here."""
    if tensor.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; the Triton kernel supports "
                        f"{', '.join(str(d) for d in dtypes)}")
    if tensor.device.type != "cuda" and not (tensor.device.type == "cpu"
                                             and interpreter_active()):
        raise ValueError(f"{op}: {name} is on {tensor.device}; Triton kernels need CUDA "
                         "tensors (or CPU tensors with TRITON_INTERPRET=1)")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 for CPU tensors in the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def erf_gelu(z):
    """Exact GELU, z * Phi(z) (not the tanh approximation)."""
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def erf_gelu_grad(z):
    """d GELU / dz = Phi(z) + z * phi(z)."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.math.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf
