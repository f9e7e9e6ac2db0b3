"""The fused ops of OneRef: one public function per op, the same signature on every backend.

Each function checks its arguments (a ``ValueError``/``TypeError`` that names the argument
and what is wrong), then dispatches to the ``cuda``, ``triton`` or ``torch`` backend (see
:mod:`oneref.ops.dispatch`). The readable definitions live in :mod:`oneref.ops.reference`.
"""

from __future__ import annotations

import torch

from oneref.ops.cast import compute_dtype
from oneref.ops.checks import (autocast_inputs, check_boxes, check_bool_mask, check_row_split,
                               check_shape, check_tensor)
from oneref.ops.dispatch import (BACKENDS, BackendUnavailableError, backend_status,
                                 current_backend, prepare, resolve, use_backend)
from oneref.ops.flops import register_cpu_attention_flops
from oneref.ops.layout import is_sequence_major, sequence_major
from oneref.ops.reference import DICE_WEIGHT, FOCAL_ALPHA, FOCAL_WEIGHT, key_padding_mask
from oneref.ops.registry import OPS

register_cpu_attention_flops()

# The dispatched ops are the registry's; the rest are helpers around them.
__all__ = ["BACKENDS", "BackendUnavailableError", "backend_status", "current_backend",
           "use_backend", "prepare", "compute_dtype",
           "sequence_major", "is_sequence_major", "draw_mask_noise", "key_padding_mask",
           *OPS]


def multiway_attention(q, k, v, text_lengths, num_vision: int, scale: float | None = None,
                       *, key_mask=None, backend: str | None = None):
    """Attention over the joint [vision | text] sequence with per-sample text length.

    Args:
        q, k, v: (B, S, H, Dh) fp32/fp16/bf16, the same dtype and device; strided views of a
            packed QKV tensor are accepted. Dh in {16, 32, 64, 128} for the kernels.
        text_lengths: (B,) integer tensor, 1 <= text_lengths[b] <= S - num_vision: the number
            of real text tokens; keys past ``num_vision + text_lengths[b]`` are ignored. The
            values are not checked here (that would read them on the host); OneRef's entry
            points check them.
        num_vision: vision tokens at the start of the sequence (577 for OneRef-B).
        scale: softmax scale, default ``Dh ** -0.5``.
        key_mask: (B, S) bool, exactly :func:`key_padding_mask` of ``(text_lengths,
            num_vision, S)`` when the caller has built it (the encoder builds it once for
            all its layers). The torch composite reads it instead of building its own; the
            Triton kernels read ``text_lengths`` and ignore it. It is not checked against
            the lengths (that would read them on the host): a different mask gives results
            that depend on the backend.

    Returns:
        (B, S, H, Dh) in the dtype of q.
    """
    check_tensor("q", q, ndim=4, floating=True)
    batch, seq, heads, head_dim = q.shape
    check_shape("k", k, (batch, seq, heads, head_dim), like=q)
    check_shape("v", v, (batch, seq, heads, head_dim), like=q)
    _check_attention_extent(text_lengths, batch, seq, num_vision, q.device, key_mask)
    return resolve("multiway_attention", q.device, backend, q.dtype, head_dim)(
        q, k, v, text_lengths, num_vision, scale, key_mask=key_mask)


def packed_multiway_attention(qkv, text_lengths, num_vision: int, scale: float | None = None,
                              *, key_mask=None, backend: str | None = None):
    """:func:`multiway_attention` of the packed QKV projection, as the encoder calls it.

    Args:
        qkv: (B, S, 3, H, Dh), q, k and v along dim 2 (any strides).
        text_lengths, num_vision, scale, key_mask: as :func:`multiway_attention`.

    Returns:
        (B, S, H, Dh) in the dtype of qkv. The backward returns the gradient of qkv as one
        tensor: the kernels write it directly with qkv's strides (contiguous when qkv is not
        dense); the torch composite's comes out sequence-major.
    """
    check_tensor("qkv", qkv, ndim=5, floating=True)
    batch, seq, three, _, head_dim = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must be (B, S, 3, H, Dh) with q, k, v along dim 2, got shape "
                         f"{tuple(qkv.shape)}")
    _check_attention_extent(text_lengths, batch, seq, num_vision, qkv.device, key_mask)
    return resolve("packed_multiway_attention", qkv.device, backend, qkv.dtype, head_dim)(
        qkv, text_lengths, num_vision, scale, key_mask=key_mask)


def _check_attention_extent(text_lengths, batch: int, seq: int, num_vision: int,
                            device: torch.device, key_mask=None) -> None:
    """The text lengths, the vision/text split and the key mask of an attention call."""
    check_tensor("text_lengths", text_lengths, ndim=1, integer=True, device=device)
    check_shape("text_lengths", text_lengths, (batch,))
    if not 0 < num_vision < seq:
        raise ValueError(f"num_vision must be in [1, S) = [1, {seq}), got {num_vision}")
    if key_mask is not None:
        check_bool_mask("key_mask", key_mask, (batch, seq), device)


def multiway_linear(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                    activation: str = "none", *, backend: str | None = None):
    """Expert A applied to rows ``s < num_vision``, expert B to the remaining rows.

    Args:
        x: (B, S, Din).
        num_vision: rows of each sample that belong to the vision expert (0..S).
        weight_a, weight_b: (Dout, Din); bias_a, bias_b: (Dout,) or None.
        activation: ``"none"`` or ``"gelu"`` (exact erf GELU, fused as an epilogue).

    Returns:
        (B, S, Dout) in the dtype of x.
    """
    check_tensor("x", x, ndim=3, floating=True)
    x, weight_a, bias_a, weight_b, bias_b = autocast_inputs(x, weight_a, bias_a, weight_b, bias_b)
    d_in = x.shape[-1]
    check_tensor("weight_a", weight_a, ndim=2, device=x.device)
    d_out = weight_a.shape[0]
    check_shape("weight_a", weight_a, (d_out, d_in), like=x)
    check_shape("weight_b", weight_b, (d_out, d_in), like=weight_a)
    for name, bias in (("bias_a", bias_a), ("bias_b", bias_b)):
        if bias is not None:
            check_shape(name, bias, (d_out,), like=weight_a)
    check_row_split(num_vision, x.shape[1])
    if activation not in ("none", "gelu"):
        raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
    return resolve("multiway_linear", x.device, backend, x.dtype)(
        x, num_vision, weight_a, bias_a, weight_b, bias_b, activation)


def _norm_args(x, num_vision: int, params, eps: float, out_dtype):
    """Checks shared by the two LayerNorm ops; returns the output dtype (the autocast dtype
    under autocast, else x's: the dtype the next GEMM reads)."""
    width = x.shape[-1]
    for name, param in zip(("weight_a", "bias_a", "weight_b", "bias_b"), params):
        if param is not None:
            check_tensor(name, param, ndim=1, floating=True, device=x.device)
            check_shape(name, param, (width,))
    check_row_split(num_vision, x.shape[1])
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if out_dtype is not None:
        if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise TypeError(f"out_dtype must be a floating torch.dtype (torch.bfloat16, ...), "
                            f"got {out_dtype!r}")
        return out_dtype
    return compute_dtype(x)


def multiway_layer_norm(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                        eps: float = 1e-5, activation: str = "none", out_dtype=None, *,
                        backend: str | None = None):
    """LayerNorm over the last dim: expert A's weight/bias on rows ``s < num_vision``,
    expert B's on the remaining rows, statistics in fp32.

    Args:
        x: (B, S, D), any strides with a contiguous last dim for the kernels.
        num_vision: rows of each sample that belong to the vision expert (0..S).
        weight_a, weight_b, bias_a, bias_b: (D,) or None (fp32 master parameters under
            autocast: the op does not cast them to the autocast dtype; the torch composite
            on CUDA rounds them to bf16 for the native kernels of a bf16 input and output).
        eps: added to the variance.
        activation: ``"none"`` or ``"gelu"``: normalise GELU(x) (exact erf), the FFN's
            sub-LN fused with the activation before it (recomputed in the backward).
        out_dtype: dtype of the result; default the autocast dtype under autocast, else
            x's dtype.

    Returns:
        (B, S, D) stored sequence-major (:mod:`oneref.ops.layout`).
    """
    check_tensor("x", x, ndim=3, floating=True)
    if activation not in ("none", "gelu"):
        raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
    params = (weight_a, bias_a, weight_b, bias_b)
    out_dtype = _norm_args(x, num_vision, params, eps, out_dtype)
    return resolve("multiway_layer_norm", x.device, backend, x.dtype)(
        x, num_vision, *params, eps, activation, out_dtype)


def multiway_add_layer_norm(x, branch, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                            eps: float = 1e-5, branch_scale=None, out_dtype=None, *,
                            backend: str | None = None):
    """A pre-LN block's residual add and the multiway LayerNorm after it, in one op.

    ``h = x + branch_scale[b] * branch`` (added in fp32, stored in the promoted dtype of x
    and branch), ``y = multiway_layer_norm(h)``.

    Args:
        x: (B, S, D) residual stream; branch: (B, S, D) the residual branch's output.
        branch_scale: (B,) per-sample drop-path scale (0 or 1 / keep), or None for 1.
        Others as :func:`multiway_layer_norm`.

    Returns:
        (h, y), both (B, S, D); y stored sequence-major, h too where x is (the encoder's
        stream; the Triton kernel's h always); h in the promoted dtype, y in ``out_dtype``.
    """
    check_tensor("x", x, ndim=3, floating=True)
    check_tensor("branch", branch, floating=True, device=x.device)
    check_shape("branch", branch, tuple(x.shape))
    if branch_scale is not None:
        check_tensor("branch_scale", branch_scale, ndim=1, floating=True, device=x.device)
        check_shape("branch_scale", branch_scale, (x.shape[0],))
    params = (weight_a, bias_a, weight_b, bias_b)
    out_dtype = _norm_args(x, num_vision, params, eps, out_dtype)
    return resolve("multiway_add_layer_norm", x.device, backend, x.dtype)(
        x, branch, num_vision, *params, eps, branch_scale, out_dtype)


def draw_mask_noise(batch: int, grid: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform noise (B, 2, grid * grid) for :func:`referring_mask`, drawn from ``generator``
    so that a seeded run masks the same patches on every backend."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(batch, 2, grid * grid, generator=generator, device=gen_device).to(device)


def referring_mask(boxes, noise, grid: int, outside_ratio: float = 0.35,
                   inside_ratio: float = 0.75, *, backend: str | None = None):
    """Referring-aware dynamic image masking of MRefM (docs/method.md, "MRefM pre-training").

    Args:
        boxes: (B, 4) normalised cx, cy, w, h of the referred object.
        noise: (B, 2, grid * grid) uniform draws (see :func:`draw_mask_noise`).
        grid: patches per side.
        outside_ratio, inside_ratio: masking ratios beta (whole grid) and gamma (grown box).

    Returns:
        (B, grid * grid) bool, True = masked.
    """
    check_boxes("boxes", boxes)
    check_shape("noise", noise, (boxes.shape[0], 2, grid * grid), like=boxes)
    for name, ratio in (("outside_ratio", outside_ratio), ("inside_ratio", inside_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    return resolve("referring_mask", boxes.device, backend, noise.dtype)(
        boxes, noise, grid, outside_ratio, inside_ratio)


def apply_mask_token(x, mask, token, *, backend: str | None = None):
    """Masked rows replaced by ``token``. x: (B, L, D); mask: (B, L) bool; token: (D,)."""
    check_tensor("x", x, ndim=3, floating=True)
    check_bool_mask("mask", mask, x.shape[:2], x.device)
    check_shape("token", token, (x.shape[-1],), like=x)
    return resolve("apply_mask_token", x.device, backend, x.dtype)(x, mask, token)


def masked_gather(x, mask, *, backend: str | None = None):
    """Rows of x at the True positions of mask, row-major. x: (B, L, D) -> (N, D)."""
    check_tensor("x", x, ndim=3)
    check_bool_mask("mask", mask, x.shape[:2], x.device)
    return resolve("masked_gather", x.device, backend, x.dtype)(x, mask)


def masked_scatter(rows, mask, *, backend: str | None = None):
    """Inverse of :func:`masked_gather`: rows (N, D) into zeros (B, L, D) at mask."""
    check_tensor("rows", rows, ndim=2)
    check_bool_mask("mask", mask, mask.shape, rows.device)
    return resolve("masked_scatter", rows.device, backend, rows.dtype)(rows, mask)


def vts_loss(pred, boxes, grid: int, *, backend: str | None = None):
    """Visual target-relation score loss (docs/method.md, "MRefM pre-training"): L1 summed over
    4 values, mean over B x L. pred: (B, grid * grid, 4); boxes: (B, 4) normalised cx, cy, w, h.
    Returns a scalar, fp32 (fp64 for fp64 inputs)."""
    check_tensor("pred", pred, ndim=3, floating=True)
    check_shape("pred", pred, (pred.shape[0], grid * grid, 4))
    check_boxes("boxes", boxes, batch=pred.shape[0], device=pred.device)
    return resolve("vts_loss", pred.device, backend, pred.dtype)(pred, boxes, grid)


def box_mask_loss(logits, boxes, focal_weight: float = FOCAL_WEIGHT,
                  dice_weight: float = DICE_WEIGHT, *, backend: str | None = None):
    """Box-mask constraint (docs/method.md, "REC head"): sigmoid focal x20 + dice x2 between
    similarity logits (B, G, G) and the box rasterised on the G x G grid. Returns a scalar, fp32
    (fp64 for fp64 inputs)."""
    check_tensor("logits", logits, ndim=3, floating=True)
    if logits.shape[1] != logits.shape[2]:
        raise ValueError(f"logits must be (B, G, G), got {tuple(logits.shape)}")
    check_boxes("boxes", boxes, batch=logits.shape[0], device=logits.device)
    return resolve("box_mask_loss", logits.device, backend, logits.dtype)(
        logits, boxes, focal_weight, dice_weight)


def focal_dice_loss(logits, target, focal_weight: float = FOCAL_WEIGHT,
                    dice_weight: float = DICE_WEIGHT, alpha: float = FOCAL_ALPHA, *,
                    backend: str | None = None):
    """Sigmoid focal x20 + dice x2 between logits and a {0, 1} target of the same shape
    (B, ...), each term averaged over the batch (RES masks, mask-target constraint); the
    focal term weights positives by ``alpha`` and negatives by ``1 - alpha``."""
    check_tensor("logits", logits, floating=True)
    check_shape("target", target, tuple(logits.shape))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return resolve("focal_dice_loss", logits.device, backend, logits.dtype)(
        logits, target, focal_weight, dice_weight, alpha)


def linear_cross_entropy(x, weight, target, bias=None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", *,
                         backend: str | None = None):
    """Vocabulary projection + (label-smoothed) cross-entropy without full logits.

    Args:
        x: (N, D) features; weight: (V, D); bias: (V,) or None; target: (N,) int64 in
            [0, V) or ``ignore_index``.
        reduction: ``"mean"`` over rows that are not ignored, or ``"none"`` for (N,) losses
            (0 at ignored rows).
    """
    check_tensor("x", x, ndim=2, floating=True)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (V, {x.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}")
    check_tensor("target", target, ndim=1, integer=True, device=x.device)
    if target.dtype != torch.long:
        raise TypeError(f"target must be an int64 (long) tensor, got {target.dtype}")
    check_shape("target", target, (x.shape[0],))
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],), like=weight)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return resolve("linear_cross_entropy", x.device, backend, x.dtype)(
        x, weight, target, bias, ignore_index, label_smoothing, reduction)


def sts_kl(pred, target, valid, *, backend: str | None = None):
    """Semantic target-relation loss: KL(softmax(target) || softmax(pred)) over the valid text
    positions, mean over the batch. pred, target: (B, T); valid: (B, T) bool."""
    check_tensor("pred", pred, ndim=2, floating=True)
    check_shape("target", target, tuple(pred.shape))
    check_bool_mask("valid", valid, pred.shape, pred.device)
    return resolve("sts_kl", pred.device, backend, pred.dtype)(pred, target, valid)
