"""Evaluation of one model over several splits, reported in the paper's layout.

:func:`evaluate_splits` runs each split in this process (or this rank's shard under
``torchrun``; the metric sums are reduced over ranks), :func:`eval_table` prints the rows
as a markdown table with the published number beside each measured one, and
:func:`write_eval` writes ``eval.json`` and ``eval.md``; :func:`evaluate_checkpoint` does all
of it for a checkpoint path (``oneref eval``), keeping the rows an earlier evaluation of the
same weights, in the same precision, wrote there for other splits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from oneref.data.synthetic import colour_guess_accuracy
from oneref.eval.evaluate import check_amp, evaluate, precision_for
from oneref.eval.metrics import PREC_THRESHOLDS
from oneref.eval.published import published
from oneref.eval.samples import SAMPLE_FILES, SampleRecorder, sample_paths
from oneref.io import make_folder, write_json, write_text
from oneref.sources import ModelSource
from oneref.train.config import DataConfig
from oneref.train.data import (build_dataset, check_data, dataset_info, eval_loader,
                               check_sizes, load_tokenizer, recorded_data, recorded_paths)
from oneref.train.distributed import init_distributed, shutdown

__all__ = ["default_splits", "evaluate_splits", "eval_table", "write_eval",
           "EvalReport", "evaluate_checkpoint"]


def default_splits(data: DataConfig) -> tuple[str, ...]:
    """Every split of the dataset but train (RefShapes: val, test)."""
    if not data.real:
        return ("val", "test")
    info = dataset_info(data)
    splits = info.eval_splits
    if not splits and data.annotations:
        found = (f"only {', '.join(info.splits)}" if info.splits
                 else "no {split}.jsonl files")
        raise ValueError(f"--annotations {data.annotations} holds {found}: name the split to "
                         f"evaluate with --split")
    if not splits:
        raise ValueError(f"dataset {data.dataset!r} split by {data.split_by!r}: no known "
                         f"splits; name them with --split")
    return splits


def evaluate_splits(model, data: DataConfig, task: str, splits, device: torch.device,
                    amp: str = "auto", rank: int = 0, world_size: int = 1,
                    tokenizer=None, predictions_dir: str | Path | None = None) -> list[dict]:
    """One row per split: the task's metrics (``n`` samples) and ``samples_per_s``.
    ``tokenizer``: real data's, when the caller loaded it already. ``predictions_dir``:
    rank 0 writes each split's per-sample rows and worst samples there
    (:mod:`oneref.eval.samples`)."""
    check_data(data, splits)
    if data.real and tokenizer is None:
        tokenizer = load_tokenizer(data, model.config)
    rows = []
    for split in splits:
        dataset = build_dataset(data, model.config, split, task, tokenizer)
        loader = eval_loader(dataset, data, device, rank, world_size)
        recorder = SampleRecorder(task) if predictions_dir is not None else None
        start = time.perf_counter()
        metrics = evaluate(model, loader, task, device, amp, recorder=recorder)
        seconds = time.perf_counter() - start
        if recorder is not None:
            recorder.gather()
            if rank == 0:
                recorder.write(dataset, split, predictions_dir)
        row = {"split": split, **metrics, "seconds": seconds,
               "samples_per_s": metrics["n"] / max(seconds, 1e-9)}
        if not data.real and task == "rec":
            row["colour_guess"] = colour_guess_accuracy(dataset, seed=0)
        rows.append(row)
    return rows


def _paper_dataset(data: DataConfig) -> str:
    """The dataset's name in the paper's tables; none for your own data, whatever its name."""
    if data.annotations:
        return ""
    return dataset_info(data).name if data.real else data.dataset


def eval_table(rows: list[dict], task: str, data: DataConfig, preset: str) -> str:
    """Markdown table: metrics in percent (so headed), the paper's (single / mixed) beside
    them."""
    dataset = _paper_dataset(data)
    paper = {"base": "paper OneRef-B", "large": "paper OneRef-L"}.get(preset, "paper")
    if task == "rec":
        extra = ["colour-guess %"] if any("colour_guess" in r for r in rows) else []
        head = ["split", "samples", "Acc@0.5 %", f"{paper} % (single / mixed)", *extra,
                "samples/s"]
        body = [[r["split"], f"{r['n']:,}", f"{100 * r['acc@0.5']:.2f}",
                 published("acc@0.5", dataset, preset, r["split"]),
                 *([f"{100 * r['colour_guess']:.2f}"] if extra else []),
                 f"{r['samples_per_s']:.1f}"] for r in rows]
    else:
        precs = [f"prec@{t:g}" for t in PREC_THRESHOLDS]
        head = ["split", "samples", "mIoU %", "oIoU %", *(f"{p.capitalize()} %" for p in precs),
                f"{paper} mIoU %", f"{paper} oIoU %", "samples/s"]
        body = [[r["split"], f"{r['n']:,}", f"{100 * r['miou']:.2f}", f"{100 * r['oiou']:.2f}",
                 *(f"{100 * r[p]:.2f}" for p in precs),
                 published("miou", dataset, preset, r["split"]),
                 published("oiou", dataset, preset, r["split"]),
                 f"{r['samples_per_s']:.1f}"] for r in rows]
    # Paper columns only where the paper published something for these rows.
    keep = [i for i, name in enumerate(head)
            if not name.startswith("paper") or any(row[i] != "-" for row in body)]
    head, body = [head[i] for i in keep], [[row[i] for i in keep] for row in body]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


#: What an earlier eval.json must share with this evaluation for its rows to be kept.
_SAME_EVALUATION = ("weights", "task", "dataset", "data", "model", "precision")


def _data_id(data: DataConfig) -> str:
    """Which files a real dataset's samples come from (RefShapes: its generator seed)."""
    if not data.real:
        return (f"RefShapes, seed {data.seed}, val {data.eval_size} / test {data.test_size} "
                f"samples")
    if data.refer_root:
        annotations = f"{data.refer_root} (split by {data.split_by or 'default'})"
    else:
        annotations = data.split_root or data.annotations
    return f"images {data.root}, annotations {annotations}"


def _weights_id(path: Path) -> str:
    """Which weights were evaluated: the file, its size and its modification time."""
    stat = path.stat()
    return f"{path.resolve()} ({stat.st_size} bytes, modified {stat.st_mtime_ns} ns)"


def _earlier(out_dir: str | Path, meta: dict) -> dict | None:
    """The earlier ``eval.json`` in ``out_dir`` when it evaluated the same weights file for
    the same task, data and model in the same precision (else None)."""
    try:
        earlier = json.loads((Path(out_dir) / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), list):
        return None
    # Written before the precision was recorded: the default's (bf16 autocast on a GPU).
    recorded = {"precision": "fp32" if earlier.get("device") == "cpu" else "bf16", **earlier}
    if any(recorded.get(key) != meta[key] for key in _SAME_EVALUATION):
        return None
    return earlier


def _other_splits(earlier: dict | None, splits) -> list[dict]:
    return [] if earlier is None else [
        row for row in earlier["rows"] if isinstance(row, dict) and row.get("split") not in splits]


def _remove_other_samples(out_dir: Path, fresh) -> None:
    """Delete the per-sample files (``--predictions``) in ``out_dir`` of splits not in
    ``fresh``: they belong to the weights of an evaluation that is no longer recorded."""
    keep = {path for split in fresh for path in sample_paths(out_dir, split)}
    for name in SAMPLE_FILES:
        for path in out_dir.glob(name.format("*")):
            if path not in keep:
                path.unlink(missing_ok=True)


def write_eval(out_dir: str | Path, rows: list[dict], meta: dict, table: str) -> list[Path]:
    """``eval.json`` (``meta`` + rows) and ``eval.md`` (a header line + the table) in
    ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    header = (f"# oneref eval: {meta['checkpoint']} ({meta['model']}, {meta['task']}) on "
              f"{meta['dataset']}, {meta['device']} ({meta.get('precision', 'fp32')}), "
              f"{meta['date_utc']}\n\n"
              f"Data: {meta['data']}\n\n")
    return [write_json(out_dir / "eval.json", {**meta, "rows": rows}, sort_keys=False),
            write_text(out_dir / "eval.md", header + table + "\n")]


@dataclasses.dataclass
class EvalReport:
    """What :func:`evaluate_checkpoint` measured and wrote."""

    rows: list[dict]
    table: str
    meta: dict
    paths: list[Path]
    load_summary: str = ""
    #: Splits whose rows come from an earlier eval.json of the same weights.
    kept_splits: list[str] = dataclasses.field(default_factory=list)


def _beside_weights(source: ModelSource) -> Path:
    """Where an evaluation's files go by default: the run folder for a run, its final model
    or one of its checkpoints; a run's other model folder itself (RUN/best); else the
    current folder."""
    run = source.run_dir
    if (run is not None and source.kind == "pretrained"
            and source.model_dir.resolve() != (run / "model").resolve()):
        return source.model_dir
    return run or Path(".")


def evaluate_checkpoint(checkpoint: str | Path, data_changes: dict | None = None,
                        splits: list[str] | None = None, task: str | None = None,
                        preset: str | None = None, size: int | None = None,
                        batch_size: int = 128, device: str = "auto", trust: bool = False,
                        out: str | Path | None = None, predictions: bool = False,
                        amp: str = "auto") -> EvalReport | None:
    """``oneref eval``: the model at ``checkpoint`` on ``splits`` (default: every split of
    its dataset but the training ones), the data its run recorded with ``data_changes``
    applied; writes eval.json / eval.md to ``out`` (default: beside the weights, see
    :func:`_beside_weights`), keeping the other splits' rows of an earlier evaluation of the same
    weights there; with ``predictions`` also each split's per-sample rows
    (``predictions_{split}.jsonl``) and lowest-IoU samples (``worst_{split}.png``). ``amp``:
    auto (bf16 autocast on CUDA), bf16 or fp32 (the reference code's numerics). Under
    ``torchrun`` every rank evaluates its shard and rank 0 reports; other ranks get None."""
    check_amp(amp)
    # torchrun's RANK: the process group starts once the files are checked
    source = ModelSource(checkpoint, preset=preset, trust=trust,
                         quiet=os.environ.get("RANK", "0") != "0")
    sizes = {} if size is None else {"eval_size": size, "test_size": size}
    data = recorded_data(source.train_config, data_changes or {}, eval_batch_size=batch_size,
                         **sizes)
    check_sizes(data, "--size" if size is not None else "")
    task = source.task_for(task)
    splits = [s for s in splits if s] if splits is not None else list(default_splits(data))
    if not splits:
        raise ValueError("--split names no split")
    if repeated := sorted({split for split in splits if splits.count(split) > 1}):
        raise ValueError(f"--split names {', '.join(repeated)} more than once")
    with recorded_paths(source.train_config, data_changes or {}):
        check_data(data, splits)  # the files, before the weights are built
        tokenizer = load_tokenizer(data, source.config) if data.real else None
    # Before the evaluation, which may take long.
    out_dir = make_folder(Path(out) if out else _beside_weights(source), "--out")
    info = init_distributed(device)
    try:
        model = source.build().to(info.device)
        rows = evaluate_splits(model, data, task, splits, info.device, amp, rank=info.rank,
                               world_size=info.world_size, tokenizer=tokenizer,
                               predictions_dir=out_dir if predictions else None)
    finally:
        shutdown()
    if info.rank != 0:
        return None
    meta = {"checkpoint": str(checkpoint), "weights": _weights_id(source.weights_file),
            "task": task, "dataset": data.dataset, "data": _data_id(data),
            "model": model.config.name, "precision": precision_for(info.device, amp),
            "world_size": info.world_size,
            "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda"
            else "cpu", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    earlier = _earlier(out_dir, meta)
    kept = _other_splits(earlier, splits)
    if earlier is None:
        _remove_other_samples(out_dir, splits if predictions else ())
    rows = kept + rows
    table = eval_table(rows, task, data, model.config.name)
    paths = write_eval(out_dir, rows, meta, table)
    if predictions:
        paths += [path for split in splits for path in sample_paths(out_dir, split)]
    summary = source.report.summary(str(checkpoint)) if source.report is not None else ""
    return EvalReport(rows, table, meta, paths, summary, [row["split"] for row in kept])
