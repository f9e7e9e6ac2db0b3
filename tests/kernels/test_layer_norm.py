"""Triton multiway LayerNorm (plain, GELU-fused, residual-add-fused) against
:mod:`oneref.ops.reference`: outputs and every gradient, interpreter tests in fp32/fp16 and
the same checks in bf16 on CUDA; the torch composites by the same checks in bf16. Error
criterion: kernel error vs fp64 <= 2x the error of the same-precision PyTorch reference + a
small floor."""

from __future__ import annotations

import pytest
import torch

from oneref.bench.roofline import OpCounter
from oneref.ops import reference, torch_backend

ln = pytest.importorskip("oneref.kernels.layer_norm")

_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (batch, seq, width, num_vision, variant, drop-path scale)
_CASES = [
    pytest.param(2, 641, 48, 577, "add", True, id="S641-add-droppath"),
    pytest.param(3, 13, 40, 5, "gelu", False, id="odd-width-gelu"),
    pytest.param(2, 9, 33, 0, "plain", False, id="no-vision-rows"),
    pytest.param(2, 7, 64, 7, "add", False, id="no-text-rows"),
    pytest.param(1, 2, 130, 1, "gelu", False, id="one-vision-row-wide"),
]


def _draw(gen, *shape, dtype, device, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen) * scale + offset).to(device=device, dtype=dtype)


def _inputs(batch, seq, width, variant, with_scale, dtype, device):
    """x and branch as strided views (nothing contiguous but the last dim); fp32 parameters
    as autocast keeps them."""
    gen = torch.Generator().manual_seed(7)
    x = _draw(gen, seq, batch, width, dtype=dtype, device=device, scale=2.0,
              offset=0.3).transpose(0, 1)
    branch = (_draw(gen, batch, width, seq, dtype=dtype, device=device).transpose(1, 2)
              if variant == "add" else None)
    scale = None
    if with_scale:
        scale = torch.tensor([0.0, 1.25], device=device)[:batch].repeat(2)[:batch]
    params = [_draw(gen, width, dtype=torch.float32, device=device, scale=0.5, offset=o)
              for o in (1.0, 0.0, 1.0, 0.0)]
    return x, branch, scale, params


def _call(fn_plain, fn_add, x, branch, scale, params, num_vision, variant, out_dtype):
    if variant == "add":
        return fn_add(x, branch, num_vision, *params, 1e-5, scale, out_dtype)
    return (fn_plain(x, num_vision, *params, 1e-5, "gelu" if variant == "gelu" else "none",
                     out_dtype),)


def _grads(outs, leaves, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    return torch.autograd.grad(outs, leaves, cotangents)


def _check_case(batch, seq, width, num_vision, variant, with_scale, dtype, device, check,
                impl=(ln.multiway_layer_norm, ln.multiway_add_layer_norm)):
    """``impl`` (plain, add) against the same-precision reference and the fp64 one."""
    x, branch, scale, params = _inputs(batch, seq, width, variant, with_scale, dtype, device)
    assert batch == 1 or not x.is_contiguous()
    leaves = [t.requires_grad_() for t in (x, branch, *params) if t is not None]

    outs = _call(*impl, x, branch, scale, params, num_vision, variant, dtype)
    same = _call(reference.multiway_layer_norm, reference.multiway_add_layer_norm, x, branch,
                 scale, params, num_vision, variant, dtype)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, rest = leaves64[0], leaves64[1:]
    branch64 = rest.pop(0) if branch is not None else None
    ref = _call(reference.multiway_layer_norm, reference.multiway_add_layer_norm, x64, branch64,
                None if scale is None else scale.double(), rest, num_vision, variant,
                torch.float64)
    for i, (o, s, r) in enumerate(zip(outs, same, ref)):
        assert o.dtype == dtype and o.transpose(0, 1).is_contiguous()  # sequence-major
        check(f"out{i}", o, s, r, _FLOOR[dtype])
    names = ["x", *(["branch"] if branch is not None else []), "w_a", "b_a", "w_b", "b_b"]
    for name, g, s, r in zip(names, _grads(outs, leaves), _grads(same, leaves),
                             _grads(ref, leaves64)):
        check(f"d{name}", g, s, r, _FLOOR[dtype] * max(1.0, r.abs().max().item()))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,seq,width,num_vision,variant,with_scale", _CASES)
def test_kernel_matches_reference(batch, seq, width, num_vision, variant, with_scale, dtype,
                                  assert_kernel_close, poison_empty):
    _check_case(batch, seq, width, num_vision, variant, with_scale, dtype, torch.device("cpu"),
                assert_kernel_close)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq,width,num_vision,variant,with_scale",
                         [(4, 641, 768, 577, "add", True), (4, 641, 3072, 577, "gelu", False),
                          (3, 37, 768, 20, "plain", False)])
def test_kernel_matches_reference_cuda(batch, seq, width, num_vision, variant, with_scale,
                                       assert_kernel_close):
    _check_case(batch, seq, width, num_vision, variant, with_scale, torch.bfloat16,
                torch.device("cuda"), assert_kernel_close)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("batch,seq,width,num_vision,variant,with_scale",
                         [(4, 641, 768, 577, "add", True), (2, 641, 3072, 577, "gelu", False),
                          (3, 37, 768, 20, "plain", False)])
def test_torch_composite_bf16_matches_reference(batch, seq, width, num_vision, variant,
                                                with_scale, device, assert_kernel_close):
    """The torch composites (what the policy runs until the kernels are measured) in bf16, by
    the kernels' criterion: native LayerNorm kernels, casts on copy, the fused residual and
    GELU backward."""
    _check_case(batch, seq, width, num_vision, variant, with_scale, torch.bfloat16,
                torch.device(device), assert_kernel_close,
                impl=(torch_backend.multiway_layer_norm, torch_backend.multiway_add_layer_norm))


@pytest.mark.interpret
def test_bf16_output_from_fp32_residual(poison_empty):
    """The autocast case of an fp32 stream (``residual_dtype="params"``): fp32 residual,
    bf16 branch -> fp32 h, bf16 y; y is the fp32
    LayerNorm rounded once (within one bf16 ulp: the interpreter's bf16 store truncates)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 24, generator=gen)
    branch = torch.randn(2, 11, 24, generator=gen).bfloat16()
    params = [torch.ones(24), torch.zeros(24), torch.full((24,), 2.0), torch.ones(24)]
    h, y = ln.multiway_add_layer_norm(x, branch, 4, *params, 1e-5, None, torch.bfloat16)
    h_ref, y_ref = reference.multiway_add_layer_norm(x, branch, 4, *params, 1e-5, None,
                                                     torch.float32)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y.float(), y_ref, rtol=2 ** -7, atol=1e-6)


def test_cpu_stand_in_matches_reference(monkeypatch):
    """Without the interpreter the ops compute their outputs with PyTorch (what the cost
    counter counts as one kernel): the same values as the reference, every gradient."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for variant, with_scale in (("add", True), ("gelu", False), ("plain", False)):
        x, branch, scale, params = _inputs(2, 9, 16, variant, with_scale, torch.float32,
                                           torch.device("cpu"))
        leaves = [t.requires_grad_() for t in (x, branch, *params) if t is not None]
        ours = _call(_stand_in_plain, _stand_in_add, x, branch, scale, params, 6, variant,
                     torch.float32)
        ref = _call(reference.multiway_layer_norm, reference.multiway_add_layer_norm, x, branch,
                    scale, params, 6, variant, torch.float32)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r)
        for g, r in zip(_grads(ours, leaves), _grads(ref, leaves)):
            torch.testing.assert_close(g, r)


def test_parameter_gradients_take_each_parameters_dtype(monkeypatch):
    """The four parameter gradients come back in their parameters' dtypes (one cast when
    both experts share one, into one storage; a cast per expert else), with the values of
    fp32 parameters' gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, _, _, params = _inputs(2, 9, 16, "plain", False, torch.float32, torch.device("cpu"))
    cotangent = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    low = [p.half() for p in params]  # fp16 values: the fp32 reference sees the same
    params32 = [p.float().requires_grad_() for p in low]
    expected = torch.autograd.grad(_stand_in_plain(x, 4, *params32, 1e-5, "none",
                                                   torch.float32), params32, cotangent)
    for dtype_a, dtype_b, casts in ((torch.float16, torch.float16, 1),
                                    (torch.float32, torch.float16, 2)):
        leaves = [p.to(d).requires_grad_()
                  for p, d in zip(low, (dtype_a, dtype_a, dtype_b, dtype_b))]
        y = _stand_in_plain(x, 4, *leaves, 1e-5, "none", torch.float32)
        counter = OpCounter()
        with counter:
            grads = torch.autograd.grad(y, leaves, cotangent)
        assert counter.ops["aten._to_copy"]["calls"] == casts
        if casts == 1:
            assert len({g.untyped_storage().data_ptr() for g in grads}) == 1
        for grad, leaf, want in zip(grads, leaves, expected):
            assert grad.dtype == leaf.dtype
            torch.testing.assert_close(grad, want.to(leaf.dtype))


def _stand_in_plain(x, num_vision, wa, ba, wb, bb, eps, activation, out_dtype):
    return ln._norm_op(x, None, None, num_vision, wa, ba, wb, bb, eps, activation == "gelu",
                       out_dtype)[1]


def _stand_in_add(x, branch, num_vision, wa, ba, wb, bb, eps, scale, out_dtype):
    h, y, _, _ = ln._norm_op(x, branch, scale, num_vision, wa, ba, wb, bb, eps, False,
                             out_dtype)
    return h, y


def test_unsupported_dtype_names_the_argument():
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        ln.norm_forward(x, None, None, 1, *[torch.ones(4)] * 4, 1e-5, False, torch.float64)


@pytest.mark.interpret
def test_empty_batch_gives_zero_parameter_gradients(poison_empty):
    """No rows: no kernel runs, and the parameter gradients are zeros, not the poisoned
    partials."""
    x = torch.randn(0, 5, 16, requires_grad=True)
    branch = torch.randn(0, 5, 16, requires_grad=True)
    params = [torch.randn(16, requires_grad=True) for _ in range(4)]
    h, y = ln.multiway_add_layer_norm(x, branch, 3, *params, 1e-5, None, torch.float32)
    assert h.shape == y.shape == (0, 5, 16)
    grads = torch.autograd.grad((h.sum() + y.sum()), params)
    assert all(torch.equal(g, torch.zeros(16)) for g in grads)


def test_backward_op_passes_opcheck(monkeypatch):
    """The backward custom op's fake (meta) outputs, schema and dispatch agree with what it
    computes (on the CPU stand-in)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 16, generator=gen)
    params = [torch.randn(16, generator=gen) for _ in range(4)]
    _, _, mean, rstd = ln._norm_op(x, None, None, 4, *params, 1e-5, True, torch.float32)
    dy = torch.randn(2, 7, 16, generator=gen)
    torch.library.opcheck(ln._norm_backward_op, (dy, None, x, None, mean, rstd, params[0],
                                                 params[2], 4, True, None))
