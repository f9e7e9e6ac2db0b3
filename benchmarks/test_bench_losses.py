"""benchmarks/README.md, G2: VTS L1, box-mask focal + dice and STS KL (Triton, forward +
backward) vs the eager reference composites, B = 64, 24 x 24 grid, 64 text positions, bf16
predictions."""

import pytest
import torch

from oneref.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, GRID, TEXT = 64, 24, 64


def _fwd_bwd(fn, *args, grad_of=(0,)):
    leaves = [a.clone().requires_grad_() if i in grad_of else a for i, a in enumerate(args)]
    return lambda: fn(*leaves).backward()


@pytest.fixture(scope="module")
def boxes():
    gen = torch.Generator(device="cuda").manual_seed(0)
    return torch.cat([torch.rand(BATCH, 2, device="cuda", generator=gen),
                      torch.rand(BATCH, 2, device="cuda", generator=gen) * 0.8 + 0.05], 1)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_vts_loss(benchmark, timed, boxes, impl):
    from oneref.kernels import losses

    pred = torch.randn(BATCH, GRID * GRID, 4, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(losses.vts_loss(pred, boxes, GRID),
                               reference.vts_loss(pred, boxes, GRID))
    fn = losses.vts_loss if impl == "triton" else reference.vts_loss
    benchmark.group = "G2 vts_loss fwd+bwd B=64 G=24"
    benchmark.extra_info["bytes"] = 3 * pred.numel() * 2
    timed(_fwd_bwd(fn, pred, boxes, GRID), rounds=50, iterations=5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_box_mask_loss(benchmark, timed, boxes, impl):
    from oneref.kernels import losses

    logits = (torch.randn(BATCH, GRID, GRID, device="cuda") * 3).to(torch.bfloat16)
    torch.testing.assert_close(losses.box_mask_loss(logits, boxes),
                               reference.box_mask_loss(logits, boxes), rtol=1e-4, atol=1e-4)
    fn = losses.box_mask_loss if impl == "triton" else reference.box_mask_loss
    benchmark.group = "G2 box_mask_loss fwd+bwd B=64 G=24"
    benchmark.extra_info["bytes"] = 3 * logits.numel() * 2
    timed(_fwd_bwd(fn, logits, boxes), rounds=50, iterations=5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_sts_kl(benchmark, timed, impl):
    from oneref.kernels import losses

    pred = torch.randn(BATCH, TEXT, device="cuda").to(torch.bfloat16)
    target = torch.randn(BATCH, TEXT, device="cuda")
    valid = torch.rand(BATCH, TEXT, device="cuda") > 0.2
    torch.testing.assert_close(losses.sts_kl(pred, target, valid),
                               reference.sts_kl(pred, target, valid), rtol=1e-4, atol=1e-5)
    fn = losses.sts_kl if impl == "triton" else reference.sts_kl
    benchmark.group = "G2 sts_kl fwd+bwd B=64 T=64"
    timed(_fwd_bwd(fn, pred, target, valid), rounds=50, iterations=5)
