"""The torch backend's fast composites against the readable reference."""

import pytest
import torch

from oneref.ops import reference, torch_backend


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


def test_attention_bf16_error_is_that_of_the_reference():
    _, (q, k, v) = _packed_qkv(2, 70, 2, 32, torch.float32)
    lengths = torch.tensor([3, 5])
    exact = reference.multiway_attention(*(t.double() for t in (q, k, v)), lengths, 65)
    low = [t.detach().bfloat16() for t in (q, k, v)]
    fast_err = (torch_backend.multiway_attention(*low, lengths, 65).double() - exact).abs().max()
    ref_err = (reference.multiway_attention(*low, lengths, 65).double() - exact).abs().max()
    assert fast_err <= 2 * ref_err + 1e-3


@pytest.mark.parametrize("num_vision", [0, 1, 9, 12])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_multiway_linear_matches_reference(num_vision, activation):
    x = torch.randn(12, 3, 5, dtype=torch.float64).transpose(0, 1).requires_grad_()  # strided
    params = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in ((4, 5), (4,), (4, 5), (4,))]
    grad = torch.randn(3, 12, 4, dtype=torch.float64)
    results = []
    for fn in (torch_backend.multiway_linear, reference.multiway_linear):
        inputs = [x] + params
        for tensor in inputs:
            tensor.grad = None
        fn(x, num_vision, *params, activation=activation).backward(grad)
        results.append([fn(x, num_vision, *params, activation=activation).detach()]
                       + [t.grad.clone() for t in inputs])
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref)


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
