"""The MRefM ablation in small (``oneref ablate``): what pre-training buys the RefShapes
REC main job, at equal total compute.

Variants (docs/method.md, "Ablation"):

* ``scratch``: the REC recipe for the whole budget;
* ``random``: vanilla masked modelling (random image patches at the referring mask's
  ratio, uniform MLM positions), then REC;
* ``referring``: referring-aware image masking and subject/object-first MLM, then REC;
* ``referring+vts``: the same with the visual target-relation score.

Every variant gets the same wall-clock budget per seed; a pre-trained variant spends
``pretrain_share`` of it pre-training (``oneref pretrain``'s recipe on the fine-tuning
run's train scenes) and the rest fine-tuning from that run (``init_from``). Each run is a
normal run folder under ``runs`` (default ``out/runs``): a finished one (its
``metrics.json`` exists) is read back, an unfinished one resumes from its newest
checkpoint, so a killed ablation continues where it stopped. The results go to
``results.json``, ``summary.md`` (mean +- std per variant) and ``finetune_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path

import torch

from oneref.bench.report import environment
from oneref.io import write_json, write_text
from oneref.train.checkpoint import list_checkpoints
from oneref.train.config import apply_overrides, pretrain_recipe, refshapes_recipe
from oneref.train.logger import read_rows

__all__ = ["VARIANTS", "AblationSettings", "run_ablation", "summary_markdown"]

log = logging.getLogger(__name__)

#: variant -> pre-training overrides (None: no pre-training)
VARIANTS: dict[str, list[str] | None] = {
    "scratch": None,
    "random": ['pretrain.masking="random"', "pretrain.vts=false"],
    "referring": ['pretrain.masking="referring"', "pretrain.vts=false"],
    "referring+vts": ['pretrain.masking="referring"', "pretrain.vts=true"],
}


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


def _run(cfg, run_dir: Path) -> dict:
    """The metrics of the run in ``run_dir``: read back when finished, else trained
    (resuming from its newest checkpoint when there is one)."""
    done = run_dir / "metrics.json"
    if done.exists():
        log.info("ablation: %s finished earlier, read back", run_dir)
        return json.loads(done.read_text())
    from oneref.train.trainer import Trainer  # the loop and the model: loaded on first run

    log.info("ablation: training %s", run_dir)
    return Trainer(cfg).fit()


def _config(recipe, settings: AblationSettings, run_dir: Path, seed: int, budget: float,
            extra: list[str]):
    resume = ['checkpoint.resume="auto"'] if list_checkpoints(run_dir / "checkpoints") else []
    flags = [f"output_dir={json.dumps(str(run_dir))}", f"seed={seed}",
             f"time_budget_s={budget}", *resume, "progress=false",
             f"checkpoint.interval={settings.checkpoint_interval}", *extra,
             *settings.overrides]
    return apply_overrides(recipe(), flags)


def _one(settings: AblationSettings, variant: str, seed: int) -> dict:
    root = Path(settings.runs or Path(settings.out) / "runs") / f"{variant}-seed{seed}"
    pretrain_flags = VARIANTS[variant]
    pretrain_s, pretrain_steps, init = 0.0, 0, []
    budget = settings.budget_s
    if pretrain_flags is not None:
        share = settings.pretrain_share * settings.budget_s
        scenes = apply_overrides(refshapes_recipe(), list(settings.overrides)).data.train_size
        pre = _run(_config(pretrain_recipe, settings, root / "pretrain", seed, share,
                           [f"data.train_size={scenes}", *pretrain_flags]), root / "pretrain")
        pretrain_s, pretrain_steps = pre["train_seconds"], pre["steps"]
        budget = settings.budget_s - share
        init = [f"checkpoint.init_from={json.dumps(str(root / 'pretrain'))}"]
    finetune = _config(refshapes_recipe, settings, root / "finetune", seed, budget, init)
    tuned = _run(finetune, root / "finetune")
    return {"variant": variant, "seed": seed,
            "test_acc@0.5": tuned[finetune.data.test_split]["acc@0.5"],
            "val_acc@0.5": tuned[finetune.data.eval_split]["acc@0.5"],
            "pretrain_s": pretrain_s, "finetune_s": tuned["train_seconds"],
            "steps": tuned["steps"], "pretrain_steps": pretrain_steps,
            "run": str(root)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_markdown(results: dict) -> str:
    """Mean +- std of test / val Acc@0.5 per variant, and the settings."""
    s = results["settings"]
    lines = [f"MRefM ablation on RefShapes (small preset): {s['budget_s']:g} s per variant "
             f"and seed, pre-trained variants {100 * s['pretrain_share']:.0f}% pre-training / "
             f"{100 * (1 - s['pretrain_share']):.0f}% fine-tuning; "
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
    colours = dict(zip(VARIANTS, ("tab:grey", "tab:blue", "tab:orange", "tab:green")))
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


def run_ablation(settings: AblationSettings) -> dict:
    """Run (or continue) every variant x seed; write results.json, summary.md and the PNG
    after each run. Returns the results."""
    settings.validate()
    out = Path(settings.out)
    results = {"settings": dataclasses.asdict(settings), "runs": [],
               "environment": environment(torch.device("cpu"))}
    for seed in settings.seeds:  # seeds outermost: an early stop still compares variants
        for variant in settings.variants:
            results["runs"].append(_one(settings, variant, seed))
            write_json(out / "results.json", results)
            write_text(out / "summary.md", summary_markdown(results) + "\n")
            _plot(results, out / "finetune_curves.png")
    return results
