"""Multiway LayerNorm with its neighbours fused: the residual add before it (with the
drop-path scale) or the exact GELU of the FFN's sub-LN, in one pass over memory.

Math (rows (b, s); expert e = A for s < num_vision, else B)::

    add:    h = x + c_b * branch      c_b: per-sample drop-path scale (1 without)
            a = h                      (h is written: the residual stream)
    gelu:   a = GELU(x)                (exact erf; recomputed from x in the backward)
    plain:  a = x
    mu, rstd = mean(a), 1 / sqrt(var(a) + eps)          fp32 statistics
    y = (a - mu) * rstd * w_e + b_e                     written in the output dtype

    xhat = (a - mu) * rstd,  g = dy * w_e
    da = rstd * (g - mean(g) - xhat * mean(g * xhat))   (+ dh: the residual gradient)
    dx = da * GELU'(x) (gelu) or da;   dbranch = c_b * da
    dw_e = sum over e's rows of dy * xhat;   db_e = sum of dy

What it saves against the unfused sequence (docs/perf.md, "Bytes"): under bf16 autocast
the forward reads x (the residual stream, bf16 or fp32: docs/perf.md, "Residual stream")
and the bf16 branch once and writes h and a bf16 y that the next GEMM reads as is: no
promoted add, no fp32 LayerNorm output, no layout copy, no cast. The backward writes the
input gradient with the residual gradient already added, and the
branch gradient in the branch's dtype.

Layout: inputs may have any strides with a contiguous last dim. Rows are processed in
position-major order (row r -> s = r // B, b = r % B) and h, y and the input gradients are
written sequence-major (:mod:`oneref.ops.layout`), as the encoder keeps its hidden states.
The weight gradient is reduced per program over a run of rows (fp32 partials summed
afterwards: no atomics, deterministic).

Launch configs are fixed, keyed on the row width (rows per program and warps): no
autotuning. Registered as ``torch.ops.oneref_triton.multiway_norm`` and
``...multiway_norm_backward`` with fake implementations and autograd. On CPU tensors with the
interpreter off, the two ops compute the same outputs with PyTorch: what
``oneref bench --cost`` counts as one kernel each (the dispatcher never sends CPU tensors
to the triton backend without the interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from oneref.kernels.geometry import norm_backward_programs, norm_rows_per_program
from oneref.kernels.utils import (check_supported, erf_gelu, erf_gelu_grad, interpreter_active,
                                  num_sms)

__all__ = ["multiway_layer_norm", "multiway_add_layer_norm"]

_OP = "multiway_layer_norm"


@triton.jit
def _row_offsets(r, batch, stride_b, stride_s):
    """Memory offsets of position-major rows ``r`` in a (B, S, D) tensor."""
    return (r % batch) * stride_b + (r // batch) * stride_s


@triton.jit
def _expert_select(is_a, ptr_a, ptr_b, cols, col_ok):
    """(ROWS, BLOCK_D) fp32: expert A's vector on rows where ``is_a``, B's elsewhere."""
    va = tl.load(ptr_a + cols, mask=col_ok, other=0.0).to(tl.float32)
    vb = tl.load(ptr_b + cols, mask=col_ok, other=0.0).to(tl.float32)
    return tl.where(is_a[:, None], va[None, :], vb[None, :])


@triton.jit
def _norm_fwd_kernel(X, BR, SCALE, H, Y, WA, BA, WB, BB, MEAN, RSTD,
                     stride_xb, stride_xs, stride_rb, stride_rs,
                     batch, rows, num_vision, width, eps,
                     HAS_BRANCH: tl.constexpr, HAS_SCALE: tl.constexpr, GELU: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = r < rows, cols < width
    ok = row_ok[:, None] & col_ok[None, :]
    x_at = _row_offsets(r, batch, stride_xb, stride_xs)[:, None] + cols[None, :]
    out_at = r.to(tl.int64)[:, None] * width + cols[None, :]
    a = tl.load(X + x_at, mask=ok, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        br_at = _row_offsets(r, batch, stride_rb, stride_rs)[:, None] + cols[None, :]
        branch = tl.load(BR + br_at, mask=ok, other=0.0).to(tl.float32)
        if HAS_SCALE:
            branch *= tl.load(SCALE + r % batch, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        h = (a + branch).to(H.dtype.element_ty)
        tl.store(H + out_at, h, mask=ok)
        a = h.to(tl.float32)  # normalise the stored h: the backward recomputes from it
    if GELU:
        a = erf_gelu(a)
    mean = tl.sum(a, axis=1) / width
    diff = tl.where(ok, a - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / width + eps)
    is_a = (r // batch) < num_vision
    y = (diff * rstd[:, None] * _expert_select(is_a, WA, WB, cols, col_ok)
         + _expert_select(is_a, BA, BB, cols, col_ok))
    tl.store(Y + out_at, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + r, mean, mask=row_ok)
    tl.store(RSTD + r, rstd, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(DY, SRC, DH, SCALE, DSRC, DBR, MEAN, RSTD, WA, WB, PARTS,
                     stride_yb, stride_ys, stride_sb, stride_ss, stride_hb, stride_hs,
                     batch, rows, num_vision, width, rows_per_program,
                     HAS_DH: tl.constexpr, WRITE_BRANCH: tl.constexpr,
                     HAS_SCALE: tl.constexpr, GELU: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < width
    wa = tl.load(WA + cols, mask=col_ok, other=0.0).to(tl.float32)
    wb = tl.load(WB + cols, mask=col_ok, other=0.0).to(tl.float32)
    dwa = tl.zeros((BLOCK_D,), tl.float32)
    dba = tl.zeros((BLOCK_D,), tl.float32)
    dwb = tl.zeros((BLOCK_D,), tl.float32)
    dbb = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(pid * rows_per_program, (pid + 1) * rows_per_program, ROWS):
        r = start + tl.arange(0, ROWS)
        row_ok = r < rows
        ok = row_ok[:, None] & col_ok[None, :]
        src = tl.load(SRC + _row_offsets(r, batch, stride_sb, stride_ss)[:, None] + cols[None, :],
                      mask=ok, other=0.0).to(tl.float32)
        a = src
        if GELU:
            a = erf_gelu(src)
        mean = tl.load(MEAN + r, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + r, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (a - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + _row_offsets(r, batch, stride_yb, stride_ys)[:, None] + cols[None, :],
                     mask=ok, other=0.0).to(tl.float32)
        is_a = (r // batch) < num_vision
        g = dy * tl.where(is_a[:, None], wa[None, :], wb[None, :])
        c1 = tl.sum(g * xhat, axis=1) / width
        c2 = tl.sum(g, axis=1) / width
        da = rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None])
        if HAS_DH:
            da += tl.load(DH + _row_offsets(r, batch, stride_hb, stride_hs)[:, None]
                          + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if GELU:
            da *= erf_gelu_grad(src)
        out_at = r.to(tl.int64)[:, None] * width + cols[None, :]
        tl.store(DSRC + out_at, da.to(DSRC.dtype.element_ty), mask=ok)
        if WRITE_BRANCH:
            if HAS_SCALE:
                da *= tl.load(SCALE + r % batch, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(DBR + out_at, da.to(DBR.dtype.element_ty), mask=ok)
        on_a = tl.where(is_a[:, None], dy, 0.0)
        on_b = dy - on_a
        dwa += tl.sum(on_a * xhat, axis=0)
        dba += tl.sum(on_a, axis=0)
        dwb += tl.sum(on_b * xhat, axis=0)
        dbb += tl.sum(on_b, axis=0)
    base = PARTS + pid * 4 * width + cols  # this program's partial: dw_a, db_a, dw_b, db_b
    tl.store(base, dwa, mask=col_ok)
    tl.store(base + width, dba, mask=col_ok)
    tl.store(base + 2 * width, dwb, mask=col_ok)
    tl.store(base + 3 * width, dbb, mask=col_ok)


# ----------------------------------------------------------------------------- launchers

def _config(width: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK_D, warps) for rows of ``width``: about 4,096 elements per
    program on the GPU (768 -> 4 rows, 3,072 -> 1 row), 16 rows in the interpreter (its
    cost is per program)."""
    block = triton.next_power_of_2(width)
    if interpreter_active():
        return 16, block, 1
    return norm_rows_per_program(width), block, 4 if block <= 1024 else 8


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _sequence_major(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    batch, seq, width = like.shape
    return torch.empty((seq, batch, width), dtype=dtype, device=like.device).transpose(0, 1)


def _check(x, branch, weights) -> None:
    check_supported(_OP, "x", x)
    if branch is not None:
        check_supported(_OP, "branch", branch)
    for name, w in zip(("weight_a", "bias_a", "weight_b", "bias_b"), weights):
        check_supported(_OP, name, w)


def norm_forward(x, branch, scale, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                 eps: float, gelu: bool, out_dtype: torch.dtype):
    """Launch the forward. Returns (h, y, mean, rstd): h is empty without a branch."""
    _check(x, branch, (weight_a, bias_a, weight_b, bias_b))
    batch, seq, width = x.shape
    x = _last_dim_contiguous(x)
    rows = batch * seq
    has_branch = branch is not None
    if has_branch:
        branch = _last_dim_contiguous(branch)
        h = _sequence_major(x, torch.promote_types(x.dtype, branch.dtype))
    else:
        h = x.new_empty((0,))
    y = _sequence_major(x, out_dtype)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows:
        per_program, block, warps = _config(width)
        meta = {} if interpreter_active() else {"num_warps": warps}
        _norm_fwd_kernel[(triton.cdiv(rows, per_program),)](
            x, branch if has_branch else x, scale if scale is not None else mean,
            h if has_branch else y, y, weight_a, bias_a, weight_b, bias_b, mean, rstd,
            x.stride(0), x.stride(1), *(branch.stride()[:2] if has_branch else (0, 0)),
            batch, rows, num_vision, width, eps, HAS_BRANCH=has_branch,
            HAS_SCALE=scale is not None, GELU=gelu, ROWS=per_program, BLOCK_D=block, **meta)
    return h, y, mean, rstd


def _programs(rows: int, per_program: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) of the backward: about two per SM on the GPU (each
    writes a 4 x width fp32 partial), 2 in the interpreter (to exercise the partial sums)."""
    slots = 2 if interpreter_active() else 2 * num_sms(device)
    programs = norm_backward_programs(rows, per_program, slots)
    return programs, triton.cdiv(triton.cdiv(rows, per_program), programs) * per_program


def norm_backward(dy, dh, src, scale, mean, rstd, weight_a, weight_b, num_vision: int,
                  gelu: bool, branch_dtype: torch.dtype | None):
    """Launch the backward. Returns (dsrc, dbranch, the (4, D) fp32 parameter gradients
    dw_a, db_a, dw_b, db_b); dbranch is empty unless ``branch_dtype`` is given. Two
    launches: the kernel, which writes one fp32 partial per program, and their sum."""
    batch, seq, width = src.shape
    rows = batch * seq
    dy = _last_dim_contiguous(dy)
    if dh is not None:
        dh = _last_dim_contiguous(dh)
    dsrc = _sequence_major(src, src.dtype)
    write_branch = branch_dtype is not None
    dbranch = _sequence_major(src, branch_dtype) if write_branch else src.new_empty((0,))
    per_program, block, warps = _config(width)
    programs, rows_per_program = _programs(rows, per_program, src.device)
    parts = torch.empty((programs, 4, width), dtype=torch.float32, device=src.device)
    if not rows:
        parts.zero_()
    else:
        meta = {} if interpreter_active() else {"num_warps": warps}
        _norm_bwd_kernel[(programs,)](
            dy, src, dh if dh is not None else dy, scale if scale is not None else mean,
            dsrc, dbranch if write_branch else dsrc, mean, rstd, weight_a, weight_b, parts,
            dy.stride(0), dy.stride(1), src.stride(0), src.stride(1),
            *(dh.stride()[:2] if dh is not None else (0, 0)),
            batch, rows, num_vision, width, rows_per_program, HAS_DH=dh is not None,
            WRITE_BRANCH=write_branch, HAS_SCALE=scale is not None, GELU=gelu,
            ROWS=per_program, BLOCK_D=block, **meta)
    return dsrc, dbranch, parts.sum(0)


# ----------------------------------------------------- PyTorch outputs for the cost counter

def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Position-major per-row values -> (B, S, 1)."""
    return values.view(like.shape[1], like.shape[0]).t()[..., None]


def _expert_vectors(num_vision: int, seq: int, vec_a, vec_b) -> torch.Tensor:
    """(1, S, D) fp32: expert A's vector on the first ``num_vision`` positions, B's after."""
    return torch.cat([vec_a.float().expand(num_vision, -1),
                      vec_b.float().expand(seq - num_vision, -1)])[None]


def _torch_forward(x, branch, scale, num_vision, weight_a, bias_a, weight_b, bias_b, eps,
                   gelu, out_dtype):
    h = x.new_empty((0,))
    a = x.float()
    if branch is not None:
        c = 1.0 if scale is None else scale.float()[:, None, None]
        h = (a + branch.float() * c).to(torch.promote_types(x.dtype, branch.dtype))
        a = h.float()
    a = F.gelu(a) if gelu else a
    var, mean = torch.var_mean(a, dim=-1, unbiased=False, keepdim=True)
    rstd = (var + eps).rsqrt()
    seq = a.shape[1]
    y = ((a - mean) * rstd * _expert_vectors(num_vision, seq, weight_a, weight_b)
         + _expert_vectors(num_vision, seq, bias_a, bias_b))
    flat = lambda t: t[..., 0].t().reshape(-1)  # noqa: E731 - (B, S, 1) -> position-major
    return h, y.to(out_dtype), flat(mean), flat(rstd)


def _torch_backward(dy, dh, src, scale, mean, rstd, weight_a, weight_b, num_vision, gelu,
                    branch_dtype):
    # Runs below autograd (a custom op's body): the GELU derivative is written out.
    z = src.float()
    a = F.gelu(z) if gelu else z
    mean, rstd = _per_row(mean, src), _per_row(rstd, src)
    xhat = (a - mean) * rstd
    dy = dy.float()
    g = dy * _expert_vectors(num_vision, src.shape[1], weight_a, weight_b)
    da = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True))
    if dh is not None:
        da = da + dh.float()
    if gelu:
        cdf = 0.5 * (1.0 + torch.erf(z * 0.5 ** 0.5))
        da = da * (cdf + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5)
    dbranch = src.new_empty((0,))
    if branch_dtype is not None:
        dbranch = (da if scale is None else da * scale.float()[:, None, None]).to(branch_dtype)
    grads = []
    for rows in (slice(None, num_vision), slice(num_vision, None)):
        grads += [(dy[:, rows] * xhat[:, rows]).sum((0, 1)), dy[:, rows].sum((0, 1))]
    return da.to(src.dtype), dbranch, torch.stack(grads)


def _on_kernel(kernel, cpu_stand_in):
    """The Triton launcher, or on CPU tensors without the interpreter the PyTorch stand-in."""
    def run(*args):
        first = args[0]
        if first.device.type == "cpu" and not interpreter_active():
            return cpu_stand_in(*args)
        return kernel(*args)
    return run


_forward = _on_kernel(norm_forward, _torch_forward)
_backward = _on_kernel(norm_backward, _torch_backward)


# ----------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("oneref_triton::multiway_norm", mutates_args=())
def _norm_op(x: torch.Tensor, branch: torch.Tensor | None, scale: torch.Tensor | None,
             num_vision: int, weight_a: torch.Tensor, bias_a: torch.Tensor,
             weight_b: torch.Tensor, bias_b: torch.Tensor, eps: float, gelu: bool,
             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    return _forward(x, branch, scale, num_vision, weight_a, bias_a, weight_b, bias_b, eps,
                    gelu, out_dtype)


@_norm_op.register_fake
def _norm_fake(x, branch, scale, num_vision, weight_a, bias_a, weight_b, bias_b, eps, gelu,
               out_dtype):
    rows = x.shape[0] * x.shape[1]
    h = (_sequence_major(x, torch.promote_types(x.dtype, branch.dtype)) if branch is not None
         else x.new_empty((0,)))
    stats = x.new_empty((rows,), dtype=torch.float32)
    return h, _sequence_major(x, out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("oneref_triton::multiway_norm_backward", mutates_args=())
def _norm_backward_op(dy: torch.Tensor, dh: torch.Tensor | None, src: torch.Tensor,
                      scale: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                      weight_a: torch.Tensor, weight_b: torch.Tensor, num_vision: int,
                      gelu: bool, branch_dtype: torch.dtype | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, dh, src, scale, mean, rstd, weight_a, weight_b, num_vision, gelu,
                     branch_dtype)


@_norm_backward_op.register_fake
def _norm_backward_fake(dy, dh, src, scale, mean, rstd, weight_a, weight_b, num_vision, gelu,
                        branch_dtype):
    dbranch = (_sequence_major(src, branch_dtype) if branch_dtype is not None
               else src.new_empty((0,)))
    return (_sequence_major(src, src.dtype), dbranch,
            src.new_empty((4, src.shape[-1]), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    x, branch, scale, num_vision, weight_a, _, weight_b, _, _, gelu, _ = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h if branch is not None else x, scale, mean, rstd, weight_a,
                          weight_b)
    ctx.set_materialize_grads(False)
    ctx.num_vision, ctx.gelu = num_vision, gelu
    ctx.has_branch = branch is not None
    # Without a scale and with the residual's dtype, the branch gradient is the input's.
    ctx.branch_dtype = (branch.dtype if branch is not None
                        and (scale is not None or branch.dtype != h.dtype) else None)


def _backward_rule(ctx, grad_h, grad_y, grad_mean, grad_rstd):
    src, scale, mean, rstd, weight_a, weight_b = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(src)
    dsrc, dbranch, param_grads = _norm_backward_op(
        grad_y, grad_h, src, scale, mean, rstd, weight_a, weight_b, ctx.num_vision, ctx.gelu,
        ctx.branch_dtype)
    # Rows of one tensor (the op's outputs may not alias each other; these may): the four
    # parameters' .grad share its storage, which in-place accumulation and the optimizers
    # take as it is. Experts of one dtype take one cast (none for fp32 parameters).
    dtypes = (weight_a.dtype, weight_a.dtype, weight_b.dtype, weight_b.dtype)
    if weight_a.dtype == weight_b.dtype:
        param_grads = param_grads.to(weight_a.dtype)
    dwa, dba, dwb, dbb = (grad.to(dtype) for grad, dtype in zip(param_grads, dtypes))
    if ctx.has_branch and ctx.branch_dtype is None:
        dbranch = dsrc
    return (dsrc, dbranch if ctx.has_branch else None, None, None, dwa, dba, dwb, dbb, None,
            None, None)


_norm_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ------------------------------------------------------------------------ backend functions

def _affine(weight, bias, like):
    """LayerNorm parameters with the defaults of absent ones (ones / zeros)."""
    width = like.shape[-1]
    weight = weight if weight is not None else like.new_ones(width, dtype=torch.float32)
    bias = bias if bias is not None else like.new_zeros(width, dtype=torch.float32)
    return weight, bias


def multiway_layer_norm(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                        eps: float = 1e-5, activation: str = "none", out_dtype=None):
    """Triton multiway LayerNorm (the ``triton`` backend of
    :func:`oneref.ops.multiway_layer_norm`); ``activation="gelu"`` normalises GELU(x).
    Returns (B, S, D) sequence-major in ``out_dtype`` (default x's dtype)."""
    wa, ba = _affine(weight_a, bias_a, x)
    wb, bb = _affine(weight_b, bias_b, x)
    return _norm_op(x, None, None, int(num_vision), wa, ba, wb, bb, float(eps),
                    activation == "gelu", out_dtype or x.dtype)[1]


def multiway_add_layer_norm(x, branch, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                            eps: float = 1e-5, branch_scale=None, out_dtype=None):
    """Triton residual add + multiway LayerNorm (the ``triton`` backend of
    :func:`oneref.ops.multiway_add_layer_norm`). Returns (h, y), both sequence-major."""
    wa, ba = _affine(weight_a, bias_a, x)
    wb, bb = _affine(weight_b, bias_b, x)
    h, y, _, _ = _norm_op(x, branch, branch_scale, int(num_vision), wa, ba, wb, bb, float(eps),
                          False, out_dtype or torch.promote_types(x.dtype, branch.dtype))
    return h, y
