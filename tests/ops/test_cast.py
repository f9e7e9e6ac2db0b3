"""Operands cast together (oneref.ops.cast): the values and gradients of ``t.to``, with one
``_foreach_copy_`` per source dtype each way."""

import pytest
import torch

from oneref import ops
from oneref.bench.roofline import OpCounter
from oneref.ops import torch_backend
from oneref.ops.cast import cast_floating


def _operands():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=gen, requires_grad=True)
    bias = torch.randn(5, generator=gen, requires_grad=True)
    frozen = torch.randn(4, generator=gen)
    wide = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    done = torch.randn(3, generator=gen).bfloat16().requires_grad_()
    index = torch.arange(3)
    return [weight, bias, frozen, None, wide, done, index]


def test_values_and_gradients_are_those_of_to():
    tensors = _operands()
    cast = cast_floating(tensors, torch.bfloat16)
    for src, out in zip(tensors, cast):
        if src is None or not src.is_floating_point() or src.dtype == torch.bfloat16:
            assert out is src  # nothing to cast
        else:
            assert out.dtype == torch.bfloat16 and torch.equal(out, src.to(torch.bfloat16))
    weights = [torch.randn(t.shape) if t is not None and t.is_floating_point() else None
               for t in tensors]
    loss = sum((c.float() * w).sum() for c, w in zip(cast, weights) if w is not None)
    loss.backward()
    for src, w in zip(tensors, weights):
        if src is not None and src.requires_grad:
            assert src.grad.dtype == src.dtype
            torch.testing.assert_close(src.grad, w.to(torch.bfloat16).to(src.dtype))
    assert not cast[2].requires_grad  # a frozen tensor's cast asks for no gradient


def test_twice_differentiable_as_to():
    weight = torch.randn(4, 3, requires_grad=True)
    twin = weight.detach().clone().requires_grad_()
    grads = []
    for leaf, cast in ((weight, cast_floating((weight,), torch.bfloat16)[0]),
                       (twin, twin.to(torch.bfloat16))):
        first, = torch.autograd.grad(cast.float().pow(3).sum(), leaf, create_graph=True)
        grads += [first, *torch.autograd.grad(first.sum(), leaf)]
    torch.testing.assert_close(grads[0], grads[2])
    torch.testing.assert_close(grads[1], grads[3])


def test_one_foreach_copy_per_source_dtype_each_way():
    tensors = _operands()
    with OpCounter() as forward:
        cast = cast_floating(tensors, torch.bfloat16)
    with OpCounter() as backward:
        (cast[0].sum() + cast[4].sum()).backward()  # bias's output unused
    assert forward.ops["aten._foreach_copy_"]["calls"] == 2  # fp32 and fp64 sources
    assert backward.ops["aten._foreach_copy_"]["calls"] == 2
    assert "aten._to_copy" not in forward.ops and "aten._to_copy" not in backward.ops
    assert tensors[1].grad is None and tensors[0].grad.dtype == torch.float32


def test_strides_are_kept_where_they_can_be():
    base = torch.randn(3, 6, requires_grad=True)
    transposed, strided = base.t(), base[:, ::2]
    out_t, out_s = cast_floating((transposed, strided), torch.bfloat16)
    assert out_t.stride() == transposed.stride()  # dense: the same strides
    assert out_s.is_contiguous() and torch.equal(out_s, strided.bfloat16())
    (out_t.float().sum() + 2 * out_s.float().sum()).backward()
    want = torch.ones(3, 6)
    want[:, ::2] += 2
    torch.testing.assert_close(base.grad, want)


def test_multiway_linear_casts_its_operands_together_under_autocast():
    """x (no gradient) and four parameters in one cast; the backward computes no input
    gradient for x: two GEMMs, the experts' weight gradients."""
    x = torch.randn(2, 5, 8)
    params = [torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True),
              torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True)]
    with OpCounter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.multiway_linear(x, 3, *params)
    assert counter.ops["aten._foreach_copy_"]["calls"] == 1  # x and four parameters
    assert "aten._to_copy" not in counter.ops
    with OpCounter() as backward:
        y.sum().backward()
    assert backward.ops["aten.mm"]["calls"] == 2
    assert backward.ops["aten._foreach_copy_"]["calls"] == 1
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_bf16_layer_norm_casts_its_parameters_together():
    """The sub-LN composite on the native bf16 path (as on CUDA): its four fp32 parameters
    cast to bf16 in one copy, their gradients back in one more."""
    x = torch.randn(2, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    params = [torch.randn(8, requires_grad=True) for _ in range(4)]
    with torch_backend.native_bf16_on("cpu"):
        with OpCounter() as forward:
            y = torch_backend.multiway_layer_norm(x, 4, *params)
        with OpCounter() as backward:
            y.float().square().sum().backward()
    assert forward.ops["aten._foreach_copy_"]["calls"] == 1
    assert backward.ops["aten._foreach_copy_"]["calls"] == 1
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("needs_grad", [True, False])
def test_traces_as_one_graph_of_plain_casts(needs_grad):
    weight = torch.randn(4, 3, requires_grad=needs_grad)
    bias = torch.randn(4, requires_grad=needs_grad)

    def f(w, b):
        cw, cb = cast_floating((w, b), torch.bfloat16)
        return (cw.float() * 2).sum() + cb.float().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(weight, bias), f(weight, bias)
    torch.testing.assert_close(got, want)
    if needs_grad:
        grads = torch.autograd.grad(got, (weight, bias))
        torch.testing.assert_close(grads[0], torch.full((4, 3), 2.0))
        torch.testing.assert_close(grads[1], torch.ones(4))


def test_compiled_multiway_linear_under_autocast_matches_eager():
    """Autocast's operand cast inside one graph (inductor's CPU backend): the loss and every
    gradient equal eager's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    params = [torch.randn(*shape, generator=gen, requires_grad=True)
              for shape in ((4, 8), (4,), (4, 8), (4,))]

    def loss(x, *params):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.multiway_linear(x, 3, *params).float().square().sum()

    ops.prepare("cpu")
    inputs = (x, *params)
    want = torch.autograd.grad(loss(*inputs), inputs)
    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_one_cuda_kernel_each_way():
    """On CUDA a multiway linear's four parameters are cast by one multi-tensor kernel, and
    their gradients back by one more: the fast path of ``_foreach_copy_`` that the launch
    count assumes."""
    shapes = ((2304, 768), (2304,), (2304, 768), (2304,))
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    grads = [torch.ones(s, device="cuda", dtype=torch.bfloat16) for s in shapes]

    def kernels(fn):
        fn()  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return [e.name for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.startswith(("Memcpy", "Memset"))]

    assert len(kernels(lambda: cast_floating(params, torch.bfloat16))) == 1
    both = kernels(lambda: torch.autograd.grad(cast_floating(params, torch.bfloat16), params,
                                               grads))
    assert len(both) == 2, both
