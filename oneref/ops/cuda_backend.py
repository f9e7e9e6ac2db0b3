"""The ``cuda`` backend: the compiled ops of the extension ``oneref._C``.

The extension registers ``torch.ops.oneref.<op>`` with a CUDA kernel and a C++ CPU kernel
each (``csrc/``). This module adds what the dispatcher and ``torch.compile`` need on top:
fake (meta) implementations, autograd formulas, and one thin wrapper per op (named in
:mod:`oneref.ops.registry`), so ``oneref.ops.<op>(..., backend="cuda")`` runs the CUDA kernels
on GPU tensors and the C++ kernels on CPU tensors.

Ops: referring_mask, apply_mask_token, masked_gather, masked_scatter, vts_loss,
box_mask_loss. Semantics are those of :mod:`oneref.ops.reference`.
"""

from __future__ import annotations

import torch

from oneref import _native

__all__ = ["unavailable_reasons"]

_C = _native.load()


def unavailable_reasons(device: torch.device | None) -> list[str]:
    """Plain-language reasons why the compiled ops cannot run on ``device`` (empty: they can)."""
    state = _native.status()
    if not state.loaded:
        return [f"the extension oneref._C is not built or failed to load ({state.error}); "
                + _native.BUILD_HINT]
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return []
    if device.type != "cuda":
        return [f"oneref._C has no kernels for {device.type} tensors"]
    reasons = []
    if not state.with_cuda:
        reasons.append("oneref._C was built without its CUDA kernels (no CUDA toolkit or a "
                       "CPU-only torch at build time); rebuild with CUDA_HOME set "
                       "(ONEREF_FORCE_CUDA=1 turns a CPU-only build into an error)")
    if not torch.cuda.is_available():
        reasons.append("CUDA is not available (no GPU or driver)")
    return reasons


# ----------------------------------------------------------------- fake implementations
def _loss_dtype(*inputs: torch.Tensor) -> torch.dtype:
    """Loss dtype of the kernels (and of the reference): float64 if an input is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32


def _register_fakes() -> None:
    @torch.library.register_fake("oneref::referring_mask")
    def _(boxes, noise, grid, outside_ratio, inside_ratio):
        return boxes.new_empty((boxes.shape[0], grid * grid), dtype=torch.bool)

    @torch.library.register_fake("oneref::masked_gather")
    def _(x, mask, num_rows):
        return x.new_empty((num_rows, x.shape[2]))

    @torch.library.register_fake("oneref::masked_scatter")
    def _(rows, mask):
        return rows.new_empty((mask.shape[0], mask.shape[1], rows.shape[1]))

    @torch.library.register_fake("oneref::apply_mask_token")
    def _(x, mask, token):
        return torch.empty_like(x)

    @torch.library.register_fake("oneref::vts_loss")
    def _(pred, boxes, grid):
        return pred.new_empty((), dtype=_loss_dtype(pred, boxes))

    @torch.library.register_fake("oneref::vts_loss_backward")
    def _(grad, pred, boxes, grid):
        return torch.empty_like(pred)

    @torch.library.register_fake("oneref::box_mask_loss")
    def _(logits, boxes, focal_weight, dice_weight):
        return logits.new_empty((), dtype=_loss_dtype(logits))

    @torch.library.register_fake("oneref::box_mask_loss_backward")
    def _(grad, logits, boxes, focal_weight, dice_weight):
        return torch.empty_like(logits)


# ------------------------------------------------------------------------------ autograd
def _scalar_grad(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The incoming gradient of a scalar loss as the 0-dim tensor the kernels read (in the
    dtype of the loss: float32, or float64 for float64 inputs)."""
    return grad.reshape(()).to(dtype).contiguous()


def _register_autograd() -> None:
    ops = torch.ops.oneref

    def setup_masked_gather(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward_masked_gather(ctx, grad):
        (mask,) = ctx.saved_tensors
        return ops.masked_scatter(grad.contiguous(), mask), None, None

    def setup_masked_scatter(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.num_rows = inputs[0].shape[0]

    def backward_masked_scatter(ctx, grad):
        (mask,) = ctx.saved_tensors
        return ops.masked_gather(grad.contiguous(), mask, ctx.num_rows), None

    def setup_apply_mask_token(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward_apply_mask_token(ctx, grad):
        (mask,) = ctx.saved_tensors
        selected = mask[..., None]
        grad_x = grad.masked_fill(selected, 0) if ctx.needs_input_grad[0] else None
        grad_token = None
        if ctx.needs_input_grad[2]:
            grad_token = grad.masked_fill(~selected, 0).sum((0, 1), dtype=torch.float32)
            grad_token = grad_token.to(grad.dtype)
        return grad_x, None, grad_token

    def setup_vts_loss(ctx, inputs, output):
        pred, boxes, grid = inputs
        ctx.save_for_backward(pred, boxes)
        ctx.grid = grid
        ctx.loss_dtype = output.dtype

    def backward_vts_loss(ctx, grad):
        pred, boxes = ctx.saved_tensors
        grad_pred = None
        if ctx.needs_input_grad[0]:
            grad_pred = ops.vts_loss_backward(_scalar_grad(grad, ctx.loss_dtype), pred, boxes,
                                              ctx.grid)
        return grad_pred, None, None

    def setup_box_mask_loss(ctx, inputs, output):
        logits, boxes, focal_weight, dice_weight = inputs
        ctx.save_for_backward(logits, boxes)
        ctx.weights = (focal_weight, dice_weight)
        ctx.loss_dtype = output.dtype

    def backward_box_mask_loss(ctx, grad):
        logits, boxes = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = ops.box_mask_loss_backward(_scalar_grad(grad, ctx.loss_dtype), logits,
                                                     boxes, *ctx.weights)
        return grad_logits, None, None, None

    for name, backward, setup in (
        ("masked_gather", backward_masked_gather, setup_masked_gather),
        ("masked_scatter", backward_masked_scatter, setup_masked_scatter),
        ("apply_mask_token", backward_apply_mask_token, setup_apply_mask_token),
        ("vts_loss", backward_vts_loss, setup_vts_loss),
        ("box_mask_loss", backward_box_mask_loss, setup_box_mask_loss),
    ):
        torch.library.register_autograd(f"oneref::{name}", backward, setup_context=setup)


if _C is not None:
    _register_fakes()
    _register_autograd()


# ------------------------------------------------------------------ registry entries
# Same signatures as oneref.ops.reference; the public functions in oneref.ops have already
# checked the arguments. Inputs are made contiguous here (the kernels require it).
def referring_mask(boxes, noise, grid: int, outside_ratio: float = 0.35,
                   inside_ratio: float = 0.75):
    return torch.ops.oneref.referring_mask(boxes.contiguous(), noise.contiguous(), int(grid),
                                           float(outside_ratio), float(inside_ratio))


def apply_mask_token(x, mask, token):
    return torch.ops.oneref.apply_mask_token(x.contiguous(), mask.contiguous(),
                                             token.contiguous())


def masked_gather(x, mask):
    # The output row count is data dependent: it is counted here, once (one host sync on a
    # GPU); the kernel itself never synchronises. Callers that know the count (a fixed
    # masking ratio) can call torch.ops.oneref.masked_gather(x, mask, num_rows) directly.
    num_rows = int(mask.sum())
    return torch.ops.oneref.masked_gather(x.contiguous(), mask.contiguous(), num_rows)


def masked_scatter(rows, mask):
    return torch.ops.oneref.masked_scatter(rows.contiguous(), mask.contiguous())


def vts_loss(pred, boxes, grid: int):
    return torch.ops.oneref.vts_loss(pred.contiguous(), boxes.contiguous(), int(grid))


def box_mask_loss(logits, boxes, focal_weight: float, dice_weight: float):
    return torch.ops.oneref.box_mask_loss(logits.contiguous(), boxes.contiguous(),
                                          float(focal_weight), float(dice_weight))
