"""Multiway linear: expert A on the vision rows (``s < num_vision``) and expert B on the text
rows of every sample, in one launch, with fused bias and optional exact (erf) GELU.

Math (x: (B, S, Din), W_e: (Dout, Din), e = A for s < num_vision else B)::

    z[b, s] = x[b, s] @ W_e^T + b_e          y = z  or  y = GELU(z) = z * Phi(z)
    dz = dy * (Phi(z) + z * phi(z))          (GELU backward, from the saved z)
    dx[b, s] = dz[b, s] @ W_e                dW_e = sum_{rows of e} dz^T x,  db_e = sum dz

Design (a grouped GEMM with two groups):

* The rows of each expert over the whole batch form one logical matrix: expert A has
  ``B * num_vision`` rows (row r -> sample r // num_vision, position r % num_vision), expert B
  ``B * (S - num_vision)`` rows. Row tiles are laid out per expert, so a tile never straddles
  the vision/text boundary and the tail waste is one partial tile per expert for the whole
  batch (B = 32, S = 641: 144.25 + 16 tiles of 128 rows, < 1% waste), not one per sample. Rows
  are addressed through x's strides (a gathered load per row, contiguous along Din), so there
  is no split/cat copy. Tiles are ordered in GROUP_M super-rows for L2 reuse of W.
* ``_mwl_kernel`` computes the forward and also dx (the same kernel with W's strides swapped
  and no epilogue). With GELU it stores both z (saved for backward) and y from the fp32
  accumulator: one GEMM, no extra pass over memory besides the z write.
* ``_mwl_dw_kernel`` computes dW_A, dW_B and the bias gradients: a reduction over each expert's
  rows, split into SPLIT chunks (fp32 partials, summed afterwards) so that small Dout x Din
  weights still fill the GPU (expert B has only B * 64 rows); db comes from the same dz tiles.
  No atomics anywhere: results are deterministic run to run.
* ``_gelu_bwd_kernel`` materialises dz once (memory-bound; read dy and z, write dz) so that
  both backward GEMMs read plain operands. A later fusion could compute dz inside the GEMM
  loads; with dz re-read by ceil(Din / BLOCK_N) tiles the erf cost would then repeat.

Expected speed (H100, bf16, D = 768): the forward and dx GEMMs should run at cuBLAS-like
efficiency for these shapes (the autotuner picks 128x128x64-class tiles), and beat the
eager split + two F.linear + cat + (bias, GELU) sequence by removing the copies and the
separate epilogue passes. The weight gradient is the weakest part (gathered rows along the
reduction dimension and fp32 partials); predicted ~60-75% of the dx GEMM's throughput.
On the GPU the kernels launch with their first config; autotuning runs on request only
(``ONEREF_AUTOTUNE=1``). The interpreter uses one fixed config (64 x 64 tiles: its cost is
per program and loop step, not per element).

Registered as ``torch.ops.oneref_triton.multiway_linear`` (returns (y, z); z is empty without
GELU) and ``...multiway_linear_backward``, with fake implementations, autograd and FLOP
formulas (``2 * B * S * Din * Dout`` forward, twice that backward; bias and GELU not counted).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from oneref.kernels.utils import (check_supported, dot_precision, erf_gelu, erf_gelu_grad,
                                  interpreter_active, num_sms, tuned)

__all__ = ["multiway_linear", "linear_forward", "linear_backward"]

_OP = "multiway_linear"


@triton.jit
def _expert_rows(offs, rows_e, s0, stride_b, stride_s):
    """Memory offsets of rows ``offs`` of one expert (row r -> sample r // rows_e, position
    s0 + r % rows_e) in a (B, S, ...) tensor with strides (stride_b, stride_s)."""
    safe = tl.maximum(rows_e, 1)
    return (offs // safe) * stride_b + (s0 + offs % safe) * stride_s


@triton.jit
def _mwl_tile(X, W, BIAS, Y, PRE, local_m, pid_n, batch, rows_e, s0, seq_len,
              stride_xb, stride_xs, stride_xk, stride_wn, stride_wk, N, K,
              HAS_BIAS: tl.constexpr, GELU: tl.constexpr, EVEN_K: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """One (BLOCK_M rows of one expert) x (BLOCK_N outputs) tile of Y."""
    total = batch * rows_e
    offs_m = local_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_ok = offs_m < total
    # clamped copies for the loads: no row/column mask inside the K loop
    x_rows = _expert_rows(tl.minimum(offs_m, total - 1), rows_e, s0, stride_xb, stride_xs)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_n_ld = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + x_rows[:, None] + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_n_ld[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # Y and PRE are contiguous (B, S, N)
    out_off = _expert_rows(offs_m, rows_e, s0, seq_len * N, N)[:, None] + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if GELU:
        tl.store(PRE + out_off, acc.to(PRE.dtype.element_ty), mask=out_ok)
        acc = erf_gelu(acc)
    tl.store(Y + out_off, acc.to(Y.dtype.element_ty), mask=out_ok)


# BLOCK_K is 32 or 64 everywhere, so EVEN_K = (K % 64 == 0) is decided before tuning.
_MM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                             (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                             (128, 128, 32, 4, 4)]
]


@tuned(_MM_CONFIGS, key=["N", "K", "rows_a", "rows_b"],
       interpret={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2})
@triton.jit
def _mwl_kernel(X, WA, WB, BIAS_A, BIAS_B, Y, PRE,
                stride_xb, stride_xs, stride_xk,
                stride_wan, stride_wak, stride_wbn, stride_wbk,
                batch, seq_len, num_vision, N, K, rows_a, rows_b,
                HAS_BIAS_A: tl.constexpr, HAS_BIAS_B: tl.constexpr, GELU: tl.constexpr,
                EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y = act(X @ W_e^T + b_e) over both experts' row tiles; rows_a = B * nv,
    rows_b = B * (S - nv). Grid: (cdiv(rows_a, BM) + cdiv(rows_b, BM)) * cdiv(N, BN)."""
    pid = tl.program_id(0)
    tiles_a = tl.cdiv(rows_a, BLOCK_M)
    tiles_m = tiles_a + tl.cdiv(rows_b, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share each column tile of W while it is in L2
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m < tiles_a:
        _mwl_tile(X, WA, BIAS_A, Y, PRE, pid_m, pid_n, batch, num_vision, 0, seq_len,
                  stride_xb, stride_xs, stride_xk, stride_wan, stride_wak, N, K,
                  HAS_BIAS_A, GELU, EVEN_K, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _mwl_tile(X, WB, BIAS_B, Y, PRE, pid_m - tiles_a, pid_n, batch, seq_len - num_vision,
                  num_vision, seq_len, stride_xb, stride_xs, stride_xk, stride_wbn,
                  stride_wbk, N, K, HAS_BIAS_B, GELU, EVEN_K, DOT_PREC, BLOCK_M, BLOCK_N,
                  BLOCK_K)


_DW_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4),
                             (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
]


@tuned(_DW_CONFIGS, key=["N", "K", "rows_a", "rows_b", "split"],
       interpret={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
@triton.jit
def _mwl_dw_kernel(DZ, X, DW, DB,
                   stride_zb, stride_zs, stride_zn, stride_xb, stride_xs, stride_xk,
                   seq_len, num_vision, N, K, rows_a, rows_b, split,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Partial dW[e, c] = sum over chunk c of expert e's rows of dz^T x (fp32, (2, split, N, K))
    and db[e, c] = the row sum of dz (written by the column-0 programs).
    Grid: (cdiv(N, BM) * cdiv(K, BN), split, 2). Here N = Dout, K = Din, rows reduced."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    expert = tl.program_id(2)
    tiles_k = tl.cdiv(K, BLOCK_N)
    pid_o = pid // tiles_k
    pid_i = pid % tiles_k
    is_a = expert == 0
    rows_e = tl.where(is_a, num_vision, seq_len - num_vision)
    s0 = tl.where(is_a, 0, num_vision)
    total = tl.where(is_a, rows_a, rows_b)
    per_chunk = tl.cdiv(tl.cdiv(total, split), BLOCK_K) * BLOCK_K
    r_start = chunk * per_chunk
    r_end = tl.minimum(total, r_start + per_chunk)

    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < N
    i_ok = offs_i < K
    offs_o_ld = tl.minimum(offs_o, N - 1)
    offs_i_ld = tl.minimum(offs_i, K - 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        r_ok = offs_r < r_end
        z_rows = _expert_rows(offs_r, rows_e, s0, stride_zb, stride_zs)
        x_rows = _expert_rows(offs_r, rows_e, s0, stride_xb, stride_xs)
        dz_t = tl.load(DZ + z_rows[None, :] + offs_o_ld[:, None] * stride_zn,
                       mask=r_ok[None, :], other=0.0)
        x = tl.load(X + x_rows[:, None] + offs_i_ld[None, :] * stride_xk,
                    mask=r_ok[:, None], other=0.0)
        acc = tl.dot(dz_t, x, acc, input_precision=DOT_PREC)
        db += tl.sum(dz_t.to(tl.float32), 1)
    part = expert * split + chunk
    tl.store(DW + (part * N + offs_o[:, None]) * K + offs_i[None, :], acc,
             mask=o_ok[:, None] & i_ok[None, :])
    if pid_i == 0:
        tl.store(DB + part * N + offs_o, db, mask=o_ok)


@triton.jit
def _gelu_bwd_kernel(DY, PRE, DPRE, DZ, n_cols, stride_yr, numel,
                     HAS_DPRE: tl.constexpr, BLOCK: tl.constexpr):
    """dz = dy * GELU'(z) (+ dpre); z, dpre, dz contiguous (rows, n_cols); dy rows strided."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dy = tl.load(DY + (offs // n_cols) * stride_yr + offs % n_cols, mask=ok,
                 other=0.0).to(tl.float32)
    z = tl.load(PRE + offs, mask=ok, other=0.0).to(tl.float32)
    dz = dy * erf_gelu_grad(z)
    if HAS_DPRE:
        dz += tl.load(DPRE + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers

def _launch_mm(x, w_a, w_b, bias_a, bias_b, y, pre, num_vision: int, w_strides_a, w_strides_b,
               gelu: bool) -> None:
    """y (contiguous (B, S, N)) = act(x @ W_e^T + b_e); W_e given by (n, k) strides."""
    batch, seq, k_dim = x.shape
    n_dim = y.shape[-1]
    rows_a, rows_b = batch * num_vision, batch * (seq - num_vision)
    def grid(meta):
        row_tiles = triton.cdiv(rows_a, meta["BLOCK_M"]) + triton.cdiv(rows_b, meta["BLOCK_M"])
        return (row_tiles * triton.cdiv(n_dim, meta["BLOCK_N"]),)

    _mwl_kernel[grid](x, w_a, w_b, bias_a if bias_a is not None else y,
                      bias_b if bias_b is not None else y, y, pre if pre is not None else y,
                      *x.stride(), *w_strides_a, *w_strides_b,
                      batch, seq, num_vision, n_dim, k_dim, rows_a, rows_b,
                      HAS_BIAS_A=bias_a is not None, HAS_BIAS_B=bias_b is not None, GELU=gelu,
                      EVEN_K=k_dim % 64 == 0, DOT_PREC=dot_precision(x.dtype))


def _check(x, weight_a, weight_b) -> None:
    check_supported(_OP, "x", x)
    for name, w in (("weight_a", weight_a), ("weight_b", weight_b)):
        if w.dtype != x.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {w.dtype}, expected {x.dtype}")


def linear_forward(x, num_vision: int, weight_a, bias_a, weight_b, bias_b, activation: str):
    """Launch the forward. x: (B, S, Din) strided. Returns (y (B, S, Dout) contiguous, z): z is
    the pre-activation (B, S, Dout) with GELU, an empty tensor otherwise."""
    _check(x, weight_a, weight_b)
    batch, seq, _ = x.shape
    d_out = weight_a.shape[0]
    gelu = activation == "gelu"
    y = torch.empty((batch, seq, d_out), dtype=x.dtype, device=x.device)
    pre = torch.empty_like(y) if gelu else y.new_empty((0,))
    _launch_mm(x, weight_a, weight_b, bias_a, bias_b, y, pre if gelu else None, num_vision,
               weight_a.stride(), weight_b.stride(), gelu)
    return y, pre


def _dz(dy, pre, dpre, activation: str):
    if activation != "gelu":
        return dy if dpre is None else dy + dpre
    dy = dy.contiguous()
    dz = torch.empty_like(pre)
    numel = dz.numel()
    block = 1024
    _gelu_bwd_kernel[(triton.cdiv(numel, block),)](
        dy, pre, dpre.contiguous() if dpre is not None else pre, dz, dz.shape[-1],
        dz.shape[-1], numel, HAS_DPRE=dpre is not None, BLOCK=block)
    return dz


def _split(rows: int, tiles: int, device: torch.device) -> int:
    """Row chunks of the weight-gradient reduction: enough programs for about one wave of
    the GPU, chunks of >= 1024 rows (2 in the interpreter, to exercise the partial sums).
    Each extra chunk costs an fp32 Dout x Din partial per expert (written, then summed):
    D = 768 -> 3072 (fc1) with 72 tiles of 128 x 128 gives 2 chunks, 38 MB of partials."""
    if interpreter_active():
        return 2
    want = triton.cdiv(num_sms(device), max(tiles, 1))
    return max(1, min(want, rows // 1024))


def linear_backward(dy, x, pre, num_vision: int, weight_a, weight_b, has_bias_a: bool,
                    has_bias_b: bool, activation: str, dpre=None):
    """Launch the backward. Returns (dx, dW_A, db_A, dW_B, db_B); a bias gradient is an empty
    tensor when that bias is absent. dpre: gradient flowing into the saved z output (or None)."""
    batch, seq, d_in = x.shape
    d_out = weight_a.shape[0]
    dz = _dz(dy, pre, dpre, activation)
    dx = torch.empty((batch, seq, d_in), dtype=x.dtype, device=x.device)
    # dx = dz @ W_e: W_e read as an (n = Din, k = Dout) matrix through swapped strides
    _launch_mm(dz, weight_a, weight_b, None, None, dx, None, num_vision,
               weight_a.stride()[::-1], weight_b.stride()[::-1], False)

    rows_a, rows_b = batch * num_vision, batch * (seq - num_vision)
    split = _split(max(rows_a, rows_b), triton.cdiv(d_out, 128) * triton.cdiv(d_in, 128) * 2,
                   x.device)
    dw = torch.empty((2, split, d_out, d_in), dtype=torch.float32, device=x.device)
    db = torch.empty((2, split, d_out), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(d_out, meta["BLOCK_M"])  # noqa: E731
                         * triton.cdiv(d_in, meta["BLOCK_N"]), split, 2)
    _mwl_dw_kernel[grid](dz, x, dw, db, *dz.stride(), *x.stride(), seq, num_vision, d_out, d_in,
                         rows_a, rows_b, split, DOT_PREC=dot_precision(x.dtype))
    # separate tensors per expert: custom-op outputs must not alias each other
    dw_a, dw_b = (dw[e].sum(0).to(weight_a.dtype) for e in (0, 1))
    db_a, db_b = (db[e].sum(0).to(weight_a.dtype) if has else dw_a.new_empty((0,))
                  for e, has in ((0, has_bias_a), (1, has_bias_b)))
    return dx, dw_a, db_a, dw_b, db_b


# ----------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("oneref_triton::multiway_linear", mutates_args=())
def _linear_op(x: torch.Tensor, num_vision: int, weight_a: torch.Tensor,
               bias_a: torch.Tensor | None, weight_b: torch.Tensor, bias_b: torch.Tensor | None,
               activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_forward(x, num_vision, weight_a, bias_a, weight_b, bias_b, activation)


@_linear_op.register_fake
def _linear_fake(x, num_vision, weight_a, bias_a, weight_b, bias_b, activation):
    shape = (*x.shape[:2], weight_a.shape[0])
    y = x.new_empty(shape)
    return y, (x.new_empty(shape) if activation == "gelu" else x.new_empty((0,)))


@torch.library.custom_op("oneref_triton::multiway_linear_backward", mutates_args=())
def _linear_backward_op(dy: torch.Tensor, x: torch.Tensor, pre: torch.Tensor,
                        dpre: torch.Tensor | None, num_vision: int, weight_a: torch.Tensor,
                        weight_b: torch.Tensor, has_bias_a: bool, has_bias_b: bool,
                        activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
    return linear_backward(dy, x, pre, num_vision, weight_a, weight_b, has_bias_a, has_bias_b,
                           activation, dpre)


@_linear_backward_op.register_fake
def _linear_backward_fake(dy, x, pre, dpre, num_vision, weight_a, weight_b, has_bias_a,
                          has_bias_b, activation):
    d_out = weight_a.shape[0]
    bias_shape = lambda has: (d_out,) if has else (0,)  # noqa: E731
    return (x.new_empty(x.shape), weight_a.new_empty(weight_a.shape),
            weight_a.new_empty(bias_shape(has_bias_a)), weight_a.new_empty(weight_a.shape),
            weight_a.new_empty(bias_shape(has_bias_b)))


def _setup_context(ctx, inputs, output) -> None:
    x, num_vision, weight_a, bias_a, weight_b, bias_b, activation = inputs
    ctx.save_for_backward(x, weight_a, weight_b, output[1])
    ctx.set_materialize_grads(False)  # the unused z output gets None, not a (B, S, Dout) memset
    ctx.num_vision = num_vision
    ctx.activation = activation
    ctx.has_bias = (bias_a is not None, bias_b is not None)


def _backward(ctx, grad_y, grad_pre):
    x, weight_a, weight_b, pre = ctx.saved_tensors
    if grad_y is None:
        grad_y = x.new_zeros((*x.shape[:2], weight_a.shape[0]))
    if grad_pre is not None and grad_pre.numel() == 0:
        grad_pre = None
    dx, dwa, dba, dwb, dbb = _linear_backward_op(grad_y, x, pre, grad_pre, ctx.num_vision,
                                                 weight_a, weight_b, *ctx.has_bias,
                                                 ctx.activation)
    has_a, has_b = ctx.has_bias
    return dx, None, dwa, dba if has_a else None, dwb, dbb if has_b else None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.oneref_triton.multiway_linear)
def _linear_flops(x_shape, num_vision, w_shape, *args, **kwargs):
    return 2 * x_shape[0] * x_shape[1] * x_shape[2] * w_shape[0]


@register_flop_formula(torch.ops.oneref_triton.multiway_linear_backward)
def _linear_backward_flops(dy_shape, x_shape, pre_shape, dpre_shape, num_vision, w_shape,
                           *args, **kwargs):
    return 4 * x_shape[0] * x_shape[1] * x_shape[2] * w_shape[0]


def multiway_linear(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                    activation: str = "none"):
    """Triton multiway linear (the ``triton`` backend of :func:`oneref.ops.multiway_linear`).

    x: (B, S, Din) fp32/fp16/bf16, any strides; weight_a, weight_b: (Dout, Din) in x's dtype;
    bias_a, bias_b: (Dout,) or None; activation "none" or "gelu" (exact erf GELU).
    Returns (B, S, Dout) contiguous; differentiable in x, both weights and both biases.
    """
    if activation not in ("none", "gelu"):
        raise ValueError(f"{_OP}: activation must be 'none' or 'gelu', got {activation!r}")
    return _linear_op(x, int(num_vision), weight_a, bias_a, weight_b, bias_b, activation)[0]
