"""benchmarks/README.md, G1: multiway_attention (Triton) forward and forward+backward vs SDPA
with a bool key mask (PyTorch picks its best backend that accepts the mask) and the eager
reference, bf16,
B = 32, H = 12, Dh = 64, S = 641 (577 vision + text lengths 8..64).
``extra_info["flops"]`` counts 4 * H * S * Dh * sum_b(valid keys) forward (2.5x more for the
backward), the convention of the op's FLOP formula; a row's TFLOP/s = flops / mean time.
Results are checked against :func:`oneref.ops.reference.multiway_attention` before timing."""

import pytest
import torch
import torch.nn.functional as F

from oneref.ops import reference
from oneref.ops.cases import CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

IMPLS = ["triton", "sdpa", "torch"]
CASE = CASES["multiway_attention"]


@pytest.fixture(scope="module")
def inputs():
    """Two input sets of the shared case at batch 32 (rotated between calls): q, k, v views
    of a packed (B, S, 3, H, Dh) tensor, as the model passes them, and text lengths 8..64."""
    return [CASE.inputs(seed, "cuda", torch.bfloat16, scale=8)[:5] for seed in (0, 1)]


def _sdpa(q, k, v, lengths, num_vision):
    mask = reference.key_padding_mask(lengths, num_vision, q.shape[1])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _impl(name):
    if name == "triton":
        from oneref.kernels import attention

        return attention.multiway_attention
    return _sdpa if name == "sdpa" else reference.multiway_attention


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_attention_fwd(benchmark, timed, rotate, inputs, impl):
    fn = _impl(impl)
    args = inputs[0]
    want = reference.multiway_attention(*(t.float() for t in args[:3]), *args[3:])
    got = fn(*args).float()
    assert (got - want).abs().max().item() < 2e-2
    next_args = rotate(inputs)
    benchmark.group = "G1 multiway_attention fwd bf16 B32 H12 S641 Dh64"
    benchmark.extra_info["flops"] = CASE.flops(args) / 3.5
    with torch.no_grad():
        timed(lambda: fn(*next_args()), rounds=20, iterations=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_attention_fwd_bwd(benchmark, timed, rotate, inputs, impl):
    fn = _impl(impl)
    sets = [CASE.training_inputs(seed, "cuda", torch.bfloat16, scale=8)[:5] for seed in (0, 1)]
    args = sets[0]
    grad = torch.randn_like(args[0])
    # gradients checked against the fp32 reference before timing
    got = torch.autograd.grad(fn(*args), args[:3], grad)
    ref_leaves = [t.detach().float().requires_grad_() for t in args[:3]]
    ref = reference.multiway_attention(*ref_leaves, *args[3:])
    want = torch.autograd.grad(ref, ref_leaves, grad.float())
    for g, w in zip(got, want):
        assert (g.float() - w).abs().max().item() < 5e-2 * (1 + w.abs().max().item())
    next_args = rotate(sets)

    def step():
        fn(*next_args()).backward(grad)

    benchmark.group = "G1 multiway_attention fwd+bwd bf16 B32 H12 S641 Dh64"
    benchmark.extra_info["flops"] = CASE.flops(args)
    timed(step, rounds=20, iterations=3)
