"""Schema, fake tensor and autograd registration of the oneref._C ops (torch.library.opcheck),
argument errors, the cuda backend of oneref.ops on CPU tensors, and oneref.info()."""

from __future__ import annotations

import io

import pytest
import torch

import oneref.ops
from tests.csrc.csrc_helpers import make_boxes
from oneref.ops import reference
from oneref.ops.dispatch import unavailable_reasons


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    boxes = make_boxes(3, seed=0)
    noise = torch.rand(3, 2, 36, generator=gen)
    x = torch.randn(3, 10, 8, generator=gen, requires_grad=True)
    mask = torch.rand(3, 10, generator=gen) < 0.5
    rows = torch.randn(int(mask.sum()), 8, generator=gen, requires_grad=True)
    token = torch.randn(8, generator=gen, requires_grad=True)
    pred = torch.randn(3, 36, 4, generator=gen, requires_grad=True)
    logits = torch.randn(3, 6, 6, generator=gen, requires_grad=True)
    return {
        "referring_mask": (boxes, noise, 6, 0.35, 0.75),
        "masked_gather": (x, mask, int(mask.sum())),
        "masked_scatter": (rows, mask),
        "apply_mask_token": (x, mask, token),
        "vts_loss": (pred, boxes, 6),
        "box_mask_loss": (logits, boxes, 20.0, 2.0),
    }


@pytest.mark.parametrize("op", ["referring_mask", "masked_gather", "masked_scatter",
                                "apply_mask_token", "vts_loss", "box_mask_loss"])
def test_opcheck(native_ops, op):
    args = _opcheck_cases()[op]
    torch.library.opcheck(getattr(native_ops, op).default, args)


def test_errors_name_the_argument(native_ops):
    boxes = make_boxes(2, seed=0)
    pred = torch.randn(2, 576, 4)
    with pytest.raises(RuntimeError, match=r"oneref::vts_loss: pred must have shape \[2, 576, 4\], "
                                           r"got \[2, 575, 4\]"):
        native_ops.vts_loss(pred[:, :575].contiguous(), boxes, 24)
    with pytest.raises(RuntimeError, match="oneref::vts_loss: pred must be float32, float64, "
                                           "float16 or bfloat16, got Long"):
        native_ops.vts_loss(pred.long(), boxes, 24)
    with pytest.raises(RuntimeError, match="oneref::vts_loss: pred must be contiguous"):
        native_ops.vts_loss(pred.transpose(0, 1).contiguous().transpose(0, 1), boxes, 24)
    with pytest.raises(RuntimeError,
                       match=r"oneref::box_mask_loss: boxes must have shape \[2, 4\]"):
        native_ops.box_mask_loss(torch.randn(2, 24, 24), boxes[:1], 20.0, 2.0)
    with pytest.raises(RuntimeError, match=r"oneref::box_mask_loss: logits must have shape "
                                           r"\[2, 24, 24\], got \[2, 24, 23\]"):
        native_ops.box_mask_loss(torch.randn(2, 24, 23), boxes, 20.0, 2.0)
    with pytest.raises(RuntimeError, match=r"oneref::referring_mask: noise must have shape "
                                           r"\[2, 2, 576\]"):
        native_ops.referring_mask(boxes, torch.rand(2, 576), 24, 0.35, 0.75)
    with pytest.raises(RuntimeError, match=r"inside_ratio must be in \[0, 1\], got 1.5"):
        native_ops.referring_mask(boxes, torch.rand(2, 2, 576), 24, 0.35, 1.5)
    x, mask = torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="num_rows is 9 but mask has 10 True entries"):
        native_ops.masked_gather(x, mask, 9)
    with pytest.raises(RuntimeError, match="oneref::masked_gather: mask must be Bool, got Long"):
        native_ops.masked_gather(x, mask.long(), 10)
    with pytest.raises(RuntimeError,
                       match=r"oneref::apply_mask_token: token must have shape \[3\]"):
        native_ops.apply_mask_token(x, mask, torch.zeros(4))


def test_public_ops_on_cpu_with_cuda_backend(native_ops):
    gen = torch.Generator().manual_seed(2)
    boxes = make_boxes(4, seed=2)
    noise = oneref.ops.draw_mask_noise(4, 24, gen)
    mask = oneref.ops.referring_mask(boxes, noise, 24, backend="cuda")
    assert torch.equal(mask, reference.referring_mask(boxes, noise, 24))
    x = torch.randn(4, 576, 16, generator=gen)
    rows = oneref.ops.masked_gather(x, mask, backend="cuda")
    assert torch.equal(rows, x[mask])
    assert torch.equal(oneref.ops.masked_scatter(rows, mask, backend="cuda"),
                       reference.masked_scatter(rows, mask))
    pred = torch.randn(4, 576, 4, generator=gen)
    with oneref.ops.use_backend("cuda"):
        loss = oneref.ops.vts_loss(pred, boxes, 24)
        box_loss = oneref.ops.box_mask_loss(torch.randn(4, 24, 24, generator=gen), boxes)
    torch.testing.assert_close(loss, reference.vts_loss(pred, boxes, 24))
    assert box_loss.shape == () and torch.isfinite(box_loss)


def test_unavailable_reasons_explain_missing_gpu(native_ops):
    assert unavailable_reasons("cuda", "vts_loss", torch.device("cpu")) == []
    if not torch.cuda.is_available():
        reasons = unavailable_reasons("cuda", "vts_loss", torch.device("cuda"))
        assert any("CUDA is not available" in r for r in reasons)
    assert unavailable_reasons("cuda", "sts_kl", torch.device("cpu")) == [
        "cuda backend does not implement sts_kl"]


def test_info_reports_backends_and_build(native_ops):
    from oneref.info import info

    out = io.StringIO()
    data = info(file=out)
    text = out.getvalue()
    assert data["extension_built"] is True
    assert data["backends"]["cpu"]["cuda"] == [] and data["backends"]["cpu"]["torch"] == []
    assert f"torch {torch.__version__}" in text
    assert "oneref._C: built with" in text
    assert ("CPU + CUDA kernels" in text) == data["extension_with_cuda"]


@pytest.mark.slow
def test_torch_compile_fullgraph(native_ops):
    """The ops trace into one graph (fake impls + autograd) and give the eager results."""
    gen = torch.Generator().manual_seed(4)
    boxes = make_boxes(3, seed=4)
    noise = torch.rand(3, 2, 576, generator=gen)
    pred = torch.randn(3, 576, 4, generator=gen, requires_grad=True)
    logits = torch.randn(3, 24, 24, generator=gen, requires_grad=True)

    def step(pred, logits):
        mask = native_ops.referring_mask(boxes, noise, 24, 0.35, 0.75)
        loss = native_ops.vts_loss(pred, boxes, 24) + native_ops.box_mask_loss(logits, boxes,
                                                                               20.0, 2.0)
        return loss, mask

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, mask = compiled(pred, logits)
    loss.backward()
    grads = (pred.grad.clone(), logits.grad.clone())
    pred.grad = logits.grad = None
    loss_ref, mask_ref = step(pred, logits)
    loss_ref.backward()
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grads[0], pred.grad)
    torch.testing.assert_close(grads[1], logits.grad)
