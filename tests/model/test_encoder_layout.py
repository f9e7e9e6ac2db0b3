"""The encoder's sequence-major hidden states (oneref.ops.layout): same values and gradients
as a batch-major run, and every backend setting reads them."""

import pytest
import torch

import oneref.ops as ops
from oneref.config import get_config
from oneref.model.encoder import MultiwayEncoder


def _encoder_run(encoder, x, lengths, num_vision):
    x = x.detach().requires_grad_()
    encoder.zero_grad(set_to_none=True)
    out = encoder(x, lengths, num_vision)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), x.grad, [p.grad.clone() for p in encoder.parameters()]


def test_sequence_major_encoder_matches_batch_major_run(monkeypatch):
    config = get_config("tiny", drop_path=0.0)
    encoder = MultiwayEncoder(config).double()
    batch, num_vision, seq = 3, 17, 17 + config.max_text_len
    x = torch.randn(batch, seq, config.embed_dim, dtype=torch.float64)
    lengths = torch.tensor([1, config.max_text_len, 5])
    out, grad_x, grads = _encoder_run(encoder, x, lengths, num_vision)
    assert ops.is_sequence_major(out)
    monkeypatch.setattr(ops, "sequence_major", lambda t: t.contiguous())
    ref_out, ref_grad_x, ref_grads = _encoder_run(encoder, x, lengths, num_vision)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad_x, ref_grad_x)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)


def test_key_mask_is_built_once_per_forward():
    """Every layer's attention reads the one key mask the encoder builds: the ops that build
    it run as often with three layers as with one."""
    from oneref.bench.roofline import OpCounter

    calls = []
    for depth in (1, 3):
        config = get_config("tiny", depth=depth)
        x = torch.randn(2, 17 + config.max_text_len, config.embed_dim)
        with OpCounter() as counter, torch.no_grad():
            MultiwayEncoder(config)(x, torch.tensor([3, config.max_text_len]), 17)
        calls.append({op: counter.ops[op]["calls"] for op in ("aten.arange", "aten.lt")})
    assert calls[0] == calls[1] == {"aten.arange": 1, "aten.lt": 1}


@pytest.mark.interpret
def test_kernels_read_sequence_major_hidden_states():
    config = get_config("tiny")
    encoder = MultiwayEncoder(config)
    x = torch.randn(2, 17 + config.max_text_len, config.embed_dim)
    lengths = torch.tensor([3, config.max_text_len])
    with torch.no_grad():
        with ops.use_backend("torch"):
            expected = encoder(x, lengths, 17)
        with ops.use_backend("triton"):
            got = encoder(x, lengths, 17)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
