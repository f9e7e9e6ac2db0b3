"""The torch backend's fast composites against the readable reference."""

import pytest
import torch

from oneref.ops import is_sequence_major, reference, sequence_major, torch_backend
from oneref.ops.cases import CASES


def _packed_qkv(batch, seq, heads, dim, dtype):
    packed = torch.randn(batch, seq, 3, heads, dim, dtype=dtype, requires_grad=True)
    return packed, packed.unbind(2)  # strided (B, S, H, Dh) views, as the model passes them


@pytest.mark.parametrize("seq, num_vision, heads, dim", [(641, 577, 1, 16), (40, 17, 3, 32)])
@pytest.mark.parametrize("lengths", ["one", "full", "mixed"])
def test_attention_matches_reference(seq, num_vision, heads, dim, lengths):
    text = seq - num_vision
    text_lengths = {"one": torch.tensor([1, 1]), "full": torch.tensor([text, text]),
                    "mixed": torch.tensor([1, text - 3])}[lengths]
    packed, (q, k, v) = _packed_qkv(2, seq, heads, dim, torch.float64)
    grad = torch.randn(2, seq, heads, dim, dtype=torch.float64)

    def run(fn):
        packed.grad = None
        out = fn(q, k, v, text_lengths, num_vision)
        out.backward(grad)
        return out.detach(), packed.grad.clone()

    out, dqkv = run(torch_backend.multiway_attention)
    ref_out, ref_dqkv = run(reference.multiway_attention)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dqkv, ref_dqkv)


@pytest.mark.parametrize("fn", [torch_backend.packed_multiway_attention,
                                reference.packed_multiway_attention])
def test_attention_reads_a_prebuilt_key_mask(fn):
    """Given the key mask, the composite and the reference attend to its keys: the lengths'
    own mask gives the lengths' result, and a mask one key shorter the shorter lengths'."""
    packed, _ = _packed_qkv(2, 12, 2, 8, torch.float64)
    lengths = torch.tensor([2, 5])
    expected = fn(packed, lengths, 6)
    torch.testing.assert_close(
        fn(packed, lengths, 6, key_mask=reference.key_padding_mask(lengths, 6, 12)), expected)
    shorter = reference.key_padding_mask(lengths - 1, 6, 12)
    torch.testing.assert_close(fn(packed, lengths, 6, key_mask=shorter),
                               fn(packed, lengths - 1, 6))


def test_attention_output_is_sequence_major():
    _, (q, k, v) = _packed_qkv(3, 20, 2, 8, torch.float32)
    out = torch_backend.multiway_attention(q, k, v, torch.tensor([1, 4, 2]), 16)
    assert out.shape == (3, 20, 2, 8) and is_sequence_major(out)
    assert is_sequence_major(out.reshape(3, 20, 16))  # the model's (B, S, D) view: no copy


@pytest.mark.parametrize("layout", ["batch-major", "sequence-major"])
def test_packed_attention_gradient_is_sequence_major(layout):
    """The packed form matches the reference and hands the QKV projection a sequence-major
    gradient, whatever the layout of its input."""
    packed, _ = _packed_qkv(3, 20, 2, 8, torch.float64)
    qkv = sequence_major(packed) if layout == "sequence-major" else packed
    lengths = torch.tensor([1, 4, 2])
    out = torch_backend.packed_multiway_attention(qkv, lengths, 16)
    (grad,) = torch.autograd.grad(out.square().sum(), [qkv])
    ref = reference.packed_multiway_attention(qkv, lengths, 16)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), [qkv])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert is_sequence_major(out) and is_sequence_major(grad)


@pytest.mark.parametrize("batch, seq", [(3, 7), (1, 7), (3, 1)])
def test_sequence_major_keeps_values_and_copies_only_when_needed(batch, seq):
    x = torch.randn(batch, seq, 4)
    y = sequence_major(x)
    assert torch.equal(x, y) and is_sequence_major(y)
    assert y.transpose(0, 1).is_contiguous()
    assert sequence_major(y) is y
    if batch == 1 or seq == 1:  # both layouts are the same memory order
        assert y is x


def test_attention_bf16_error_is_that_of_the_reference():
    _, (q, k, v) = _packed_qkv(2, 70, 2, 32, torch.float32)
    lengths = torch.tensor([3, 5])
    exact = reference.multiway_attention(*(t.double() for t in (q, k, v)), lengths, 65)
    low = [t.detach().bfloat16() for t in (q, k, v)]
    fast_err = (torch_backend.multiway_attention(*low, lengths, 65).double() - exact).abs().max()
    ref_err = (reference.multiway_attention(*low, lengths, 65).double() - exact).abs().max()
    assert fast_err <= 2 * ref_err + 1e-3


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Buffers from ``new_empty`` start as NaN, so a row range an op forgets to write shows."""
    allocate = torch.Tensor.new_empty

    def new_empty(self, *size, **kwargs):
        return allocate(self, *size, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)


# op name -> (fast, reference, keyword arguments, parameter shapes for input width d)
_ROW_OPS = {
    "linear": (torch_backend.multiway_linear, reference.multiway_linear, {},
               lambda d: ((4, d), (4,), (4, d), (4,))),
    "linear+gelu": (torch_backend.multiway_linear, reference.multiway_linear,
                    {"activation": "gelu"}, lambda d: ((4, d), (4,), (4, d), (4,))),
    "layer_norm": (torch_backend.multiway_layer_norm, reference.multiway_layer_norm,
                   {"eps": 1e-5}, lambda d: ((d,),) * 4),
}


def _row_op_results(op, x, params, num_vision, grad):
    """Output and gradients of every input that requires one, for the fast and the
    reference implementation."""
    fast, ref, kwargs, _ = _ROW_OPS[op]
    leaves = [t for t in [x, *params] if t is not None and t.requires_grad]
    results = []
    for fn in (fast, ref):
        for tensor in leaves:
            tensor.grad = None
        out = fn(x, num_vision, *params, **kwargs)
        out.backward(grad)
        results.append([out.detach()] + [t.grad.clone() for t in leaves])
    return results


def _random_laid_out(batch, seq, width, layout):
    """A random fp64 (batch, seq, width) tensor stored as ``layout`` names: sequence-major
    (as the encoder keeps its hidden states), batch-major, or rows of a wider tensor."""
    if layout == "sequence-major":
        return torch.randn(seq, batch, width, dtype=torch.float64).transpose(0, 1)
    if layout == "batch-major":
        return torch.randn(batch, seq, width, dtype=torch.float64)
    return torch.randn(batch, seq, 2 * width + 1, dtype=torch.float64)[..., 1:width + 1]


@pytest.mark.parametrize("op", list(_ROW_OPS))
@pytest.mark.parametrize("seq, num_vision", [(12, 0), (12, 1), (12, 9), (12, 12), (641, 577)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout, grad_layout", [("sequence-major", "sequence-major"),
                                                 ("sequence-major", "batch-major"),
                                                 ("batch-major", "batch-major"),
                                                 ("strided", "strided")])
def test_multiway_row_ops_match_reference(poisoned_buffers, op, seq, num_vision, bias, layout,
                                          grad_layout):
    width = 5
    x = _random_laid_out(3, seq, width, layout).requires_grad_()
    params = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in _ROW_OPS[op][3](width)]
    if not bias:
        params[1] = params[3] = None
    grad = _random_laid_out(3, seq, params[0].shape[0], grad_layout)
    fast, ref = _row_op_results(op, x, params, num_vision, grad)
    assert not fast[0].isnan().any()
    assert is_sequence_major(fast[0])  # each expert's block written in place
    for got, expected in zip(fast, ref):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op", list(_ROW_OPS))
@pytest.mark.parametrize("frozen", ["input", "parameters"])
def test_multiway_row_ops_with_frozen_inputs(op, frozen):
    x = torch.randn(2, 7, 6, requires_grad=frozen == "parameters")
    params = [torch.randn(*shape, requires_grad=frozen == "input")
              for shape in _ROW_OPS[op][3](6)]
    grad = torch.randn(2, 7, params[0].shape[0])
    fast, ref = _row_op_results(op, x, params, 3, grad)
    assert len(fast) == (2 if frozen == "parameters" else 5)
    for got, expected in zip(fast, ref):
        torch.testing.assert_close(got, expected)


def test_flop_counter_sees_the_attention():
    batch, seq, heads, dim, vision = 2, 30, 2, 16, 20
    q, k, v = (torch.randn(batch, seq, heads, dim, requires_grad=True) for _ in range(3))
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        out = torch_backend.multiway_attention(q, k, v, torch.tensor([3, 10]), vision)
        forward = counter.get_total_flops()
        out.sum().backward()
    # Two matmuls of 2 * S * S * Dh FLOPs per head (the padded key count, as SDPA's formula).
    assert forward == 4 * batch * heads * seq * seq * dim
    assert counter.get_total_flops() == forward * 3.5


@pytest.mark.parametrize("backend, layout", [("aot_eager", "sequence-major"),
                                             ("inductor", "sequence-major"),
                                             ("inductor", "batch-major")])
def test_row_ops_compile_without_graph_breaks(backend, layout):
    """fullgraph torch.compile of a block's row ops matches eager, forward and backward:
    layer norm -> linear -> sub-LN of GELU -> linear, then the residual add + LN with a
    drop-path scale, and one whose h is not used (the final norm). With inductor, the graph
    copies no whole tensor to write one expert's block into it (``slice_scatter``): the
    blocks are joined by a cat that the kernels write in place."""
    x = torch.randn(2, 9, 6)
    x = (sequence_major(x) if layout == "sequence-major" else x).requires_grad_()
    norm = [torch.randn(6, requires_grad=True) for _ in range(4)]
    sub_norm = [torch.randn(8, requires_grad=True) for _ in range(4)]
    fc1 = [torch.randn(*shape, requires_grad=True) for shape in ((8, 6), (8,), (8, 6), (8,))]
    fc2 = [torch.randn(*shape, requires_grad=True) for shape in ((6, 8), (6,), (6, 8), (6,))]
    leaves = [x, *norm, *sub_norm, *fc1, *fc2]
    drop = torch.tensor([0.0, 1.25])

    def step():
        y = torch_backend.multiway_layer_norm(x, 4, *norm)
        y = torch_backend.multiway_layer_norm(torch_backend.multiway_linear(y, 4, *fc1), 4,
                                              *sub_norm, activation="gelu")
        branch = torch_backend.multiway_linear(y, 4, *fc2)
        h, y = torch_backend.multiway_add_layer_norm(x, branch, 4, *norm, branch_scale=drop)
        _, out = torch_backend.multiway_add_layer_norm(h, y, 4, *norm)
        return out.square().sum()

    ops = []  # the aten ops of the graphs inductor compiles, after its own passes

    def collect(graph):
        ops.extend(str(node.target) for node in graph.nodes if node.op == "call_function")

    results = []
    for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
        for leaf in leaves:
            leaf.grad = None
        with torch._inductor.config.patch(post_grad_custom_post_pass=collect,
                                          force_disable_caches=True):
            loss = fn()
            loss.backward()
        results.append([loss.detach()] + [leaf.grad.clone() for leaf in leaves])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)
    assert backend == "aot_eager" or ops and not any("slice_scatter" in op for op in ops)


@pytest.mark.parametrize("layout", ["sequence-major", "batch-major"])
def test_bf16_stream_add_with_drop_path_compiles_without_graph_breaks(layout):
    """The default stream's add (bf16 x and branch, fp32 drop-path scale, written through
    ``out=``) under fullgraph inductor: h, y and the gradients equal eager's."""
    x = _random_laid_out(2, 9, 6, layout).bfloat16().requires_grad_()
    branch = _random_laid_out(2, 9, 6, layout).bfloat16().requires_grad_()
    norm = [torch.randn(6, requires_grad=True) for _ in range(4)]
    drop = torch.tensor([0.0, 1.25])

    def step():
        h, y = torch_backend.multiway_add_layer_norm(x, branch, 4, *norm, branch_scale=drop)
        return h, y, h.float().square().sum() + y.float().square().sum()

    results = []
    for fn in (step, torch.compile(step, backend="inductor", fullgraph=True)):
        for leaf in (x, branch, *norm):
            leaf.grad = None
        h, y, loss = fn()
        loss.backward()
        results.append([h.detach(), y.detach(), *(leaf.grad.clone() for leaf in (x, branch,
                                                                              *norm))])
    assert results[1][0].dtype == torch.bfloat16
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


def _add_norm_results(fn, x, branch, scale, params, grads, out_dtype):
    """(h, y) of ``fn`` and the gradients of x, branch, the parameters and the scale (when
    one is given), with ``grads`` the upstream gradients of (h, y) (None: that output is not
    used)."""
    leaves = [x, branch, *params] + ([] if scale is None else [scale])
    for leaf in leaves:
        leaf.grad = None
    h, y = fn(x, branch, 4, *params, 1e-5, scale, out_dtype)
    used = [(out, grad) for out, grad in zip((h, y), grads) if grad is not None]
    torch.autograd.backward([out for out, _ in used], [grad for _, grad in used])
    return [h.detach(), y.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("scale", [None, "drop"])
@pytest.mark.parametrize("used", ["both", "y", "h"])
@pytest.mark.parametrize("layout", ["sequence-major", "batch-major"])
def test_add_layer_norm_matches_reference(poisoned_buffers, scale, used, layout):
    """The backward writes the LayerNorm's input gradient with h's own gradient added, and
    the branch's gradient scaled, in one pass each: the same gradients as the reference."""
    x = _random_laid_out(3, 11, 6, layout).requires_grad_()
    branch = _random_laid_out(3, 11, 6, layout).requires_grad_()
    params = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    drop = None if scale is None else torch.tensor([0.0, 1.25, 1.25], dtype=torch.float64,
                                                   requires_grad=True)
    grads = [None if used == "y" else _random_laid_out(3, 11, 6, layout),
             None if used == "h" else _random_laid_out(3, 11, 6, layout)]
    fast = _add_norm_results(torch_backend.multiway_add_layer_norm, x, branch, drop, params,
                             grads, None)
    ref = _add_norm_results(reference.multiway_add_layer_norm, x, branch, drop, params, grads,
                            None)
    for got, expected in zip(fast, ref):
        if expected is None:
            assert got is None
            continue
        assert not got.isnan().any()
        torch.testing.assert_close(got, expected)
    assert is_sequence_major(fast[1])
    if layout == "sequence-major":  # leaf gradients take their leaf's layout
        assert is_sequence_major(fast[2]) and is_sequence_major(fast[3])


def test_add_layer_norm_mixed_dtypes():
    """fp32 stream + bf16 branch, bf16 output (the encoder under autocast): h is fp32, y
    bf16, x's gradient fp32 and the branch's bf16, each the reference's to its rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)
    branch = torch.randn(2, 9, 8, generator=gen).bfloat16()
    params = [torch.randn(8, generator=gen, requires_grad=True) for _ in range(4)]
    drop = torch.tensor([1.25, 0.0], requires_grad=True)
    grads = [torch.randn(2, 9, 8, generator=gen), torch.randn(2, 9, 8, generator=gen).bfloat16()]
    results = []
    for fn in (torch_backend.multiway_add_layer_norm, reference.multiway_add_layer_norm):
        leaves = (x.clone().requires_grad_(), branch.clone().requires_grad_())
        results.append(_add_norm_results(fn, *leaves, drop, params, grads, torch.bfloat16))
    fast, ref = results
    assert [t.dtype for t in fast[:4]] == [torch.float32, torch.bfloat16, torch.float32,
                                           torch.bfloat16]
    for got, expected in zip(fast, ref):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["sequence-major", "batch-major"])
def test_bf16_stream_with_drop_path_is_summed_in_fp32_and_written_once(layout):
    """The default stream under bf16 autocast (bf16 x and branch, fp32 drop-path scale): h
    is the fp32 sum rounded once to bf16, written by the add itself in x's layout; no fp32
    h is written and cast again."""
    from oneref.bench.roofline import OpCounter

    x = _random_laid_out(3, 11, 6, layout).bfloat16()
    branch = _random_laid_out(3, 11, 6, layout).bfloat16()
    scale = torch.tensor([1.1111, 0.0, 1.1111])
    params = [torch.randn(6) for _ in range(4)]
    with OpCounter() as counter:
        h, _ = torch_backend.multiway_add_layer_norm(x, branch, 4, *params, branch_scale=scale)
    expected = (x.float() + scale[:, None, None] * branch.float()).bfloat16()
    assert h.dtype == torch.bfloat16 and torch.equal(h, expected)
    assert h.stride() == x.stride()
    assert counter.ops["aten.addcmul"]["written"] == h.numel() * 2


def test_layer_norm_of_bf16_gelu_writes_bf16_gradient():
    """The FFN's sub-LN under autocast: bf16 in, bf16 out, statistics in fp32; the input
    gradient comes back bf16 and sequence-major, with the reference's values."""
    gen = torch.Generator().manual_seed(0)
    x = sequence_major(torch.randn(3, 10, 16, generator=gen).bfloat16()).requires_grad_()
    params = [torch.randn(16, generator=gen, requires_grad=True) for _ in range(4)]
    grad = torch.randn(3, 10, 16, generator=gen).bfloat16()
    y = torch_backend.multiway_layer_norm(x, 7, *params, activation="gelu")
    (dx,) = torch.autograd.grad(y, [x], grad)
    exact = x.detach().double().requires_grad_()
    y_ref = reference.multiway_layer_norm(exact, 7, *(p.double() for p in params),
                                          activation="gelu")
    (dx_ref,) = torch.autograd.grad(y_ref, [exact], grad.double())
    assert y.dtype == dx.dtype == torch.bfloat16 and is_sequence_major(dx)
    torch.testing.assert_close(y.double(), y_ref, rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1.6e-2, atol=5e-2)
    # the GELU's derivative taken as the norm's gradient is written: no less exact than
    # autograd's GELU after the norm
    apart = torch_backend.multiway_layer_norm(torch.nn.functional.gelu(x), 7, *params)
    (dx_apart,) = torch.autograd.grad(apart, [x], grad)
    error = (dx.double() - dx_ref).abs().mean()
    assert error <= 1.01 * (dx_apart.double() - dx_ref).abs().mean()


def test_add_layer_norm_fusion_is_exact_for_an_fp32_stream():
    """With h in fp32 (the stream of residual_dtype="params" under autocast) the fused backward
    gives, to the bit, what autograd gives for the add and the LayerNorm run apart (with a
    bf16 h, the input gradient is rounded once where autograd rounds it twice); the
    drop-path scale gets its gradient too, and h needs none when only the LayerNorm's
    parameters train."""
    gen = torch.Generator().manual_seed(0)
    x = sequence_major(torch.randn(3, 10, 8, generator=gen))
    branch = sequence_major(torch.randn(3, 10, 8, generator=gen).bfloat16())
    scale = torch.tensor([0.0, 1.25, 1.25])
    params = [torch.randn(8, generator=gen) for _ in range(4)]
    grad_h, grad_y = torch.randn(3, 10, 8, generator=gen), torch.randn(3, 10, 8, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, branch, scale, *params)]

    def apart(x, branch, scale, *params):
        h = torch.addcmul(x, branch, scale[:, None, None])
        return h, torch_backend.multiway_layer_norm(h, 4, *params, out_dtype=torch.bfloat16)

    def fused(x, branch, scale, *params):
        return torch_backend.multiway_add_layer_norm(x, branch, 4, *params,
                                                     branch_scale=scale,
                                                     out_dtype=torch.bfloat16)

    results = []
    for fn in (fused, apart):
        inputs = [t.detach().clone().requires_grad_() for t in leaves]
        h, y = fn(*inputs)
        torch.autograd.backward([h, y], [grad_h, grad_y.bfloat16()])
        results.append([h, y] + [t.grad for t in inputs])
    *exact, grad_scale = results[0][:5]
    *expected, expected_scale = results[1][:5]
    for got, want in zip(exact + results[0][5:], expected + results[1][5:]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # the scale's gradient is a sum: the same up to the order it is summed in
    torch.testing.assert_close(grad_scale, expected_scale)
    trained = [p.clone().requires_grad_() for p in params]
    h, y = fused(x, branch, None, *trained)
    assert not h.requires_grad and y.requires_grad
    expected = torch.autograd.grad(apart(x, branch, torch.ones(3), *trained)[1], trained,
                                   grad_y.bfloat16())
    for got, want in zip(torch.autograd.grad(y, trained, grad_y.bfloat16()), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("num_vision", [9, 2])
def test_layer_norm_in_its_output_dtype_copies_only_the_smaller_expert(num_vision):
    """Output in the compute dtype: the larger expert's rows are written where they stand,
    and only the other expert's rows are copied into the output."""
    from oneref.bench.roofline import OpCounter

    x = sequence_major(torch.randn(2, 12, 16))
    params = [torch.randn(16) for _ in range(4)]
    with OpCounter() as counter:
        y = torch_backend.multiway_layer_norm(x, num_vision, *params)
    smaller = 2 * min(num_vision, 12 - num_vision) * 16 * 4  # rows x width x fp32 bytes
    assert counter.ops["aten.copy_"]["written"] == smaller
    torch.testing.assert_close(y, reference.multiway_layer_norm(x, num_vision, *params))
    assert is_sequence_major(y)


def test_layer_norm_backwards_write_each_gradient_once():
    """What the composites are for: the backward of the FFN's sub-LN writes x's gradient
    through the GELU's derivative, and the residual add's writes the sum and the scaled
    branch gradient, with no separate copy, cast or add of a full-size gradient."""
    from oneref.bench.roofline import OpCounter

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(16, generator=gen, requires_grad=True) for _ in range(4)]
    x = sequence_major(torch.randn(2, 9, 16, generator=gen).bfloat16()).requires_grad_()
    y = torch_backend.multiway_layer_norm(x, 5, *params, activation="gelu")
    with OpCounter() as counter:
        y.backward(torch.ones_like(y))
    calls = {name: op["calls"] for name, op in counter.ops.items()}
    assert calls.get("aten.gelu_backward") == 2 and "aten.copy_" not in calls  # one per expert
    assert calls.get("aten._to_copy") == 1  # the bf16 gradient of y, cast once for the norm

    stream = sequence_major(torch.randn(2, 9, 16, generator=gen)).requires_grad_()
    branch = sequence_major(torch.randn(2, 9, 16, generator=gen).bfloat16()).requires_grad_()
    h, y = torch_backend.multiway_add_layer_norm(stream, branch, 5, *params,
                                                 branch_scale=torch.tensor([1.25, 0.0]),
                                                 out_dtype=torch.bfloat16)
    with OpCounter() as counter:
        torch.autograd.backward([h, y], [torch.ones_like(h), torch.ones_like(y)])
    calls = {name: op["calls"] for name, op in counter.ops.items()}
    assert calls.get("aten.add") == 2 and calls.get("aten.mul") == 1
    assert "aten.copy_" not in calls


@pytest.mark.parametrize("op", ["gelu_layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_layer_norms_compute_in_their_input_dtype(monkeypatch, op, device):
    """Where the native kernels keep fp32 sums for a bf16 input (CUDA; here the CPU as well),
    the sub-LN of a bf16 GELU and the add-LN of a bf16 stream run them in bf16: about half
    the bytes of the fp32-copy path, with the fp64 reference's values to bf16 rounding. The
    parameter gradients meet the bf16 tolerance on CUDA; the CPU's bf16 kernel sums them
    with more error, which is why the CPU keeps the fp32 copy."""
    from oneref.bench.roofline import OpCounter

    batch, seq, width, num_vision = (8, 641, 768, 577) if device == "cuda" else (3, 41, 48, 37)
    gen = torch.Generator().manual_seed(0)

    def draw(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device)

    x = sequence_major(draw(batch, seq, width, scale=2.0, shift=0.5).bfloat16())
    branch = sequence_major(draw(batch, seq, width).bfloat16())
    params = [draw(width, scale=0.3, shift=1.0), draw(width), draw(width, scale=0.3, shift=1.0),
              draw(width)]
    grad = draw(batch, seq, width).bfloat16()

    def run(fn, x, branch, params, grad):
        x, branch, *params = (t.detach().clone().requires_grad_() for t in (x, branch, *params))
        if op == "gelu_layer_norm":
            leaves, y = [x, *params], fn(x, num_vision, *params, activation="gelu")
        else:
            leaves, (_, y) = [x, branch, *params], fn(x, branch, num_vision, *params)
        return [y, *torch.autograd.grad(y, leaves, grad)]

    fast_fn, ref_fn = ((torch_backend.multiway_layer_norm, reference.multiway_layer_norm)
                       if op == "gelu_layer_norm" else
                       (torch_backend.multiway_add_layer_norm, reference.multiway_add_layer_norm))
    moved, results = {}, {}
    for native in (False, True):
        monkeypatch.setattr(torch_backend, "NATIVE_BF16_DEVICES",
                            frozenset({device} if native else ()))
        with OpCounter() as counter:
            results[native] = run(fast_fn, x, branch, params, grad)
        moved[native] = sum(o["read"] + o["written"] for o in counter.ops.values())
    assert moved[True] < 0.6 * moved[False]
    ref = run(ref_fn, *(t.double() for t in (x, branch)), [p.double() for p in params],
              grad.double())
    rtol, atol = CASES["multiway_layer_norm"].tolerance(torch.bfloat16)
    for got, fp32_copy, want in zip(results[True], results[False], ref):
        assert got.dtype == fp32_copy.dtype
        error = (got.double() - want).abs().mean()
        if want.dim() == 1 and device == "cpu":  # a parameter's gradient
            assert (got.double() - want).norm() < 3e-2 * want.norm()
        elif want.dim() == 1:
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
        else:  # a bf16 activation: within twice the fp32 path's error (the input gradient
            # is rounded to bf16 once more, before the GELU's derivative or the residual)
            assert error <= 2 * (fp32_copy.double() - want).abs().mean()
            torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_layer_norms_choose_their_dtype_under_autocast(monkeypatch, device):
    """CUDA autocast runs native_layer_norm in fp32 whatever its inputs: the composites call
    it with autocast off, so under autocast a bf16 sub-LN still computes in the dtype they
    chose and returns the bf16 it was asked for, and the fp32 stream's add-LN stays fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(torch_backend, "NATIVE_BF16_DEVICES", frozenset({device}))

    class NormCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_layer_norm.default:
                self.calls.append((args[0].dtype, torch.is_autocast_enabled(device)))
            return func(*args, **(kwargs or {}))

    x = sequence_major(torch.randn(2, 9, 16, device=device).bfloat16())
    stream = sequence_major(torch.randn(2, 9, 16, device=device))
    params = [torch.randn(16, device=device) for _ in range(4)]
    with torch.autocast(device, torch.bfloat16), NormCalls() as mode:
        y = torch_backend.multiway_layer_norm(x, 5, *params, activation="gelu",
                                              out_dtype=torch.bfloat16)
        h, z = torch_backend.multiway_add_layer_norm(stream, x, 5, *params,
                                                     out_dtype=torch.bfloat16)
    assert y.dtype == z.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert mode.calls == [(torch.bfloat16, False)] * 2 + [(torch.float32, False)] * 2
