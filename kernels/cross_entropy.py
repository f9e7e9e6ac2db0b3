"""Vocabulary projection + (label-smoothed) cross-entropy without the full N x V logits.

Semantics: :func:`oneref.ops.reference.linear_cross_entropy`, i.e. PyTorch's
``F.cross_entropy(F.linear(x, weight, bias).float(), target, ignore_index, label_smoothing,
reduction)``: per row ``loss = (1 - eps) * (lse - z_t) + eps * (lse - mean_c z_c)``, 0 at
ignored rows; ``"mean"`` divides the sum by the number of rows that are not ignored.

Design (Liger-style, benchmarks/README.md, G3):
* Rows are processed in chunks. For each chunk the logits ``x_c @ W^T + b`` are one cuBLAS
  GEMM in the input dtype (fp32 accumulation inside the GEMM, the rounding the reference
  has too); a Triton kernel then makes two passes over each row (online max / sum-exp /
  sum in fp32, then the gradient ``scale * (softmax - (1 - eps) onehot - eps / V)``) and
  writes that gradient over the logits in place. Two more GEMMs give the chunk's rows of
  grad_x and its contribution to grad_W (accumulated in fp32, so many chunks round like one
  GEMM); grad_b is the column sum.
* ``reduction="mean"``: the gradient is computed in the forward pass (when an input needs
  it), scaled by ``1 / #valid`` read on the device, and backward only multiplies by
  grad_output. Nothing N x V is kept.
* ``reduction="none"``: the per-row grad_output is unknown in the forward, so the forward
  computes only the losses and the backward recomputes each chunk's logits (one extra GEMM).
* Chunk size (:func:`_chunk_rows`): the chunk's logits at most the size of the fp32 grad_W
  accumulator, at least 256 rows, equal chunks. Predicted for MLM (N = 1638, V = 64010,
  D = 768, bf16): 2 chunks of 819 rows; extra memory = one chunk (105 MB) + the fp32
  accumulator (197 MB) + one bf16 chunk product (98 MB) ~ 0.4 GB against ~1.5 GB for eager
  Linear + CE (bf16 and fp32 logits, log-softmax, their gradients): ~0.27x, at the G3 limit
  (``chunk_rows`` trades memory for accumulator passes). Time: the three GEMMs of eager
  (~0.7 ms on an H100) + one read/write pass of each chunk (~0.2 ms) + one accumulator
  pass per extra chunk (~0.2 ms), against ~1.8 ms for eager: predicted ~0.6-0.8x. MIM
  (N = 14746, V = 8192): 10 chunks of 1475 rows, accumulator passes cheap (V x D small).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

__all__ = ["linear_cross_entropy"]


@triton.jit
def _ce_rows_kernel(logits_ptr, stride_l, target_ptr, loss_ptr, scale_ptr, scale_stride,
                    V, ignore_index, eps, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row program: loss of one row of a logits chunk; with COMPUTE_GRAD the row is
    overwritten by ``scale[row] * d loss / d logits`` (0 at an ignored row)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    target = tl.load(target_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    # Pass 1: online max and sum of exp, plus the plain sum for the smoothing term.
    m = float("-inf")
    s = 0.0
    total = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        total += tl.sum(tl.where(cols < V, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_t = tl.load(base + tl.where(in_range, target, 0)).to(tl.float32)
    loss = (1.0 - eps) * (lse - z_t) + eps * (lse - total / V)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - eps / V - tl.where(cols == target, 1.0 - eps, 0.0)
            tl.store(base + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=cols < V)


def _chunk_rows(n: int, d: int, elt_size: int) -> int:
    """Rows per chunk: the chunk's logits (rows x V) at most the size of the fp32 grad_W
    accumulator (V x D x 4 bytes), i.e. ``4 D / elt_size`` rows, but at least 256 rows (GEMMs
    stay compute-bound), split into equal chunks. Fewer, larger chunks mean fewer passes of
    the V x D accumulator (the main extra traffic); the cap bounds the extra memory."""
    cap = max(256, 4 * d // elt_size)
    chunks = triton.cdiv(max(n, 1), cap)
    return triton.cdiv(max(n, 1), chunks)


def _block_v(v: int, device: torch.device) -> int:
    # GPU: 4096-wide blocks (16 KB of fp32 per pass step); the interpreter: larger blocks,
    # since there every block operation has a large fixed cost.
    return min(triton.next_power_of_2(v), 4096 if device.type == "cuda" else 16384)


def _chunk_logits(x_c, weight, bias):
    return torch.addmm(bias.to(x_c.dtype), x_c, weight.t()) if bias is not None \
        else x_c @ weight.t()


def _run_rows(logits, target_c, loss_c, scale, scale_stride, ignore_index, eps, compute_grad):
    v = logits.shape[1]
    kwargs = {"num_warps": 8} if logits.is_cuda else {}
    _ce_rows_kernel[(logits.shape[0],)](logits, logits.stride(0), target_c, loss_c, scale,
                                        scale_stride, v, ignore_index, eps,
                                        COMPUTE_GRAD=compute_grad,
                                        BLOCK_V=_block_v(v, logits.device), **kwargs)


def _forward(x, weight, target, bias, ignore_index, eps, scale, scale_stride, compute_grad,
             chunk_rows):
    """Loss per row, and (with compute_grad) grad_x, fp32 grad_w, fp32 grad_b where the
    row gradient is multiplied by ``scale[row * scale_stride]``."""
    n, d = x.shape
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    grad_x = grad_w = grad_b = None
    chunk = chunk_rows or _chunk_rows(n, d, x.element_size())
    single = n <= chunk
    if compute_grad:
        grad_x = torch.empty_like(x)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        x_c = x[start:stop]
        logits = _chunk_logits(x_c, weight, bias)
        scale_c = scale[start * scale_stride:] if scale_stride else scale
        _run_rows(logits, target[start:stop], losses[start:stop], scale_c, scale_stride,
                  ignore_index, eps, compute_grad)
        if compute_grad:
            grad_x[start:stop] = logits @ weight.to(logits.dtype)
            part_w = logits.t() @ x_c
            part_b = logits.sum(0, dtype=torch.float32)
            if single:  # one chunk: no accumulator, no extra V x D buffer
                grad_w, grad_b = part_w, part_b
            elif grad_w is None:  # several: fp32 accumulators, so the sum rounds once
                grad_w, grad_b = part_w.float(), part_b
            else:  # mixed-dtype in-place add: no fp32 copy of part_w
                grad_w += part_w
                grad_b += part_b
    if bias is None:
        grad_b = None
    return losses, grad_x, grad_w, grad_b


def _empty(ref):
    return ref.new_empty(0)


@torch.library.custom_op("oneref_triton::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None, ignore_index: int, label_smoothing: float,
                mean: bool, compute_grad: bool, chunk_rows: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_w, grad_b); loss is a scalar when ``mean`` else (N,). The grads
    (of the mean loss, fp32 for weight and bias) are empty unless ``compute_grad``."""
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    not_ignored = target != ignore_index
    # Device-side check (no host sync on a GPU), as F.cross_entropy does.
    torch._assert_async((~not_ignored | ((target >= 0) & (target < weight.shape[0]))).all(),
                        "linear_cross_entropy: a target is outside [0, V) and not ignore_index")
    valid = not_ignored.sum().to(torch.float32).reshape(1)
    scale = 1.0 / valid
    losses, grad_x, grad_w, grad_b = _forward(x, weight, target, bias, ignore_index,
                                              label_smoothing, scale, 0, compute_grad,
                                              chunk_rows)
    loss = (losses.sum() / valid[0]) if mean else losses
    if not compute_grad:
        return loss, _empty(x), _empty(x), _empty(x)
    return (loss, grad_x, grad_w.to(weight.dtype),
            grad_b.to(bias.dtype) if grad_b is not None else _empty(x))


@_lce_fwd_op.register_fake
def _(x, weight, target, bias, ignore_index, label_smoothing, mean, compute_grad, chunk_rows):
    loss = x.new_empty((), dtype=torch.float32) if mean else \
        x.new_empty(x.shape[0], dtype=torch.float32)
    if not compute_grad:
        return loss, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    grad_b = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return loss, torch.empty_like(x), torch.empty_like(weight), grad_b


@torch.library.custom_op("oneref_triton::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                target: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
                label_smoothing: float, chunk_rows: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_loss * loss_rows)`` (reduction ``"none"``): recomputes the
    logits chunk by chunk. Returns (grad_x, grad_w, grad_b or empty)."""
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    scale = grad_loss.to(torch.float32).contiguous()
    _, grad_x, grad_w, grad_b = _forward(x, weight, target, bias, ignore_index,
                                         label_smoothing, scale, 1, True, chunk_rows)
    return (grad_x, grad_w.to(weight.dtype),
            grad_b.to(bias.dtype) if grad_b is not None else _empty(x))


@_lce_bwd_op.register_fake
def _(grad_loss, x, weight, target, bias, ignore_index, label_smoothing, chunk_rows):
    grad_b = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), grad_b


@register_flop_formula(torch.ops.oneref_triton.linear_cross_entropy_fwd)
def _lce_fwd_flops(x_shape, weight_shape, target_shape, bias_shape, ignore_index,
                   label_smoothing, mean, compute_grad, *args, **kwargs) -> int:
    """2 N D V for the logits, + 4 N D V for grad_x and grad_W when computed."""
    n, d = x_shape
    return (6 if compute_grad else 2) * n * d * weight_shape[0]


@register_flop_formula(torch.ops.oneref_triton.linear_cross_entropy_bwd)
def _lce_bwd_flops(grad_shape, x_shape, weight_shape, *args, **kwargs) -> int:
    """Recomputed logits (2 N D V) + grad_x and grad_W (4 N D V)."""
    n, d = x_shape
    return 6 * n * d * weight_shape[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, label_smoothing, reduction,
                chunk_rows):
        mean = reduction == "mean"
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        loss, grad_x, grad_w, grad_b = _lce_fwd_op(x, weight, target, bias, ignore_index,
                                                   label_smoothing, mean,
                                                   mean and needs_grad, chunk_rows)
        ctx.mean = mean
        ctx.has_bias = bias is not None
        ctx.args = (ignore_index, label_smoothing, chunk_rows)
        if mean:
            ctx.save_for_backward(grad_x, grad_w, grad_b)
        else:
            ctx.save_for_backward(x, weight, target, bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.mean:
            grad_x, grad_w, grad_b = ctx.saved_tensors
            grad_x, grad_w = grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(
                grad_w.dtype)
            grad_b = grad_b * grad_loss.to(grad_b.dtype) if ctx.has_bias else None
        else:
            x, weight, target, bias = ctx.saved_tensors
            grad_x, grad_w, grad_b = _lce_bwd_op(grad_loss, x, weight, target, bias,
                                                 *ctx.args)
            grad_b = grad_b if ctx.has_bias else None
        return grad_x, grad_w, None, grad_b, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean",
                         chunk_rows: int = 0) -> torch.Tensor:
    """Cross-entropy of ``x @ weight.T + bias`` against target without the full logits.

    Args:
        x: (N, D); weight: (V, D); bias: (V,) or None; target: (N,) int64 in [0, V) or
            ``ignore_index`` (checked on the device: an asynchronous assert on a GPU).
        reduction: ``"mean"`` (scalar over the rows that are not ignored; NaN when all are)
            or ``"none"`` ((N,) fp32, 0 at ignored rows).
        chunk_rows: rows per chunk; 0 picks ``max(256, 4 D / element size)`` rows, split
            into equal chunks.

    Returns:
        fp32 loss. Differentiable w.r.t. x, weight and bias.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return _LinearCrossEntropy.apply(x, weight, target, bias, int(ignore_index),
                                     float(label_smoothing), reduction, int(chunk_rows))
