"""Switching the op backend changes no model result beyond tolerance (tiny preset, fp32).

A REC fine-tuning step (forward_rec + rec_loss + backward), a Referring MIM step and a
Referring MLM step run once with ``use_backend("torch")`` and once with
``use_backend("triton")`` (kernels in the Triton interpreter); losses and every parameter
gradient are compared. Ops the triton backend does not implement yet run on torch in the
triton pass (recorded, and the multiway attention/linear ops must be among the triton ones).
"""

from __future__ import annotations

import pytest
import torch

from oneref import ops
from oneref.ops import dispatch

model_module = pytest.importorskip("oneref.model")
pytest.importorskip("oneref.kernels.attention")

# fp32 with different summation orders through 2 layers and the heads
_RTOL = 2e-4


@pytest.fixture
def triton_where_implemented(monkeypatch):
    """Inside ``use_backend("triton")``, ops without a triton implementation run on torch.
    Yields the set of ops that did run on triton."""
    used: set[str] = set()
    real_resolve = dispatch.resolve

    def resolve(op, device, backend=None, *args):
        name = backend if backend is not None else dispatch.current_backend(op)
        if name == "triton":
            if dispatch.unavailable_reasons("triton", op, device):
                return real_resolve(op, device, "torch", *args)
            used.add(op)
        return real_resolve(op, device, backend, *args)

    monkeypatch.setattr(dispatch, "resolve", resolve)
    monkeypatch.setattr(ops, "resolve", resolve)
    yield used


def _batch(config, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, config.img_size, config.img_size, generator=gen)
    seq = config.max_text_len
    lengths = torch.tensor([seq, 3])[:batch]  # text lengths max and short
    ids = torch.randint(4, config.vocab_size, (batch, seq), generator=gen)
    ids[:, 0] = 0
    for b, n in enumerate(lengths.tolist()):
        ids[b, n - 1] = 2
        ids[b, n:] = 1
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.6], [0.3, 0.6, 0.2, 0.3]])[:batch]
    return images, ids, lengths, boxes


def _rec_step(model, config):
    images, ids, lengths, boxes = _batch(config)
    out = model.forward_rec(images, ids, lengths)
    return model.rec_loss(out, boxes)


def _mim_step(model, config):
    images, ids, lengths, boxes = _batch(config)
    gen = torch.Generator().manual_seed(3)
    noise = ops.draw_mask_noise(images.shape[0], config.grid, gen)
    image_mask = ops.referring_mask(boxes, noise, config.grid, backend="torch")
    targets = torch.randint(0, config.mim_vocab, image_mask.shape, generator=gen)
    return model.mim_loss(images, ids, lengths, boxes, image_mask, targets, use_vts=True)


def _mlm_step(model, config):
    images, ids, lengths, boxes = _batch(config)
    labels = torch.full_like(ids, -100)
    masked = ids.clone()
    for b, pos in ((0, 2), (0, 5), (1, 1)):
        labels[b, pos] = ids[b, pos]
        masked[b, pos] = config.vocab_size - 1
    return model.mlm_loss(images, masked, lengths, boxes, labels)


def _run(step, backend):
    config = model_module.OneRef.from_config("tiny").config
    torch.manual_seed(0)
    model = model_module.OneRef.from_config("tiny")
    model.train()
    with ops.use_backend(backend):
        losses = step(model, config)
        losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _close(name, got, want):
    err = (got.double() - want.double()).abs().max().item()
    limit = _RTOL * (1.0 + want.double().abs().max().item())
    assert err <= limit, f"{name}: max difference {err:.3e} > {limit:.3e}"


@pytest.mark.interpret
@pytest.mark.slow
@pytest.mark.parametrize("step", [_rec_step, _mim_step, _mlm_step], ids=["rec", "mim", "mlm"])
def test_backend_switch_changes_nothing(step, triton_where_implemented):
    torch_losses, torch_grads = _run(step, "torch")
    triton_losses, triton_grads = _run(step, "triton")
    assert {"packed_multiway_attention", "multiway_linear"} <= triton_where_implemented
    assert torch_losses.keys() == triton_losses.keys()
    for key in torch_losses:
        _close(f"loss[{key}]", triton_losses[key], torch_losses[key])
    assert torch_grads.keys() == triton_grads.keys()
    for name in torch_grads:
        _close(f"grad[{name}]", triton_grads[name], torch_grads[name])
