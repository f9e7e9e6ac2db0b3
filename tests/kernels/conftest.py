"""Setup for the Triton kernel tests.

Without a GPU the kernels run in the Triton interpreter: ``TRITON_INTERPRET=1`` must be set
before any kernel module is imported (``triton.jit`` decides at decoration time), so it is set
in the root ``tests/conftest.py`` (any test directory may import the kernels first), unless
the caller chose a value or CUDA is present.
Nothing in ``oneref`` imports triton on ``import oneref``.

Tests marked ``interpret`` (CPU tensors through the interpreter) are skipped when the
interpreter is off; tests marked ``gpu`` are skipped without CUDA (root conftest).

Fixtures:
  * ``assert_kernel_close(name, kernel, torch_same, ref64, floor)`` - the error criterion.
  * ``poison_empty`` - makes ``torch.empty``/``torch.empty_like`` return NaN-filled tensors
    while active, so any output element a kernel fails to write shows up as NaN.
"""

from __future__ import annotations

import os

import pytest
import torch



def _fast_interpreter_dot() -> None:
    """Speed up the interpreter's fp16/fp32 ``tl.dot``.

    The interpreter computes ``np.matmul(a, b, dtype=float32)``: numpy's slow mixed-type loop
    on fp16 operands, and multi-threaded BLAS on fp32 ones, which crawls on a loaded 2-core
    machine next to torch's own thread pool (tens of ms per tile; an S = 641 attention took
    tens of seconds). Here the operands are cast to contiguous fp32 and multiplied by torch
    (single-threaded during these tests, see ``_one_thread``): the same semantics - fp16
    products are exact in fp32, accumulation in fp32. Other operand types keep the original
    path; if the interpreter's internals differ (another triton version) nothing is patched.
    """
    import numpy as np

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if original is None or handle is None or getattr(original, "_oneref_fast", False):
        return
    fast = (np.dtype(np.float16), np.dtype(np.float32))

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.data.dtype in fast and b.data.dtype in fast and d.data.dtype == np.float32:
            lhs = torch.from_numpy(np.ascontiguousarray(a.data, dtype=np.float32))
            rhs = torch.from_numpy(np.ascontiguousarray(b.data, dtype=np.float32))
            out = torch.matmul(lhs, rhs).numpy() + d.data
            return handle(out.astype(np.float32, copy=False), d.dtype.scalar)
        return original(self, a, b, d, *args, **kwargs)

    create_dot._oneref_fast = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fast_interpreter_dot()


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if interpreter_on():
        return
    skip = pytest.mark.skip(reason="TRITON_INTERPRET=1 is not set (a CUDA device is present)")
    for item in items:
        if "interpret" in item.keywords:
            item.add_marker(skip)


def _describe(diff: torch.Tensor) -> str:
    flat = diff.flatten()
    worst = int(flat.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    return f"max {flat[worst].item():.3e} at {index}, mean {flat.mean().item():.3e}"


def check_kernel_close(name: str, kernel: torch.Tensor, torch_same: torch.Tensor,
                       ref64: torch.Tensor, floor: float = 0.0, factor: float = 2.0) -> None:
    """Kernel error vs an fp64 reference <= ``factor`` x the error of the same-precision
    PyTorch reference, + ``floor`` (absolute). NaN/inf in the kernel result always fails."""
    assert kernel.shape == ref64.shape, (
        f"{name}: shape {tuple(kernel.shape)} != {tuple(ref64.shape)}")
    kernel64, torch64 = kernel.detach().double(), torch_same.detach().double()
    ref64 = ref64.detach().double()
    bad = ~torch.isfinite(kernel64)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} non-finite values, first at {bad.nonzero()[0].tolist()}")
    err_kernel = (kernel64 - ref64).abs()
    err_torch = (torch64 - ref64).abs()
    limit = factor * err_torch.max().item() + floor
    assert err_kernel.max().item() <= limit, (
        f"{name}: kernel error {_describe(err_kernel)} > {factor} x torch error "
        f"({_describe(err_torch)}) + {floor:.1e}; |ref| max {ref64.abs().max().item():.3e}")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per kernel test: the interpreter issues thousands of tiny matmuls,
    and waking a thread pool for each costs far more than the work on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def assert_kernel_close():
    return check_kernel_close


@pytest.fixture
def poison_empty(monkeypatch):
    """NaN-filled (floating) / -1-filled (integer) fresh tensors from torch.empty(_like)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield
