"""benchmarks/README.md, G2: masked_gather (+ its scatter gradient) and apply_mask_token
(Triton) vs eager PyTorch (``x[mask]``, ``torch.where``), bf16, B = 64, L = 576 patches, D =
768, ~40% masked. ``extra_info["bytes"]`` is the traffic of one call, for the bandwidth
column."""

import pytest
import torch

from oneref.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, LENGTH, DIM = 64, 576, 768


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, LENGTH, DIM, device="cuda", generator=gen).to(torch.bfloat16)
    mask = torch.rand(BATCH, LENGTH, device="cuda", generator=gen) < 0.4
    token = torch.randn(DIM, device="cuda", generator=gen).to(torch.bfloat16)
    return x, mask, token


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_masked_gather_fwd_bwd(benchmark, timed, inputs, impl):
    from oneref.kernels import gather

    x, mask, _ = inputs
    assert torch.equal(gather.masked_gather(x, mask), reference.masked_gather(x, mask))
    fn = gather.masked_gather if impl == "triton" else reference.masked_gather
    leaf = x.clone().requires_grad_()
    rows = int(mask.sum())
    grad = torch.randn(rows, DIM, device="cuda").to(x.dtype)

    def step():
        fn(leaf, mask).backward(grad)

    benchmark.group = "G2 masked_gather fwd+bwd bf16 64x576x768"
    # gather: read + write N rows; scatter: write B L rows, read N rows.
    benchmark.extra_info["bytes"] = 2 * (2 * rows * DIM + BATCH * LENGTH * DIM + rows * DIM)
    timed(step, rounds=50, iterations=5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_apply_mask_token(benchmark, timed, inputs, impl):
    from oneref.kernels import gather

    x, mask, token = inputs
    assert torch.equal(gather.apply_mask_token(x, mask, token),
                       reference.apply_mask_token(x, mask, token))
    fn = gather.apply_mask_token if impl == "triton" else reference.apply_mask_token
    benchmark.group = "G2 apply_mask_token fwd bf16 64x576x768"
    benchmark.extra_info["bytes"] = 2 * 2 * BATCH * LENGTH * DIM
    timed(fn, x, mask, token, rounds=50, iterations=5)
