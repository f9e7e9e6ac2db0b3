"""multiway_linear (Triton) vs the eager reference (split rows, two F.linear, cat, GELU),
bf16, OneRef-B shapes: B = 32, S = 641 (577 vision rows), D = 768: the packed QKV projection
(768 -> 2304) and fc1 with GELU (768 -> 3072), forward and forward+backward.
``extra_info["flops"]`` = 2 * B * S * Din * Dout forward (x3 with the backward).
Results are checked against :func:`oneref.ops.reference.multiway_linear` before timing."""

import pytest
import torch

from oneref.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, SEQ, NUM_VISION, DIM = 32, 641, 577, 768
SHAPES = {"qkv": (3 * DIM, "none"), "fc1_gelu": (4 * DIM, "gelu")}


def _inputs(d_out):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    xs = [draw(BATCH, SEQ, DIM) for _ in range(2)]
    params = (draw(d_out, DIM, scale=DIM ** -0.5), draw(d_out), draw(d_out, DIM, scale=DIM ** -0.5),
              draw(d_out))
    return xs, params


def _impl(name):
    if name == "triton":
        from oneref.kernels import multiway_linear

        return multiway_linear.multiway_linear
    return reference.multiway_linear


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_multiway_linear_fwd(benchmark, timed, rotate, impl, shape):
    d_out, activation = SHAPES[shape]
    xs, (wa, ba, wb, bb) = _inputs(d_out)
    fn = _impl(impl)
    got = fn(xs[0], NUM_VISION, wa, ba, wb, bb, activation).float()
    want = reference.multiway_linear(xs[0].float(), NUM_VISION, wa.float(), ba.float(),
                                     wb.float(), bb.float(), activation)
    assert (got - want).abs().max().item() < 5e-2 * (1 + want.abs().max().item())
    next_x = rotate(xs)

    def step():
        return fn(next_x(), NUM_VISION, wa, ba, wb, bb, activation)

    benchmark.group = f"multiway_linear {shape} fwd bf16 B32 S641 D768"
    benchmark.extra_info["flops"] = 2 * BATCH * SEQ * DIM * d_out
    with torch.no_grad():
        timed(step, rounds=20, iterations=3)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_multiway_linear_fwd_bwd(benchmark, timed, rotate, impl, shape):
    d_out, activation = SHAPES[shape]
    xs, params = _inputs(d_out)
    leaves = [x.clone().requires_grad_() for x in xs]
    params = [p.clone().requires_grad_() for p in params]
    fn = _impl(impl)
    grad = torch.randn(BATCH, SEQ, d_out, device="cuda").to(torch.bfloat16)
    next_leaf = rotate(leaves)

    def step():
        fn(next_leaf(), NUM_VISION, *params, activation).backward(grad)

    benchmark.group = f"multiway_linear {shape} fwd+bwd bf16 B32 S641 D768"
    benchmark.extra_info["flops"] = 6 * BATCH * SEQ * DIM * d_out
    timed(step, rounds=20, iterations=3)
