"""Readable pure-PyTorch version of every fused op.

This module is the oracle that every Triton kernel and every C++/CUDA kernel is tested
against, and it is the ``torch`` backend that runs on any device. Functions here do no
argument checking (the public wrappers in :mod:`oneref.ops` do) and rely on autograd for
their gradients.

Shapes use B = batch, S = joint sequence length, H = heads, Dh = head dim,
G = patch grid side (24 for 384 / 16), L = G * G patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "key_padding_mask",
    "multiway_attention",
    "packed_multiway_attention",
    "multiway_linear",
    "multiway_layer_norm",
    "multiway_add_layer_norm",
    "referring_mask",
    "grown_box_region",
    "apply_mask_token",
    "masked_gather",
    "masked_scatter",
    "vts_targets",
    "vts_loss",
    "box_to_grid_mask",
    "sigmoid_focal_loss",
    "dice_loss",
    "focal_dice_loss",
    "box_mask_loss",
    "linear_cross_entropy",
    "sts_kl",
]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32 for half inputs, fp64 stays fp64 (the oracle)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def key_padding_mask(text_lengths: torch.Tensor, num_vision: int, seq_len: int) -> torch.Tensor:
    """(B, S) bool, True where a key is real: every vision token and the first
    ``text_lengths[b]`` text tokens (text padding is always at the end)."""
    positions = torch.arange(seq_len, device=text_lengths.device)
    return positions[None, :] < (num_vision + text_lengths.long())[:, None]


def multiway_attention(q, k, v, text_lengths, num_vision: int, scale: float | None = None,
                       *, key_mask=None):
    """Softmax attention over the joint image+text sequence.

    q, k, v: (B, S, H, Dh); text_lengths: (B,) int. Returns (B, S, H, Dh).
    Keys past ``num_vision + text_lengths[b]`` get zero weight; every query (padded ones
    included) attends to the valid keys. The softmax runs in fp32. ``key_mask``: the
    :func:`key_padding_mask` of these lengths when the caller has built it.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, Dh)
    scores = _acc(torch.matmul(qh, kh.transpose(-1, -2))) * scale
    valid = (key_padding_mask(text_lengths, num_vision, q.shape[1]) if key_mask is None
             else key_mask)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, vh).transpose(1, 2)


def packed_multiway_attention(qkv, text_lengths, num_vision: int, scale: float | None = None,
                              *, key_mask=None):
    """:func:`multiway_attention` of the packed projection: qkv (B, S, 3, H, Dh) holds q, k
    and v along dim 2. Returns (B, S, H, Dh)."""
    return multiway_attention(*qkv.unbind(2), text_lengths, num_vision, scale, key_mask=key_mask)


def multiway_linear(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                    activation: str = "none"):
    """Expert A on rows ``s < num_vision``, expert B on the rest.

    x: (B, S, Din); weight_*: (Dout, Din); bias_*: (Dout,) or None. Returns (B, S, Dout),
    followed by exact (erf) GELU when ``activation == "gelu"``.
    """
    y = torch.cat([F.linear(x[:, :num_vision], weight_a, bias_a),
                   F.linear(x[:, num_vision:], weight_b, bias_b)], dim=1)
    return F.gelu(y) if activation == "gelu" else y


def multiway_layer_norm(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                        eps: float = 1e-5, activation: str = "none", out_dtype=None):
    """LayerNorm over the last dim with expert A's affine parameters on rows
    ``s < num_vision`` and expert B's on the rest; statistics in fp32 (fp64 for fp64 x).
    ``activation="gelu"`` normalises GELU(x) instead (exact erf GELU).

    x: (B, S, D); weights/biases (D,) or None. Returns (B, S, D) in ``out_dtype`` (default
    x's dtype)."""
    a = _acc(x)
    if activation == "gelu":
        a = F.gelu(a)
    shape = (x.shape[-1],)
    params = [None if p is None else p.to(a.dtype) for p in (weight_a, bias_a, weight_b, bias_b)]
    y = torch.cat([F.layer_norm(a[:, :num_vision], shape, params[0], params[1], eps),
                   F.layer_norm(a[:, num_vision:], shape, params[2], params[3], eps)], dim=1)
    return y.to(out_dtype or x.dtype)


def multiway_add_layer_norm(x, branch, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                            eps: float = 1e-5, branch_scale=None, out_dtype=None):
    """The residual add of a pre-LN block and the LayerNorm after it.

    ``h = x + branch_scale[b] * branch`` (the drop-path scale per sample, 1 when None),
    computed in fp32 and kept in the promoted dtype of x and branch; ``y`` =
    :func:`multiway_layer_norm` of h. Returns (h, y); y in ``out_dtype`` (default h's dtype).
    """
    dtype = torch.promote_types(x.dtype, branch.dtype)
    scaled = _acc(branch) if branch_scale is None else _acc(branch) * branch_scale[:, None, None]
    h = (_acc(x) + scaled).to(dtype)
    return h, multiway_layer_norm(h, num_vision, weight_a, bias_a, weight_b, bias_b, eps,
                                  out_dtype=out_dtype or dtype)


def grown_box_region(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch rectangle of each box grown by one patch per side: (B, 4) int64 x1, y1, x2, y2.

    boxes: (B, 4) normalised cx, cy, w, h. Corners are scaled to the grid, truncated to
    integers, grown by one patch each side and clipped to [0, grid] (half-open on x2, y2).
    """
    cx, cy, w, h = boxes.double().unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * grid
    grown = torch.trunc(corners).long() + torch.tensor([-1, -1, 1, 1], device=boxes.device)
    return grown.clamp(0, grid)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim (0 = smallest)."""
    return scores.argsort(dim=-1).argsort(dim=-1)


def referring_mask(boxes, noise, grid: int, outside_ratio: float = 0.35,
                   inside_ratio: float = 0.75):
    """Referring-aware dynamic image masking (MRefM). Returns (B, L) bool, True = masked.

    boxes: (B, 4) normalised cx, cy, w, h; noise: (B, 2, L) uniform draws (row 0 for the whole
    grid, row 1 for the grown box). The whole grid keeps the ``floor(L * (1 - outside_ratio))``
    patches of smallest noise[0]; inside the grown box (``Lb`` patches) the decision is
    re-drawn: exactly ``floor(Lb * (1 - inside_ratio))`` patches of smallest noise[1] are kept.
    Counts are computed in float64.
    """
    num_patches = grid * grid
    keep_outside = math.floor(num_patches * (1.0 - outside_ratio))
    masked = _rank(noise[:, 0]) >= keep_outside

    x1, y1, x2, y2 = grown_box_region(boxes, grid).unbind(-1)
    cells = torch.arange(num_patches, device=noise.device)
    col, row = cells % grid, cells // grid
    inside = ((col[None] >= x1[:, None]) & (col[None] < x2[:, None])
              & (row[None] >= y1[:, None]) & (row[None] < y2[:, None]))
    area = ((x2 - x1) * (y2 - y1)).double()
    keep_inside = torch.floor(area * (1.0 - inside_ratio)).long()
    inside_rank = _rank(noise[:, 1].masked_fill(~inside, float("inf")))
    masked_inside = inside_rank >= keep_inside[:, None]
    return torch.where(inside, masked_inside, masked)


def apply_mask_token(x, mask, token):
    """Replace masked rows by a learned token. x: (B, L, D); mask: (B, L) bool; token: (D,)."""
    return torch.where(mask[..., None], token.to(x.dtype), x)


def masked_gather(x, mask):
    """Rows of x at True positions of mask in row-major order. x: (B, L, D) -> (N, D)."""
    return x[mask]


def masked_scatter(rows, mask):
    """Inverse of :func:`masked_gather`: (N, D) rows into zeros of shape (B, L, D)."""
    out = rows.new_zeros(*mask.shape, rows.shape[-1])
    out[mask] = rows
    return out


def vts_targets(boxes, grid: int):
    """Visual target-relation score per patch: (B, L, 4).

    For the patch in column i and row j and the box (cx, cy, w, h) in patch units with w, h
    clamped to >= 1: ``[(i - cx) / G, (j - cy) / G, 1 / w, 1 / h]``.
    """
    cx, cy, w, h = (_acc(boxes) * grid).unbind(-1)
    cells = torch.arange(grid * grid, device=boxes.device)
    col, row = (cells % grid).float(), (cells // grid).float()
    return torch.stack(
        [
            (col[None] - cx[:, None]) / grid,
            (row[None] - cy[:, None]) / grid,
            (1.0 / w.clamp(min=1.0))[:, None].expand(-1, cells.numel()),
            (1.0 / h.clamp(min=1.0))[:, None].expand(-1, cells.numel()),
        ],
        dim=-1,
    )


def vts_loss(pred, boxes, grid: int):
    """L1 between predicted scores (B, L, 4) and :func:`vts_targets`: sum over the 4 values,
    mean over B x L."""
    return (_acc(pred) - vts_targets(boxes, grid)).abs().sum(-1).mean()


def box_to_grid_mask(boxes, grid: int):
    """Box rasterised on the patch grid, (B, G, G) float in {0, 1}.

    Nearest sampling of the box mask at each cell's top-left corner (what
    ``F.interpolate(mode="nearest")`` does to a full-resolution mask): cell (row r, column c)
    is inside when ``x1 * G <= c < x2 * G`` and ``y1 * G <= r < y2 * G``, in fp32.
    """
    cx, cy, w, h = boxes.float().unbind(-1)
    x1, x2 = (cx - 0.5 * w) * grid, (cx + 0.5 * w) * grid
    y1, y2 = (cy - 0.5 * h) * grid, (cy + 0.5 * h) * grid
    idx = torch.arange(grid, device=boxes.device, dtype=torch.float32)
    in_x = (idx[None] >= x1[:, None]) & (idx[None] < x2[:, None])
    in_y = (idx[None] >= y1[:, None]) & (idx[None] < y2[:, None])
    return (in_y[:, :, None] & in_x[:, None, :]).float()


#: OneRef's mask losses (docs/method.md, "RES head"): focal x20 + dice x2, the focal term's
#: positives weighted 0.25 and its negatives 0.75; the box-mask constraint uses the same.
FOCAL_WEIGHT, DICE_WEIGHT, FOCAL_ALPHA = 20.0, 2.0, 0.25


def sigmoid_focal_loss(logits, target, alpha: float = FOCAL_ALPHA, gamma: float = 2.0):
    """Per-sample sigmoid focal loss, mean over pixels: (B, ...) -> (B,)."""
    logits = _acc(logits.flatten(1))
    target = target.flatten(1).to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(1)


def dice_loss(logits, target, smooth: float = 1.0):
    """Per-sample dice loss on sigmoid probabilities with +1 smoothing: (B, ...) -> (B,)."""
    prob = _acc(logits.flatten(1)).sigmoid()
    target = target.flatten(1).to(prob.dtype)
    inter = (prob * target).sum(1)
    return 1 - (2 * inter + smooth) / (prob.sum(1) + target.sum(1) + smooth)


def focal_dice_loss(logits, target, focal_weight: float = FOCAL_WEIGHT,
                    dice_weight: float = DICE_WEIGHT, alpha: float = FOCAL_ALPHA):
    """``focal_weight * focal + dice_weight * dice``, each averaged over the batch; ``alpha``
    weights the focal term's positives (``1 - alpha`` its negatives)."""
    return (focal_weight * sigmoid_focal_loss(logits, target, alpha).mean()
            + dice_weight * dice_loss(logits, target).mean())


def box_mask_loss(logits, boxes, focal_weight: float = FOCAL_WEIGHT,
                  dice_weight: float = DICE_WEIGHT):
    """Box-mask constraint: similarity logits (B, G, G) against the rasterised GT box."""
    grid = logits.shape[-1]
    return focal_dice_loss(logits, box_to_grid_mask(boxes, grid), focal_weight, dice_weight)


def linear_cross_entropy(x, weight, target, bias=None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean"):
    """Cross-entropy of ``x @ weight.T + bias`` against target, logits in fp32.

    x: (N, D); weight: (V, D); target: (N,) int64. ``reduction="none"`` returns (N,) with 0
    at ignored rows; ``"mean"`` averages over the rows that are not ignored.
    """
    logits = _acc(F.linear(x, weight, bias))
    return F.cross_entropy(logits, target, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def sts_kl(pred, target, valid):
    """KL(softmax(target) || softmax(pred)) over the valid text positions, mean over batch.

    pred, target: (B, T) scores; valid: (B, T) bool. Rows without a valid position add 0.
    """
    pred, target = _acc(pred), _acc(target)
    neg_inf = torch.finfo(pred.dtype).min
    log_q = pred.masked_fill(~valid, neg_inf).log_softmax(-1)
    log_p = target.to(pred.dtype).masked_fill(~valid, neg_inf).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(~valid, 0.0).sum(-1)
    return kl.mean()
