"""C++ CPU kernels of vts_loss and box_mask_loss (forward and backward) against
oneref.ops.reference and its autograd gradients."""

from __future__ import annotations

import pytest
import torch

from tests.csrc.csrc_helpers import assert_close, make_boxes
from oneref.ops import reference


def _grads(fn, *inputs):
    """fn(*inputs) and the gradient of its scalar output w.r.t. inputs[0] (scaled by 3)."""
    leaf = inputs[0].detach().clone().requires_grad_()
    out = fn(leaf, *inputs[1:])
    (out * 3.0).backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("grid", [24, 5])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype,box_dtype,tol", [
    (torch.float32, torch.float32, 1e-5), (torch.float64, torch.float64, 1e-12),
    (torch.bfloat16, torch.float32, 1e-5), (torch.float32, torch.float64, 1e-12)])
def test_vts_loss_matches_reference(native_ops, grid, batch, dtype, box_dtype, tol):
    gen = torch.Generator().manual_seed(grid * batch)
    pred = (torch.randn(batch, grid * grid, 4, generator=gen) * 0.5).to(dtype)
    boxes = make_boxes(batch, seed=batch, dtype=box_dtype)
    loss, grad = _grads(lambda p: native_ops.vts_loss(p, boxes, grid), pred)
    loss_ref, grad_ref = _grads(lambda p: reference.vts_loss(p, boxes, grid), pred)
    assert loss.dtype == loss_ref.dtype and loss.shape == ()  # float64 if an input is
    assert_close(loss, loss_ref, atol=tol, rtol=tol, what="vts loss")
    assert grad.dtype == dtype
    # sign(pred - target) * 3 / (B L): identical unless pred equals the target exactly.
    assert_close(grad, grad_ref, atol=0, rtol=1e-6, what="vts grad")


@pytest.mark.parametrize("grid", [24, 6])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("scale", [1.0, 12.0])
@pytest.mark.parametrize("weights", [(20.0, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_box_mask_loss_matches_reference(native_ops, grid, batch, scale, weights):
    gen = torch.Generator().manual_seed(grid + batch)
    logits = torch.randn(batch, grid, grid, generator=gen) * scale
    boxes = make_boxes(batch, seed=grid)
    loss, grad = _grads(lambda x: native_ops.box_mask_loss(x, boxes, *weights), logits)
    loss_ref, grad_ref = _grads(lambda x: reference.box_mask_loss(x, boxes, *weights), logits)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5, what="box mask loss")
    assert_close(grad, grad_ref, atol=1e-7, rtol=1e-4, what="box mask grad")


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [
    (torch.bfloat16, 1e-5, 1e-2), (torch.float16, 1e-5, 1e-2), (torch.float64, 1e-7, 1e-5)])
def test_box_mask_loss_other_dtypes(native_ops, dtype, loss_tol, grad_tol):
    """fp16 / bf16 logits are computed in fp32, fp64 logits in fp64, like the reference.
    (fp64 tolerance: the reference's BCE takes the dtype of its fp32 rasterised target, so
    its fp64 loss carries fp32 rounding; the kernels stay in fp64 throughout.)"""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 24, 24, generator=gen) * 3).to(dtype)
    boxes = make_boxes(4, seed=5, dtype=dtype)
    loss, grad = _grads(lambda x: native_ops.box_mask_loss(x, boxes, 20.0, 2.0), logits)
    loss_ref, grad_ref = _grads(lambda x: reference.box_mask_loss(x, boxes), logits)
    assert loss.dtype == loss_ref.dtype
    assert_close(loss, loss_ref, atol=loss_tol, rtol=loss_tol, what="loss")
    assert grad.dtype == dtype
    assert_close(grad, grad_ref, atol=grad_tol * 1e-3, rtol=grad_tol, what="grad")


def test_box_rasterisation_on_cell_edges(native_ops):
    """A box whose edges fall exactly on cell boundaries: the target must match the
    reference's half-open comparison (a one-cell shift would change the loss)."""
    boxes = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]])
    target = reference.box_to_grid_mask(boxes, 24)
    # Logits that are +20 on the target and -20 elsewhere give a near-zero loss only when
    # the kernel rasterises exactly the same cells.
    logits = target * 40 - 20
    assert float(native_ops.box_mask_loss(logits, boxes, 20.0, 0.0)) < 1e-6
    assert_close(native_ops.box_mask_loss(logits, boxes, 20.0, 2.0),
                 reference.box_mask_loss(logits, boxes), atol=1e-6, rtol=1e-5, what="loss")
