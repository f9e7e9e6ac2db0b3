"""CUDA kernels of oneref._C against the reference (computed on the same device) and against
the Triton backend where it implements the op, in fp32 and bf16. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.csrc.csrc_helpers import assert_close, make_boxes
from oneref.ops import reference
from oneref.ops.dispatch import resolve, unavailable_reasons

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16]


def _triton(op: str, device):
    """The triton implementation of op, or None when it cannot run here."""
    if unavailable_reasons("triton", op, device):
        return None
    return resolve(op, device, backend="triton")


def _loss_and_grad(fn, x, *args):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf, *args)
    (out * 3.0).backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("batch,grid", [(1, 24), (64, 24), (5, 7)])
def test_referring_mask_gpu(cuda_device, batch, grid):
    boxes = make_boxes(batch, seed=batch, device=cuda_device)
    noise = torch.rand(batch, 2, grid * grid, device=cuda_device)
    got = torch.ops.oneref.referring_mask(boxes, noise, grid, 0.35, 0.75)
    assert torch.equal(got, reference.referring_mask(boxes, noise, grid))
    assert torch.equal(got.cpu(), torch.ops.oneref.referring_mask(boxes.cpu(), noise.cpu(), grid,
                                                                  0.35, 0.75))
    triton_fn = _triton("referring_mask", cuda_device)
    if triton_fn is not None:
        assert torch.equal(got, triton_fn(boxes, noise, grid, 0.35, 0.75))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", [(2, 641, 64), (8, 577, 768), (3, 9, 3)])
def test_masked_rows_gpu(cuda_device, dtype, shape):
    x = torch.randn(shape, device=cuda_device).to(dtype)
    mask = torch.rand(shape[:2], device=cuda_device) < 0.4
    n = int(mask.sum())
    rows = torch.ops.oneref.masked_gather(x, mask, n)
    assert torch.equal(rows, x[mask])
    assert torch.equal(torch.ops.oneref.masked_scatter(rows, mask),
                       reference.masked_scatter(rows, mask))
    token = torch.randn(shape[2], device=cuda_device).to(dtype)
    assert torch.equal(torch.ops.oneref.apply_mask_token(x, mask, token),
                       reference.apply_mask_token(x, mask, token))
    # Misaligned rows (odd offset view) take the narrow-copy path.
    x_odd = torch.randn(x.numel() + 1, device=cuda_device).to(dtype)[1:].view(shape)
    assert torch.equal(torch.ops.oneref.masked_gather(x_odd, mask, n), x_odd[mask])
    triton_fn = _triton("masked_gather", cuda_device)
    if triton_fn is not None:
        assert torch.equal(rows, triton_fn(x, mask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 64])
def test_vts_loss_gpu(cuda_device, dtype, batch):
    pred = torch.randn(batch, 576, 4, device=cuda_device).to(dtype)
    boxes = make_boxes(batch, seed=batch, device=cuda_device)
    loss, grad = _loss_and_grad(lambda p: torch.ops.oneref.vts_loss(p, boxes, 24), pred)
    loss_ref, grad_ref = _loss_and_grad(lambda p: reference.vts_loss(p, boxes, 24), pred)
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5, what="vts loss")
    assert_close(grad, grad_ref, atol=0, rtol=1e-6, what="vts grad")
    triton_fn = _triton("vts_loss", cuda_device)
    if triton_fn is not None:
        loss_tr, grad_tr = _loss_and_grad(lambda p: triton_fn(p, boxes, 24), pred)
        assert_close(loss, loss_tr, atol=1e-5, rtol=1e-5, what="vts loss vs triton")
        assert_close(grad, grad_tr, atol=0, rtol=1e-6, what="vts grad vs triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,grid", [(1, 24), (64, 24), (3, 7)])
def test_box_mask_loss_gpu(cuda_device, dtype, batch, grid):
    logits = (torch.randn(batch, grid, grid, device=cuda_device) * 4).to(dtype)
    boxes = make_boxes(batch, seed=grid, device=cuda_device)
    loss, grad = _loss_and_grad(
        lambda x: torch.ops.oneref.box_mask_loss(x, boxes, 20.0, 2.0), logits)
    loss_ref, grad_ref = _loss_and_grad(lambda x: reference.box_mask_loss(x, boxes), logits)
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5, what="box mask loss")
    assert_close(grad, grad_ref, atol=1e-6, rtol=grad_tol, what="box mask grad")
    loss_cpu = torch.ops.oneref.box_mask_loss(logits.cpu(), boxes.cpu(), 20.0, 2.0)
    assert_close(loss, loss_cpu, atol=1e-5, rtol=1e-5, what="box mask loss vs C++")
    triton_fn = _triton("box_mask_loss", cuda_device)
    if triton_fn is not None:
        loss_tr, grad_tr = _loss_and_grad(lambda x: triton_fn(x, boxes, 20.0, 2.0), logits)
        assert_close(loss, loss_tr, atol=1e-5, rtol=1e-5, what="box mask loss vs triton")
        assert_close(grad, grad_tr, atol=1e-6, rtol=grad_tol, what="box mask grad vs triton")


def test_no_host_sync_and_current_stream(cuda_device):
    """The ops run on the current stream and do not synchronise with the host."""
    boxes = make_boxes(8, seed=0, device=cuda_device)
    pred = torch.randn(8, 576, 4, device=cuda_device, requires_grad=True)
    logits = torch.randn(8, 24, 24, device=cuda_device, requires_grad=True)
    noise = torch.rand(8, 2, 576, device=cuda_device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default one
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")
        try:
            mask = torch.ops.oneref.referring_mask(boxes, noise, 24, 0.35, 0.75)
            loss = torch.ops.oneref.vts_loss(pred, boxes, 24) + torch.ops.oneref.box_mask_loss(
                logits, boxes, 20.0, 2.0)
            loss.backward()
            rows = torch.ops.oneref.masked_gather(pred.detach(), mask, 8 * 576 // 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    assert mask.shape == (8, 576) and rows.shape == (8 * 288, 4)
    assert pred.grad is not None and torch.isfinite(logits.grad).all()
