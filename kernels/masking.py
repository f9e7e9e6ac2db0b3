"""Referring-aware dynamic image masking (MRefM, docs/method.md, "MRefM pre-training") as one
Triton kernel.

Semantics are those of :func:`oneref.ops.reference.referring_mask`: the whole grid keeps the
``floor(L * (1 - outside_ratio))`` patches of smallest ``noise[:, 0]``; inside the box grown by
one patch (``Lb`` patches) exactly ``floor(Lb * (1 - inside_ratio))`` patches of smallest
``noise[:, 1]`` are kept. Ties are broken by patch index (a stable sort).

Design: instead of sorting, each patch's rank is counted,
``rank_i = #{j : noise_j < noise_i or (noise_j == noise_i and j < i)}``, over a block loop of
the other patches. For L = 576 that is 2 x 576^2 = 0.66 M compares per sample, spread over a
(B, L / BLOCK_I) launch grid: a few microseconds for a batch of 64 on an H100, bound by the
launch, not by memory (the kernel reads 2 x L noise values per sample and writes L bytes).
The grown box is computed in float64 as the reference does (truncate, +-1, clip) and the
inside count ``floor(Lb * (1 - inside_ratio))`` comes from a (L + 1,) table built on the
device in float64, so the masks match the reference bit for bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["referring_mask"]


@triton.jit
def _patches(noise0, noise1, offs, x1, y1, x2, y2, GRID: tl.constexpr, L: tl.constexpr):
    """For patch indices ``offs``: (in range, noise[0], noise[1] (0 out of range), inside the
    grown box [x1, x2) x [y1, y2))."""
    in_range = offs < L
    n0 = tl.load(noise0 + offs, mask=in_range, other=0.0)
    n1 = tl.load(noise1 + offs, mask=in_range, other=0.0)
    col = offs % GRID
    row = offs // GRID
    return in_range, n0, n1, (col >= x1) & (col < x2) & (row >= y1) & (row < y2)


@triton.jit
def _referring_mask_kernel(boxes_ptr, noise_ptr, keep_table_ptr, out_ptr, keep_outside,
                           GRID: tl.constexpr, L: tl.constexpr,
                           BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program (b, i-block): mask bits of patches [i0, i0 + BLOCK_I) of sample b."""
    b = tl.program_id(0).to(tl.int64)
    i0 = tl.program_id(1) * BLOCK_I
    # Grown box in float64, truncated toward zero (like torch.trunc + long), +-1, clipped.
    cx = tl.load(boxes_ptr + b * 4 + 0).to(tl.float64)
    cy = tl.load(boxes_ptr + b * 4 + 1).to(tl.float64)
    w = tl.load(boxes_ptr + b * 4 + 2).to(tl.float64)
    h = tl.load(boxes_ptr + b * 4 + 3).to(tl.float64)
    x1 = tl.minimum(tl.maximum(((cx - w / 2) * GRID).to(tl.int32) - 1, 0), GRID)
    y1 = tl.minimum(tl.maximum(((cy - h / 2) * GRID).to(tl.int32) - 1, 0), GRID)
    x2 = tl.minimum(tl.maximum(((cx + w / 2) * GRID).to(tl.int32) + 1, 0), GRID)
    y2 = tl.minimum(tl.maximum(((cy + h / 2) * GRID).to(tl.int32) + 1, 0), GRID)
    area = tl.maximum((x2 - x1) * (y2 - y1), 0)
    keep_inside = tl.load(keep_table_ptr + area)

    noise0 = noise_ptr + b * (2 * L)
    noise1 = noise0 + L
    offs_i = i0 + tl.arange(0, BLOCK_I)
    mask_i, ni0, ni1, inside_i = _patches(noise0, noise1, offs_i, x1, y1, x2, y2, GRID, L)

    rank0 = tl.zeros([BLOCK_I], dtype=tl.int32)
    rank1 = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j, nj0, nj1, inside_j = _patches(noise0, noise1, offs_j, x1, y1, x2, y2, GRID, L)
        inside_j = mask_j & inside_j
        earlier = offs_j[None, :] < offs_i[:, None]
        before0 = (nj0[None, :] < ni0[:, None]) | ((nj0[None, :] == ni0[:, None]) & earlier)
        before1 = (nj1[None, :] < ni1[:, None]) | ((nj1[None, :] == ni1[:, None]) & earlier)
        rank0 += tl.sum((before0 & mask_j[None, :]).to(tl.int32), axis=1)
        rank1 += tl.sum((before1 & inside_j[None, :]).to(tl.int32), axis=1)
    masked = tl.where(inside_i, rank1 >= keep_inside, rank0 >= keep_outside)
    tl.store(out_ptr + b * L + offs_i, masked, mask=mask_i)


_KEEP_TABLES: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _keep_table(num_patches: int, inside_ratio: float, device: torch.device) -> torch.Tensor:
    """(L + 1,) int32: ``floor(a * (1 - inside_ratio))`` in float64 for every box area a.
    Cached per (L, ratio, device), so a training step launches only the mask kernel."""
    key = (num_patches, inside_ratio, device)
    table = _KEEP_TABLES.get(key)
    if table is None:
        table = torch.floor(torch.arange(num_patches + 1, dtype=torch.float64, device=device)
                            * (1.0 - inside_ratio)).to(torch.int32)
        _KEEP_TABLES[key] = table
    return table


def _launch(boxes: torch.Tensor, noise: torch.Tensor, grid: int, outside_ratio: float,
            inside_ratio: float) -> torch.Tensor:
    batch = boxes.shape[0]
    num_patches = grid * grid
    boxes = boxes.contiguous()
    noise = noise.contiguous()
    # Counts in float64, exactly as the reference computes them.
    keep_outside = math.floor(num_patches * (1.0 - outside_ratio))
    keep_table = _keep_table(num_patches, float(inside_ratio), boxes.device)
    out = torch.empty(batch, num_patches, dtype=torch.bool, device=boxes.device)
    if batch == 0:
        return out
    # GPU: 64 x 64 compare tiles keep registers low. CPU (the interpreter): one tile per
    # sample, since there each block operation costs far more than its size.
    block_i = block_j = 64 if boxes.is_cuda else triton.next_power_of_2(num_patches)
    launch_grid = (batch, triton.cdiv(num_patches, block_i))
    _referring_mask_kernel[launch_grid](boxes, noise, keep_table, out, keep_outside,
                                        GRID=grid, L=num_patches, BLOCK_I=block_i,
                                        BLOCK_J=block_j)
    return out


@torch.library.custom_op("oneref_triton::referring_mask", mutates_args=())
def _referring_mask_op(boxes: torch.Tensor, noise: torch.Tensor, grid: int,
                       outside_ratio: float, inside_ratio: float) -> torch.Tensor:
    return _launch(boxes, noise, grid, outside_ratio, inside_ratio)


@_referring_mask_op.register_fake
def _(boxes, noise, grid, outside_ratio, inside_ratio):
    return boxes.new_empty(boxes.shape[0], grid * grid, dtype=torch.bool)


def referring_mask(boxes: torch.Tensor, noise: torch.Tensor, grid: int,
                   outside_ratio: float = 0.35, inside_ratio: float = 0.75) -> torch.Tensor:
    """Referring-aware masking for a batch on the device.

    Args:
        boxes: (B, 4) normalised cx, cy, w, h (any float dtype; read as float64).
        noise: (B, 2, grid * grid) uniform draws, row 0 for the grid, row 1 for the box.
        grid: patches per side; outside_ratio, inside_ratio: masking ratios in [0, 1].

    Returns:
        (B, grid * grid) bool, True = masked. Not differentiable.
    """
    return _referring_mask_op(boxes, noise, grid, float(outside_ratio), float(inside_ratio))
