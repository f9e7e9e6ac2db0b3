"""``oneref bench --cost``: a speed-of-light report of one training step and one inference
forward, on any machine (docs/perf.md, "Speed of light").

The REC training step of an engine (forward, loss, backward, clipping, fused AdamW), or its
REC inference forward (the G5 row), runs on CPU tensors at batches 2 and 3 under a dispatch
mode that records, per aten op: FLOPs (``torch.utils.flop_counter``'s formulas), bytes read
and written (tensor arguments read, outputs and in-place arguments written; views and
allocations are free) and kernel launches (one per recorded op). Each figure is linear in
the batch (weights, their casts and the optimizer are per step, activations per sample;
launches do not grow with it), so two batches give it at any batch. Batch 1 is not one of
them: some ops take other paths for a single row. Saved-activation bytes per sample come
from ``saved_tensors_hooks``.

The prediction at ``batch`` on a card: each op takes ``max(FLOPs / peak, bytes /
bandwidth)`` plus a fixed gap per launch, the ceilings of :data:`CARDS`; MFU = counted
FLOPs / (predicted time x peak). What it assumes: every kernel runs at the roofline (GEMMs
at the matmul peak, everything else at copy bandwidth), kernels do not overlap, the host
never starves the GPU, one launch gap of :data:`LAUNCH_GAP_US`, and the CPU dispatcher's
eager op sequence is the GPU's, one kernel per op (two for CUDA's LayerNorm backward and
for the Triton one: :func:`oneref.bench.kernel_bytes.further_kernels`). It is not exactly:
the attention kernel differs, and CPU autocast keeps softmax, layer_norm, sums and norms in
bf16 where CUDA autocast runs them in fp32. The multiway LayerNorms pick their compute
dtype themselves (with autocast off) and are counted in the one they pick on CUDA: bf16 for
a bf16 input and output (the sub-LNs, and the block LayerNorms of the default bf16 residual
stream), fp32 for an fp32 stream.

The compiled engines (b+), (e) and (e*) are compiled on the CPU with inductor, as one graph
per step, and counted kernel by kernel as it schedules them
(:mod:`oneref.bench.inductor_count`): its extern GEMMs and SDPA as the eager ops, each
fused kernel as one launch reading and writing its buffers once; clipping and the
optimizer, which run eagerly around the compiled graphs, as above.
This also assumes that inductor's CPU scheduler fuses what its GPU one would (both fuse
pointwise ops and reductions into their consumers and producers; the GPU one may split a
long reduction in two).

Engine (d) runs each op on the backend the committed policy picks for the pass
(:mod:`oneref.ops.policy`), with the backends that have CPU kernels. ``d*`` is (d) with the
Triton kernels of :data:`oneref.bench.engines.UNMEASURED_KERNELS` as well, which the policy
cannot pick before a GPU measures them: each counts as its kernels (one per call, two for
the backward), reading its tensor arguments and writing its outputs (the ops compute the
same values with PyTorch on CPU tensors, see ``oneref/kernels/layer_norm.py``). ``e*`` is
(e) with the same kernels: custom ops that inductor calls as extern kernels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from oneref import ops
from oneref.bench.baseline import use_sdpa
from oneref.bench.engines import (COMPILED, ENGINES, UNMEASURED_KERNELS, backward_step,
                                  build_engine, infer_step, make_batch, optimizer_step,
                                  train_step)
from oneref.bench.inductor_count import INDUCTOR, KernelRecorder, empty_counts
from oneref.bench.kernel_bytes import further_kernels, touched_bytes
from oneref.config import get_config
from oneref.ops import dispatch, policy, torch_backend
from oneref.ops.registry import OPS

__all__ = ["CARDS", "LAUNCH_GAP_US", "GAP_TO_EXPLAIN", "OpCounter",
           "count_step", "predict", "roofline_rows", "roofline_markdown", "card_of",
           "against_prediction", "against_prediction_markdown"]

log = logging.getLogger(__name__)

#: Ceilings: bf16 dense matmul TFLOP/s and device copy GB/s (bytes read + written). H100:
#: the best of this project's measurements (benchmarks/results/h100-2026-11-27: 715-787
#: TFLOP/s, 3.0 TB/s). H200: not measured by this project; the figures of docs/perf.md.
CARDS = {"H100": {"tflops": 787.0, "gbps": 3000.0}, "H200": {"tflops": 790.0, "gbps": 4300.0}}
#: GPU time between two back-to-back eager kernels (launch latency hidden by the queue).
LAUNCH_GAP_US = 2.0
_NAMESPACES = ("aten", "oneref", "oneref_triton")
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
         "alias", "lift_fresh", "device", "set_", "resize_", "is_same_size", "_local_scalar_dense",
         "_unsafe_view", "_reshape_alias", "view", "as_strided", "promote_types", "result_type"}


# Arguments the schema marks as written that the kernel only reads.
_READ_ONLY = {("_fused_adamw_", "grads"), ("_fused_adam_", "grads")}
_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution",
          "_convolution", "convolution_backward", "_slow_conv2d_forward",
          "_slow_conv2d_backward"}


def op_class(name: str) -> str:
    """``gemm`` (matmuls, convolutions), ``attention`` (fused SDPA kernels), ``optimizer``
    (AdamW and clipping's foreach norm and scale), or ``memory`` (everything else, the
    operands' foreach casts too)."""
    if name.startswith(f"{INDUCTOR}."):
        return "memory"
    base = name.split(".")[-1]
    if "attention" in base or base.startswith(("_flash_", "_efficient_")):
        return "attention"
    if base in _GEMMS:
        return "gemm"
    if "adam" in base or (base.startswith("_foreach") and not base.startswith("_foreach_copy")):
        return "optimizer"
    return "memory"


def _in_fp32(func, args, kwargs):
    """``func`` computed with its bf16 tensors upcast to fp32, each output cast to the dtype
    the bf16 call returns (read off the op's meta kernel), ``out=`` / in-place arguments
    written back: the same result to rounding."""
    def convert(fn, values):
        flat, spec = tree_flatten(values)
        return spec.unflatten([fn(v) if isinstance(v, torch.Tensor) else v for v in flat])

    written = [a.name for a in func._schema.arguments
               if a.alias_info is not None and a.alias_info.is_write]
    fp32_args, fp32_kwargs = convert(
        lambda t: t.float() if t.dtype == torch.bfloat16 else t, (args, kwargs))
    out = func(*fp32_args, **fp32_kwargs)
    if written:
        names = [a.name for a in func._schema.arguments]
        given, computed = dict(zip(names, args)) | kwargs, dict(zip(names, fp32_args)) | fp32_kwargs
        for name in written:
            if given[name] is not computed[name]:
                given[name].copy_(computed[name])
        return given[written[0]] if len(written) == 1 else tuple(given[n] for n in written)
    meta_args, meta_kwargs = convert(lambda t: t.to("meta"), (args, kwargs))
    dtypes = iter(m.dtype for m in tree_flatten(func(*meta_args, **meta_kwargs))[0]
                  if isinstance(m, torch.Tensor))
    out_flat, spec = tree_flatten(out)
    return spec.unflatten([o.to(next(dtypes)) if isinstance(o, torch.Tensor) else o
                           for o in out_flat])


def _has_bf16(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
               for t in tree_flatten((args, kwargs))[0])


class OpCounter(TorchDispatchMode):
    """Per aten op name: calls (launches), FLOPs, bytes read, bytes written.

    bf16 GEMMs, convolutions and attention are computed in fp32 and rounded back (what
    they accumulate in anyway): CPUs without bf16 matrix instructions run them through a
    scalar path about 80x slower than fp32. The counts are those of the bf16 call."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, dict[str, float]] = empty_counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if op_class(func.overloadpacket.__name__) in ("gemm", "attention") \
                and _has_bf16(args, kwargs):
            out = _in_fp32(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE or func.namespace not in _NAMESPACES:
            return out
        record = self.ops[f"{func.namespace}.{name}"]
        record["calls"] += 1
        # Arguments the kernel writes (in place or out=) count as written; the destinations
        # of copy_/fill_/zero_ are not read.
        written_args, read_args = [], []
        values = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        for arg in func._schema.arguments:
            if arg.name not in values:
                continue
            value = values[arg.name]
            if arg.alias_info is None or not arg.alias_info.is_write \
                    or (name, arg.name) in _READ_ONLY:
                read_args.append(value)
                continue
            written_args.append(value)
            if not arg.kwarg_only and name not in ("copy_", "_foreach_copy_", "fill_", "zero_"):
                read_args.append(value)  # in place: read, then written
        launches, read, written = further_kernels(f"{func.namespace}.{name}", values)
        record["calls"] += launches
        record["read"] += touched_bytes(tree_flatten(read_args)[0]) + read
        inputs = tree_flatten((args, kwargs))[0]
        fresh = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                 and not any(t is i for i in inputs)]
        record["written"] += (touched_bytes(fresh) + touched_bytes(tree_flatten(written_args)[0])
                              + written)
        counter = flop_registry.get(func.overloadpacket)
        if counter is not None:
            record["flops"] += counter(*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def _saved_bytes(total: list[int]):
    """Sum the bytes of the tensors autograd saves for backward (each storage once)."""
    seen: set[int] = set()

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


#: Cost engines that run the Triton ops of :data:`UNMEASURED_KERNELS` (their CPU stand-ins),
#: and the engine they are otherwise.
_ASSUMING = {"d*": "d", "e*": "e"}


#: The passes the count takes: one REC training step (forward, loss, backward, clipping,
#: AdamW), and one REC inference forward (the G5 row), with the task each runs.
PASSES = {"train": "rec", "infer": "rec_infer"}


def count_step(engine_key: str, preset: str, batch: int, seed: int = 0,
               pass_: str = "train") -> dict:
    """Per-op counts of one REC training step (``pass_="train"``) or inference forward
    (``"infer"``) of engine ``engine_key`` on the CPU (``d*``, ``e*``: (d), (e) with their
    Triton ops computed by PyTorch), bf16 autocast for the engines that use it on a GPU, and
    the saved-activation bytes (none in inference)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {sorted(PASSES)}, got {pass_!r}")
    config = get_config(preset)
    assume = UNMEASURED_KERNELS if engine_key in _ASSUMING else ()
    engine_key = _ASSUMING.get(engine_key, engine_key)
    engine = build_engine(engine_key, config, "cpu", seed=seed)
    if engine_key != "a":  # what the engine runs on a GPU: bf16 autocast (and (b) SDPA)
        engine.autocast = torch.bfloat16
    if engine_key in ("b", "b+"):
        use_sdpa(engine.model)
    training = pass_ == "train"
    if engine_key in ("d", "e"):
        engine.backend = _policy_settings(engine.device, training)
    task = PASSES[pass_]
    step = train_step if training else functools.partial(infer_step, grad_mode=torch.no_grad)
    inputs = make_batch(config, batch, "cpu", seed=seed, task=task)
    with _triton_on_cpu(assume), torch_backend.native_bf16_on("cpu"):
        if engine_key in COMPILED:
            engine.fullgraph = True  # a graph run more than once per step would count once
            if training:
                return _count_compiled_step(engine, inputs, batch)
            recorder = KernelRecorder()
            with recorder:
                step(engine, task, inputs)
            return {"ops": dict(recorder.ops), "saved_bytes": 0, "batch": batch}
        with OpCounter():  # uncounted: first-call work, and AdamW's state (made at step 1)
            step(engine, task, inputs)
        counter, saved = OpCounter(), [0]
        with counter, _saved_bytes(saved):
            step(engine, task, inputs)
    return {"ops": dict(counter.ops), "saved_bytes": saved[0], "batch": batch}


def _count_compiled_step(engine, inputs: dict, batch: int) -> dict:
    """:func:`count_step` of a compiled engine: the kernels inductor builds for the step's
    graphs as it compiles them in a first step, and the eager clipping and optimizer of a
    second step."""
    recorder = KernelRecorder()
    with recorder:
        train_step(engine, "rec", inputs)
    backward_step(engine, "rec", inputs)
    counter = OpCounter()
    with counter:
        optimizer_step(engine)
    for name, counts in counter.ops.items():
        for key, value in counts.items():
            recorder.ops[name][key] += value
    return {"ops": dict(recorder.ops), "saved_bytes": recorder.saved_bytes, "batch": batch}


def _policy_settings(device: torch.device, training: bool,
                     gen: str = "sm90") -> dict[str, str]:
    """Engine (d) on CPU tensors, as per-op backend settings: each op on the backend the
    ``gen`` policy picks for training (or inference) when that backend has CPU kernels (the
    extension's C++ ones), else the torch composite (``auto`` on a CPU)."""
    settings = {}
    for op in OPS:
        backend = policy.choice(op, gen, training=training)[0]
        if backend not in ("torch", "triton") and not dispatch.unavailable_reasons(
                backend, op, device):
            settings[op] = backend
    return settings


@contextlib.contextmanager
def _triton_on_cpu(assume: tuple[str, ...]):
    """The ops of ``assume`` on their Triton kernels, which compute with PyTorch on CPU
    tensors (loaded here: inside a compiled step the lookup is a dict's)."""
    real = ops.resolve
    kernels = {op: OPS[op].impls["triton"].load() for op in assume}

    def resolve(op, device, backend=None, dtype=None, head_dim=None):
        if op in kernels:
            return kernels[op]
        return real(op, device, backend, dtype, head_dim)

    ops.resolve = resolve
    try:
        yield
    finally:
        ops.resolve = real


FIT_BATCHES = (2, 3)


def _at(counts_a: dict, counts_b: dict, batch: int,
        batches: tuple[int, int] = FIT_BATCHES) -> dict[str, dict[str, float]]:
    """Each op's figures at ``batch``, on the line through its figures at ``batches``
    (launches are per step: the second count's)."""
    low, high = batches
    out = {}
    for name in set(counts_a) | set(counts_b):
        a = counts_a.get(name, {"calls": 0, "flops": 0.0, "read": 0.0, "written": 0.0})
        b = counts_b.get(name, a)
        out[name] = {k: max(0.0, a[k] + (b[k] - a[k]) * (batch - low) / (high - low))
                     for k in a}
        out[name]["calls"] = b["calls"]
    return out


def predict(counts: dict[str, dict[str, float]], card: str, top: int = 12) -> dict:
    """Roofline time per op class and in all, the MFU, and the ``top`` ops by time, of
    per-op counts on ``card``."""
    peak, bandwidth = CARDS[card]["tflops"] * 1e12, CARDS[card]["gbps"] * 1e9
    ops = []
    for name, c in counts.items():
        moved = c["read"] + c["written"]
        seconds = max(c["flops"] / peak, moved / bandwidth) + c["calls"] * LAUNCH_GAP_US * 1e-6
        ops.append({"op": name, "class": op_class(name), "calls": c["calls"],
                    "ms": 1e3 * seconds, "gb": moved / 1e9, "flops": c["flops"]})
    classes: dict[str, dict[str, float]] = defaultdict(
        lambda: {"ms": 0.0, "flops": 0.0, "gb": 0.0, "launches": 0.0})
    for op in ops:
        entry = classes[op["class"]]
        entry["ms"] += op["ms"]
        entry["flops"] += op["flops"]
        entry["gb"] += op["gb"]
        entry["launches"] += op["calls"]
    total_ms = sum(e["ms"] for e in classes.values())
    flops = sum(e["flops"] for e in classes.values())
    return {"card": card, "classes": dict(classes), "step_ms": total_ms,
            "mfu": flops / (total_ms * 1e-3 * peak) if total_ms else 0.0,
            "tflop": flops / 1e12, "gb": sum(e["gb"] for e in classes.values()),
            "launches": sum(e["launches"] for e in classes.values()),
            "top_ops": sorted(ops, key=lambda o: -o["ms"])[:top]}


def roofline_rows(preset: str = "base", batch: int = 64, engines=("b", "c", "d", "d*"),
                  cards=("H100", "H200"), infer_batch: int = 0) -> list[dict]:
    """One row per (pass, engine, card): the prediction of the training step at ``batch``
    and, when ``infer_batch`` is set, of the inference forward at it, with the top ops by
    time."""
    unknown = [key for key in engines if key not in ENGINES or key == "f"]
    if unknown:
        raise ValueError(f"--cost predicts engines a, b, b+, c, d, d*, e, e*, got {unknown}")
    rows = []
    for pass_, at in (("train", batch), ("infer", infer_batch)):
        if not at:
            continue
        for key in engines:
            low, high = (count_step(key, preset, b, pass_=pass_) for b in FIT_BATCHES)
            counts = _at(low["ops"], high["ops"], at)
            saved = ((high["saved_bytes"] - low["saved_bytes"])
                     / (FIT_BATCHES[1] - FIT_BATCHES[0]))
            for card in cards:
                row = {"pass": pass_, "engine": key, "engine_name": ENGINES[key],
                       "preset": preset, "batch": at, "saved_mb_per_sample": saved / 2 ** 20,
                       **predict(counts, card)}
                rows.append(row)
                log.info("cost %s %s (%s) %s: %.1f ms, MFU %.1f%%", pass_, preset, key, card,
                         row["step_ms"], 100 * row["mfu"])
    return rows


_TITLES = {"train": "one REC training step: forward, loss, backward, clipping, AdamW",
           "infer": "one REC inference forward: the G5 row"}


def _pass_of(row: dict) -> str:
    return row.get("pass", "train")  # roofline.json files before the inference pass


def _speedups(rows: list[dict]) -> dict[int, float]:
    """Each row's predicted speed over engine (b)'s at its pass, preset, batch and card."""
    def key(row):
        return _pass_of(row), row["preset"], row["batch"], row["card"]

    baseline = {key(r): r["step_ms"] for r in rows if r["engine"] == "b"}
    return {id(r): baseline[key(r)] / r["step_ms"] for r in rows
            if key(r) in baseline and r["step_ms"]}


def roofline_markdown(rows: list[dict]) -> str:
    """Per pass, the prediction table (one line per engine and card, with its speed over
    (b) when (b) was counted) and each engine's top ops. The inference table has no
    optimizer or saved-activation column: a forward under ``no_grad`` has neither."""
    speedups, lines = _speedups(rows), []
    for pass_, title in _TITLES.items():
        group = [r for r in rows if _pass_of(r) == pass_]
        if not group:
            continue
        training = pass_ == "train"
        classes = ("gemm", "attention", "memory") + (("optimizer",) if training else ())
        head = ("| preset, batch | engine | card | " + " | ".join(f"{c} ms" for c in classes)
                + f" | {'step' if training else 'forward'} ms | vs (b) | MFU | TFLOP"
                + " | GB moved | launches |" + (" saved MB/sample |" if training else ""))
        lines += ([""] if lines else []) + [
            f"Speed of light of {title} (counted on CPU tensors, roofline on the card, "
            f"{LAUNCH_GAP_US:g} us per launch; see oneref/bench/roofline.py)", "",
            head, "|" + "---|" * (head.count("|") - 1)]
        for r in group:
            per = " | ".join(f"{r['classes'].get(c, {}).get('ms', 0.0):.1f}" for c in classes)
            speedup = f"{speedups[id(r)]:.2f}x" if id(r) in speedups else "-"
            saved = f" {r['saved_mb_per_sample']:.0f} |" if training else ""
            lines.append(f"| {r['preset']}, {r['batch']} | ({r['engine']}) | {r['card']} | "
                         f"{per} | {r['step_ms']:.1f} | {speedup} | {100 * r['mfu']:.1f}% | "
                         f"{r['tflop']:.1f} | {r['gb']:.0f} | {r['launches']:.0f} |{saved}")
        for r in group:
            if r["card"] != group[0]["card"]:
                continue
            lines += ["", f"({r['engine']}) {pass_} top ops on {r['card']}:", "",
                      "| op | class | launches | GB | ms |", "|---|---|---|---|---|"]
            lines += [f"| {o['op']} | {o['class']} | {o['calls']:.0f} | {o['gb']:.2f} | "
                      f"{o['ms']:.2f} |" for o in r["top_ops"]]
    return "\n".join(lines)


#: A measured step this many times its predicted time is a gap to explain (docs/perf.md,
#: "Speed of light").
GAP_TO_EXPLAIN = 1.25


def card_of(device_name: str | None) -> str | None:
    """The :data:`CARDS` key of a device name ("NVIDIA H100 80GB HBM3" -> "H100"), or None
    for other cards, a PCIe H100 (slower memory than the ceilings) or a GH200 among them."""
    name = device_name or ""
    if "PCIe" in name:
        return None
    return next((card for card in CARDS if re.search(rf"\b{card}\b", name)), None)


#: Per pass, the measured row's fields: its batch, and its timed step.
_MEASURED = {"train": ("rec_train_batch", "rec_train_step_s"),
             "infer": ("rec_infer_large_batch", "rec_infer_large_s")}


def against_prediction(model_rows: list[dict], predicted: list[dict],
                       device_name: str | None) -> list[dict]:
    """Each measured REC training step and large-batch inference forward that ``predicted``
    (rows of ``oneref bench --cost``) has a prediction for, on this card, at its preset,
    batch and engine: the measured median, the GPU-busy time of its profile (training, when
    profiled) and the predicted time."""
    card = card_of(device_name)
    lookup = {(_pass_of(p), p["preset"], p["batch"], p["engine"]): p for p in predicted
              if p.get("card") == card}
    out = []
    for r in model_rows:
        for pass_, (batch_key, time_key) in _MEASURED.items():
            step = r.get(time_key)
            p = lookup.get((pass_, r.get("preset"), r.get(batch_key), r.get("engine")))
            if p is None or not step:
                continue
            measured = 1e3 * step["median_s"]
            busy = r.get("rec_train_profile", {}).get("busy_ms") if pass_ == "train" else None
            out.append({"pass": pass_, "preset": r["preset"], "batch": p["batch"],
                        "engine": r["engine"], "card": card, "measured_ms": measured,
                        "busy_ms": busy, "predicted_ms": p["step_ms"],
                        "predicted_mfu": p["mfu"], "ratio": measured / p["step_ms"]})
    return out


def against_prediction_markdown(rows: list[dict], source: str) -> list[str]:
    """The measured steps beside their predictions; a ratio above :data:`GAP_TO_EXPLAIN`
    is marked as a gap to explain."""
    if not rows:
        return []
    lines = ["", f"Measured against the speed-of-light prediction ({source}, {rows[0]['card']}): "
                 f"a step over {GAP_TO_EXPLAIN:g}x its prediction is a gap to explain; GPU busy "
                 "well under the measured step means the host starves the GPU.", "",
             "| pass | preset, batch | engine | measured ms | GPU busy ms | predicted ms "
             "(MFU) | measured / predicted |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        busy = "-" if r["busy_ms"] is None else f"{r['busy_ms']:.1f}"
        gap = " **gap**" if r["ratio"] > GAP_TO_EXPLAIN else ""
        lines.append(f"| {_pass_of(r)} | {r['preset']}, {r['batch']} | ({r['engine']}) | "
                     f"{r['measured_ms']:.1f} "
                     f"| {busy} | {r['predicted_ms']:.1f} ({100 * r['predicted_mfu']:.1f}%) | "
                     f"{r['ratio']:.2f}x{gap} |")
    return lines
