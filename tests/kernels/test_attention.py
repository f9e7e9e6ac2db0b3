"""Triton multiway attention against :func:`oneref.ops.reference.multiway_attention`.

Interpreter tests (CPU, fp32/fp16) and the same checks in bf16 on CUDA. The error criterion:
kernel error vs an fp64 reference <= 2x the error of the same-precision PyTorch reference
(+ a tiny absolute floor, see ``_FLOOR``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from oneref import ops
from oneref.ops import reference

attention = pytest.importorskip("oneref.kernels.attention")

# absolute floor added to 2x the torch error (summation-order noise at fp32 level)
_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (batch, seq, heads, head_dim, num_vision, text_lengths)
_SHAPES = [
    pytest.param(1, 641, 1, 64, 577, [64], id="S641-full"),
    pytest.param(2, 77, 2, 32, 50, [1, 27], id="len1-and-max"),
    pytest.param(3, 41, 2, 128, 17, [24, 5, 1], id="Dh128"),
    pytest.param(2, 150, 1, 16, 129, [21, 8], id="Dh16-tails"),
    pytest.param(1, 5, 1, 32, 1, [1], id="two-keys"),
]


def _packed_qkv(batch, seq, heads, head_dim, dtype, device="cpu", seed=0,
                sequence_major=False):
    """One (B, S, 3, H, Dh) tensor whose dim-2 slices are q, k, v (what the model passes),
    batch-major or stored sequence-major like the QKV projection's output."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    if sequence_major:
        qkv = ops.sequence_major(qkv)
    return qkv.detach().requires_grad_()


def _attend(qkv, lens, num_vision, packed, scale=None):
    """The Triton attention of ``qkv``: the packed op, or the q, k, v op on its views."""
    if packed:
        return attention.packed_multiway_attention(qkv, lens, num_vision, scale)
    return attention.multiway_attention(*qkv.unbind(2), lens, num_vision, scale)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _run_case(batch, seq, heads, head_dim, num_vision, lengths, dtype, device, check,
              packed=False, sequence_major=False):
    qkv = _packed_qkv(batch, seq, heads, head_dim, dtype, device, sequence_major=sequence_major)
    lens = torch.tensor(lengths, device=device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = _attend(qkv, lens, num_vision, packed)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    (dqkv,) = _grads(out, [qkv], grad)

    same = reference.multiway_attention(q, k, v, lens, num_vision)
    (dqkv_same,) = _grads(same, [qkv], grad)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = reference.multiway_attention(*qkv64.unbind(2), lens, num_vision)
    (dqkv_ref,) = _grads(ref, [qkv64], grad.double())

    floor = _FLOOR[dtype]
    check("out", out, same, ref, floor)
    for i, name in enumerate("qkv"):
        # gradients scale with |grad| * sqrt(S); the floor scales with the reference size
        scale = 1.0 + dqkv_ref[:, :, i].abs().max().item()
        check(f"d{name}", dqkv[:, :, i], dqkv_same[:, :, i], dqkv_ref[:, :, i], floor * scale)
    # keys past the limit get exactly zero gradient
    for b, length in enumerate(lengths):
        assert torch.all(dqkv[b, num_vision + length:, 1:] == 0)
    assert ops.is_sequence_major(out)
    if packed:  # the gradient lands in the projection's own layout
        assert dqkv.stride() == qkv.stride()
    return out


# (packed op, qkv stored sequence-major): the q, k, v op on views, the packed op on the
# model's layout and on a batch-major projection
_FORMS = [pytest.param(False, False, id="qkv-views"),
          pytest.param(True, True, id="packed-sequence-major"),
          pytest.param(True, False, id="packed-batch-major")]


@pytest.mark.interpret
@pytest.mark.parametrize("packed,sequence_major", _FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,seq,heads,head_dim,num_vision,lengths", _SHAPES)
def test_forward_backward_interpreter(batch, seq, heads, head_dim, num_vision, lengths, dtype,
                                      packed, sequence_major, assert_kernel_close):
    _run_case(batch, seq, heads, head_dim, num_vision, lengths, dtype, "cpu",
              assert_kernel_close, packed, sequence_major)


def _packed_matches_reference(leaf, qkv, lens, num_vision):
    """The packed kernels on ``qkv`` (a view of ``leaf``) against the reference, output and
    gradient of ``leaf``; returns that gradient."""
    out = _attend(qkv, lens, num_vision, packed=True)
    (grad,) = _grads(out, [leaf], torch.ones_like(out))
    ref = reference.packed_multiway_attention(qkv, lens, num_vision)
    (want,) = _grads(ref, [leaf], torch.ones_like(ref))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)
    return grad


@pytest.mark.interpret
@pytest.mark.parametrize("text_len", [1, 2, 7, 16, 33, 64])
def test_packed_text_lengths(text_len):
    """Packed attention at text lengths from 1 to 64, the range the model sees."""
    qkv = _packed_qkv(2, 17 + 64, 1, 16, torch.float32, sequence_major=True)
    _packed_matches_reference(qkv, qkv, torch.tensor([text_len, 64 - text_len + 1]), 17)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["every-other-head", "head-dim-strided"])
def test_packed_strided_inputs(layout):
    """Packed views the kernels read through their strides: every other head of a wider
    projection (not dense: the gradient comes back in a fresh contiguous buffer), and a
    dense projection whose head dim is not innermost (the gradient takes its strides)."""
    if layout == "every-other-head":
        leaf = _packed_qkv(2, 30, 4, 16, torch.float32)
        qkv = leaf[:, :, :, ::2]
    else:
        leaf = torch.randn(2, 30, 3, 16, 2).requires_grad_()
        qkv = leaf.transpose(-1, -2)
        assert qkv.stride(-1) != 1
    grad = _packed_matches_reference(leaf, qkv, torch.tensor([3, 9]), 20)
    if layout == "every-other-head":
        assert torch.all(grad[:, :, :, 1::2] == 0)
    else:
        (dqkv,) = _grads(_attend(qkv, torch.tensor([3, 9]), 20, packed=True).sum(), [qkv], None)
        assert dqkv.stride() == qkv.stride()


@pytest.mark.interpret
def test_small_blocks_many_iterations(monkeypatch, assert_kernel_close):
    """16 x 16 tiles: many full key blocks, masked tails and dead key blocks in every kernel."""
    small = {"BLOCK_M": 16, "BLOCK_N": 16}
    for kernel in (attention._attn_fwd_kernel, attention._attn_bwd_dkdv_kernel,
                   attention._attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "interpret", small)
    _run_case(2, 59, 2, 32, 20, [3, 39], torch.float32, "cpu", assert_kernel_close)


@pytest.mark.interpret
def test_separate_tensors_and_head_major_views(assert_kernel_close):
    """Contiguous q/k/v, and views of (B, H, S, Dh) tensors (another stride order)."""
    batch, seq, heads, head_dim, nv = 2, 33, 3, 32, 20
    lens = torch.tensor([13, 2])
    q = torch.randn(batch, seq, heads, head_dim)
    k = torch.randn(batch, heads, seq, head_dim).transpose(1, 2)
    v = torch.randn(batch, heads, seq, head_dim).transpose(1, 2)
    out = attention.multiway_attention(q, k, v, lens, nv, scale=0.3)
    ref = reference.multiway_attention(q.double(), k.double(), v.double(), lens, nv, scale=0.3)
    same = reference.multiway_attention(q, k, v, lens, nv, scale=0.3)
    assert_kernel_close("out", out, same, ref, _FLOOR[torch.float32])


@pytest.mark.interpret
def test_log_sum_exp_and_padding_invariance():
    batch, seq, heads, head_dim, nv = 2, 45, 2, 32, 30
    lens = torch.tensor([1, 15])
    q, k, v = (torch.randn(batch, seq, heads, head_dim) for _ in range(3))
    out, lse = torch.ops.oneref_triton.multiway_attention(q, k, v, lens, nv, 0.2)
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * 0.2
    valid = reference.key_padding_mask(lens, nv, seq)
    expected = scores.masked_fill(~valid[:, None, None], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)
    # keys past the limit are never read: garbage there changes nothing, bit for bit
    k2, v2 = k.clone(), v.clone()
    for b, length in enumerate(lens.tolist()):
        k2[b, nv + length:] = 1e4
        v2[b, nv + length:] = float("nan")
    out2, lse2 = torch.ops.oneref_triton.multiway_attention(q, k2, v2, lens, nv, 0.2)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.interpret
@pytest.mark.parametrize("packed", [False, True], ids=["qkv-views", "packed"])
def test_every_output_element_written(poison_empty, packed):
    """torch.empty returns NaN-filled buffers: any unwritten output/gradient element leaks."""
    qkv = _packed_qkv(2, 70, 2, 16, torch.float32, sequence_major=packed)
    lens = torch.tensor([1, 10])
    q, k, v = qkv.unbind(2)
    out = _attend(qkv, lens, 60, packed)
    (dqkv,) = _grads(out, [qkv], torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    ref = reference.multiway_attention(q, k, v, lens, 60)
    (dref,) = _grads(ref, [qkv], torch.ones_like(ref))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv, dref, atol=1e-4, rtol=1e-4)


@pytest.mark.interpret
def test_dispatch_through_oneref_ops():
    q, k, v = (torch.randn(1, 24, 2, 32) for _ in range(3))
    lens = torch.tensor([5])
    via_ops = ops.multiway_attention(q, k, v, lens, 16, backend="triton")
    with ops.use_backend("triton"):
        via_ctx = ops.multiway_attention(q, k, v, lens, 16)
    direct = attention.multiway_attention(q, k, v, lens, 16)
    assert torch.equal(via_ops, direct) and torch.equal(via_ctx, direct)
    torch.testing.assert_close(via_ops, reference.multiway_attention(q, k, v, lens, 16),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.interpret
def test_opcheck():
    qkv = torch.randn(1, 9, 3, 1, 16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    torch.library.opcheck(torch.ops.oneref_triton.multiway_attention.default,
                          (q, k, v, torch.tensor([2]), 6, 0.25))
    torch.library.opcheck(torch.ops.oneref_triton.packed_multiway_attention.default,
                          (ops.sequence_major(qkv.detach()).requires_grad_(), torch.tensor([2]),
                           6, 0.25))


@pytest.mark.interpret
@pytest.mark.parametrize("packed", [False, True], ids=["qkv-views", "packed"])
def test_flop_formula(packed):
    batch, seq, heads, head_dim, nv = 2, 40, 2, 32, 30
    lens = torch.tensor([4, 10])
    qkv = _packed_qkv(batch, seq, heads, head_dim, torch.float32)
    with FlopCounterMode(display=False) as counter:
        _attend(qkv, lens, nv, packed).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    valid = (nv + lens).sum().item()
    fwd = 4 * heads * seq * head_dim * valid
    name = "packed_multiway_attention" if packed else "multiway_attention"
    assert counts[getattr(torch.ops.oneref_triton, name)] == fwd
    assert counts[getattr(torch.ops.oneref_triton, f"{name}_backward")] == 2.5 * fwd


@pytest.mark.interpret
def test_unsupported_inputs_raise():
    lens = torch.tensor([1])
    q = torch.randn(1, 8, 1, 24)
    with pytest.raises(ValueError, match="head dim 24"):
        attention.multiway_attention(q, q, q, lens, 4)
    with pytest.raises(ValueError, match="head dim 24"):
        attention.packed_multiway_attention(torch.randn(1, 8, 3, 1, 24), lens, 4)
    q = torch.randn(1, 8, 1, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        attention.multiway_attention(q, q, q, lens, 4)


# --------------------------------------------------------------------------------- GPU

_GPU_SHAPES = _SHAPES + [pytest.param(4, 641, 12, 64, 577, [64, 8, 1, 33], id="G1-like")]


@pytest.mark.gpu
@pytest.mark.parametrize("packed,sequence_major", _FORMS[:2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,seq,heads,head_dim,num_vision,lengths", _GPU_SHAPES)
def test_forward_backward_gpu(batch, seq, heads, head_dim, num_vision, lengths, dtype, packed,
                              sequence_major, assert_kernel_close):
    _run_case(batch, seq, heads, head_dim, num_vision, lengths, dtype, "cuda",
              assert_kernel_close, packed, sequence_major)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["qkv-views", "packed"])
def test_every_output_element_written_gpu(poison_empty, packed):
    qkv = _packed_qkv(3, 641, 4, 64, torch.bfloat16, "cuda", sequence_major=packed)
    lens = torch.tensor([1, 64, 20], device="cuda")
    out = _attend(qkv, lens, 577, packed)
    (dqkv,) = _grads(out, [qkv], torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()


@pytest.mark.gpu
def test_opcheck_gpu():
    qkv = torch.randn(2, 70, 3, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    torch.library.opcheck(torch.ops.oneref_triton.multiway_attention.default,
                          (q, k, v, torch.tensor([2, 9], device="cuda"), 60, 0.125))
    torch.library.opcheck(torch.ops.oneref_triton.packed_multiway_attention.default,
                          (qkv, torch.tensor([2, 9], device="cuda"), 60, 0.125))


@pytest.mark.interpret
@pytest.mark.parametrize("packed", [False, True], ids=["qkv-views", "packed"])
def test_compiles_without_graph_breaks(packed):
    """fullgraph torch.compile (aot_eager: the fake implementations and the registered
    autograd are traced; the kernels still run) matches eager, forward and backward."""
    def step(qkv, lens):
        return _attend(qkv, lens, 12, packed).square().sum()

    qkv = _packed_qkv(2, 20, 2, 16, torch.float32, sequence_major=packed)
    lens = torch.tensor([3, 8])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c = compiled(qkv, lens)
    (grad_c,) = torch.autograd.grad(loss_c, [qkv])
    loss_e = step(qkv, lens)
    (grad_e,) = torch.autograd.grad(loss_e, [qkv])
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, grad_e)
