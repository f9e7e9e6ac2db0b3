"""benchmarks/README.md, G3: linear_cross_entropy (chunked, gradient in the forward) vs eager
Linear + CE, forward + backward in bf16, for the MLM head (V = 64010, N = 64 x 64 x 0.4 masked
tokens) and the MIM head (V = 8192, N = 64 x 576 x 0.4 masked patches), D = 768. ``extra_info``
holds the peak memory above the inputs (target: <= 1/4 of eager) next to the time (<= 1x)."""

import pytest
import torch

from oneref.ops import reference
from oneref.ops.cases import CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIM = 768
HEADS = {"mlm": (1638, 64010, 0.1), "mim": (14746, 8192, 0.0)}  # rows, vocabulary, smoothing


def _inputs(rows, vocab):
    """x, weight, bias, targets of the shared case (``oneref.ops.cases``) at this head."""
    x, weight, target, bias = CASES["linear_cross_entropy"].inputs(
        0, "cuda", torch.bfloat16, scale=1, rows=rows, width=DIM, vocab=vocab)[:4]
    return x, weight, bias, target


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_bench_linear_cross_entropy(benchmark, head, impl):
    from oneref.kernels import cross_entropy

    rows, vocab, smoothing = HEADS[head]
    x, weight, bias, target = _inputs(rows, vocab)
    fn = cross_entropy.linear_cross_entropy if impl == "triton" \
        else reference.linear_cross_entropy
    torch.testing.assert_close(
        cross_entropy.linear_cross_entropy(x, weight, target, bias, -100, smoothing),
        reference.linear_cross_entropy(x, weight, target, bias, -100, smoothing),
        rtol=2e-3, atol=2e-3)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]

    def step():
        fn(leaves[0], leaves[1], target, leaves[2], -100, smoothing).backward()
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()

    step()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.extra_info["gflop"] = 6 * rows * DIM * vocab / 1e9
    benchmark.group = f"G3 linear_cross_entropy {head} N={rows} V={vocab} bf16 fwd+bwd"
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
