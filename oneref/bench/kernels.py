"""Kernel tables: G1 (attention), G2 (memory-bound ops), G3 (linear cross-entropy).

Every implementation is checked against :mod:`oneref.ops.reference` on the first input set
before it is timed; implementations that cannot run here become rows with ``skipped`` and
the reason. Conventions:

* attention FLOPs = 4 * B * H * S * S * Dh forward (QK^T and PV over the padded sequence),
  backward = 2.5 x forward (so fwd+bwd = 3.5 x forward), as FlashAttention reports them;
* memory-bound ops: GB/s = the bytes the fused op must move (``oneref.ops.cases``: each
  case's count, its backward included where it trains) / time, against the measured device
  copy bandwidth (read + write).
"""

from __future__ import annotations

import functools
import itertools
import logging
import statistics

import torch
import torch.nn.functional as F

from oneref import ops
from oneref.bench.timing import sync, time_calls
from oneref.ops import backend_status, reference
from oneref.ops.cases import CASES
from oneref.ops.registry import not_supported_reasons

__all__ = ["ATTENTION_OPS", "bench_call", "attention_rows", "memory_rows", "lce_rows",
           "iter_kernel_rows", "run_kernel_tables"]

log = logging.getLogger(__name__)


def bench_call(fn, inputs, device: torch.device, repeats: int = 20) -> float:
    """Median milliseconds of ``fn(inputs[i])``, rotating the input sets: triton's
    ``do_bench`` on CUDA, timed calls on CPU."""
    cycle = itertools.cycle(inputs)
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(lambda: fn(next(cycle)), warmup=25, rep=100, return_mode="median")
    return 1e3 * statistics.median(time_calls(fn, inputs, device, 1, min(repeats, 5)))


def _backends(device: torch.device) -> list[str]:
    """Our backends that can run on ``device`` (explicit names, then auto)."""
    if device.type != "cuda":
        return ["torch"]
    status = backend_status(device)
    return [name for name in ("cuda", "triton") if not status[name]] + ["auto"]


def _skip(op: str, impl: str, reason: str, **extra) -> dict:
    return {"op": op, "impl": impl, "skipped": reason, **extra}


# ---------------------------------------------------------------------------- attention --
def _attn_inputs(batch, heads, head_dim, num_vision, text_len, device, dtype, seed):
    """The shared attention case at this shape (``oneref.ops.cases``), q, k, v made
    contiguous: every implementation of a row gets the same layout."""
    q, k, v, lengths = CASES["multiway_attention"].inputs(
        seed, device, dtype, scale=1, batch=batch, text=text_len, heads=heads,
        head_dim=head_dim, vision=num_vision)[:4]
    return q.contiguous(), k.contiguous(), v.contiguous(), lengths


def _sdpa_call(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v, lengths, num_vision):
        mask = reference.key_padding_mask(lengths, num_vision, q.shape[2])[:, None, None, :]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return call


def _xformers_call():
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalPaddedKeysMask

    def call(q, k, v, lengths, num_vision):
        batch, seq, heads, dim = q.shape
        bias = BlockDiagonalPaddedKeysMask.from_seqlens(
            q_seqlen=[seq] * batch, kv_padding=seq,
            kv_seqlen=(lengths + num_vision).tolist())
        out = xops.memory_efficient_attention(
            q.reshape(1, batch * seq, heads, dim), k.reshape(1, batch * seq, heads, dim),
            v.reshape(1, batch * seq, heads, dim), attn_bias=bias)
        return out.view(batch, seq, heads, dim)
    return call


#: The two attention ops of G1: q, k, v given apart, and the packed projection the encoder
#: passes (the same kernels; the backward writes one gradient laid out like the projection).
ATTENTION_OPS = ("multiway_attention", "packed_multiway_attention")


def _attention_impls(device):
    """(op, impl, layout, fn) per implementation: fn(q, k, v, lengths, num_vision) for
    layouts "bshd" and "bhsd", fn(qkv, lengths, num_vision) for "packed"; layout "skip" with
    the reason as fn."""
    impls = [("multiway_attention", f"ours[{name}]", "bshd",
              lambda q, k, v, l, nv, _b=name: ops.multiway_attention(q, k, v, l, nv, backend=_b))
             for name in _backends(device)]
    try:
        from torch.nn.attention import SDPBackend
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            impls.append(("multiway_attention", f"sdpa[{backend.name.lower()}]", "bhsd",
                          _sdpa_call(backend)))
    except ImportError as exc:
        impls.append(("multiway_attention", "sdpa", "skip", str(exc)))
    if device.type == "cuda":
        try:
            impls.append(("multiway_attention", "xformers", "bshd", _xformers_call()))
        except ImportError as exc:
            impls.append(("multiway_attention", "xformers", "skip",
                          f"xformers not importable ({exc})"))
    # the packed form (what the encoder calls), timed against the same baselines
    impls += [("packed_multiway_attention", f"ours[{name}]", "packed",
               lambda qkv, l, nv, _b=name: ops.packed_multiway_attention(qkv, l, nv, backend=_b))
              for name in _backends(device)]
    return impls


def _laid_out(layout: str, q, k, v, lengths) -> tuple:
    """The arguments of an implementation of ``layout`` from contiguous (B, S, H, Dh) q, k,
    v: as they are, transposed to (B, H, S, Dh), or packed into one sequence-major (B, S, 3,
    H, Dh) projection as the encoder's QKV GEMM writes it."""
    if layout == "bhsd":
        return (*(t.transpose(1, 2).contiguous() for t in (q, k, v)), lengths)
    if layout == "packed":
        return ops.sequence_major(torch.stack((q, k, v), dim=2)), lengths
    return q, k, v, lengths


def attention_rows(device, batches=(32,), text_lens=(8, 16, 32, 64), heads=12, head_dim=64,
                   num_vision=577, dtype=None, peak_tflops=None, passes=("fwd", "fwd+bwd")):
    """G1: multiway_attention and its packed form vs SDPA (each SDPBackend that accepts the
    bool key mask; the fastest is flagged ``best_sdpa``) and xformers, TFLOP/s and % of the
    matmul peak."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for batch, text_len in itertools.product(batches, text_lens):
        seq = num_vision + text_len
        sets = [_attn_inputs(batch, heads, head_dim, num_vision, text_len, device, dtype, s)
                for s in range(3)]
        q0, k0, v0, l0 = sets[0]
        want = reference.multiway_attention(q0.float(), k0.float(), v0.float(), l0, num_vision)
        fwd_flops = 4.0 * batch * heads * seq * seq * head_dim
        shape = f"B={batch} H={heads} S={num_vision}+{text_len} Dh={head_dim}"
        group, laid_out = [], {}
        for op, name, layout, fn in _attention_impls(device):
            if layout == "skip":
                rows.append(_skip(op, name, fn, shape=shape))
                continue
            back = ((lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t))
            if layout not in laid_out:  # one copy per layout, shared by its implementations
                laid_out[layout] = [_laid_out(layout, *case) for case in sets]
            inputs = laid_out[layout]
            try:
                got = back(fn(*inputs[0], num_vision)).float()
                err = (got - want).abs().max().item()
                tol = 2e-2 if dtype != torch.float32 else 1e-4
                if not err <= tol * max(1.0, want.abs().max().item()):
                    raise RuntimeError(f"max error {err:.3g} vs reference exceeds {tol}")
            except Exception as exc:  # noqa: BLE001 - an impl that rejects the inputs is a row
                rows.append(_skip(op, name, f"{type(exc).__name__}: "
                                  f"{str(exc)[:160]}", shape=shape, batch=batch,
                                  text_len=text_len))
                continue
            for pas in passes:
                if pas == "fwd":
                    call = (lambda x, _f=fn: _f(*x, num_vision))
                    flops = fwd_flops
                    timed = inputs
                else:
                    timed = [tuple(t.detach().requires_grad_(True) if t.is_floating_point()
                                   else t for t in x) for x in inputs]
                    grad = torch.randn_like(fn(*inputs[0], num_vision))

                    def call(x, _f=fn, _g=grad):
                        for t in x[:-1]:
                            t.grad = None
                        _f(*x, num_vision).backward(_g)
                    flops = 3.5 * fwd_flops
                try:
                    ms = bench_call(call, timed, device)
                except Exception as exc:  # noqa: BLE001
                    rows.append(_skip(op, name, f"{pas}: {exc}"[:200],
                                      shape=shape, batch=batch, text_len=text_len, **{"pass": pas}))
                    continue
                row = {"op": op, "impl": name, "pass": pas, "shape": shape,
                       "batch": batch, "text_len": text_len, "ms": ms,
                       "tflops": flops / ms / 1e9, "max_err": err,
                       "dtype": str(dtype).replace("torch.", "")}
                if peak_tflops:
                    row["pct_of_peak"] = 100 * row["tflops"] / peak_tflops
                group.append(row)
        for pas in passes:
            same = [r for r in group if r["pass"] == pas]
            sdpa = [r for r in same if r["impl"].startswith("sdpa")]
            if sdpa:
                best = min(sdpa, key=lambda r: r["ms"])
                best["best_sdpa"] = True
                baseline = min([best] + [r for r in same if r["impl"] == "xformers"],
                               key=lambda r: r["ms"])
                for r in same:
                    r["speedup"] = baseline["ms"] / r["ms"]
                    r["vs"] = baseline["impl"]
        rows.extend(group)
    return rows


# ----------------------------------------------------------------------- memory-bound --
#: G2 ops: their baseline is the reference, or for the LayerNorms the torch composite.
MEMORY_OPS = ("masked_gather", "referring_mask", "vts_loss", "box_mask_loss",
              "multiway_add_layer_norm", "multiway_layer_norm")
_COMPOSITE_BASELINE = ("multiway_add_layer_norm", "multiway_layer_norm")
_FP32_ROWS = ("vts_loss", "box_mask_loss")


def _op_call(name: str, backend: str):
    """The public op pinned to ``backend``."""
    return lambda *args: getattr(ops, name)(*args, backend=backend)


def _shape(args) -> str:
    """The tensor inputs of a case but its 1-D parameters, e.g. ``(64,576,768) bfloat16,
    (64,576) bool``."""
    return ", ".join(f"({','.join(map(str, a.shape))}) {str(a.dtype).replace('torch.', '')}"
                     for a in args if isinstance(a, torch.Tensor) and a.dim() > 1)


def _memory_cases(device, scale: float):
    """(op, shape, inputs(seed) -> args, baseline fn, our fn(backend), bytes, grad, rtol)
    from the shared cases (:mod:`oneref.ops.cases`) at benchmark size ``scale``: bf16 on a
    GPU, but the box losses' predictions in fp32 as the rows always had them."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for op in MEMORY_OPS:
        case = CASES[op]
        dtype = torch.float32 if op in _FP32_ROWS else low
        sample = case.inputs(0, device, dtype, scale)
        baseline = (_op_call(op, "torch") if op in _COMPOSITE_BASELINE
                    else getattr(reference, op))
        shape = _shape(sample) + (" fwd+bwd" if case.trains else "")
        rows.append((op, shape, functools.partial(case.training_inputs, device=device,
                                                  dtype=dtype, scale=scale),
                     baseline, functools.partial(_op_call, op), case.bytes(sample),
                     case.trains, case.tolerance(dtype)[0]))
    return rows


def _same(got, want, rtol: float) -> bool:
    """Outputs equal (bool / integer) or close (floating), tuple outputs element-wise."""
    if isinstance(want, tuple):
        return all(_same(g, w, rtol) for g, w in zip(got, want))
    if got.dtype == torch.bool or not got.is_floating_point():
        return torch.equal(got, want)
    return torch.allclose(got.float(), want.float(), rtol=rtol, atol=1e-4)


def _run_op(fn, args, grad: bool):
    """One call; with ``grad`` also its backward (ones as the gradient of every output)."""
    out = fn(*args)
    if grad:
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return out


def memory_rows(device, copy_gbps=None, scale: float = 8):
    """G2: masked_gather, referring_mask, vts_loss, box_mask_loss (the reference as the
    baseline) and the fused LayerNorms (the torch composite as the baseline) vs our triton /
    cuda backends, GB/s and % of the copy bandwidth."""
    rows = []
    names = [b for b in _backends(device) if b != "auto"]
    for op, shape, make, ref_fn, ours, nbytes, grad, rtol in _memory_cases(device, scale):
        inputs = [make(s) for s in range(3)]
        want = ref_fn(*inputs[0])
        impls = {"eager": ref_fn}
        impls.update({f"ours[{b}]": ours(b) for b in names if b != "torch"
                      and not not_supported_reasons(op, b, device.type)})
        results = []
        for impl, fn in impls.items():
            try:
                if not _same(fn(*inputs[0]), want, rtol):
                    raise RuntimeError("result differs from the reference")
                ms = bench_call(lambda a, _f=fn: _run_op(_f, a, grad), inputs, device)
            except Exception as exc:  # noqa: BLE001
                rows.append(_skip(op, impl, f"{type(exc).__name__}: {str(exc)[:160]}",
                                  shape=shape))
                continue
            row = {"op": op, "impl": impl, "shape": shape, "ms": ms, "bytes": nbytes,
                   "gbps": nbytes / ms / 1e6}
            if copy_gbps:
                row["pct_of_peak"] = 100 * row["gbps"] / copy_gbps
            results.append(row)
        eager = next((r for r in results if r["impl"] == "eager"), None)
        for r in results:
            if eager:
                r["speedup"] = eager["ms"] / r["ms"]
                r["vs"] = "eager"
        if len(names) == 1 and names[0] == "torch":
            rows.append(_skip(op, "ours[triton|cuda]", "no triton / cuda backend on this "
                              "device (GPU rows)", shape=shape))
        rows.extend(results)
    return rows


# ------------------------------------------------------------------ linear + CE (G3) --
def _peak_call(fn, device) -> float | None:
    """Peak GPU memory (GB) above the memory in use before one call of fn()."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - start) / 1e9


def lce_rows(device, cases=None):
    """G3: linear_cross_entropy (fwd+bwd) vs eager Linear + CE, time and peak memory.
    Default cases: MLM (N=1600 masked tokens, D=768, V=64010, smoothing 0.1) and MIM
    (N=14720 masked patches, V=8192) in bf16 on CUDA; tiny sizes in fp32 on CPU."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if cases is None:
        cases = ([("MLM", 1600, 768, 64010, 0.1), ("MIM", 14720, 768, 8192, 0.0)] if gpu
                 else [("MLM", 64, 64, 1024, 0.1), ("MIM", 256, 64, 512, 0.0)])
    rows = []
    for label, n, d, v, smoothing in cases:
        shape = f"{label} N={n} D={d} V={v} {str(dtype).replace('torch.', '')}"

        def make(seed, _n=n, _d=d, _v=v):  # the shared case's x, weight, targets (no bias)
            x, w, t = CASES["linear_cross_entropy"].training_inputs(
                seed, device, dtype, scale=1, rows=_n, width=_d, vocab=_v)[:3]
            return x, w, t
        inputs = [make(s) for s in range(2)]
        want = reference.linear_cross_entropy(*inputs[0], label_smoothing=smoothing).item()
        impls = {"eager": lambda x, w, t: reference.linear_cross_entropy(
            x, w, t, label_smoothing=smoothing)}
        for b in _backends(device):
            if b in ("auto", "torch"):
                continue
            impls[f"ours[{b}]"] = (lambda x, w, t, _b=b: ops.linear_cross_entropy(
                x, w, t, label_smoothing=smoothing, backend=_b))
        results = []
        for impl, fn in impls.items():
            def step(a, _f=fn):
                a[0].grad = a[1].grad = None
                _f(*a).backward()
            try:
                got = fn(*inputs[0]).item()
                if abs(got - want) > 2e-2 * max(1.0, abs(want)):
                    raise RuntimeError(f"loss {got:.5g} differs from the reference {want:.5g}")
                peak = _peak_call(lambda: step(inputs[0]), device)
                ms = bench_call(step, inputs, device, repeats=5)
            except Exception as exc:  # noqa: BLE001
                rows.append(_skip("linear_cross_entropy", impl,
                                  f"{type(exc).__name__}: {str(exc)[:160]}", shape=shape))
                continue
            results.append({"op": "linear_cross_entropy", "impl": impl, "shape": shape,
                            "pass": "fwd+bwd", "ms": ms, "peak_mem_gb": peak})
        eager = next((r for r in results if r["impl"] == "eager"), None)
        for r in results:
            if eager:
                r["speedup"] = eager["ms"] / r["ms"]
                r["vs"] = "eager"
                if r["peak_mem_gb"] and eager["peak_mem_gb"]:
                    r["mem_ratio"] = r["peak_mem_gb"] / eager["peak_mem_gb"]
        if not gpu:
            rows.append(_skip("linear_cross_entropy", "ours[triton|cuda]",
                              "no triton / cuda backend on this device (GPU rows)", shape=shape))
        rows.extend(results)
    return rows


def iter_kernel_rows(device, rows=("G1", "G2", "G3"), peak_tflops=None, copy_gbps=None,
                     quick: bool = False):
    """The kernel rows asked for, yielded one table part at a time (attention one shape at a
    time); on a CPU, tiny forms (attention with 17 vision tokens, small memory-bound
    batches, small vocabularies) so the code path and plots still run."""
    gpu = device.type == "cuda"
    if "G1" in rows:
        if gpu:
            # The full 641-token sequence first: each length is autotuned anew.
            for batch, text_len in itertools.product((32,) if quick else (32, 8),
                                                     (64, 8, 16, 32)):
                yield from attention_rows(device, batches=(batch,), text_lens=(text_len,),
                                          peak_tflops=peak_tflops)
        else:
            yield from attention_rows(device, batches=(2,), text_lens=(8, 16, 32, 64), heads=2,
                                      head_dim=32, num_vision=17, peak_tflops=peak_tflops,
                                      passes=("fwd",) if quick else ("fwd", "fwd+bwd"))
    if "G2" in rows:
        yield from memory_rows(device, copy_gbps, scale=8 if gpu else 1 / 16)
    if "G3" in rows:
        yield from lce_rows(device)


def run_kernel_tables(device, rows=("G1", "G2", "G3"), peak_tflops=None, copy_gbps=None,
                      quick: bool = False) -> list[dict]:
    """Every row of :func:`iter_kernel_rows` as one list."""
    return list(iter_kernel_rows(device, rows, peak_tflops, copy_gbps, quick))
