"""Benchmark output: environment record, JSON, markdown tables, PNG plots."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch

from oneref import io
from oneref.bench.kernels import ATTENTION_OPS

__all__ = ["environment", "write_json", "cost_markdown", "profile_markdown", "kernel_markdown",
           "loader_markdown", "plot_throughput", "plot_attention", "fmt"]

log = logging.getLogger(__name__)
TRAIN_KEYS = ("rec_train_sps", "res_train_sps", "mim_train_sps", "mlm_train_sps")
INFER_KEYS = ("rec_infer_large_sps", "res_infer_large_sps")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return getattr(mod, "__version__", "unknown")


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    """Card / CPU, driver, library versions, date and load: the header of every JSON."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "torchscale": _version("torchscale"),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # Without ONEREF_AUTOTUNE=1 every Triton kernel runs its first config (no tuning).
        "triton_autotune": os.environ.get("ONEREF_AUTOTUNE", "0") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   memory_gb=props.total_memory / 1e9, driver=_driver(),
                   capability=f"{props.major}.{props.minor}")
    else:
        env.update(device_name=env["cpu"], driver=None)
    return env


def write_json(results: dict, path: Path) -> Path:
    """Write ``results`` to ``path`` atomically (a run killed mid-write leaves the last
    complete file)."""
    return io.write_json(path, results, indent=1, sort_keys=False)


def fmt(value, digits: int = 3) -> str:
    """Compact number: 3 significant digits, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _with_ratio(row: dict, key: str) -> str:
    text = fmt(row.get(key))
    ratios = [f"{row[f'{key}_vs_{ref}']:.2f}x{ref}" for ref in ("a", "b", "b+")
              if f"{key}_vs_{ref}" in row and row["engine"] != ref]
    return f"{text} ({', '.join(ratios)})" if ratios else text


def _preset(row: dict) -> str:
    return f"{row['row']} {row['preset']}" if row.get("row") else row["preset"]


def _tasks(row: dict, keys: tuple[str, ...]) -> str:
    """Several task figures in one cell: ``rec 12 (1.3xa); mim ...`` (only those measured)."""
    parts = [f"{key.split('_')[0]} {_with_ratio(row, key)}" for key in keys if key in row]
    if len(parts) == 1:
        return parts[0].split(" ", 1)[1]
    return "; ".join(parts) if parts else "-"


def cost_markdown(rows: list[dict]) -> str:
    """The cost table: one line per (preset, engine); speeds with ratios to (a) / (b)."""
    head = ("| preset | engine | params M (bb/head) | GFLOPs (GMACs) | train samples/s | "
            "infer b1 samples/s | infer large samples/s | 5,657 split s | peak GB | MFU |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {_preset(r)} | ({r['engine']}) | skipped: {r['skipped'][:80]} |"
                         + " |" * 7)
            continue
        params = f"{fmt(r.get('total_m'))} ({fmt(r.get('backbone_m'))}/{fmt(r.get('head_m'))})"
        flops = f"{fmt(r.get('gflops_rec'))} ({fmt(r.get('gmacs_rec'))})"
        split = fmt(r.get("split_time_s"))
        if r.get("split_time_extrapolated"):
            split += f" (extrap. from {r['split_samples_measured']})"
        mfu = r.get("rec_train_mfu")
        lines.append(
            f"| {_preset(r)} | ({r['engine']}) {r.get('dtype', '')} | {params} | {flops} | "
            f"{_tasks(r, TRAIN_KEYS)} | {_with_ratio(r, 'rec_infer_b1_sps')} | "
            f"{_tasks(r, INFER_KEYS)} | {split} | "
            f"{fmt(r.get('rec_train_peak_mem_gb'))} | "
            f"{'-' if mfu is None else fmt(100 * mfu) + '%'} |")
    return "\n".join(lines)


def profile_markdown(rows: list[dict]) -> list[str]:
    """One table per profiled training step (``<task>_train_profile``): its top ops."""
    lines = []
    for r in rows:
        for key, prof in r.items():
            if not key.endswith("_train_profile"):
                continue
            busy = "GPU busy" if str(r.get("device", "")).startswith("cuda") else "op self time"
            lines += ["", f"{_preset(r)} ({r['engine']}) {key.split('_')[0]} training step: "
                          f"{busy} {fmt(prof['busy_ms'])} ms of {fmt(prof['wall_ms'])} ms wall",
                      "", "| op | calls | ms | share |", "|---|---|---|---|"]
            lines += [f"| {o['op'][:70]} | {fmt(o['calls'])} | {fmt(o['ms'])} | "
                      f"{fmt(100 * o['share'])}% |" for o in prof["top"]]
    return lines


def kernel_markdown(rows: list[dict]) -> str:
    """Kernel table: op, shape, implementation, time, throughput, % of ceiling, speed-up."""
    lines = ["| op | shape | impl | ms | TFLOP/s or GB/s | % of peak | vs eager/best baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['op']} | {r.get('shape', '')} | {r.get('impl', '')} | "
                         f"skipped: {r['skipped'][:70]} | | | |")
            continue
        rate = r.get("tflops", r.get("gbps"))
        unit = "TF" if "tflops" in r else "GB/s"
        pct = r.get("pct_of_peak")
        impl = f"{r['impl']} {r['pass']}" if r.get("pass") else r["impl"]
        lines.append(f"| {r['op']} | {r.get('shape', '')} | {impl} | {fmt(r['ms'])} | "
                     f"{fmt(rate)} {unit} | {fmt(None if pct is None else pct)} | "
                     f"{fmt(r.get('speedup'))} |")
    return "\n".join(lines)


def loader_markdown(rows: list[dict]) -> str:
    """Loader table: samples/s per worker per transform, ms/sample and its split by stage,
    and the workers needed to feed each target rate."""
    targets = {name: t for r in rows for name, t in r["targets"].items()}
    first = rows[0]
    lines = [f"loader: one process (a DataLoader worker, 1 torch thread), {first['num_images']} "
             f"JPEG images of COCO sizes (mean {fmt(first.get('mean_jpeg_kb'))} KB), "
             f"S={first['img_size']}, T={first['max_text_len']}; targets from "
             + "; ".join(t["source"] for t in targets.values()),
             "",
             "| transform | samples/s per worker (spread) | ms/sample | decode / mask / transform "
             "/ tokenise ms | " + " | ".join(f"workers for {name} ({fmt(t['samples_per_s'])}/s)"
                                            for name, t in targets.items()) + " |",
             "|" + "---|" * (4 + len(targets))]
    for r in rows:
        stages = " / ".join(fmt(ms) for ms in r["stage_ms"].values())
        workers = " | ".join(fmt(r["workers_needed_for"].get(name)) for name in targets)
        lines.append(f"| {r['transform']} (S={r['img_size']}) | "
                     f"{fmt(r['samples_per_s_per_worker'])} ({fmt(100 * r['spread'])}%) | "
                     f"{fmt(r['ms_per_sample'])} | {stages} | {workers} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_plot(plt, fig, ax, title: str, path: Path) -> Path:
    """Title, legend and layout of a finished plot; writes it to ``path`` (PNG, parents
    created) and closes the figure."""
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(rows: list[dict], path: Path, title: str) -> Path | None:
    """Inference samples/s vs batch, one line per (preset, engine) with a sweep."""
    series = [(f"{r['preset']} ({r['engine']})", r["infer_sweep"]) for r in rows
              if r.get("infer_sweep")]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, sweep in series:
        batches = sorted(int(b) for b in sweep)
        ax.plot(batches, [sweep[b] if b in sweep else sweep[str(b)] for b in batches],
                marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("REC inference samples/s")
    ax.grid(True, which="both", alpha=0.3)
    return _save_plot(plt, fig, ax, title, path)


def plot_attention(rows: list[dict], path: Path, title: str) -> Path | None:
    """Attention TFLOP/s vs text length, one line per (op, implementation, pass, batch):
    q, k, v given apart solid, the packed projection (what the encoder calls) dashed."""
    rows = [r for r in rows if r.get("op") in ATTENTION_OPS and "tflops" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["op"], r["impl"], r["pass"], r["batch"]) for r in rows})
    colours = {}  # one colour per (implementation, pass, batch), both forms alike
    for op, impl, pas, batch in keys:
        pts = sorted((r["text_len"], r["tflops"]) for r in rows
                     if (r["op"], r["impl"], r["pass"], r["batch"]) == (op, impl, pas, batch))
        packed = op == "packed_multiway_attention"
        colour = colours.setdefault((impl, pas, batch), f"C{len(colours) % 10}")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour,
                linestyle="--" if packed else "-",
                label=f"{impl}{' packed' if packed else ''} {pas} B={batch}")
    ax.set_xlabel("text length (keys = vision + text)")
    ax.set_ylabel("TFLOP/s")
    ax.grid(True, alpha=0.3)
    return _save_plot(plt, fig, ax, title, path)
