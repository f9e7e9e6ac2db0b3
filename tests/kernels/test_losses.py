"""vts_loss, box_mask_loss, focal_dice_loss and sts_kl kernels against the reference.

Criterion: the kernel's error against the fp64 reference is at most 2x the error of the
reference run in the same precision (plus a tiny absolute floor), for the loss and for
every gradient.
"""

import pytest
import torch

import oneref.ops as ops
from oneref.kernels import losses
from oneref.ops import reference, use_backend

_CPU = [pytest.mark.interpret]
DEVICE_DTYPES = [pytest.param("cpu", torch.float32, marks=_CPU),
                 pytest.param("cpu", torch.float16, marks=_CPU),
                 pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]


def _floor(oracle):
    """Tiny absolute floor: 1e-6 relative to the largest reference value."""
    return 1e-6 * (1 + oracle.detach().abs().max().item())


def _compare(check, kernel_fn, reference_fn, inputs, grad_of):
    """Run kernel and reference (same precision and fp64) on ``inputs``; compare the loss
    and the gradients of the inputs at indices ``grad_of``."""
    def run(fn, cast):
        args = [cast(t).requires_grad_(i in grad_of) if t.is_floating_point() else t
                for i, t in enumerate(inputs)]
        loss = fn(*args)
        loss.backward()
        return loss, [args[i].grad for i in grad_of]

    got, got_grads = run(kernel_fn, lambda t: t.clone())
    same, same_grads = run(reference_fn, lambda t: t.clone())
    want, want_grads = run(reference_fn, lambda t: t.double())
    assert got.dtype == torch.float32 and got.dim() == 0
    check("loss", got, same, want, floor=_floor(want))
    for i, g, s, w in zip(grad_of, got_grads, same_grads, want_grads):
        assert g.dtype == inputs[i].dtype
        check(f"grad of input {i}", g, s, w, floor=_floor(w))


def _boxes(batch, device, edge=False):
    boxes = torch.cat([torch.rand(batch, 2), torch.rand(batch, 2) * 0.8 + 0.01], 1)
    if edge:
        boxes[0] = torch.tensor([0.5, 0.5, 1.0, 1.0])             # the whole image
        boxes[1 % batch] = torch.tensor([0.01, 0.99, 0.2, 0.3])   # crosses two borders
        boxes[2 % batch] = torch.tensor([0.3, 0.6, 0.0, 0.0])     # degenerate
        boxes[3 % batch] = torch.tensor([0.5, 0.5, 0.01, 0.02])   # smaller than a cell
    return boxes.to(device)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("batch,grid,edge", [(3, 24, False), (1, 24, True), (5, 7, True),
                                             (2, 1, False)])
def test_vts_loss(device, dtype, batch, grid, edge, poison_empty, assert_kernel_close):
    pred = (torch.randn(batch, grid * grid, 4, device=device) * 0.5).to(dtype)
    boxes = _boxes(batch, device, edge)
    _compare(assert_kernel_close, lambda p, b: losses.vts_loss(p, b, grid),
             lambda p, b: reference.vts_loss(p, b, grid), [pred, boxes], grad_of=[0])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("batch,grid,edge,weights", [
    (3, 24, False, (20.0, 2.0)), (1, 24, True, (20.0, 2.0)), (5, 7, True, (1.0, 0.5)),
    (2, 3, False, (0.0, 2.0))])
def test_box_mask_loss(device, dtype, batch, grid, edge, weights, poison_empty,
                       assert_kernel_close):
    logits = (torch.randn(batch, grid, grid, device=device) * 3).to(dtype)
    boxes = _boxes(batch, device, edge)
    _compare(assert_kernel_close, lambda x, b: losses.box_mask_loss(x, b, *weights),
             lambda x, b: reference.box_mask_loss(x, b, *weights), [logits, boxes],
             grad_of=[0])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape,fill,weights", [
    ((2, 24, 24), None, ()), ((1, 37, 41), None, (20.0, 10.0, 0.6)),
    ((3, 1500), None, ()), ((2, 5, 5), 0.0, (5.0, 1.0, 0.9)), ((2, 5, 5), 1.0, ())])
def test_focal_dice_loss(device, dtype, shape, fill, weights, poison_empty,
                         assert_kernel_close):
    """``weights``: (focal weight, dice weight, alpha), or () for the defaults."""
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    target = (torch.rand(shape, device=device) > 0.6).to(dtype)
    if fill is not None:  # empty and full targets
        target.fill_(fill)
    _compare(assert_kernel_close, lambda x, t: losses.focal_dice_loss(x, t, *weights),
             lambda x, t: reference.focal_dice_loss(x, t, *weights), [logits, target],
             grad_of=[0])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("batch,length,valid_case", [
    (4, 64, "random"), (1, 64, "all"), (3, 1, "all"), (3, 13, "none_in_row0"),
    (2, 300, "prefix")])
def test_sts_kl(device, dtype, batch, length, valid_case, poison_empty, assert_kernel_close):
    pred = torch.randn(batch, length, device=device).to(dtype)
    target = (torch.randn(batch, length, device=device) * 2).to(dtype)
    if valid_case == "all":
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    elif valid_case == "prefix":  # text positions 1..n-2, like the STS head
        lengths = torch.randint(3, length, (batch,), device=device)
        pos = torch.arange(length, device=device)
        valid = (pos[None] >= 1) & (pos[None] < lengths[:, None] - 1)
    else:
        valid = torch.rand(batch, length, device=device) > 0.3
        if valid_case == "none_in_row0":
            valid[0] = False
    _compare(assert_kernel_close, losses.sts_kl, reference.sts_kl, [pred, target, valid],
             grad_of=[0, 1])


@pytest.mark.interpret
def test_losses_dispatch_and_opcheck():
    grid, boxes = 4, _boxes(2, "cpu")
    pred = torch.randn(2, grid * grid, 4)
    logits = torch.randn(2, grid, grid)
    target = (torch.rand(2, grid, grid) > 0.5).float()
    scores, teacher = torch.randn(2, 6), torch.randn(2, 6)
    valid = torch.rand(2, 6) > 0.3
    with use_backend("triton"):
        got = [ops.vts_loss(pred, boxes, grid), ops.box_mask_loss(logits, boxes),
               ops.focal_dice_loss(logits, target), ops.sts_kl(scores, teacher, valid)]
    want = [reference.vts_loss(pred, boxes, grid), reference.box_mask_loss(logits, boxes),
            reference.focal_dice_loss(logits, target), reference.sts_kl(scores, teacher, valid)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    pred.requires_grad_()
    logits.requires_grad_()
    scores.requires_grad_()
    lib = torch.ops.oneref_triton
    torch.library.opcheck(lib.vts_loss.default, (pred, boxes, grid))
    torch.library.opcheck(lib.box_mask_loss.default, (logits, boxes, 20.0, 2.0, 0.25))
    torch.library.opcheck(lib.focal_dice_loss.default, (logits, target, 20.0, 2.0, 0.5))
    torch.library.opcheck(lib.sts_kl.default, (scores, teacher, valid))
