"""One input case per op of the registry, drawn from a seed: what the conformance tests
(``tests/ops/test_conformance.py``), the pytest micro-benchmarks (``benchmarks/``) and the
G2 rows of ``oneref bench`` (:mod:`oneref.bench.kernels`) run every backend on.

``CASES[op].inputs(seed, device, dtype)`` returns the op's positional arguments (the
reference's signature) at the test size: odd sizes on purpose (9 tokens with 6 vision rows,
7-row linear inputs, 12-wide LayerNorm rows, a 5-row cross-entropy with an ignored row).
``scale=s`` gives the benchmark size instead, OneRef-B's shapes (24 x 24 grid, D = 768) with
the batch multiplied by ``s``; there the LayerNorm inputs take the model's layout (a
sequence-major residual stream, in ``dtype`` as the default ``residual_dtype`` holds it,
with fp32 parameters). ``CASES[op].bytes(args)``
counts what one call reads and writes (its backward included where the case trains), and
``CASES[op].tolerance(dtype)`` is the (rtol, atol) against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from oneref.ops.layout import sequence_major

__all__ = ["Case", "CASES", "boxes"]

GRID, DIM, TEXT = 24, 768, 64


def boxes(gen: torch.Generator, n: int, device) -> torch.Tensor:
    """(n, 4) normalised cx, cy, w, h inside the canvas."""
    wh = 0.15 + 0.5 * torch.rand(n, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([centre, wh], dim=1).to(device)


def _randn(gen, *shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _mask(gen, batch: int, rows: int, device, share: float = 0.5) -> torch.Tensor:
    mask = torch.rand(batch, rows, generator=gen) < share
    mask[:, 0] = True  # at least one row per sample
    return mask.to(device)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class Case:
    """How to draw, judge and count the inputs of one op.

    Attributes:
        build: ``(gen, device, dtype, scale) -> args``; ``scale`` is None (test size) or the
            benchmark scale.
        bytes: ``args -> int``: bytes one call reads and writes (with its backward when the
            case trains).
        grads: positions of the arguments that take a gradient in training (activations and
            weights; labels, boxes and targets take none); empty: the op has no backward.
        flops: ``args -> int`` for the compute-bound ops (with the backward), else None.
    """

    build: Callable
    bytes: Callable[[tuple], int]
    grads: tuple[int, ...] = (0,)
    flops: Callable[[tuple], int] | None = None

    @property
    def trains(self) -> bool:
        return bool(self.grads)

    def inputs(self, seed: int, device, dtype: torch.dtype, scale: float | None = None,
               **shape: int) -> tuple:
        """The op's arguments; ``shape`` overrides benchmark sizes of the ops that sweep them
        (attention: ``batch``, ``text``, ``heads``, ``head_dim``, ``vision``; linear
        cross-entropy: ``rows``, ``width``, ``vocab``)."""
        return self.build(torch.Generator().manual_seed(seed), torch.device(device), dtype, scale,
                          **shape)

    def training_inputs(self, seed: int, device, dtype: torch.dtype,
                        scale: float | None = None, **shape: int) -> tuple:
        """:meth:`inputs` with ``requires_grad`` on the arguments of ``grads``."""
        args = self.inputs(seed, device, dtype, scale, **shape)
        return tuple(a.requires_grad_(True) if i in self.grads else a for i, a in enumerate(args))

    @staticmethod
    def tolerance(dtype: torch.dtype) -> tuple[float, float]:
        """(rtol, atol) against the reference."""
        if dtype in (torch.float16, torch.bfloat16):
            return 1e-2, 1e-2
        return 1e-4, 1e-5


def _batch(scale: float, bench: int) -> int:
    """The benchmark batch ``bench`` times ``scale``, at least 1."""
    return max(1, int(bench * scale))


def _qkv(gen, device, dtype, scale, batch: int = 0, text: int = TEXT, heads: int = 12,
         head_dim: int = 64, vision: int = GRID * GRID + 1):
    """One packed (B, S, 3, H, Dh) QKV projection, the text lengths and the vision count.
    Test size: 9 tokens, 6 of them vision, text lengths 1 and 3; benchmark size:
    ``vision + text`` tokens, text lengths ``text // 8 .. text``."""
    if scale is None:
        batch, text, heads, head_dim, vision = 2, 3, 2, 16, 6
        lengths = torch.tensor([1, 3])
    else:
        batch = batch or _batch(scale, 4)
        lengths = torch.randint(max(1, text // 8), text + 1, (batch,), generator=gen)
    qkv = _randn(gen, batch, vision + text, 3, heads, head_dim, device=device, dtype=dtype)
    return qkv, lengths.to(device), vision


def _attention(gen, device, dtype, scale, **shape):
    """q, k, v as strided views of one packed projection."""
    qkv, lengths, vision = _qkv(gen, device, dtype, scale, **shape)
    return (*qkv.unbind(2), lengths, vision, None)


def _packed_attention(gen, device, dtype, scale, **shape):
    """The packed projection as the encoder passes it: sequence-major, like the QKV GEMM's
    output."""
    qkv, lengths, vision = _qkv(gen, device, dtype, scale, **shape)
    return sequence_major(qkv), lengths, vision, None


def _linear(gen, device, dtype, scale):
    batch, seq, d_in, d_out, vision = ((2, 7, 16, 8, 4) if scale is None else
                                       (_batch(scale, 4), GRID * GRID + 1 + TEXT, DIM,
                                        4 * DIM, GRID * GRID + 1))
    x = _randn(gen, batch, seq, d_in, device=device, dtype=dtype)
    wa, wb = (_randn(gen, d_out, d_in, device=device, dtype=dtype) * d_in ** -0.5
              for _ in range(2))
    ba, bb = (_randn(gen, d_out, device=device, dtype=dtype) for _ in range(2))
    return x, vision, wa, ba, wb, bb, "gelu"


def _norm_params(gen, width, device, dtype):
    return [_randn(gen, width, device=device, dtype=dtype) * 0.5 + offset
            for offset in (1.0, 0.0, 1.0, 0.0)]


def _rows(gen, scale, width, device, dtype):
    """LayerNorm input: (3, 9, width) at the test size; at a benchmark size the model's
    layout, a (B, S, width) view of a sequence-major (S, B, width) tensor."""
    if scale is None:
        return _randn(gen, 3, 9, width, device=device, dtype=dtype)
    batch, seq = _batch(scale, 1), GRID * GRID + 1 + TEXT
    return _randn(gen, seq, batch, width, device=device, dtype=dtype).transpose(0, 1)


def _layer_norm(gen, device, dtype, scale):
    """The FFN's sub-LN of GELU(fc1): the input in ``dtype``, fp32 parameters at a
    benchmark size."""
    width = 12 if scale is None else 4 * DIM
    z = _rows(gen, scale, width, device, dtype) * 2 + 0.5
    params = _norm_params(gen, width, device, dtype if scale is None else torch.float32)
    return z, 6 if scale is None else GRID * GRID + 1, *params, 1e-5, "gelu", dtype


def _layer_norm_bytes(args) -> int:
    """Forward reads z, writes y; backward reads dy and z, writes dz."""
    z, dtype = args[0], args[-1]
    return z.numel() * (3 * z.element_size() + 2 * torch.finfo(dtype).bits // 8)


def _add_layer_norm(gen, device, dtype, scale):
    """A block's residual add + LN: the residual stream and the branch in ``dtype`` (the
    model's default ``residual_dtype``); at a benchmark size, fp32 parameters and no
    drop-path scale."""
    width = 12 if scale is None else DIM
    x = _rows(gen, scale, width, device, dtype)
    branch = _rows(gen, scale, width, device, dtype)
    params = _norm_params(gen, width, device, dtype if scale is None else torch.float32)
    if scale is None:
        drop_scale, vision = torch.tensor([0.0, 1.25, 1.25], device=device, dtype=dtype), 6
    else:
        drop_scale, vision = None, GRID * GRID + 1
    return x, branch, vision, *params, 1e-5, drop_scale, dtype


def _add_layer_norm_bytes(args) -> int:
    """Forward reads x and the branch, writes h (the new residual) and y; backward reads dy,
    h and dh, writes dx and, unless it is dx itself (no drop-path scale, the branch in h's
    dtype), the branch's gradient."""
    x, branch, scale, dtype = args[0], args[1], args[-2], args[-1]
    out = torch.finfo(dtype).bits // 8
    own_gradient = scale is not None or branch.dtype != torch.promote_types(x.dtype,
                                                                            branch.dtype)
    return x.numel() * (5 * x.element_size() + (1 + own_gradient) * branch.element_size()
                        + 2 * out)


def _referring_mask(gen, device, dtype, scale):
    """The noise is fp32 at a benchmark size whatever ``dtype`` (the model draws it so: a
    half dtype would tie most of 576 draws)."""
    batch, grid = (3, 6) if scale is None else (_batch(scale, 512), GRID)
    noise_dtype = dtype if scale is None else torch.float32
    return (boxes(gen, batch, device),
            torch.rand(batch, 2, grid * grid, generator=gen).to(device, noise_dtype), grid,
            0.35, 0.75)


def _tokens(gen, device, dtype, scale):
    batch, rows, width = (2, 5, 8) if scale is None else (_batch(scale, 8), GRID * GRID, DIM)
    return _randn(gen, batch, rows, width, device=device, dtype=dtype), \
        _mask(gen, batch, rows, device, 0.5 if scale is None else 0.4)


def _apply_mask_token(gen, device, dtype, scale):
    x, mask = _tokens(gen, device, dtype, scale)
    return x, mask, _randn(gen, x.shape[-1], device=device, dtype=dtype)


def _masked_gather(gen, device, dtype, scale):
    return _tokens(gen, device, dtype, scale)


def _masked_scatter(gen, device, dtype, scale):
    x, mask = _tokens(gen, device, dtype, scale)
    return x[mask].contiguous(), mask


def _selected_rows_bytes(args) -> int:
    """Gather and scatter alike, forward + backward: the mask read twice, the selected rows
    read or written three times, every row written once (the zeros of the unselected ones)."""
    x, mask = args[0], args[1]
    row = x.shape[-1] * x.element_size()
    return 2 * mask.numel() + (3 * int(mask.sum()) + mask.numel()) * row


def _vts(gen, device, dtype, scale):
    batch, grid = (2, 4) if scale is None else (_batch(scale, 256), GRID)
    return _randn(gen, batch, grid * grid, 4, device=device, dtype=dtype), \
        boxes(gen, batch, device), grid


def _box_mask(gen, device, dtype, scale):
    batch, grid = (2, 4) if scale is None else (_batch(scale, 4096), GRID)
    return _randn(gen, batch, grid, grid, device=device, dtype=dtype) * 3, \
        boxes(gen, batch, device), 20.0, 2.0


def _prediction_bytes(args) -> int:
    """A loss over one prediction tensor: read forward, its gradient written backward (a
    fused loss keeps nothing else); the other tensors read once."""
    return 2 * _nbytes(args[0]) + _nbytes(*args[1:])


def _focal_dice(gen, device, dtype, scale):
    batch, side = (2, 6) if scale is None else (_batch(scale, 64), 16 * GRID)
    logits = _randn(gen, batch, side, side, device=device, dtype=dtype) * 3
    target = (torch.rand(batch, side, side, generator=gen) > 0.6).to(device=device, dtype=dtype)
    return logits, target, 20.0, 2.0


def _linear_ce(gen, device, dtype, scale, rows: int = 0, width: int = DIM, vocab: int = 64010):
    """Test size: 5 rows, 16 wide, 11 classes; benchmark size: the MLM head (1,600 masked
    tokens x the scale, D = 768, V = 64,010)."""
    if scale is None:
        rows, width, vocab = 5, 16, 11
    else:
        rows = rows or _batch(scale, 1600)
    x = _randn(gen, rows, width, device=device, dtype=dtype)
    weight = _randn(gen, vocab, width, device=device, dtype=dtype) * width ** -0.5
    if scale is None:  # the first and last class and an ignored row
        target = torch.tensor([0, vocab - 1, -100, 3, 7])
    else:
        target = torch.randint(0, vocab, (rows,), generator=gen)
    return x, weight, target.to(device), _randn(gen, vocab, device=device, dtype=dtype), \
        -100, 0.1, "mean"


def _sts(gen, device, dtype, scale):
    batch, text = (2, 6) if scale is None else (_batch(scale, 64), TEXT)
    pred, target = (_randn(gen, batch, text, device=device, dtype=dtype) for _ in range(2))
    valid = torch.zeros(batch, text, dtype=torch.bool)
    valid[:, 1:text - 1] = True  # [CLS] and the last position out
    valid[1 % batch, text // 2:] = False  # a shorter expression
    return pred, target, valid.to(device)


def _attention_bytes(q) -> int:
    """Forward reads q, k, v and writes o; backward reads q, k, v, o and do, writes dq, dk,
    dv (the probabilities recomputed, never stored)."""
    return 12 * _nbytes(q)


def _attention_flops(q, lengths, vision) -> int:
    """4 H S Dh per valid key and sample forward; the backward 2.5x that."""
    heads, head_dim = q.shape[2], q.shape[3]
    return int(3.5 * 4 * heads * q.shape[1] * head_dim * int((vision + lengths).sum()))


def _linear_bytes(args) -> int:
    """x and the weights read forward, read again and their gradients written backward; y
    written forward and its gradient read backward."""
    x, weight = args[0], args[2]
    y = x.numel() // x.shape[-1] * weight.shape[0] * x.element_size()
    return 3 * _nbytes(x, *args[2:6]) + 2 * y


def _linear_flops(args) -> int:
    """2 x rows x d_in x d_out forward, twice that backward."""
    return 6 * args[0].numel() * args[2].shape[0]


def _linear_ce_bytes(args) -> int:
    """The fused loss never stores the logits: x, the weight and the bias read forward, read
    again and their gradients written backward; the targets read once."""
    return 3 * _nbytes(args[0], args[1], args[3]) + _nbytes(args[2])


def _linear_ce_flops(args) -> int:
    x, weight = args[0], args[1]
    return 6 * x.shape[0] * x.shape[1] * weight.shape[0]


CASES: dict[str, Case] = {
    "multiway_attention": Case(_attention, lambda a: _attention_bytes(a[0]), (0, 1, 2),
                               lambda a: _attention_flops(a[0], a[3], a[4])),
    "packed_multiway_attention": Case(
        _packed_attention, lambda a: _attention_bytes(a[0][:, :, 0]), (0,),
        lambda a: _attention_flops(a[0][:, :, 0], a[1], a[2])),
    "multiway_linear": Case(_linear, _linear_bytes, (0, 2, 3, 4, 5), _linear_flops),
    # the LayerNorm parameters' gradients are reductions the byte counts leave out
    "multiway_layer_norm": Case(_layer_norm, _layer_norm_bytes),
    "multiway_add_layer_norm": Case(_add_layer_norm, _add_layer_norm_bytes, (0, 1)),
    # reads the boxes and the noise, writes one bool per patch
    "referring_mask": Case(_referring_mask, lambda a: _nbytes(*a[:2]) + a[1].numel() // 2,
                           grads=()),
    # forward and backward each read a (B, L, D) tensor and the mask and write one
    "apply_mask_token": Case(_apply_mask_token, lambda a: 4 * _nbytes(a[0]) + 2 * a[1].numel(),
                             (0, 2)),
    "masked_gather": Case(_masked_gather, _selected_rows_bytes),
    "masked_scatter": Case(_masked_scatter, _selected_rows_bytes),
    "vts_loss": Case(_vts, _prediction_bytes),
    "box_mask_loss": Case(_box_mask, _prediction_bytes),
    "focal_dice_loss": Case(_focal_dice, _prediction_bytes),
    "linear_cross_entropy": Case(_linear_ce, _linear_ce_bytes, (0, 1, 3), _linear_ce_flops),
    "sts_kl": Case(_sts, _prediction_bytes),
}
