"""The MRefM ablation in small (``oneref ablate``): what pre-training buys the RefShapes
REC main job, at equal total compute.

Variants (docs/method.md, "Ablation"):

* ``scratch``: the REC recipe for the whole budget;
* ``random``: vanilla masked modelling (random image patches at the referring mask's
  ratio, uniform MLM positions), then REC;
* ``referring``: referring-aware image masking and subject/object-first MLM, then REC;
* ``referring+vts``: the same with the visual target-relation score;
* ``referring+vts+sts``: and the semantic target-relation score, its labels from the same
  seed's ``scratch`` run as teacher (``oneref sts-labels``; labelling is not counted in the
  budget: the paper's teacher is trained elsewhere too).

Every variant gets the same wall-clock budget per seed; a pre-trained variant spends
``pretrain_share`` of it pre-training (``oneref pretrain``'s recipe on the fine-tuning
run's train scenes) and the rest fine-tuning from that run (``init_from``). Each run is a
normal run folder under ``runs`` (default ``out/runs``): a finished one (its
``metrics.json`` exists) is read back, an unfinished one resumes from its newest
checkpoint, so a killed ablation continues where it stopped; one begun with other
settings is refused. The results go to
``results.json``, ``summary.md`` (mean +- std per variant) and ``finetune_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from oneref.bench.report import environment
from oneref.io import write_json, write_text
from oneref.train.checkpoint import list_checkpoints
from oneref.train.config import apply_overrides, pretrain_recipe, refshapes_recipe
from oneref.train.distributed import resolve_device
from oneref.train.interrupt import TrainingInterrupted
from oneref.train.logger import read_rows
from oneref.train.sts_labels import make_sts_labels
from oneref.train.trainer import Trainer

__all__ = ["VARIANTS", "AblationSettings", "run_ablation", "summary_markdown"]

log = logging.getLogger(__name__)

#: variant -> pre-training overrides (None: no pre-training)
VARIANTS: dict[str, list[str] | None] = {
    "scratch": None,
    "random": ['pretrain.masking="random"', "pretrain.vts=false"],
    "referring": ['pretrain.masking="referring"', "pretrain.vts=false"],
    "referring+vts": ['pretrain.masking="referring"', "pretrain.vts=true"],
    "referring+vts+sts": ['pretrain.masking="referring"', "pretrain.vts=true",
                          "pretrain.sts=true"],
}
#: the variant whose run teaches STS
TEACHER = "scratch"


@dataclasses.dataclass
class AblationSettings:
    """What ``oneref ablate`` runs."""

    out: str
    runs: str = ""                   # run folders (default: out/runs)
    budget_s: float = 240.0          # per variant and seed: pre-training + fine-tuning
    pretrain_share: float = 0.4      # of the budget, for the pre-trained variants
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    overrides: tuple[str, ...] = ()  # applied to every run (``--set``)
    checkpoint_interval: int = 200   # steps: what a killed run resumes from
    pretrain_scenes: int = 0         # pre-train on scenes 0..N-1 (0: all fine-tuning scenes)

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; variants: "
                             f"{', '.join(VARIANTS)}")
        if self.budget_s <= 0 or not 0.0 < self.pretrain_share < 1.0:
            raise ValueError(f"budget must be > 0 s and the pre-training share in (0, 1), got "
                             f"{self.budget_s} s and {self.pretrain_share}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.pretrain_scenes < 0:
            raise ValueError(f"pretrain_scenes must be >= 0, got {self.pretrain_scenes}")
        sts = [v for v in self.variants if _uses_sts(v)]
        if sts and TEACHER not in self.variants:
            raise ValueError(f"{', '.join(sts)} take STS labels from the {TEACHER!r} run of "
                             f"the same seed: add {TEACHER!r} to the variants")


def _uses_sts(variant: str) -> bool:
    return "pretrain.sts=true" in (VARIANTS[variant] or [])


def _run(cfg, run_dir: Path) -> dict:
    """The metrics of the run in ``run_dir``: read back when finished, else trained
    (resuming from its newest checkpoint when there is one). A run begun with other settings
    (another budget, preset or override) is refused: its metrics would be reported as
    these settings'."""
    recorded = run_dir / "train_config.json"
    if recorded.is_file():
        changes = [change for change in cfg.changes_from(json.loads(recorded.read_text()))
                   if not change.startswith("checkpoint.resume")]
        if changes:
            raise ValueError(f"ablation: {run_dir} was run with other settings "
                             f"({'; '.join(changes)}): give another --out, or remove that "
                             "folder to run it again")
    done = run_dir / "metrics.json"
    if done.exists():
        log.info("ablation: %s finished earlier, read back", run_dir)
        return json.loads(done.read_text())
    log.info("ablation: training %s", run_dir)
    return Trainer(cfg).fit()


def _budget_used(metrics: dict) -> float:
    """Budget seconds a run used, over every process that worked on it (runs finished
    before ``elapsed_s`` was recorded give their last process's ``train_seconds``)."""
    return metrics.get("elapsed_s", metrics["train_seconds"])


def _config(recipe, settings: AblationSettings, run_dir: Path, seed: int, budget: float,
            extra: list[str]):
    resume = ['checkpoint.resume="auto"'] if list_checkpoints(run_dir / "checkpoints") else []
    flags = [f"output_dir={json.dumps(str(run_dir))}", f"seed={seed}",
             f"time_budget_s={budget}", *resume, "progress=false",
             f"checkpoint.interval={settings.checkpoint_interval}", *settings.overrides,
             *extra]  # the variant's own settings win over the shared --set overrides
    return apply_overrides(recipe(), flags)


def _run_dir(settings: AblationSettings, variant: str, seed: int) -> Path:
    return Path(settings.runs or Path(settings.out) / "runs") / f"{variant}-seed{seed}"


def _sts_labels(settings: AblationSettings, cfg, seed: int, path: Path) -> float | None:
    """Label the pre-training scenes of ``cfg`` with the seed's teacher run into ``path``
    (kept when it exists, its time read back from ``path``.json: None when not recorded);
    returns the seconds."""
    timing = path.with_suffix(".json")
    if path.exists():
        return json.loads(timing.read_text())["seconds"] if timing.exists() else None
    start = time.perf_counter()
    make_sts_labels(_run_dir(settings, TEACHER, seed) / "finetune", path, cfg.data,
                    device=resolve_device(cfg.device), progress=False)
    seconds = time.perf_counter() - start
    write_json(timing, {"seconds": seconds})
    return seconds


def _one(settings: AblationSettings, variant: str, seed: int) -> dict:
    root = _run_dir(settings, variant, seed)
    pretrain_flags = VARIANTS[variant]
    pretrain_s, pretrain_steps, label_s, init = 0.0, 0, 0.0, []
    budget = settings.budget_s
    if pretrain_flags is not None:
        share = settings.pretrain_share * settings.budget_s
        scenes = (settings.pretrain_scenes or apply_overrides(
            refshapes_recipe(), list(settings.overrides)).data.train_size)
        flags = [f"data.train_size={scenes}", *pretrain_flags]
        labels = root / "sts_labels.safetensors" if _uses_sts(variant) else None
        if labels:
            flags.append(f"pretrain.sts_labels={json.dumps(str(labels))}")
        pre_cfg = _config(pretrain_recipe, settings, root / "pretrain", seed, share, flags)
        if labels:
            label_s = _sts_labels(settings, pre_cfg, seed, labels)
        pre = _run(pre_cfg, root / "pretrain")
        pretrain_s, pretrain_steps = _budget_used(pre), pre["steps"]
        budget = settings.budget_s - share
        init = [f"checkpoint.init_from={json.dumps(str(root / 'pretrain'))}"]
    finetune = _config(refshapes_recipe, settings, root / "finetune", seed, budget, init)
    tuned = _run(finetune, root / "finetune")
    return {"variant": variant, "seed": seed,
            "test_acc@0.5": tuned[finetune.data.test_split]["acc@0.5"],
            "val_acc@0.5": tuned[finetune.data.eval_split]["acc@0.5"],
            "pretrain_s": pretrain_s, "finetune_s": _budget_used(tuned),
            "steps": tuned["steps"], "pretrain_steps": pretrain_steps,
            "sts_label_s": label_s, "run": str(root)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_markdown(results: dict) -> str:
    """Mean +- std of test / val Acc@0.5 per variant, and the settings."""
    s = results["settings"]
    model = apply_overrides(refshapes_recipe(), list(s["overrides"])).model
    scenes = f"scenes 0..{s['pretrain_scenes'] - 1}" if s["pretrain_scenes"] else "all scenes"
    lines = [f"MRefM ablation on RefShapes ({model} preset): {s['budget_s']:g} s per variant "
             f"and seed, pre-trained variants {100 * s['pretrain_share']:.0f}% pre-training / "
             f"{100 * (1 - s['pretrain_share']):.0f}% fine-tuning (pre-training on train "
             f"{scenes}); "
             f"{results['environment'].get('cpu', 'CPU')}, {results['environment']['date_utc']}",
             "", "| variant | seeds | test Acc@0.5 | val Acc@0.5 | fine-tune steps |",
             "|---|---|---|---|---|"]
    for variant in s["variants"]:
        runs = [r for r in results["runs"] if r["variant"] == variant]
        if not runs:
            continue
        test, val = (_mean_std([r[k] for r in runs]) for k in ("test_acc@0.5", "val_acc@0.5"))
        steps = statistics.fmean(r["steps"] for r in runs)
        lines.append(f"| {variant} | {len(runs)} | {test[0]:.4f} +- {test[1]:.4f} | "
                     f"{val[0]:.4f} +- {val[1]:.4f} | {steps:.0f} |")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    """Fine-tuning loss curves, one colour per variant, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colours = dict(zip(VARIANTS, ("tab:grey", "tab:blue", "tab:orange", "tab:green",
                                  "tab:red")))
    for run in results["runs"]:
        rows = [r for r in read_rows(Path(run["run"]) / "finetune")
                if r.get("split") == "train" and r.get("loss") not in (None, "")]
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=0.9,
                color=colours.get(run["variant"]), alpha=0.8,
                label=run["variant"] if run["seed"] == results["settings"]["seeds"][0] else None)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("REC loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("RefShapes REC fine-tuning after each pre-training variant")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_ablation(settings: AblationSettings, progress: bool = True) -> dict:
    """Run (or continue) every variant x seed, with a progress bar of the runs; write
    results.json, summary.md and the PNG after each run. Returns the results."""
    settings.validate()
    out = Path(settings.out)
    results = {"settings": dataclasses.asdict(settings), "runs": [],
               "environment": environment(torch.device("cpu"))}
    # Seeds outermost: an early stop still compares variants. Variants in the table's order,
    # so the STS teacher (scratch) is trained before the variant that needs it.
    variants = [v for v in VARIANTS if v in settings.variants]
    plan = [(seed, variant) for seed in settings.seeds for variant in variants]
    with tqdm(plan, desc="ablate", unit="run", disable=not progress) as bar:
        for seed, variant in bar:
            bar.set_postfix_str(f"{variant}, seed {seed}")
            try:
                results["runs"].append(_one(settings, variant, seed))
            except TrainingInterrupted as stop:  # each run resumes as part of the ablation
                raise TrainingInterrupted(stop.what, stop.signal_number,
                                          resume="the same oneref ablate command") from None
            write_json(out / "results.json", results)
            write_text(out / "summary.md", summary_markdown(results) + "\n")
            _plot(results, out / "finetune_curves.png")
    return results
