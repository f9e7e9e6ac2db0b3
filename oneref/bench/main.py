"""``oneref bench``: plan the rows, run them, write JSON + PNG + markdown under ``--out``.

Rows (docs/perf.md): ``C1`` (CPU: tiny/small training step, engines (a), (c), (d)), ``G1``
attention, ``G2`` memory-bound ops, ``G3`` linear cross-entropy, ``G4`` OneRef-B REC
fine-tune step, ``G5`` OneRef-B inference (batch 1, batch 256, the 5,657-sample split end to
end), ``G6`` MIM and MLM pre-training steps, ``G7`` OneRef-L REC fine-tune step, and
``cost`` (the full paper-style table, REC and RES, base and large), and ``loader`` (samples/s
of the real-data input pipeline per DataLoader worker; only when asked for). Without a GPU
the default is ``C1`` plus the tiny CPU forms of G1-G3.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from oneref.bench.cost import CostSettings, add_ratios, iter_cost_rows
from oneref.bench.engines import ENGINES
from oneref.bench.kernels import ATTENTION_OPS, iter_kernel_rows
from oneref.bench.loader import iter_loader_rows
from oneref.bench.roofline import (against_prediction, against_prediction_markdown,
                                   roofline_markdown, roofline_rows)
from oneref.bench.report import (cost_markdown, environment, kernel_markdown, loader_markdown,
                                 plot_attention, plot_throughput, profile_markdown, write_json)
from oneref.bench.timing import copy_bandwidth, matmul_peak
from oneref.ops.policy import write_policy

__all__ = ["add_arguments", "run_bench", "main", "plan_cost_rows", "ROWS"]

log = logging.getLogger(__name__)
ROWS = ("C1", "G1", "G2", "G3", "G4", "G5", "G6", "G7", "cost", "loader")
KERNEL_ROWS = ("G1", "G2", "G3")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``oneref bench`` (for the CLI's sub-parser)."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--rows", default=None,
                        help=f"comma list of {','.join(ROWS)}; default C1,G1,G2,G3 on CPU, "
                             "G1..G7 on a GPU")
    parser.add_argument("--presets", default=None,
                        help="override the model presets of the model rows (e.g. tiny,small)")
    parser.add_argument("--engines", default=None,
                        help="override the engine rows, subset of a,b,b+,c,d,d*,e,e*,f")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per run")
    parser.add_argument("--sweep-batches", type=_batch_list, default=None,
                        help="comma list of the REC inference batches of the throughput sweep "
                             "(0: no sweep; default per row, G5: 1,16,64,256)")
    parser.add_argument("--split-samples", type=int, default=None,
                        help="samples of the end-to-end test split (-1: all 5,657; 0: skip; "
                             "N: measure N and extrapolate)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default: torch's default; on a "
                             "machine shared with other jobs 1 thread gives steadier ratios)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one training step per model row: the top ops by "
                             "device time, and busy vs wall time (in summary.md and the JSON)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset only, 1 repeat (loader: 8 images, one pass): a smoke "
                             "run of every code path")
    parser.add_argument("--out", default=None, help="results folder (default runs/bench-<date>)")
    parser.add_argument("--cost", action="store_true",
                        help="speed-of-light report instead of timings: per-op FLOPs, bytes and "
                             "launches of one REC training step and one REC inference forward "
                             "(counted on CPU tensors; the compiled engines b+, e, e* per "
                             "inductor kernel) and the predicted H100/H200 time and MFU "
                             "(--presets: default base; --engines: default b,c,d,d*; --batch: "
                             "default 64; --infer-batch: default 256)")
    parser.add_argument("--batch", type=int, default=64,
                        help="training batch of the --cost prediction")
    parser.add_argument("--infer-batch", type=int, default=256,
                        help="inference batch of the --cost prediction (0: no inference "
                             "prediction)")
    parser.add_argument("--write-policy", nargs="+", default=None, metavar="JSON",
                        help="write the per-op backend policy of auto (oneref/ops/policy.json) "
                             "from the kernel rows of these results.json files, and exit")
    parser.add_argument("--predicted", default=None, metavar="JSON",
                        help="a roofline.json of --cost: the summary sets each measured "
                             "training step (G4) and batch-256 inference forward (G5) beside "
                             "its prediction on this card")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="merge results.json files of earlier runs (or the GPU check's "
                             "parts.json, a list of them) into --out instead of measuring "
                             "(tables and plots redone from them)")
    return parser


def _batch_list(value: str) -> tuple[int, ...]:
    """``"1,16"`` -> (1, 16); ``"0"`` -> () (no sweep)."""
    try:
        batches = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of batch sizes, got {value!r}") from None
    if batches == (0,):
        return ()
    if any(b <= 0 for b in batches):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive (0 alone: no sweep), "
                                         f"got {value!r}")
    return batches


def _split(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def plan_cost_rows(row: str, gpu: bool, args) -> CostSettings:
    """The CostSettings of one model row."""
    quick = getattr(args, "quick", False)
    if row == "C1":
        s = CostSettings(presets=("tiny", "small"), engines=("a", "c", "d"),
                         train_tasks=("rec",), infer_tasks=("rec_infer",),
                         infer_batch={"tiny": 32, "small": 16},
                         sweep_batch={"tiny": (1, 8, 32), "small": (1, 4, 16)},
                         split_samples=32, warmup=2, repeats=5, passes=2)
    elif row == "G4":
        s = CostSettings(presets=("base",),
                         engines=("a", "b", "b+", "c", "d", "d*", "e", "e*", "f"),
                         train_tasks=("rec",), infer_tasks=(), warmup=2, repeats=4)
    elif row == "G5":
        s = CostSettings(presets=("base",), engines=("a", "b", "b+", "c", "d", "e", "f"),
                         train_tasks=(),
                         infer_tasks=("rec_infer",), sweep_batch={"base": (1, 16, 64, 256)},
                         split_samples=None, split_workers=8, warmup=2, repeats=4)
    elif row == "G6":
        s = CostSettings(presets=("base",), engines=("a", "b", "c", "d"),
                         train_tasks=("mim", "mlm"), infer_tasks=(), warmup=2, repeats=4)
    elif row == "G7":
        s = CostSettings(presets=("large",), engines=("b", "c", "d"), train_tasks=("rec",),
                         infer_tasks=(), warmup=2, repeats=4)
    elif row == "cost":
        s = CostSettings(presets=("base", "large") if gpu else ("tiny", "small"),
                         engines=("a", "b", "c", "d", "e") if gpu else ("a", "c", "d"),
                         train_tasks=("rec", "res"), infer_tasks=("rec_infer", "res_infer"),
                         split_samples=None if gpu else 64, split_workers=8 if gpu else 0)
    else:
        raise ValueError(f"unknown model row {row!r}; choose from {ROWS}")
    if args.presets:
        s.presets = _split(args.presets)
    if args.engines:
        s.engines = _split(args.engines)
    if quick:
        s.presets, s.repeats, s.warmup, s.input_sets, s.passes = ("tiny",), 1, 1, 2, 1
        s.sweep_batch = {"tiny": (1, 4)}
        s.split_samples = 16 if s.split_samples != 0 else 0
        s.train_batch = dict(s.train_batch, tiny=4)
        s.infer_batch = dict(s.infer_batch, tiny=8)
    s.profile = getattr(args, "profile", False)
    if args.repeats is not None:
        s.repeats = args.repeats
    if args.warmup is not None:
        s.warmup = args.warmup
    if getattr(args, "sweep_batches", None) is not None:
        s.sweep_batch = {preset: args.sweep_batches for preset in s.presets}
    if args.split_samples is not None:
        s.split_samples = None if args.split_samples < 0 else args.split_samples
    if args.workers is not None:
        s.split_workers = args.workers
    return s


def _short_kernels(rows: list[dict]) -> list[dict]:
    """The printed kernel table: our default-backend rows (each carries its speed-up over the
    best baseline) and the reasons of ours that could not run; the full table is in
    summary.md and results.json."""
    ours = "ours[auto]" if any(r.get("impl") == "ours[auto]" for r in rows) else "ours[torch]"
    keep = []
    for r in rows:
        impl = r.get("impl", "")
        if impl.startswith("ours[") and (r["op"] not in ATTENTION_OPS or impl == ours
                                         or "skipped" in r):
            keep.append(r)
    return keep


def _summary(results: dict, short: bool = False) -> str:
    env = results["environment"]
    ceil = results.get("ceilings", {})
    lines = [f"# oneref bench: {env.get('device_name')} ({env['device_type']}), torch "
             f"{env['torch']}, triton {env.get('triton')}, xformers {env.get('xformers')}, "
             f"{env['date_utc']}, load {env.get('load_avg_1_5_15')}"
             + ("" if env.get("triton_autotune", True)
                else ", Triton kernels untuned (first config; ONEREF_AUTOTUNE=1 tunes)"),
             f"matmul peak {ceil.get('matmul', {}).get('tflops', 0):.3g} TFLOP/s "
             f"({ceil.get('matmul', {}).get('dtype')}), copy "
             f"{ceil.get('copy', {}).get('gbps', 0):.4g} GB/s; FLOPs = 2 x MACs; speeds are "
             "samples/s with (ratio to row (a), row (b)) of the same run"]
    if results.get("model_rows"):
        lines += ["", cost_markdown(results["model_rows"])]
        lines += against_prediction_markdown(results.get("against_prediction", []),
                                             results.get("predicted", {}).get("source", ""))
        if not short:
            lines += profile_markdown(results["model_rows"])
    if results.get("kernel_rows"):
        kernel_rows = results["kernel_rows"]
        lines += ["", kernel_markdown(_short_kernels(kernel_rows) if short else kernel_rows)]
    if results.get("loader_rows"):
        lines += ["", loader_markdown(results["loader_rows"])]
    c1 = results.get("c1")
    if c1:
        lines += ["", "C1 (training step, samples/s ratio to (a); target >= 1.2x): "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in c1.items())]
    return "\n".join(lines)


def c1_ratios(model_rows: list[dict]) -> dict:
    """C1: (c) and (d) over (a) on the REC training step, per preset: the ratio of median
    step times, and (``... fastest``) the ratio of the fastest single steps, which is the
    steadier figure on a machine shared with other jobs."""
    out = {}
    for r in model_rows:
        if (r["engine"] not in ("c", "d") or "rec_train_sps_vs_a" not in r
                or r.get("row") not in (None, "C1")):
            continue
        out[f"{r['preset']} ({r['engine']})"] = r["rec_train_sps_vs_a"]
        base = next((b for b in model_rows if b["engine"] == "a" and b["preset"] == r["preset"]
                     and b.get("row") == r.get("row") and "rec_train_step_s" in b), None)
        if base and "min_s" in r["rec_train_step_s"]:
            out[f"{r['preset']} ({r['engine']}) fastest"] = (
                base["rec_train_step_s"]["min_s"] / r["rec_train_step_s"]["min_s"])
    return out


def _finish(results: dict, out: Path) -> str:
    model_rows = results.get("model_rows", [])
    add_ratios(model_rows)
    results["c1"] = c1_ratios(model_rows)
    if results.get("predicted"):
        results["against_prediction"] = against_prediction(
            model_rows, results["predicted"]["rows"], results["environment"].get("device_name"))
    files = {"json": write_json(results, out / "results.json")}
    device = results["environment"].get("device_name", "")
    png = plot_throughput(model_rows, out / "throughput.png", f"REC inference, {device}")
    if png:
        files["throughput_png"] = png
    png = plot_attention(results.get("kernel_rows", []), out / "attention.png",
                         f"multiway attention, {device}")
    if png:
        files["attention_png"] = png
    (out / "summary.md").write_text(_summary(results) + "\n")
    summary = _summary(results, short=True)
    results["files"] = {k: str(v) for k, v in files.items()}
    write_json(results, out / "results.json")
    return summary


_PREDICTED_KEYS = ("preset", "batch", "engine", "card", "step_ms", "mfu")


def _load_predicted(path: str | None) -> dict:
    """``{"predicted": {"source", "rows"}}`` from a roofline.json of ``--cost`` ({} for
    None); a file that is not one is an error naming it."""
    if path is None:
        return {}
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--predicted {path}: cannot read the rows of a roofline.json "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(rows, list) or not all(
            isinstance(row, dict) and all(k in row for k in _PREDICTED_KEYS) for row in rows):
        raise ValueError(f"--predicted {path}: each row needs {', '.join(_PREDICTED_KEYS)}: "
                         "not a roofline.json of 'oneref bench --cost'")
    return {"predicted": {"source": str(path), "rows": rows}}


def _parts(paths: list[str]):
    """``(name, results)`` of each file: a results.json, or a list of them (the GPU check's
    parts.json, which it rewrites after each part so that a killed run keeps its rows)."""
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--merge {path}: cannot read it ({type(e).__name__}: {e})") from e
        parts = ([(f"{path}[{i}]", part) for i, part in enumerate(data)]
                 if isinstance(data, list) else [(path, data)])
        for name, part in parts:
            if not (isinstance(part, dict) and "environment" in part  # rows: names, not dicts
                    and all(isinstance(row, str) for row in part.get("rows", []))):
                raise ValueError(f"--merge {name}: not a results.json of an 'oneref bench' "
                                 "timing run (--cost writes roofline.json: give that to "
                                 "--predicted)")
        yield from parts


def _merge(parts: list[tuple[str, dict]], out: Path, predicted: dict) -> str:
    """The summary of the ``(name, results)`` parts of :func:`_parts`, written to ``out``."""
    merged: dict = {"model_rows": [], "kernel_rows": [], "loader_rows": [], "rows": [],
                    "parts": [], **predicted}
    for path, part in parts:
        merged.setdefault("environment", part["environment"])
        merged.setdefault("ceilings", part.get("ceilings", {}))
        merged["model_rows"] += part.get("model_rows", [])
        merged["kernel_rows"] += part.get("kernel_rows", [])
        merged["loader_rows"] += part.get("loader_rows", [])
        merged["rows"] += part.get("rows", [])
        merged["parts"].append({"path": str(path), "rows": part.get("rows"),
                                "environment": part["environment"]})
    return _finish(merged, out)


def _run_cost(args: argparse.Namespace) -> int:
    """``--cost``: the speed-of-light rows, written as roofline.json and roofline.md."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.infer_batch < 0:
        raise ValueError(f"--infer-batch must be >= 0 (0: none), got {args.infer_batch}")
    out = Path(args.out or f"runs/cost-{time.strftime('%Y%m%d-%H%M%S')}")
    presets = _split(args.presets) or ("base",)
    engines = _split(args.engines) or ("b", "c", "d", "d*")
    rows = [r for preset in presets
            for r in roofline_rows(preset, args.batch, engines, infer_batch=args.infer_batch)]
    table = roofline_markdown(rows)
    write_json({"environment": environment(torch.device("cpu")), "rows": rows},
               out / "roofline.json")
    (out / "roofline.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {out / 'roofline.json'}")
    return 0


def _check_timing_settings(args: argparse.Namespace) -> None:
    """Refuse engines, repeats and warm-up calls a timing run cannot use, before it starts."""
    unknown = [key for key in _split(args.engines) or () if key not in ENGINES]
    if unknown:
        raise ValueError(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")


def run_bench(args: argparse.Namespace) -> int:
    """Run ``oneref bench`` with parsed arguments; prints the summary table last."""
    if args.predicted and (args.write_policy or args.cost):
        raise ValueError("--predicted sets timings beside a prediction: give it with a timing "
                         "run or --merge, not with --cost or --write-policy")
    if args.write_policy:
        print(f"wrote {write_policy(args.write_policy)}")
        return 0
    if args.cost:
        return _run_cost(args)
    _check_timing_settings(args)
    predicted = _load_predicted(args.predicted)
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.merge:
        parts = list(_parts(args.merge))  # every file checked before the folder is made
        out.mkdir(parents=True, exist_ok=True)
        print(_merge(parts, out, predicted))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if gpu else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rows = _split(args.rows) or (("G1", "G2", "G3", "G4", "G5", "G6", "G7") if gpu
                                 else ("C1", "G1", "G2", "G3"))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown {unknown}; choose from {ROWS}")
    results = {"environment": environment(device), "rows": list(rows),
               "ceilings": {"matmul": matmul_peak(device), "copy": copy_bandwidth(device)},
               "model_rows": [], "kernel_rows": [], "loader_rows": [],
               "convention": "FLOPs = 2 x MACs", **predicted}
    peak = results["ceilings"]["matmul"]["tflops"]
    copy = results["ceilings"]["copy"]["gbps"]
    log.info("ceilings: %.3g TFLOP/s matmul, %.4g GB/s copy", peak, copy)
    # results.json is rewritten after every row, so a run stopped by a time box still leaves
    # what it measured (for --merge).
    kernel_rows = tuple(r for r in rows if r in KERNEL_ROWS)
    if kernel_rows:
        for r in iter_kernel_rows(device, kernel_rows, peak, copy, quick=args.quick):
            results["kernel_rows"].append(r)
            write_json(results, out / "results.json")
    if "loader" in rows:
        loader = dict(num_images=8, passes=1) if args.quick else {}
        for r in iter_loader_rows(**loader):
            results["loader_rows"].append(r)
            write_json(results, out / "results.json")
    for row in rows:
        if row in KERNEL_ROWS or row == "loader":
            continue
        settings = plan_cost_rows(row, gpu, args)
        if not gpu and row in ("G4", "G5", "G6", "G7"):
            log.warning("%s is a GPU row; running it on the CPU with %s", row, settings.presets)
        for r in iter_cost_rows(settings, device, peak):
            r["row"] = row
            results["model_rows"].append(r)
            add_ratios(results["model_rows"])
            write_json(results, out / "results.json")
    print(_finish(results, out))
    print(f"\nresults: {out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m oneref.bench [args]`` (and ``oneref bench``)."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="oneref bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_bench(args)
