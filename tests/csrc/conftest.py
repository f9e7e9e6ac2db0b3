"""Shared inputs for the tests of the native extension oneref._C.

Every test here needs the extension: without it the tests skip with the reason (and how
to build it). GPU tests are marked ``gpu`` and skip without CUDA or without the CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

from oneref import _native

NATIVE = _native.status()


@pytest.fixture
def native_ops():
    """torch.ops.oneref with fake tensors and autograd registered; skips when not built."""
    if not NATIVE.loaded:
        pytest.skip(f"oneref._C is not built ({NATIVE.error}); {_native.BUILD_HINT}")
    import oneref.ops.cuda_backend  # noqa: F401 - registers fakes and autograd

    return torch.ops.oneref


@pytest.fixture
def cuda_device():
    """The GPU, when the CUDA kernels were built and a GPU is present; else skip."""
    if not NATIVE.loaded:
        pytest.skip(f"oneref._C is not built ({NATIVE.error})")
    if not NATIVE.with_cuda:
        pytest.skip("oneref._C was built without its CUDA kernels")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    import oneref.ops.cuda_backend  # noqa: F401

    return torch.device("cuda")
