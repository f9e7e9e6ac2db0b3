"""Target-relation and referring losses: VTS L1, box-mask / mask focal + dice, STS KL.

Semantics are those of :mod:`oneref.ops.reference` (``vts_loss``, ``box_mask_loss``,
``focal_dice_loss``, ``sts_kl``); every loss is a scalar fp32 tensor and every kernel computes
in fp32 whatever the input dtype.

Design (all memory-bound, benchmarks/README.md, G2):
* ``vts_loss``: targets ``[(i - cx)/G, (j - cy)/G, 1/w, 1/h]`` come from the box and the cell
  index inside the kernel; the forward reads pred once and writes one partial sum per
  program (summed deterministically); it saves only its inputs. Backward writes
  ``sign(pred - target) * g / (B * L)`` in one more read of pred.
* ``focal_dice_loss`` / ``box_mask_loss``: one program per sample loops over its pixels
  (576 for the 24 x 24 similarity map) accumulating the focal sum and the three dice sums;
  the box variant rasterises the target on the fly (``x1 * G <= c < x2 * G`` in fp32, as the
  reference). The forward keeps (B, 4) statistics; the backward, a (B, pixel-block) grid,
  recomputes the sigmoid from the logits. Focal uses gamma 2 and alpha 0.25 (docs/method.md,
  "REC head"); ``focal_dice_loss`` takes another alpha (a RES recipe's, "RES head").
* ``sts_kl``: one program per row with the whole row in registers (T <= a few hundred);
  the forward keeps the (B,) row KLs, the backward recomputes both softmaxes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from oneref.ops.reference import DICE_WEIGHT, FOCAL_ALPHA, FOCAL_WEIGHT

__all__ = ["vts_loss", "box_mask_loss", "focal_dice_loss", "sts_kl"]

_VTS_BLOCK = 256


def _scalar_grad(grad: torch.Tensor) -> torch.Tensor:
    """The incoming scalar gradient as a 1-element fp32 buffer the kernels read (no sync)."""
    return grad.reshape(1).to(torch.float32).contiguous()


# --- VTS -----------------------------------------------------------------------------------

@triton.jit
def _vts_targets(boxes_ptr, b, cells, GRID: tl.constexpr):
    """(BLOCK, 4) fp32 targets of cells ``cells`` of sample b (reference: vts_targets)."""
    cx = tl.load(boxes_ptr + b * 4 + 0).to(tl.float32) * GRID
    cy = tl.load(boxes_ptr + b * 4 + 1).to(tl.float32) * GRID
    inv_w = 1.0 / tl.maximum(tl.load(boxes_ptr + b * 4 + 2).to(tl.float32) * GRID, 1.0)
    inv_h = 1.0 / tl.maximum(tl.load(boxes_ptr + b * 4 + 3).to(tl.float32) * GRID, 1.0)
    col = (cells % GRID).to(tl.float32)
    row = (cells // GRID).to(tl.float32)
    k = tl.arange(0, 4)[None, :]
    dx = ((col - cx) / GRID)[:, None]
    dy = ((row - cy) / GRID)[:, None]
    return tl.where(k == 0, dx, tl.where(k == 1, dy, tl.where(k == 2, inv_w, inv_h)))


@triton.jit
def _vts_fwd_kernel(pred_ptr, boxes_ptr, partial_ptr, stride_pb, stride_pl, stride_pk,
                    scale, GRID: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cells = blk * BLOCK + tl.arange(0, BLOCK)
    valid = (cells < L)[:, None]
    k = tl.arange(0, 4)[None, :]
    pred = tl.load(pred_ptr + b * stride_pb + cells[:, None] * stride_pl + k * stride_pk,
                   mask=valid, other=0.0).to(tl.float32)
    diff = tl.where(valid, tl.abs(pred - _vts_targets(boxes_ptr, b, cells, GRID)), 0.0)
    tl.store(partial_ptr + b * tl.num_programs(1) + blk,
             tl.sum(tl.sum(diff, axis=1), axis=0) * scale)


@triton.jit
def _vts_bwd_kernel(grad_ptr, pred_ptr, boxes_ptr, out_ptr, stride_pb, stride_pl, stride_pk,
                    scale, GRID: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cells = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = (cells < L)[:, None]
    k = tl.arange(0, 4)[None, :]
    pred = tl.load(pred_ptr + b * stride_pb + cells[:, None] * stride_pl + k * stride_pk,
                   mask=valid, other=0.0).to(tl.float32)
    diff = pred - _vts_targets(boxes_ptr, b, cells, GRID)
    g = tl.load(grad_ptr) * scale
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    tl.store(out_ptr + b * (L * 4) + cells[:, None] * 4 + k,
             (sign * g).to(out_ptr.dtype.element_ty), mask=valid)


@torch.library.custom_op("oneref_triton::vts_loss", mutates_args=())
def _vts_loss_op(pred: torch.Tensor, boxes: torch.Tensor, grid: int) -> torch.Tensor:
    batch, cells = pred.shape[0], grid * grid
    blocks = triton.cdiv(cells, _VTS_BLOCK)
    partial = torch.empty(batch, blocks, dtype=torch.float32, device=pred.device)
    if batch == 0:
        return partial.sum()
    _vts_fwd_kernel[(batch, blocks)](pred, boxes.contiguous(), partial, *pred.stride(),
                                     1.0 / (batch * cells), GRID=grid, L=cells,
                                     BLOCK=_VTS_BLOCK)
    return partial.sum()


@_vts_loss_op.register_fake
def _(pred, boxes, grid):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("oneref_triton::vts_loss_backward", mutates_args=())
def _vts_loss_bwd_op(grad: torch.Tensor, pred: torch.Tensor, boxes: torch.Tensor,
                     grid: int) -> torch.Tensor:
    batch, cells = pred.shape[0], grid * grid
    out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if batch == 0:
        return out
    blocks = triton.cdiv(cells, _VTS_BLOCK)
    _vts_bwd_kernel[(batch, blocks)](_scalar_grad(grad), pred, boxes.contiguous(), out,
                                     *pred.stride(), 1.0 / (batch * cells), GRID=grid, L=cells,
                                     BLOCK=_VTS_BLOCK)
    return out


@_vts_loss_bwd_op.register_fake
def _(grad, pred, boxes, grid):
    return torch.empty_like(pred)


def _vts_setup(ctx, inputs, output):
    pred, boxes, grid = inputs
    ctx.save_for_backward(pred, boxes)
    ctx.grid = grid


def _vts_backward(ctx, grad):
    pred, boxes = ctx.saved_tensors
    return _vts_loss_bwd_op(grad, pred, boxes, ctx.grid), None, None


_vts_loss_op.register_autograd(_vts_backward, setup_context=_vts_setup)


# --- focal + dice --------------------------------------------------------------------------

@triton.jit
def _pixel_target(target_ptr, b, pix, n_pix, valid, GRID: tl.constexpr, FROM_BOX: tl.constexpr):
    """Target of pixels ``pix`` of sample b: loaded, or the box rasterised on the grid."""
    if FROM_BOX:
        cx = tl.load(target_ptr + b * 4 + 0).to(tl.float32)
        cy = tl.load(target_ptr + b * 4 + 1).to(tl.float32)
        w = tl.load(target_ptr + b * 4 + 2).to(tl.float32)
        h = tl.load(target_ptr + b * 4 + 3).to(tl.float32)
        x1 = (cx - 0.5 * w) * GRID
        x2 = (cx + 0.5 * w) * GRID
        y1 = (cy - 0.5 * h) * GRID
        y2 = (cy + 0.5 * h) * GRID
        col = (pix % GRID).to(tl.float32)
        row = (pix // GRID).to(tl.float32)
        inside = (col >= x1) & (col < x2) & (row >= y1) & (row < y2) & valid
        t = tl.where(inside, 1.0, 0.0)
    else:
        t = tl.load(target_ptr + b * n_pix + pix, mask=valid, other=0).to(tl.float32)
    return t


@triton.jit
def _focal_terms(x, t, alpha):
    """Sigmoid p, BCE-with-logits ce, alpha_t and q = 1 - p_t (fp32, elementwise)."""
    e = tl.exp(-tl.abs(x))
    ce = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + e)
    p = 1.0 / (1.0 + tl.exp(-x))
    q = 1.0 - (p * t + (1.0 - p) * (1.0 - t))
    alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    return p, ce, alpha_t, q


@triton.jit
def _focal_dice_fwd_kernel(logits_ptr, target_ptr, stats_ptr, per_sample_ptr, n_pix,
                           focal_scale, dice_scale, alpha, GRID: tl.constexpr,
                           FROM_BOX: tl.constexpr, BLOCK: tl.constexpr):
    """Program b: stats[b] = (focal mean, sum p t, sum p + sum t + 1, unused) and
    per_sample[b] = focal_scale * focal mean + dice_scale * dice."""
    b = tl.program_id(0).to(tl.int64)
    acc_focal = tl.zeros([BLOCK], dtype=tl.float32)
    acc_inter = tl.zeros([BLOCK], dtype=tl.float32)
    acc_den = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_pix, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        valid = pix < n_pix
        x = tl.load(logits_ptr + b * n_pix + pix, mask=valid, other=0.0).to(tl.float32)
        t = _pixel_target(target_ptr, b, pix, n_pix, valid, GRID, FROM_BOX)
        p, ce, alpha_t, q = _focal_terms(x, t, alpha)
        acc_focal += tl.where(valid, alpha_t * ce * q * q, 0.0)
        acc_inter += tl.where(valid, p * t, 0.0)
        acc_den += tl.where(valid, p + t, 0.0)
    focal = tl.sum(acc_focal, axis=0) / n_pix
    inter = tl.sum(acc_inter, axis=0)
    den = tl.sum(acc_den, axis=0) + 1.0
    dice = 1.0 - (2.0 * inter + 1.0) / den
    tl.store(stats_ptr + b * 4 + 0, focal)
    tl.store(stats_ptr + b * 4 + 1, inter)
    tl.store(stats_ptr + b * 4 + 2, den)
    tl.store(stats_ptr + b * 4 + 3, dice)
    tl.store(per_sample_ptr + b, focal_scale * focal + dice_scale * dice)


@triton.jit
def _focal_dice_bwd_kernel(grad_ptr, logits_ptr, target_ptr, stats_ptr, out_ptr, n_pix,
                           focal_scale, dice_scale, alpha, GRID: tl.constexpr,
                           FROM_BOX: tl.constexpr, BLOCK: tl.constexpr):
    """d loss / d logits for pixels of block program_id(1) of sample program_id(0)."""
    b = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = pix < n_pix
    x = tl.load(logits_ptr + b * n_pix + pix, mask=valid, other=0.0).to(tl.float32)
    t = _pixel_target(target_ptr, b, pix, n_pix, valid, GRID, FROM_BOX)
    p, ce, alpha_t, q = _focal_terms(x, t, alpha)
    dp = p * (1.0 - p)
    # focal = alpha_t * ce * q^2, dce/dx = p - t, dq/dx = -(2t - 1) p (1 - p)
    d_focal = alpha_t * q * ((p - t) * q - 2.0 * ce * (2.0 * t - 1.0) * dp)
    inter = tl.load(stats_ptr + b * 4 + 1)
    den = tl.load(stats_ptr + b * 4 + 2)
    # dice = 1 - (2 I + 1) / den: d/dp_i = ((2 I + 1) - 2 t_i den) / den^2
    d_dice = ((2.0 * inter + 1.0) - 2.0 * t * den) / (den * den) * dp
    g = tl.load(grad_ptr)
    grad = g * (focal_scale / n_pix * d_focal + dice_scale * d_dice)
    tl.store(out_ptr + b * n_pix + pix, grad.to(out_ptr.dtype.element_ty), mask=valid)


def _fd_block(n_pix: int) -> int:
    return min(triton.next_power_of_2(max(n_pix, 1)), 1024)


def _focal_dice_forward(logits, target, focal_weight, dice_weight, alpha, grid, from_box):
    batch = logits.shape[0]
    n_pix = logits[0].numel() if batch else 0
    logits = logits.contiguous()
    stats = torch.empty(batch, 4, dtype=torch.float32, device=logits.device)
    per_sample = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return per_sample.sum() / 0, stats
    _focal_dice_fwd_kernel[(batch,)](logits, target, stats, per_sample, n_pix,
                                     focal_weight / batch, dice_weight / batch, alpha,
                                     GRID=grid, FROM_BOX=from_box, BLOCK=_fd_block(n_pix))
    return per_sample.sum(), stats


def _focal_dice_backward(grad, logits, target, stats, focal_weight, dice_weight, alpha, grid,
                         from_box):
    batch = logits.shape[0]
    n_pix = logits[0].numel()
    logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    block = _fd_block(n_pix)
    _focal_dice_bwd_kernel[(batch, triton.cdiv(n_pix, block))](
        _scalar_grad(grad), logits, target, stats, out, n_pix, focal_weight / batch,
        dice_weight / batch, alpha, GRID=grid, FROM_BOX=from_box, BLOCK=block)
    return out


def _target_buffer(target: torch.Tensor) -> torch.Tensor:
    target = target.contiguous()
    return target.view(torch.uint8) if target.dtype == torch.bool else target


@torch.library.custom_op("oneref_triton::focal_dice_loss", mutates_args=())
def _focal_dice_op(logits: torch.Tensor, target: torch.Tensor, focal_weight: float,
                   dice_weight: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _focal_dice_forward(logits, _target_buffer(target), focal_weight, dice_weight,
                               alpha, 1, False)


@torch.library.custom_op("oneref_triton::box_mask_loss", mutates_args=())
def _box_mask_op(logits: torch.Tensor, boxes: torch.Tensor, focal_weight: float,
                 dice_weight: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _focal_dice_forward(logits, boxes.contiguous(), focal_weight, dice_weight, alpha,
                               logits.shape[-1], True)


@torch.library.custom_op("oneref_triton::focal_dice_loss_backward", mutates_args=())
def _focal_dice_bwd_op(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                       stats: torch.Tensor, focal_weight: float, dice_weight: float,
                       alpha: float, from_box: bool) -> torch.Tensor:
    if from_box:
        return _focal_dice_backward(grad, logits, target.contiguous(), stats, focal_weight,
                                    dice_weight, alpha, logits.shape[-1], True)
    return _focal_dice_backward(grad, logits, _target_buffer(target), stats, focal_weight,
                                dice_weight, alpha, 1, False)


def _fd_fake(logits, target, focal_weight, dice_weight, alpha):
    return (logits.new_empty((), dtype=torch.float32),
            logits.new_empty(logits.shape[0], 4, dtype=torch.float32))


_focal_dice_op.register_fake(_fd_fake)
_box_mask_op.register_fake(_fd_fake)


@_focal_dice_bwd_op.register_fake
def _(grad, logits, target, stats, focal_weight, dice_weight, alpha, from_box):
    return torch.empty_like(logits)


def _fd_setup_factory(from_box: bool):
    def setup(ctx, inputs, output):
        logits, target, focal_weight, dice_weight, alpha = inputs
        ctx.save_for_backward(logits, target, output[1])
        ctx.weights = (focal_weight, dice_weight, alpha)
        ctx.from_box = from_box
    return setup


def _fd_backward(ctx, grad, grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad_logits = _focal_dice_bwd_op(grad, logits, target, stats, *ctx.weights, ctx.from_box)
    return grad_logits, None, None, None, None


_focal_dice_op.register_autograd(_fd_backward, setup_context=_fd_setup_factory(False))
_box_mask_op.register_autograd(_fd_backward, setup_context=_fd_setup_factory(True))


# --- STS KL --------------------------------------------------------------------------------

@triton.jit
def _masked_log_softmax(x, valid):
    """Log-softmax over the valid entries (0 at invalid ones); safe when none is valid."""
    m = tl.max(tl.where(valid, x, float("-inf")), axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    shifted = tl.where(valid, x - m, 0.0)
    s = tl.sum(tl.where(valid, tl.exp(shifted), 0.0), axis=0)
    return tl.where(valid, shifted - tl.log(tl.where(s > 0, s, 1.0)), 0.0)


@triton.jit
def _sts_row(pred_ptr, target_ptr, valid_ptr, b, offs, inb, stride_p, stride_t, stride_v):
    """Row b: (valid, log q = log-softmax of pred, log p = log-softmax of target), fp32."""
    valid = (tl.load(valid_ptr + b * stride_v + offs, mask=inb, other=0) != 0) & inb
    x = tl.load(pred_ptr + b * stride_p + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.load(target_ptr + b * stride_t + offs, mask=inb, other=0.0).to(tl.float32)
    return valid, _masked_log_softmax(x, valid), _masked_log_softmax(y, valid)


@triton.jit
def _sts_fwd_kernel(pred_ptr, target_ptr, valid_ptr, kl_ptr, T, stride_p, stride_t,
                    stride_v, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inb = offs < T
    valid, log_q, log_p = _sts_row(pred_ptr, target_ptr, valid_ptr, b, offs, inb, stride_p,
                                   stride_t, stride_v)
    kl = tl.sum(tl.where(valid, tl.exp(log_p) * (log_p - log_q), 0.0), axis=0)
    tl.store(kl_ptr + b, kl)


@triton.jit
def _sts_bwd_kernel(grad_ptr, pred_ptr, target_ptr, valid_ptr, kl_ptr, grad_pred_ptr,
                    grad_target_ptr, T, stride_p, stride_t, stride_v, scale,
                    BLOCK: tl.constexpr):
    """d/d pred = g/B (q - p); d/d target = g/B p ((log p - log q) - kl), on valid entries."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inb = offs < T
    valid, log_q, log_p = _sts_row(pred_ptr, target_ptr, valid_ptr, b, offs, inb, stride_p,
                                   stride_t, stride_v)
    p = tl.exp(log_p)
    g = tl.load(grad_ptr) * scale
    kl = tl.load(kl_ptr + b)
    d_pred = tl.where(valid, g * (tl.exp(log_q) - p), 0.0)
    d_target = tl.where(valid, g * p * ((log_p - log_q) - kl), 0.0)
    tl.store(grad_pred_ptr + b * T + offs, d_pred.to(grad_pred_ptr.dtype.element_ty), mask=inb)
    tl.store(grad_target_ptr + b * T + offs, d_target.to(grad_target_ptr.dtype.element_ty),
             mask=inb)


def _sts_inputs(pred, target, valid):
    return pred.contiguous(), target.contiguous(), valid.contiguous().view(torch.uint8)


@torch.library.custom_op("oneref_triton::sts_kl", mutates_args=())
def _sts_kl_op(pred: torch.Tensor, target: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length = pred.shape
    kl = torch.empty(batch, dtype=torch.float32, device=pred.device)
    if batch == 0:
        return kl.sum() / 0, kl
    pred, target, valid = _sts_inputs(pred, target, valid)
    _sts_fwd_kernel[(batch,)](pred, target, valid, kl, length, pred.stride(0),
                              target.stride(0), valid.stride(0),
                              BLOCK=triton.next_power_of_2(max(length, 1)))
    return kl.sum() / batch, kl


@_sts_kl_op.register_fake
def _(pred, target, valid):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape[0],
                                                                    dtype=torch.float32)


@torch.library.custom_op("oneref_triton::sts_kl_backward", mutates_args=())
def _sts_kl_bwd_op(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                   valid: torch.Tensor, kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length = pred.shape
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device)
    pred, target, valid = _sts_inputs(pred, target, valid)
    _sts_bwd_kernel[(batch,)](_scalar_grad(grad), pred, target, valid, kl, grad_pred,
                              grad_target, length, pred.stride(0), target.stride(0),
                              valid.stride(0), 1.0 / batch,
                              BLOCK=triton.next_power_of_2(max(length, 1)))
    return grad_pred, grad_target


@_sts_kl_bwd_op.register_fake
def _(grad, pred, target, valid, kl):
    return torch.empty_like(pred), torch.empty_like(target)


def _sts_setup(ctx, inputs, output):
    pred, target, valid = inputs
    ctx.save_for_backward(pred, target, valid, output[1])


def _sts_backward(ctx, grad, grad_kl):
    pred, target, valid, kl = ctx.saved_tensors
    grad_pred, grad_target = _sts_kl_bwd_op(grad, pred, target, valid, kl)
    return grad_pred, grad_target, None


_sts_kl_op.register_autograd(_sts_backward, setup_context=_sts_setup)


# --- public functions ----------------------------------------------------------------------

def vts_loss(pred: torch.Tensor, boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """L1 between pred (B, grid^2, 4) and the VTS targets of boxes (B, 4): sum over the 4
    values, mean over B x grid^2. Differentiable w.r.t. pred."""
    return _vts_loss_op(pred, boxes, grid)


def box_mask_loss(logits: torch.Tensor, boxes: torch.Tensor, focal_weight: float = FOCAL_WEIGHT,
                  dice_weight: float = DICE_WEIGHT) -> torch.Tensor:
    """Focal x focal_weight + dice x dice_weight between logits (B, G, G) and boxes (B, 4)
    rasterised on the G x G grid (focal alpha 0.25). Differentiable w.r.t. logits."""
    return _box_mask_op(logits, boxes, float(focal_weight), float(dice_weight),
                        FOCAL_ALPHA)[0]


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                    focal_weight: float = FOCAL_WEIGHT, dice_weight: float = DICE_WEIGHT,
                    alpha: float = FOCAL_ALPHA) -> torch.Tensor:
    """Focal (``alpha`` weighting the positives) x focal_weight + dice x dice_weight, each
    averaged over the batch; logits and target (B, ...) of one shape, target in [0, 1].
    Differentiable w.r.t. logits."""
    return _focal_dice_op(logits, target, float(focal_weight), float(dice_weight),
                          float(alpha))[0]


def sts_kl(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(pred)) over valid (B, T) positions, mean over the batch;
    rows with no valid position add 0. Differentiable w.r.t. pred and target."""
    return _sts_kl_op(pred, target, valid)[0]
