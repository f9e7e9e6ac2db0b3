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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, HEADS, HEAD_DIM, NUM_VISION, TEXT = 32, 12, 64, 577, 64
SEQ = NUM_VISION + TEXT
IMPLS = ["triton", "sdpa", "torch"]


@pytest.fixture(scope="module")
def inputs():
    """Two input sets (rotated between calls): q, k, v views of a packed (B, S, 3, H, Dh)
    tensor, as the model passes them, and text lengths drawn from 8..64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = []
    for _ in range(2):
        qkv = torch.randn(BATCH, SEQ, 3, HEADS, HEAD_DIM, device="cuda", generator=gen)
        lengths = torch.randint(8, TEXT + 1, (BATCH,), device="cuda", generator=gen)
        sets.append((qkv.to(torch.bfloat16), lengths))
    return sets


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


def _flops(lengths):
    return 4 * HEADS * SEQ * HEAD_DIM * int((NUM_VISION + lengths).sum())


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_attention_fwd(benchmark, timed, rotate, inputs, impl):
    fn = _impl(impl)
    qkv, lengths = inputs[0]
    want = reference.multiway_attention(*qkv.float().unbind(2), lengths, NUM_VISION)
    got = fn(*qkv.unbind(2), lengths, NUM_VISION).float()
    assert (got - want).abs().max().item() < 2e-2
    next_qkv = rotate([packed for packed, _ in inputs])

    def step():
        q, k, v = next_qkv().unbind(2)
        return fn(q, k, v, inputs[0][1], NUM_VISION)

    benchmark.group = "G1 multiway_attention fwd bf16 B32 H12 S641 Dh64"
    benchmark.extra_info["flops"] = _flops(lengths)
    with torch.no_grad():
        timed(step, rounds=20, iterations=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_attention_fwd_bwd(benchmark, timed, rotate, inputs, impl):
    fn = _impl(impl)
    leaves = [qkv.clone().requires_grad_() for qkv, _ in inputs]
    lengths = inputs[0][1]
    grad = torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, device="cuda").to(torch.bfloat16)
    # gradients checked against the fp32 reference before timing
    out = fn(*leaves[0].unbind(2), lengths, NUM_VISION)
    (dqkv,) = torch.autograd.grad(out, [leaves[0]], grad)
    ref_leaf = inputs[0][0].float().requires_grad_()
    ref = reference.multiway_attention(*ref_leaf.unbind(2), lengths, NUM_VISION)
    (dref,) = torch.autograd.grad(ref, [ref_leaf], grad.float())
    assert (dqkv.float() - dref).abs().max().item() < 5e-2 * (1 + dref.abs().max().item())
    next_leaf = rotate(leaves)

    def step():
        fn(*next_leaf().unbind(2), lengths, NUM_VISION).backward(grad)

    benchmark.group = "G1 multiway_attention fwd+bwd bf16 B32 H12 S641 Dh64"
    benchmark.extra_info["flops"] = int(3.5 * _flops(lengths))
    timed(step, rounds=20, iterations=3)
