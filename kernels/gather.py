"""Masked-row compaction for the MIM/MLM heads and the fused mask-token substitution.

* ``masked_gather(x, mask)``: rows of x (B, L, D) at the True positions of mask, row-major,
  as (N, D). Its gradient is ``masked_scatter``.
* ``masked_scatter(rows, mask)``: the inverse, rows (N, D) into zeros (B, L, D). Its gradient
  is ``masked_gather``.
* ``apply_mask_token(x, mask, token)``: ``where(mask, token, x)`` in one pass; gradient to x
  where not masked, to token the sum over masked rows.

Design: the output row of each source row is an inclusive prefix sum of the flattened mask,
computed on the device (``torch.cumsum``, one scan of B*L bytes); the kernels then copy
(BLOCK_R x BLOCK_D) tiles, each source row loaded only when selected. The one host read is
the total N, needed to allocate the (N, D) output of the gather; pass ``num_rows`` (e.g. a
count known from the masking ratios) to skip it. Scatter and the gradient of the gather need
no host read at all. All three are pure copies, so they should run near copy bandwidth
(benchmarks/README.md, G2): gather moves ~2 N D elements, scatter and apply_mask_token ~2 B L D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["masked_gather", "masked_scatter", "apply_mask_token"]


def _tiles(dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): up to 1024 columns, about 4096 elements per program on a GPU
    (16 KB of fp32 in flight per program); 64 K in the interpreter, where each program has
    a large fixed cost."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), 1024)
    elements = 4096 if device.type == "cuda" else 65536
    return max(1, elements // block_d), block_d


@triton.jit
def _gather_kernel(x_ptr, mask_ptr, dest_ptr, out_ptr, num_src, num_rows, dim,
                   stride_xr, stride_xd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[dest[r] - 1, :] = x[r, :] for each source row r with mask[r]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < num_src
    selected = tl.load(mask_ptr + rows, mask=in_rows, other=0) != 0
    dest = tl.load(dest_ptr + rows, mask=in_rows, other=0).to(tl.int64) - 1
    selected = selected & (dest < num_rows)  # a wrong num_rows never writes out of bounds
    tile = selected[:, None] & (cols[None, :] < dim)
    vals = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xd, mask=tile)
    tl.store(out_ptr + dest[:, None] * dim + cols[None, :], vals, mask=tile)


@triton.jit
def _scatter_kernel(rows_ptr, mask_ptr, dest_ptr, out_ptr, num_dst, num_rows, dim,
                    stride_rr, stride_rd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r, :] = rows[dest[r] - 1, :] where mask[r], else 0 (every output element written)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < num_dst
    selected = tl.load(mask_ptr + rows, mask=in_rows, other=0) != 0
    src = tl.load(dest_ptr + rows, mask=in_rows, other=0).to(tl.int64) - 1
    selected = selected & (src < num_rows)
    in_cols = cols[None, :] < dim
    vals = tl.load(rows_ptr + src[:, None] * stride_rr + cols[None, :] * stride_rd,
                   mask=selected[:, None] & in_cols, other=0.0)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], vals,
             mask=in_rows[:, None] & in_cols)


@triton.jit
def _mask_token_fwd_kernel(x_ptr, mask_ptr, token_ptr, out_ptr, num_src, dim,
                           stride_xr, stride_xd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < num_src
    in_cols = cols < dim
    selected = tl.load(mask_ptr + rows, mask=in_rows, other=0) != 0
    token = tl.load(token_ptr + cols, mask=in_cols)
    keep = in_rows[:, None] & in_cols[None, :] & ~selected[:, None]
    vals = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xd, mask=keep)
    vals = tl.where(selected[:, None], token[None, :], vals)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], vals,
             mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def _mask_token_bwd_kernel(grad_ptr, mask_ptr, grad_x_ptr, partial_ptr, num_src, dim,
                           stride_gr, stride_gd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_x = grad where not masked, else 0; partial[pid_r] = sum of grad over masked rows
    of this row block (fp32; summed on the host side of the launch, deterministic)."""
    pid_r = tl.program_id(0)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < num_src
    in_cols = cols < dim
    selected = tl.load(mask_ptr + rows, mask=in_rows, other=0) != 0
    tile = in_rows[:, None] & in_cols[None, :]
    g = tl.load(grad_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gd, mask=tile,
                other=0.0)
    zero = tl.zeros_like(g)
    tl.store(grad_x_ptr + rows[:, None] * dim + cols[None, :],
             tl.where(selected[:, None], zero, g), mask=tile)
    token_part = tl.sum(tl.where(selected[:, None], g, zero).to(tl.float32), axis=0)
    tl.store(partial_ptr + pid_r.to(tl.int64) * dim + cols, token_part, mask=in_cols)


def _prefix(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = mask.reshape(-1)
    return flat.view(torch.uint8), torch.cumsum(flat, 0, dtype=torch.int32)


def _launch_gather(x: torch.Tensor, mask: torch.Tensor, num_rows: int | None) -> torch.Tensor:
    dim = x.shape[-1]
    src = x.reshape(-1, dim)
    flat, dest = _prefix(mask)
    if num_rows is None:
        num_rows = int(dest[-1].item()) if dest.numel() else 0  # the one host read
    out = torch.empty(num_rows, dim, dtype=x.dtype, device=x.device)
    if num_rows == 0 or dim == 0:
        return out
    block_r, block_d = _tiles(dim, out.device)
    grid = (triton.cdiv(src.shape[0], block_r), triton.cdiv(dim, block_d))
    _gather_kernel[grid](src, flat, dest, out, src.shape[0], num_rows, dim,
                         src.stride(0), src.stride(1), BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _launch_scatter(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dim = rows.shape[-1]
    flat, dest = _prefix(mask)
    out = torch.empty(*mask.shape, dim, dtype=rows.dtype, device=rows.device)
    if out.numel() == 0:
        return out
    block_r, block_d = _tiles(dim, out.device)
    grid = (triton.cdiv(flat.numel(), block_r), triton.cdiv(dim, block_d))
    _scatter_kernel[grid](rows, flat, dest, out, flat.numel(), rows.shape[0], dim,
                          rows.stride(0), rows.stride(1), BLOCK_R=block_r, BLOCK_D=block_d)
    return out


# --- registered ops ------------------------------------------------------------------------

@torch.library.custom_op("oneref_triton::masked_gather", mutates_args=())
def _masked_gather_op(x: torch.Tensor, mask: torch.Tensor, num_rows: int | None) -> torch.Tensor:
    return _launch_gather(x, mask, num_rows)


@_masked_gather_op.register_fake
def _(x, mask, num_rows):
    rows = num_rows if num_rows is not None else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(rows, x.shape[-1])


@torch.library.custom_op("oneref_triton::masked_scatter", mutates_args=())
def _masked_scatter_op(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _launch_scatter(rows, mask)


@_masked_scatter_op.register_fake
def _(rows, mask):
    return rows.new_empty(*mask.shape, rows.shape[-1])


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _gather_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return _masked_scatter_op(grad, mask), None, None


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_rows = inputs[0].shape[0]


def _scatter_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return _masked_gather_op(grad, mask, ctx.num_rows), None


_masked_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_masked_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


@torch.library.custom_op("oneref_triton::apply_mask_token", mutates_args=())
def _apply_mask_token_op(x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    dim = x.shape[-1]
    src = x.reshape(-1, dim)
    flat = mask.reshape(-1).view(torch.uint8)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_r, block_d = _tiles(dim, out.device)
    grid = (triton.cdiv(src.shape[0], block_r), triton.cdiv(dim, block_d))
    _mask_token_fwd_kernel[grid](src, flat, token.to(x.dtype).contiguous(), out, src.shape[0],
                                 dim, src.stride(0), src.stride(1),
                                 BLOCK_R=block_r, BLOCK_D=block_d)
    return out


@_apply_mask_token_op.register_fake
def _(x, mask, token):
    return torch.empty_like(x)


@torch.library.custom_op("oneref_triton::apply_mask_token_backward", mutates_args=())
def _apply_mask_token_bwd_op(grad: torch.Tensor, mask: torch.Tensor,
                             token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dim = grad.shape[-1]
    src = grad.reshape(-1, dim)
    flat = mask.reshape(-1).view(torch.uint8)
    grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    block_r, block_d = _tiles(dim, grad.device)
    num_blocks = triton.cdiv(src.shape[0], block_r)
    partial = torch.empty(num_blocks, dim, dtype=torch.float32, device=grad.device)
    if grad.numel() == 0:
        return grad_x, torch.zeros_like(token)
    _mask_token_bwd_kernel[(num_blocks, triton.cdiv(dim, block_d))](
        src, flat, grad_x, partial, src.shape[0], dim, src.stride(0), src.stride(1),
        BLOCK_R=block_r, BLOCK_D=block_d)
    return grad_x, partial.sum(0).to(token.dtype)


@_apply_mask_token_bwd_op.register_fake
def _(grad, mask, token):
    return torch.empty_like(grad), torch.empty_like(token)


def _mask_token_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _mask_token_backward(ctx, grad):
    mask, token = ctx.saved_tensors
    grad_x, grad_token = _apply_mask_token_bwd_op(grad, mask, token)
    return grad_x, None, grad_token


_apply_mask_token_op.register_autograd(_mask_token_backward, setup_context=_mask_token_setup)


# --- public functions ----------------------------------------------------------------------

def masked_gather(x: torch.Tensor, mask: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """Rows of x (B, L, D) at the True positions of mask (B, L) bool -> (N, D), row-major.

    ``num_rows`` (= ``mask.sum()``) skips the one host read of N; a wrong value drops rows
    (too small) or leaves the tail rows unset (too large), it never writes out of bounds.
    """
    return _masked_gather_op(x, mask, num_rows)


def masked_scatter(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rows (N, D) placed at the True positions of mask (B, L) in zeros (B, L, D)."""
    return _masked_scatter_op(rows, mask)


def apply_mask_token(x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``where(mask[..., None], token, x)``: x (B, L, D), mask (B, L) bool, token (D,)."""
    return _apply_mask_token_op(x, mask, token)
