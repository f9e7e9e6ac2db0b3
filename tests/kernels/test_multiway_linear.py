"""Triton multiway linear against :func:`oneref.ops.reference.multiway_linear`.

Interpreter tests (CPU, fp32/fp16) and the same checks in bf16 on CUDA. Error criterion:
kernel error vs an fp64 reference <= 2x the error of the same-precision PyTorch reference
(+ a tiny absolute floor scaled by the size of the reference values).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from oneref import ops
from oneref.ops import reference

mwl = pytest.importorskip("oneref.kernels.multiway_linear")

_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (batch, seq, d_in, d_out, num_vision, bias_a, bias_b, activation)
_CASES = [
    pytest.param(2, 41, 64, 96, 17, True, True, "gelu", id="tiny-fc1"),
    pytest.param(1, 641, 64, 48, 577, True, True, "gelu", id="S641"),
    pytest.param(2, 37, 70, 33, 5, True, True, "none", id="odd-K-N"),
    pytest.param(1, 13, 40, 48, 0, True, False, "none", id="no-vision-rows"),
    pytest.param(3, 10, 24, 20, 10, False, False, "gelu", id="no-text-rows"),
    pytest.param(2, 3, 16, 16, 1, False, True, "gelu", id="one-vision-row"),
]


def _inputs(batch, seq, d_in, d_out, has_a, has_b, dtype, device, seed=0):
    """x as a (B, Din, S)-major view and weights as transposed views: nothing contiguous."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = draw(batch, d_in, seq).transpose(1, 2).requires_grad_()
    w_scale = d_in ** -0.5
    weight_a = draw(d_in, d_out, scale=w_scale).t().requires_grad_()
    weight_b = draw(d_in, d_out, scale=w_scale).t().requires_grad_()
    bias_a = draw(d_out).requires_grad_() if has_a else None
    bias_b = draw(d_out).requires_grad_() if has_b else None
    return x, weight_a, bias_a, weight_b, bias_b


def _run_case(batch, seq, d_in, d_out, num_vision, has_a, has_b, activation, dtype, device,
              check):
    x, wa, ba, wb, bb = _inputs(batch, seq, d_in, d_out, has_a, has_b, dtype, device)
    assert not x.is_contiguous() and not wa.is_contiguous()
    params = [t for t in (x, wa, ba, wb, bb) if t is not None]
    y = mwl.multiway_linear(x, num_vision, wa, ba, wb, bb, activation)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, params, grad)

    same = reference.multiway_linear(x, num_vision, wa, ba, wb, bb, activation)
    grads_same = torch.autograd.grad(same, params, grad)
    params64 = [p.detach().double().requires_grad_() for p in params]
    it = iter(params64)
    args64 = [next(it) if t is not None else None for t in (x, wa, ba, wb, bb)]
    ref = reference.multiway_linear(args64[0], num_vision, *args64[1:], activation)
    grads_ref = torch.autograd.grad(ref, params64, grad.double())

    floor = _FLOOR[dtype]
    check("y", y, same, ref, floor * (1 + ref.abs().max().item()))
    names = [n for n, t in zip(("dx", "dW_A", "db_A", "dW_B", "db_B"), (x, wa, ba, wb, bb))
             if t is not None]
    for name, g, g_same, g_ref in zip(names, grads, grads_same, grads_ref):
        check(name, g, g_same, g_ref, floor * (1 + g_ref.abs().max().item()))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,seq,d_in,d_out,num_vision,has_a,has_b,activation", _CASES)
def test_forward_backward_interpreter(batch, seq, d_in, d_out, num_vision, has_a, has_b,
                                      activation, dtype, assert_kernel_close):
    _run_case(batch, seq, d_in, d_out, num_vision, has_a, has_b, activation, dtype, "cpu",
              assert_kernel_close)


@pytest.mark.interpret
def test_rows_on_both_sides_of_every_tile_boundary(monkeypatch, assert_kernel_close):
    """16-row tiles: num_vision not a multiple of the tile, tiles spanning samples, several
    K steps with a ragged tail, several row chunks per weight-gradient split."""
    monkeypatch.setattr(mwl._mwl_kernel, "interpret",
                        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})
    monkeypatch.setattr(mwl._mwl_dw_kernel, "interpret",
                        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    _run_case(3, 29, 40, 24, 11, True, True, "gelu", torch.float32, "cpu", assert_kernel_close)


@pytest.mark.interpret
def test_every_output_element_written(poison_empty):
    x, wa, ba, wb, bb = _inputs(2, 35, 32, 40, True, True, torch.float32, "cpu")
    y = mwl.multiway_linear(x, 20, wa, ba, wb, bb, "gelu")
    grads = torch.autograd.grad(y, [x, wa, ba, wb, bb], torch.ones_like(y))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    ref = reference.multiway_linear(x, 20, wa, ba, wb, bb, "gelu")
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref, [x, wa, ba, wb, bb], torch.ones_like(ref))):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.interpret
def test_dispatch_through_oneref_ops():
    x, wa, ba, wb, bb = _inputs(1, 9, 16, 24, True, False, torch.float32, "cpu")
    via_ops = ops.multiway_linear(x, 4, wa, ba, wb, bb, "gelu", backend="triton")
    direct = mwl.multiway_linear(x, 4, wa, ba, wb, bb, "gelu")
    assert torch.equal(via_ops, direct)
    torch.testing.assert_close(via_ops, reference.multiway_linear(x, 4, wa, ba, wb, bb, "gelu"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_opcheck(activation):
    x, wa, ba, wb, bb = _inputs(1, 5, 8, 16, True, True, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.oneref_triton.multiway_linear.default,
                          (x, 3, wa, ba, wb, bb, activation))


@pytest.mark.interpret
def test_flop_formula():
    x, wa, ba, wb, bb = _inputs(2, 7, 16, 24, True, True, torch.float32, "cpu")
    with FlopCounterMode(display=False) as counter:
        mwl.multiway_linear(x, 3, wa, ba, wb, bb, "gelu").sum().backward()
    counts = counter.get_flop_counts()["Global"]
    fwd = 2 * 2 * 7 * 16 * 24
    assert counts[torch.ops.oneref_triton.multiway_linear] == fwd
    assert counts[torch.ops.oneref_triton.multiway_linear_backward] == 2 * fwd


@pytest.mark.interpret
def test_unsupported_inputs_raise():
    x = torch.randn(1, 4, 8)
    w = torch.randn(8, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="weight_a"):
        mwl.multiway_linear(x, 2, w, None, w, None)
    with pytest.raises(ValueError, match="activation"):
        mwl.multiway_linear(x, 2, w.float(), None, w.float(), None, "relu")
    with pytest.raises(TypeError, match="float64"):
        mwl.multiway_linear(x.double(), 2, w.double(), None, w.double(), None)


# --------------------------------------------------------------------------------- GPU

_GPU_CASES = _CASES + [
    pytest.param(8, 641, 768, 2304, 577, True, True, "none", id="B-qkv"),
    pytest.param(4, 641, 768, 3072, 577, True, True, "gelu", id="B-fc1"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,seq,d_in,d_out,num_vision,has_a,has_b,activation", _GPU_CASES)
def test_forward_backward_gpu(batch, seq, d_in, d_out, num_vision, has_a, has_b, activation,
                              dtype, assert_kernel_close):
    _run_case(batch, seq, d_in, d_out, num_vision, has_a, has_b, activation, dtype, "cuda",
              assert_kernel_close)


@pytest.mark.gpu
def test_every_output_element_written_gpu(poison_empty):
    x, wa, ba, wb, bb = _inputs(3, 641, 256, 320, True, True, torch.bfloat16, "cuda")
    y = mwl.multiway_linear(x, 577, wa, ba, wb, bb, "gelu")
    grads = torch.autograd.grad(y, [x, wa, ba, wb, bb], torch.ones_like(y))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
def test_opcheck_gpu():
    x, wa, ba, wb, bb = _inputs(2, 70, 64, 96, True, True, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.oneref_triton.multiway_linear.default,
                          (x, 60, wa, ba, wb, bb, "gelu"))


@pytest.mark.interpret
def test_compiles_without_graph_breaks():
    """fullgraph torch.compile (aot_eager) of two stacked multiway linears matches eager."""
    x, wa, ba, wb, bb = _inputs(2, 9, 16, 16, True, True, torch.float32, "cpu")

    def step(x):
        h = mwl.multiway_linear(x, 5, wa, ba, wb, bb, "gelu")
        return mwl.multiway_linear(h, 5, wb, None, wa, bb).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, [x, wa, ba, wb, bb])
    loss_e = step(x)
    grads_e = torch.autograd.grad(loss_e, [x, wa, ba, wb, bb])
    torch.testing.assert_close(loss_c, loss_e)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e)
