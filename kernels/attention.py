"""Flash-style multiway attention: softmax attention over the joint [vision | text] sequence
with a per-sample key limit ``num_vision + text_lengths[b]`` (text padding is at the end).

Math (per batch b, head h; ``s_ij = scale * q_i . k_j`` for keys ``j < n_b``)::

    lse_i = log sum_j exp(s_ij)          P_ij = exp(s_ij - lse_i)        O = P V
    delta_i = sum_d dO_id O_id - dlse_i  dS = P * (dO V^T - delta)
    dQ = scale * dS K                    dK = scale * dS^T Q             dV = P^T dO

(FlashAttention-2, Dao 2023: online softmax in the forward, recomputation of P from the
saved log-sum-exp in the backward.) No S x S matrix is ever stored.

Layout: q, k, v are (B, S, H, Dh) with arbitrary strides, e.g. views of a packed
(B, S, 3, H, Dh) QKV projection; the kernels address them through their strides, no copy.
The kernels write o, dq, dk, dv through strides too. o is sequence-major (stored as
(S, B, H, Dh), the encoder's layout, :mod:`oneref.ops.layout`); lse is fp32 (B, H, S),
natural log. The packed form (:func:`packed_multiway_attention`) takes the QKV projection
itself and writes dq, dk and dv directly into one gradient with the projection's strides
(a fresh contiguous one when the projection is not dense), so autograd neither stacks the
three gradients nor copies the stack into the layout the QKV GEMM's backward reads.

Kernels and design choices (predicted behaviour on H100, bf16, Dh = 64, S = 641):

* ``_attn_fwd_kernel`` - grid (cdiv(S, BLOCK_M), B * H). Each program keeps a Q tile in
  registers and streams K/V tiles up to the sample's own key limit ``n_b``: keys past it are
  never loaded, so text padding costs nothing (key-length-aware early exit). The key loop is
  split into unmasked full blocks and one masked tail block (a constexpr branch), so the mask
  costs one ``where`` per program, not per iteration. Softmax in base 2 with the scale folded
  into one multiply; fp32 accumulators. The 641 = 5*128 + 1 query tail wastes a whole
  128-row tile; the autotuner may pick BLOCK_M = 64 (tail waste 9% instead of 17%).
* ``_attn_bwd_preprocess`` - delta = rowsum(dO * O) - dlse, fp32 (memory-bound, tiny).
* ``_attn_bwd_dkdv_kernel`` - grid (cdiv(S, BLOCK_N), B * H): a program owns one key block and
  loops over all query blocks, accumulating dK and dV in registers (no atomics: deterministic).
  Key blocks past ``n_b`` skip the loop and write zeros (the exact gradient). Rows of a
  partially valid key block past ``n_b`` only ever touch their own output rows, which are
  zeroed at the store, so the loop itself needs no key mask.
* ``_attn_bwd_dq_kernel`` - grid (cdiv(S, BLOCK_M), B * H): a program owns one query block and
  streams K/V up to ``n_b`` like the forward.
  Splitting dq from dk/dv recomputes Q K^T once more (12 instead of 10 S*S*Dh matmul units)
  but avoids fp32 atomics; at S = 641 the extra work is about 20% of the backward matmuls.

Padded queries (positions >= n_b) compute normally: their outputs and all gradients are exact
against :func:`oneref.ops.reference.multiway_attention`. Expected speed: the forward should
reach FA2-class throughput for head dim 64 (the docs/perf.md anchor ~280-340 TFLOP/s at seq 512 is
an upper bound; with the 641 tail about 70-80% of that); against SDPA with a bool key mask
(memory-efficient / cuDNN backend) at 577 + 8..64 keys the key-length early exit is the main
gain. On the GPU each kernel launches with the first config of its list; autotuning runs on
request only (``ONEREF_AUTOTUNE=1``). The interpreter uses one fixed 128 x 128 config.

Registered as ``torch.ops.oneref_triton.multiway_attention`` (returns (o, lse)),
``...packed_multiway_attention`` and their ``..._backward`` ops, with fake implementations,
autograd and FLOP formulas
(FLOP convention: forward ``4 * H * S * Dh * sum_b n_b`` - two matmuls over the valid keys;
backward 2.5x that, the five recomputation-based matmuls of FlashAttention-2; with fake
``text_lengths`` every key counts, ``n_b = S``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from oneref.kernels.utils import check_supported, dot_precision, tuned

__all__ = ["multiway_attention", "packed_multiway_attention", "attention_forward",
           "attention_backward", "packed_attention_backward", "HEAD_DIMS"]

HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_OP = "multiway_attention"
# interpreter launch config: its cost is per program and per loop iteration (Python
# overhead), not per element, so big tiles keep the CPU tests fast
_INTERP = {"BLOCK_M": 128, "BLOCK_N": 128}


@triton.jit
def _key_limit(LENS, b, num_vision, seq_len):
    """n_b = num_vision + text_lengths[b], clamped to [0, S] so bad lengths cannot read out of
    bounds; keys at positions >= n_b are never read."""
    return tl.minimum(tl.maximum(num_vision + tl.load(LENS + b).to(tl.int32), 0), seq_len)


@triton.jit
def _load_kv_block(k_base, v_base, start_n, kv_len, stride_ks, stride_kd, stride_vs, stride_vd,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """K and V rows start_n .. start_n + BLOCK_N, (BLOCK_N, HEAD_DIM) each, and the key mask
    ``offs_n < kv_len``; only the MASKED (tail) block loads under that mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    n_ok = offs_n < kv_len
    if MASKED:
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v, n_ok


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n, kv_len, stride_ks, stride_kd,
               stride_vs, stride_vd, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One K/V block of the online softmax; MASKED only for the block holding key n_b."""
    k, v, n_ok = _load_kv_block(k_base, v_base, start_n, kv_len, stride_ks, stride_kd,
                                stride_vs, stride_vd, HEAD_DIM, BLOCK_N, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                         (64, 128, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)]
]


@tuned(_FWD_CONFIGS, key=["seq_len", "HEAD_DIM"], interpret=_INTERP)
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, LENS,
                     stride_qb, stride_qs, stride_qh, stride_qd,
                     stride_kb, stride_ks, stride_kh, stride_kd,
                     stride_vb, stride_vs, stride_vh, stride_vd,
                     stride_ob, stride_os, stride_oh, stride_od,
                     seq_len, num_heads, num_vision, qk_scale,
                     HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_len = _key_limit(LENS, b, num_vision, seq_len)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < seq_len
    q_ptrs = (Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (kv_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n, kv_len,
                                   stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                   HEAD_DIM, BLOCK_N, False, DOT_PREC)
    if n_full < kv_len:
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, n_full, kv_len,
                                   stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                   HEAD_DIM, BLOCK_N, True, DOT_PREC)

    out = acc / l_i[:, None]
    o_ptrs = (O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    tl.store(LSE + pid_bh * seq_len + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_preprocess(O, DO, DLSE, DELTA,
                         stride_ob, stride_os, stride_oh, stride_od,
                         stride_dob, stride_dos, stride_doh, stride_dod,
                         seq_len, num_heads,
                         HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """delta[b, h, s] = sum_d dO * O - dlse (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < seq_len
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
                + offs_d[None, :] * stride_od, mask=m_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :] * stride_dod, mask=m_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh * seq_len + offs_m, mask=m_ok, other=0.0)
    tl.store(DELTA + pid_bh * seq_len + offs_m, delta, mask=m_ok)


_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 128, 4, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3),
                         (16, 128, 4, 3)]
]


@tuned(_DKDV_CONFIGS, key=["seq_len", "HEAD_DIM"], interpret=_INTERP)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, LENS,
                          stride_qb, stride_qs, stride_qh, stride_qd,
                          stride_kb, stride_ks, stride_kh, stride_kd,
                          stride_vb, stride_vs, stride_vh, stride_vd,
                          stride_dob, stride_dos, stride_doh, stride_dod,
                          stride_gb, stride_gs, stride_gh, stride_gd,
                          seq_len, num_heads, num_vision, sm_scale, qk_scale,
                          HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_len = _key_limit(LENS, b, num_vision, seq_len)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < kv_len
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks
                + offs_d[None, :] * stride_kd, mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs
                + offs_d[None, :] * stride_vd, mask=n_ok[:, None], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = pid_bh * seq_len

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # a key block wholly past the key limit skips the loop: its gradients are exactly zero
    q_end = tl.where(start_n < kv_len, seq_len, 0)
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_len
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                     mask=m_ok[:, None], other=0.0)
        # +inf log-sum-exp for rows past S makes their probabilities exactly 0
        lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
                           - lse2[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)

    # rows past the key limit never feed other rows; write their exact (zero) gradient
    dk = tl.where(n_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(n_ok[:, None], dv, 0.0)
    out_off = (b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gs
               + offs_d[None, :] * stride_gd)
    store_ok = (offs_n < seq_len)[:, None]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, kv_len, stride_ks, stride_kd,
              stride_vs, stride_vd, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    k, v, n_ok = _load_kv_block(k_base, v_base, start_n, kv_len, stride_ks, stride_kd,
                                stride_vs, stride_vd, HEAD_DIM, BLOCK_N, MASKED)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
                     - lse2[:, None])
    if MASKED:
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2),
                         (64, 32, 4, 3)]
]


@tuned(_DQ_CONFIGS, key=["seq_len", "HEAD_DIM"], interpret=_INTERP)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LENS,
                        stride_qb, stride_qs, stride_qh, stride_qd,
                        stride_kb, stride_ks, stride_kh, stride_kd,
                        stride_vb, stride_vs, stride_vh, stride_vd,
                        stride_dob, stride_dos, stride_doh, stride_dod,
                        stride_gb, stride_gs, stride_gh, stride_gd,
                        seq_len, num_heads, num_vision, sm_scale, qk_scale,
                        HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_len = _key_limit(LENS, b, num_vision, seq_len)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :] * stride_dod, mask=m_ok[:, None], other=0.0)
    row = pid_bh * seq_len + offs_m
    lse2 = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (kv_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, kv_len, stride_ks,
                       stride_kd, stride_vs, stride_vd, qk_scale, HEAD_DIM, BLOCK_N, False,
                       DOT_PREC)
    if n_full < kv_len:
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, n_full, kv_len, stride_ks,
                       stride_kd, stride_vs, stride_vd, qk_scale, HEAD_DIM, BLOCK_N, True,
                       DOT_PREC)
    dq_ptrs = (DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs
               + offs_d[None, :] * stride_gd)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


# ----------------------------------------------------------------------------- launchers

def _check(q, k, v, text_lengths) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_supported(_OP, name, t)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{_OP}: head dim {q.shape[-1]} is not supported by the Triton kernel; "
                         f"supported: {HEAD_DIMS}")
    if text_lengths.device != q.device:
        raise ValueError(f"{_OP}: text_lengths is on {text_lengths.device}, q on {q.device}")


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())  # (b, s, h, d)


def _sequence_major_like(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, S, H, Dh) tensor stored as (S, B, H, Dh): the encoder's layout
    (:mod:`oneref.ops.layout`), so the (B, S, D) view of an output needs no copy."""
    batch, seq, heads, head_dim = q.shape
    return q.new_empty((seq, batch, heads, head_dim)).transpose(0, 1)


def attention_forward(q, k, v, text_lengths, num_vision: int, scale: float):
    """Launch the forward. q, k, v: (B, S, H, Dh) strided. Returns (o (B, S, H, Dh)
    sequence-major, lse (B, H, S) fp32 natural-log log-sum-exp)."""
    _check(q, k, v, text_lengths)
    batch, seq, heads, head_dim = q.shape
    o = _sequence_major_like(q)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    lens = text_lengths.contiguous()
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_fwd_kernel[grid](q, k, v, o, lse, lens, *_strides(q), *_strides(k), *_strides(v),
                           *_strides(o), seq, heads, num_vision, scale * _LOG2E,
                           HEAD_DIM=head_dim, DOT_PREC=dot_precision(q.dtype))
    return o, lse


def attention_backward(do, q, k, v, o, lse, text_lengths, num_vision: int, scale: float,
                       dlse=None, grads=None):
    """Launch the backward into ``grads`` = (dq, dk, dv), three (B, S, H, Dh) tensors in q's
    dtype with one set of strides (None: fresh sequence-major tensors), and return them.
    ``dlse`` (B, H, S) is the gradient of the log-sum-exp output (None: zero)."""
    batch, seq, heads, head_dim = q.shape
    lens = text_lengths.contiguous()
    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse_arg = dlse.float().contiguous() if has_dlse else delta
    pre_block = 64
    _attn_bwd_preprocess[(triton.cdiv(seq, pre_block), batch * heads)](
        o, do, dlse_arg, delta, *_strides(o), *_strides(do), seq, heads,
        HEAD_DIM=head_dim, HAS_DLSE=has_dlse, BLOCK_M=pre_block)
    dq, dk, dv = grads if grads is not None else (_sequence_major_like(q) for _ in range(3))
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
              seq, heads, num_vision, scale, scale * _LOG2E)
    prec = dot_precision(q.dtype)
    grid_kv = lambda meta: (triton.cdiv(seq, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, lens, *common,
                                   HEAD_DIM=head_dim, DOT_PREC=prec)
    grid_q = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, lens, *common,
                                HEAD_DIM=head_dim, DOT_PREC=prec)
    return dq, dk, dv


def packed_attention_backward(do, qkv, o, lse, text_lengths, num_vision: int, scale: float,
                              dlse=None):
    """The backward of the packed form: one (B, S, 3, H, Dh) gradient with the strides of
    ``qkv`` (the QKV projection's output; contiguous if ``qkv`` is not dense), into which the
    kernels write dq, dk and dv directly: no gradient stack."""
    dqkv = torch.empty_like(qkv)
    attention_backward(do, *qkv.unbind(2), o, lse, text_lengths, num_vision, scale, dlse,
                       grads=dqkv.unbind(2))
    return dqkv


# ----------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("oneref_triton::multiway_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  text_lengths: torch.Tensor, num_vision: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, text_lengths, num_vision, scale)


@torch.library.custom_op("oneref_triton::packed_multiway_attention", mutates_args=())
def _packed_attention_op(qkv: torch.Tensor, text_lengths: torch.Tensor, num_vision: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(*qkv.unbind(2), text_lengths, num_vision, scale)


def _forward_fake(q):
    batch, seq, heads, _ = q.shape
    return _sequence_major_like(q), q.new_empty((batch, heads, seq), dtype=torch.float32)


_attention_op.register_fake(lambda q, *args: _forward_fake(q))
_packed_attention_op.register_fake(lambda qkv, *args: _forward_fake(qkv[:, :, 0]))


@torch.library.custom_op("oneref_triton::multiway_attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                           dlse: torch.Tensor | None, text_lengths: torch.Tensor,
                           num_vision: int, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse, text_lengths, num_vision, scale, dlse)


@_attention_backward_op.register_fake
def _attention_backward_fake(do, q, *args):
    return tuple(_sequence_major_like(q) for _ in range(3))


@torch.library.custom_op("oneref_triton::packed_multiway_attention_backward", mutates_args=())
def _packed_attention_backward_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor,
                                  lse: torch.Tensor, dlse: torch.Tensor | None,
                                  text_lengths: torch.Tensor, num_vision: int,
                                  scale: float) -> torch.Tensor:
    return packed_attention_backward(do, qkv, o, lse, text_lengths, num_vision, scale, dlse)


@_packed_attention_backward_op.register_fake
def _packed_attention_backward_fake(do, qkv, *args):
    return torch.empty_like(qkv)


def _save(ctx, tensors, num_vision: int, scale: float) -> None:
    ctx.save_for_backward(*tensors)
    ctx.set_materialize_grads(False)  # an unused lse gets None, not a zeros tensor
    ctx.num_vision = num_vision
    ctx.scale = scale


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, text_lengths, num_vision, scale = inputs
    _save(ctx, (q, k, v, *output, text_lengths), num_vision, scale)


def _packed_setup_context(ctx, inputs, output) -> None:
    qkv, text_lengths, num_vision, scale = inputs
    _save(ctx, (qkv, *output, text_lengths), num_vision, scale)


def _grad_out(grad_o, o):
    return torch.zeros_like(o) if grad_o is None else grad_o


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, text_lengths = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(_grad_out(grad_o, o), q, k, v, o, lse, grad_lse,
                                        text_lengths, ctx.num_vision, ctx.scale)
    return dq, dk, dv, None, None, None


def _packed_backward(ctx, grad_o, grad_lse):
    qkv, o, lse, text_lengths = ctx.saved_tensors
    dqkv = _packed_attention_backward_op(_grad_out(grad_o, o), qkv, o, lse, grad_lse,
                                         text_lengths, ctx.num_vision, ctx.scale)
    return dqkv, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
_packed_attention_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


def _valid_keys(text_lengths: torch.Tensor, num_vision: int, batch: int, seq: int) -> int:
    """sum_b n_b, or B * S when the lengths are not real values (fake/meta tensors)."""
    try:
        if text_lengths.device.type == "meta":
            raise RuntimeError
        return int((num_vision + text_lengths.long()).clamp(0, seq).sum().item())
    except Exception:  # noqa: BLE001 - fake tensors cannot be read
        return batch * seq


def _forward_flops(q, text_lengths, num_vision) -> int:
    """4 H S Dh per valid key and sample: the two matmuls of the forward; q (B, S, H, Dh)."""
    batch, seq, heads, head_dim = q.shape
    return 4 * heads * seq * head_dim * _valid_keys(text_lengths, num_vision, batch, seq)


@register_flop_formula(torch.ops.oneref_triton.multiway_attention, get_raw=True)
def _attention_flops(q, k, v, text_lengths, num_vision, scale, *args, out_val=None, **kwargs):
    return _forward_flops(q, text_lengths, num_vision)


@register_flop_formula(torch.ops.oneref_triton.packed_multiway_attention, get_raw=True)
def _packed_attention_flops(qkv, text_lengths, num_vision, scale, *args, out_val=None,
                            **kwargs):
    return _forward_flops(qkv[:, :, 0], text_lengths, num_vision)


@register_flop_formula(torch.ops.oneref_triton.multiway_attention_backward, get_raw=True)
def _attention_backward_flops(do, q, k, v, o, lse, dlse, text_lengths, num_vision, scale,
                              *args, out_val=None, **kwargs):
    return 5 * _forward_flops(q, text_lengths, num_vision) // 2


@register_flop_formula(torch.ops.oneref_triton.packed_multiway_attention_backward, get_raw=True)
def _packed_attention_backward_flops(do, qkv, o, lse, dlse, text_lengths, num_vision, scale,
                                     *args, out_val=None, **kwargs):
    return 5 * _forward_flops(qkv[:, :, 0], text_lengths, num_vision) // 2


def _checked_scale(scale: float | None, head_dim: int) -> float:
    scale = float(head_dim ** -0.5 if scale is None else scale)
    if not math.isfinite(scale):
        raise ValueError(f"{_OP}: scale must be finite, got {scale}")
    return scale


def multiway_attention(q, k, v, text_lengths, num_vision: int, scale: float | None = None,
                       *, key_mask=None):
    """Triton multiway attention (the ``triton`` backend of :func:`oneref.ops.multiway_attention`).

    q, k, v: (B, S, H, Dh) fp32/fp16/bf16 with any strides, Dh in {16, 32, 64, 128};
    text_lengths: (B,) int; keys at positions >= num_vision + text_lengths[b] are ignored
    (the kernels read the lengths, so a prebuilt ``key_mask`` is not used).
    Returns (B, S, H, Dh) sequence-major in q's dtype; differentiable in q, k, v.
    """
    scale = _checked_scale(scale, q.shape[-1])
    return _attention_op(q, k, v, text_lengths, int(num_vision), scale)[0]


def packed_multiway_attention(qkv, text_lengths, num_vision: int, scale: float | None = None,
                              *, key_mask=None):
    """:func:`multiway_attention` of ``qkv.unbind(2)`` for a packed (B, S, 3, H, Dh) ``qkv``
    (the ``triton`` backend of :func:`oneref.ops.packed_multiway_attention`). Its backward
    writes the (B, S, 3, H, Dh) gradient with ``qkv``'s strides."""
    scale = _checked_scale(scale, qkv.shape[-1])
    return _packed_attention_op(qkv, text_lengths, int(num_vision), scale)[0]
