"""The ``torch`` backend: PyTorch on any device.

Most ops run their readable definition from :mod:`oneref.ops.reference` (the registry,
:mod:`oneref.ops.registry`, points at it). Three hot paths use a faster PyTorch composite
with the same contract (tested against the reference):

* ``multiway_attention`` runs :func:`torch.nn.functional.scaled_dot_product_attention` with a
  bool key-padding mask (fused CPU flash kernel; memory-efficient or cuDNN kernel on GPU)
  instead of materialising the fp32 score matrix. Its packed form unbinds q, k, v so that
  their gradients are stacked sequence-major.
* ``multiway_linear`` runs each expert once over the rows of its range (one ``addmm``)
  and writes each range of the output and of the input gradient once. Autograd's slice +
  cat composite instead zero-fills a full-size input gradient per expert and adds the two.
  :func:`multiway_layer_norm` does the same around the native LayerNorm kernels. Together they took
  about 7% off the CPU training step of the ``small`` model.
* The LayerNorms write each output and input gradient once, in its final dtype: the copy of
  an expert's block into the sequence-major result is also the cast (bf16 out for the next
  GEMM; a bf16 input's gradient back in bf16). :func:`multiway_add_layer_norm`'s backward
  adds h's own gradient into the LayerNorm's input gradient as it writes it, and scales and
  casts the branch's gradient in one pass; the FFN's sub-LN takes the GELU's derivative as it
  writes its input gradient. Counted by ``oneref bench --cost``, that took a OneRef-B step
  at batch 64 from 268 to 214 GB moved (docs/perf.md, "Bytes").
* On CUDA the native LayerNorm kernels take a bf16 input as it is (fp32 statistics and
  parameter-gradient sums): the sub-LNs, bf16 in and out, run on them in bf16 instead of on
  an fp32 copy (:data:`NATIVE_BF16_DEVICES`; called with autocast off, which would run them
  in fp32); the fp32 residual stream stays fp32. That took the same step from 214 to 165
  GB. Where the output is in the compute dtype (those sub-LNs; an fp32 model), one
  LayerNorm call over all rows with the larger expert's parameters writes the output where
  it stands, and only the other expert's rows are normalised again and copied: 159 GB.
* The outputs of these three ops, and the input gradients of the multiway linear and
  LayerNorm, are sequence-major (:mod:`oneref.ops.layout`), the layout the encoder keeps
  its hidden states in. On such inputs each expert's rows are a contiguous block: the GEMMs
  read their rows as views and write their blocks in place, with no split or join copies.
  That took another 7% off the same step (71.4 vs 76.8 ms, median of 8 alternating runs in
  one process, 2 threads).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from oneref.ops import reference
from oneref.ops.cast import cast_floating


def multiway_attention(q, k, v, text_lengths, num_vision: int, scale: float | None = None,
                       *, key_mask=None):
    """SDPA over (B, H, S, Dh) views with a (B, 1, 1, S) bool mask (True = attend): the
    caller's ``key_mask``, else built from the lengths."""
    valid = (reference.key_padding_mask(text_lengths, num_vision, q.shape[1])
             if key_mask is None else key_mask)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale,
    )
    # (B, H, S, Dh) -> (B, S, H, Dh) stored sequence-major (the one copy the layout change
    # needs), so the model's (B, S, D) view of it is sequence-major too.
    return out.permute(2, 0, 1, 3).contiguous().transpose(0, 1)


def packed_multiway_attention(qkv, text_lengths, num_vision: int, scale: float | None = None,
                              *, key_mask=None):
    """:func:`multiway_attention` of q, k, v taken from the (S, B, 3, H, Dh) view of ``qkv``:
    autograd stacks their gradients in that shape, so the packed gradient comes out
    sequence-major, the layout the QKV projection's backward reads without a copy."""
    q, k, v = (t.transpose(0, 1) for t in qkv.transpose(0, 1).unbind(2))
    return multiway_attention(q, k, v, text_lengths, num_vision, scale, key_mask=key_mask)


def _position_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, S, D) -> its (S * B, D) rows in position-major order: a view when x is
    sequence-major, else a copy."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _expert_rows(x: torch.Tensor, num_vision: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, D) -> the vision rows (num_vision * B, D) and the text rows of
    :func:`_position_rows`."""
    rows, split = _position_rows(x), num_vision * x.shape[0]
    return rows[:split], rows[split:]


def _empty_joint(like: torch.Tensor, width: int, num_vision: int, dtype=None
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """An uninitialised sequence-major (B, S, width) tensor shaped like ``like``'s first two
    dims (of ``like``'s dtype by default), and its two row blocks as 2-D views
    (position-major, as :func:`_expert_rows`)."""
    batch, seq = like.shape[:2]
    out = like.new_empty(seq, batch, width, dtype=dtype or like.dtype)
    return out.transpose(0, 1), (out[:num_vision].view(-1, width),
                                 out[num_vision:].view(-1, width))


def _by_expert(like: torch.Tensor, width: int, num_vision: int, dtype, block) -> torch.Tensor:
    """A new sequence-major (B, S, width) tensor of ``dtype`` (B, S: ``like``'s) whose
    expert ``i`` rows are ``block(i, out)``. Eager, ``block`` writes them into ``out``, a
    view of the result (no copy). Compiled, it returns them (``out`` is None) and one
    ``cat`` joins the two, which inductor has each kernel write in place: a write into a view
    would be functionalised into a copy of the whole tensor (``slice_scatter``)."""
    if torch.compiler.is_compiling():
        batch, seq = like.shape[:2]
        joined = torch.cat([block(i, None).to(dtype) for i in range(2)])
        return joined.view(seq, batch, width).transpose(0, 1)
    y, blocks = _empty_joint(like, width, num_vision, dtype)
    for i, out in enumerate(blocks):
        block(i, out)
    return y


def _joint_matmul(like: torch.Tensor, num_vision: int, rows, weights, biases=(None, None)
                  ) -> torch.Tensor:
    """The sequence-major (B, S, N) tensor (``like``'s dtype) whose expert blocks are
    ``rows[i] @ weights[i] (+ biases[i])``, each GEMM writing its block (:func:`_by_expert`)."""
    def block(i, out):
        if biases[i] is None:
            return torch.mm(rows[i], weights[i], out=out)
        return torch.addmm(biases[i], rows[i], weights[i], out=out)

    return _by_expert(like, weights[0].shape[1], num_vision, like.dtype, block)


class _MultiwayLinear(torch.autograd.Function):
    """y = [x_A W_A^T + b_A | x_B W_B^T + b_B] over the two row ranges (GELU applied outside).

    y and the input gradient are sequence-major and each expert's GEMM writes its block of
    them directly; on a sequence-major input nothing is split or joined by copies."""

    @staticmethod
    def forward(ctx, x, num_vision: int, weight_a, bias_a, weight_b, bias_b):
        rows = _expert_rows(x, num_vision)
        y = _joint_matmul(x, num_vision, rows, (weight_a.t(), weight_b.t()), (bias_a, bias_b))
        ctx.save_for_backward(*rows, weight_a, weight_b)
        ctx.num_vision, ctx.has_bias = num_vision, (bias_a is not None, bias_b is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        rows_a, rows_b, weight_a, weight_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_rows = _expert_rows(grad_y, ctx.num_vision)
        grad_x = (_joint_matmul(grad_y, ctx.num_vision, grad_rows, (weight_a, weight_b))
                  if needs[0] else None)
        grads = []
        for grad, rows, has_bias, (need_w, need_b) in zip(
                grad_rows, (rows_a, rows_b), ctx.has_bias, (needs[2:4], needs[4:6])):
            grads.append(grad.t() @ rows if need_w else None)
            grads.append(grad.sum(0) if has_bias and need_b else None)
        return (grad_x, None, *grads)


def multiway_linear(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                    activation: str = "none"):
    y = _MultiwayLinear.apply(x, num_vision, weight_a, bias_a, weight_b, bias_b)
    return F.gelu(y) if activation == "gelu" else y


#: Device types whose native LayerNorm kernels take a bf16 input as it is: fp32 statistics,
#: and fp32 sums for the parameter gradients (CUDA's). Elsewhere the LayerNorms run on an
#: fp32 copy: the CPU's bf16 backward sums the parameter gradients with about 5% relative
#: error (fp32: 1e-6; 4096 rows of 3072, measured 2026-12-07).
NATIVE_BF16_DEVICES = frozenset({"cuda"})


def _norm_dtype(dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device
                ) -> torch.dtype:
    """The dtype the native LayerNorm kernels compute in for a ``dtype`` input and an
    ``out_dtype`` output on ``device`` (the parameters are cast to it): bf16 for bf16 in and
    out on :data:`NATIVE_BF16_DEVICES`, else fp32 (fp64 stays). fp16 stays off the native
    path: its parameter gradients, summed over every row, could overflow."""
    if dtype == out_dtype == torch.bfloat16 and device.type in NATIVE_BF16_DEVICES:
        return dtype
    return torch.promote_types(dtype, torch.float32)


@contextlib.contextmanager
def native_bf16_on(device_type: str):
    """Run the LayerNorms of bf16 inputs natively on ``device_type`` as well (the cost count
    of ``oneref bench --cost`` counts the CUDA step on CPU tensors)."""
    global NATIVE_BF16_DEVICES
    devices = NATIVE_BF16_DEVICES
    NATIVE_BF16_DEVICES = devices | {device_type}
    try:
        yield
    finally:
        NATIVE_BF16_DEVICES = devices


def _without_autocast(device: torch.device):
    """CUDA autocast runs ``native_layer_norm`` in fp32: the composites pick its dtype."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _norm_in_place(rows, experts, split: int, eps: float):
    """LayerNorm of the position-major ``rows`` into one new tensor: a call over all of them
    with the larger expert's parameters, then the other expert's rows again, copied over
    their block. Returns it and each expert's (mean, rstd)."""
    width = rows.shape[-1]
    base = 0 if 2 * split >= rows.shape[0] else 1
    halves = (slice(None, split), slice(split, None))
    joint, mean, rstd = torch.native_layer_norm(rows, (width,), *experts[base][1:], eps)
    other_rows, weight, bias = experts[1 - base]
    out, *other_stats = torch.native_layer_norm(other_rows, (width,), weight, bias, eps)
    joint[halves[1 - base]].copy_(out)
    stats = [(mean[halves[base]], rstd[halves[base]]), tuple(other_stats)]
    return joint, stats if base == 0 else stats[::-1]


def _norm_forward(x, num_vision: int, params, eps: float, out_dtype):
    """Native LayerNorm of each expert's rows of x in the dtype of :func:`_norm_dtype` (the
    parameters' too), as a new sequence-major output of ``out_dtype``. Returns the output
    and what :func:`_norm_backward` reads.

    Eager with the output in the compute dtype, the output is written where it stands
    (:func:`_norm_in_place`); otherwise each expert's output is copied into its block, the
    copy being the cast (:func:`_by_expert`)."""
    batch, seq, width = x.shape
    with _without_autocast(x.device):
        x = x.to(_norm_dtype(x.dtype, out_dtype, x.device))
        rows, split = _position_rows(x), num_vision * batch
        experts = ((rows[:split], *params[:2]), (rows[split:], *params[2:]))
        if out_dtype == x.dtype and not torch.compiler.is_compiling():
            joint, stats = _norm_in_place(rows, experts, split, eps)
            y = joint.view(seq, batch, width).transpose(0, 1)
        else:
            outs, stats = [], []
            for expert_rows, weight, bias in experts:
                out, *expert_stats = torch.native_layer_norm(expert_rows, (width,), weight,
                                                             bias, eps)
                outs.append(out)
                stats.append(expert_stats)
            y = _by_expert(x, width, num_vision, out_dtype,
                           lambda i, block: outs[i] if block is None else block.copy_(outs[i]))
    saved = []
    for (expert_rows, weight, bias), (mean, rstd) in zip(experts, stats):
        saved += [expert_rows, mean, rstd, weight, bias]
    return y, saved


def _norm_backward(saved, grad_y, num_vision: int, needs_input: bool, needs_params,
                   input_dtype, residual=None, gelu_input=None):
    """Input gradient of :func:`_norm_forward`, written block by block into a new
    sequence-major tensor of ``input_dtype`` (:func:`_by_expert`): with ``residual`` added,
    or taken back through the GELU of ``gelu_input`` (the LayerNorm's input was
    GELU(gelu_input)) as it is written. Returns it and the four parameter gradients."""
    width = grad_y.shape[-1]
    grad_rows = _expert_rows(grad_y.to(saved[0].dtype), num_vision)
    extra = residual if residual is not None else gelu_input
    extra_rows = _expert_rows(extra, num_vision) if extra is not None and needs_input else None
    grads = [None] * 4

    def expert(i, out=None):
        """Expert i's backward: its parameter gradients into ``grads``, its input gradient
        written into ``out`` (or returned)."""
        rows, mean, rstd, weight, bias = saved[5 * i:5 * i + 5]
        need_w, need_b = needs_params[2 * i:2 * i + 2]
        dx, grads[2 * i], grads[2 * i + 1] = torch.ops.aten.native_layer_norm_backward(
            grad_rows[i], rows, (width,), mean, rstd, weight, bias,
            [needs_input, need_w and weight is not None, need_b and bias is not None])
        if dx is None:
            return None
        if residual is not None:
            return torch.add(dx, extra_rows[i], out=out)
        if gelu_input is not None and out is None:
            return torch.ops.aten.gelu_backward(dx, extra_rows[i])
        if gelu_input is not None:
            return torch.ops.aten.gelu_backward.grad_input(dx, extra_rows[i], grad_input=out)
        return dx if out is None else out.copy_(dx)

    if not needs_input:
        for i in range(2):
            expert(i)
        return None, grads
    return _by_expert(grad_y, width, num_vision, input_dtype, expert), grads


class _MultiwayLayerNorm(torch.autograd.Function):
    """Native LayerNorm per expert over its row range (forward and backward kernels) of x,
    or of GELU(x) taken in x's dtype; the output and the input gradient are sequence-major,
    like :class:`_MultiwayLinear`'s, and written in their final dtype (no separate cast).
    The GELU's backward reads the LayerNorm's input gradient and writes x's gradient."""

    @staticmethod
    def forward(ctx, x, num_vision: int, weight_a, bias_a, weight_b, bias_b, eps: float,
                activation: str, out_dtype):
        gelu = activation == "gelu"
        y, saved = _norm_forward(F.gelu(x) if gelu else x, num_vision,
                                 (weight_a, bias_a, weight_b, bias_b), eps, out_dtype)
        ctx.save_for_backward(*saved, x if gelu and ctx.needs_input_grad[0] else None)
        ctx.num_vision, ctx.input_dtype = num_vision, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        needs = ctx.needs_input_grad
        *saved, gelu_input = ctx.saved_tensors
        grad_x, grads = _norm_backward(saved, grad_y, ctx.num_vision, needs[0], needs[2:6],
                                       ctx.input_dtype, gelu_input=gelu_input)
        return (grad_x, None, *grads, None, None, None)


def _add_scaled(x, branch, scale, dtype):
    """x + scale[i] * branch for each sample i, computed in the promoted dtype (fp32 for a
    bf16 stream and an fp32 drop-path scale) and written once in ``dtype``: sequence-major
    when x is, else contiguous batch-major (``out=`` contiguous, as Dynamo traces it)."""
    dims = (1, 0, 2) if x.transpose(0, 1).is_contiguous() else (0, 1, 2)
    h = x.new_empty(x.permute(dims).shape, dtype=dtype)
    torch.addcmul(x.permute(dims), branch.permute(dims), scale[:, None, None].permute(dims),
                  out=h)
    return h.permute(dims)


class _MultiwayAddLayerNorm(torch.autograd.Function):
    """h = x + scale * branch in ``dtype``, then :class:`_MultiwayLayerNorm` of h. The
    backward adds h's own gradient to the LayerNorm's input gradient as it writes it, and
    scales and casts the branch's gradient in one pass: no separate sum, scale or cast of
    the residual gradient."""

    @staticmethod
    def forward(ctx, x, branch, branch_scale, num_vision: int, weight_a, bias_a, weight_b,
                bias_b, eps: float, dtype, out_dtype):
        h = (x.to(dtype) + branch if branch_scale is None
             else _add_scaled(x, branch, branch_scale, dtype))
        y, saved = _norm_forward(h, num_vision, (weight_a, bias_a, weight_b, bias_b), eps,
                                 out_dtype)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(*saved, branch_scale, branch if needs[2] else None)
        ctx.num_vision, ctx.dtypes = num_vision, (x.dtype, branch.dtype, h.dtype)
        ctx.set_materialize_grads(False)
        # Fresh views as the outputs: torch 2.11's Dynamo can route an output's gradient to
        # the wrong slot when a tensor it traced before an in-place write is also returned
        # (pytorch#180642, fixed in 2.12); a compiled step then lost h's gradient.
        h, y = h.view_as(h), y.view_as(y)
        if not any(needs[:3]):
            ctx.mark_non_differentiable(h)
        return h, y

    @staticmethod
    def backward(ctx, grad_h, grad_y):
        needs = ctx.needs_input_grad
        *saved, branch_scale, branch = ctx.saved_tensors
        x_dtype, branch_dtype, h_dtype = ctx.dtypes
        grads = [None] * 4
        if grad_y is None:
            total = grad_h
        else:
            total, grads = _norm_backward(saved, grad_y, ctx.num_vision, any(needs[:3]),
                                          needs[4:8], h_dtype, residual=grad_h)
        grad_x = grad_branch = grad_scale = None
        if total is not None and needs[0]:
            grad_x = total.to(x_dtype)
        if total is not None and needs[1]:
            if branch_scale is None:
                grad_branch = total.to(branch_dtype)
            else:  # sequence-major, so that out= is contiguous (what Dynamo traces)
                grad_branch = total.new_empty(total.transpose(0, 1).shape, dtype=branch_dtype)
                torch.mul(total.transpose(0, 1), branch_scale[:, None], out=grad_branch)
                grad_branch = grad_branch.transpose(0, 1)
        if total is not None and needs[2]:  # summed in fp32 (fp64 stays) whatever h's dtype
            acc = torch.promote_types(total.dtype, torch.float32)
            grad_scale = (total.to(acc) * branch).sum((1, 2)).to(branch_scale.dtype)
        return (grad_x, grad_branch, grad_scale, None, *grads, None, None, None)


def multiway_layer_norm(x, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                        eps: float = 1e-5, activation: str = "none", out_dtype=None):
    """Native LayerNorm per expert (in the dtype of :func:`_norm_dtype`) of x, or of its
    exact GELU (taken in x's dtype, as the unfused GELU would be)."""
    out_dtype = out_dtype or x.dtype
    params = cast_floating((weight_a, bias_a, weight_b, bias_b),
                           _norm_dtype(x.dtype, out_dtype, x.device))
    return _MultiwayLayerNorm.apply(x, num_vision, *params, eps, activation, out_dtype)


def multiway_add_layer_norm(x, branch, num_vision: int, weight_a, bias_a, weight_b, bias_b,
                            eps: float = 1e-5, branch_scale=None, out_dtype=None):
    """One add (``addcmul`` with the drop-path scale) into the promoted dtype, then the
    LayerNorm of :func:`multiway_layer_norm`; h keeps x's layout (sequence-major in the
    encoder)."""
    dtype = torch.promote_types(x.dtype, branch.dtype)
    out_dtype = out_dtype or dtype
    params = cast_floating((weight_a, bias_a, weight_b, bias_b),
                           _norm_dtype(dtype, out_dtype, x.device))
    return _MultiwayAddLayerNorm.apply(x, branch, branch_scale, num_vision, *params, eps, dtype,
                                       out_dtype)


def unavailable_reasons(device: torch.device | None) -> list[str]:
    return []
