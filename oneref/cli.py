"""The ``oneref`` command: train | pretrain | eval | predict | convert | info | ablate |
sts-labels | bench.

``oneref train`` with no arguments trains REC on the built-in RefShapes data with the
``small`` preset (the CPU demo: a few minutes on 2 cores), then prints Acc@0.5 on the test
split beside a colour-guess baseline. Real data (docs/data.md) takes the reference code's
flags: ``--dataset unc --data-root IMAGES --split-root SPLITS --tokenizer beit3.spm``.
Settings come from the recipe, then ``--config FILE`` (JSON or YAML, merged onto the recipe),
then the flags, then ``--set key=value`` overrides (dotted keys). The train / pretrain flags
and the data flags are built from the config fields' :class:`~oneref.train.config.Flag`
metadata, so their help is the fields' documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

from oneref.ablation import VARIANTS, AblationSettings, run_ablation, summary_markdown
from oneref.bench import add_arguments as add_bench_arguments
from oneref.bench import run_bench
from oneref.checkpoints import CONFIG_NAME
from oneref.config import PRESETS
from oneref.data.records import own_message
from oneref.eval.predict import draw_prediction, load_image, load_predictor, predict_file
from oneref.eval.splits import evaluate_checkpoint
from oneref.io import make_folder
from oneref.info import info
from oneref.model import OneRef
from oneref.ops.dispatch import BackendUnavailableError, current_backend
from oneref.ops.registry import OPS
from oneref.sources import ModelSource, preset_of
from oneref.train import config as tc
from oneref.train.checkpoint import NEWEST, run_folder_of
from oneref.train.config import AMP_MODES, command_flags
from oneref.train.data import check_sizes
from oneref.train.distributed import is_main, resolve_device, shutdown
from oneref.train.sts_labels import make_sts_labels
from oneref.train.trainer import Trainer

__all__ = ["main", "build_parser"]

_DATA_GROUP = "data (real-data layout: docs/data.md)"
_VERBOSE_HELP = "debug logging, and the traceback behind an error"


def _add_config_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of the config fields ``command`` has (``oneref.train.config.Flag``): their
    help is the field's documentation; the data flags form their own group."""
    data = p.add_argument_group(_DATA_GROUP)
    for key, flag, kind in command_flags(command):
        group = data if key.startswith("data.") else p
        options = {"dest": flag.dest, "help": flag.help}
        if flag.metavar:
            options["metavar"] = flag.metavar
        if flag.const is not None and flag.optional_value:
            options.update(nargs="?", const=flag.const)
        elif flag.const is not None:
            options.update(action="store_const", const=flag.const)
        else:
            options.update(type=kind, choices=flag.choices or None)
        group.add_argument(*flag.names, **options)


def _absolute(value, flag: str):
    """A path flag's value made absolute (``--resume`` without a path stays ``auto``); an
    empty one (``-o "$RUN"`` with RUN unset) would mean the current folder: an error."""
    if not isinstance(value, str) or value in NEWEST:
        return value
    if not value.strip():
        raise ValueError(f"{flag}: empty path")
    return os.path.abspath(os.path.expanduser(value))


def _flag_values(args, command: str, stages: int = 1) -> dict[str, object]:
    """Dotted config key -> value of every config flag given (paths made absolute; a stage
    flag expanded to the stages it applies to). A flag's resets win over a value given for
    the same field (``--epochs 3 --steps 9`` trains 3 epochs)."""
    values, resets = {}, {}
    for key, flag, _ in command_flags(command):
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        value = _absolute(value, flag.names[0]) if flag.path else value
        if not flag.stage:
            values[key] = value
            continue
        field = key.rsplit(".", 1)[1]
        for i in range(stages - 1 if flag.stage == "last" else 0, stages):
            values[f"stages.{i}.{field}"] = value
            resets.update({f"stages.{i}.{reset}": 0 for reset in flag.resets})
    return {**values, **resets}


def _add_weights_flags(p: argparse.ArgumentParser, flag: str, alias: str,
                       default: str | None, required: bool = False) -> None:
    """The weights flag (``alias``: the reference code's name for it) and its trust switch."""
    p.add_argument(flag, alias, dest=flag[2:].replace("-", "_"), default=default, metavar="PATH",
                   required=required,
                   help="run folder, save_pretrained folder or official .pth (BEiT-3 / OneRef)"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle any object in a .pth (runs code from the file; only for "
                        "files you trust)")


def _add_amp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16, or fp32 (the "
                        "reference code's numerics)")


def _add_train_flags(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--config", metavar="FILE", help="TrainConfig as .json or .yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.grad_clip=0 (repeatable)")
    p.add_argument("--recipe", choices=("refshapes", "reference"),
                   help="refshapes: CPU demo from scratch; reference: the paper's schedule for "
                        "real data (default whenever --dataset is not refshapes)")
    _add_config_flags(p, command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneref", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="REC/RES fine-tuning (default: REC on RefShapes, small)",
                       description="Train REC or RES. Default: REC on RefShapes, small preset.")
    _add_train_flags(p, "train")
    p = sub.add_parser("pretrain", help="MRefM pre-training (alternating MIM / MLM)",
                       description="Mask Referring Modeling pre-training on RefShapes or "
                                   "real data.")
    _add_train_flags(p, "pretrain")
    p = sub.add_parser("eval", help="metrics of a trained model on one or more splits",
                       description="REC Acc@0.5 or RES mIoU/oIoU/Prec@X per split, beside the "
                                   "paper's numbers; writes eval.json and eval.md.")
    _add_weights_flags(p, "--checkpoint", "--eval_model", "runs/refshapes_rec")
    p.add_argument("--split", "--eval_set", dest="split",
                   help="comma list, e.g. val,testA,testB (default: every split of the "
                        "dataset but the training ones)")
    p.add_argument("--task", choices=("rec", "res"), help="default: the run's task")
    p.add_argument("--model", help="preset of an official .pth (default: from its shapes)")
    _add_config_flags(p, "eval")
    p.add_argument("--size", type=int, help="RefShapes split size (default: the run's)")
    p.add_argument("--batch-size", type=int, default=128, help="per-rank batch (default 128)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_amp_flag(p)
    p.add_argument("--out", metavar="DIR", help="where eval.json / eval.md go (default: the "
                                                "run folder; RUN/best itself; else the "
                                                "current folder)")
    p.add_argument("--predictions", action="store_true",
                   help="also write predictions_{split}.jsonl (every sample's predicted box "
                        "and IoU) and worst_{split}.png (the 16 lowest-IoU samples, target "
                        "green, prediction red)")
    p = sub.add_parser("predict", help="ground expressions in images",
                       description="One image and expression (--image, --text), or a JSON-lines "
                                   "file of pairs (--input); prints / writes boxes and drawings.")
    _add_weights_flags(p, "--checkpoint", "--eval_model", "runs/refshapes_rec")
    p.add_argument("--tokenizer", metavar="SPM",
                   help="sentencepiece model, or refshapes for the built-in vocabulary "
                        "(default: the one the run recorded)")
    p.add_argument("--model", help="preset of an official .pth (default: from its shapes)")
    p.add_argument("--image", metavar="PATH", help="input image")
    p.add_argument("--text", help="referring expression")
    p.add_argument("--out", metavar="PNG", help="output image (default: <image>_pred.png)")
    p.add_argument("--input", metavar="JSONL",
                   help='lines {"image": path, "text": str} (paths relative to the file)')
    p.add_argument("--out-dir", metavar="DIR", help="with --input: predictions.jsonl + PNGs")
    p.add_argument("--batch-size", type=int, default=16, help="with --input (default 16)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="with --input: skip a bad line or image (default), or stop")
    p.add_argument("--task", choices=("rec", "res"), help="default: the run's task")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_amp_flag(p)
    p = sub.add_parser("convert", help=".pth -> save_pretrained folder",
                       description="Convert an official BEiT-3 / OneRef .pth (printing the "
                                   "load report) or one of our training checkpoints "
                                   "(step_*.pt) into a folder of model.safetensors + "
                                   "config.json.")
    p.add_argument("source", metavar="IN.pth",
                   help="official checkpoint or training checkpoint (step_*.pt)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write")
    p.add_argument("--model", help="preset (default: from the tensor shapes)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle any object in the file (runs code from it)")
    p = sub.add_parser("info", help="model presets, parameter counts, op backends",
                       description="Print presets with parameter counts and the op backend "
                                   "in use on each device.")
    p.add_argument("--model", default="small", help="preset to count (default: small)")
    p = sub.add_parser("ablate", help="the MRefM ablation on RefShapes (resumable)",
                       description="Pre-training variants (scratch, random, referring, "
                                   "referring+vts, referring+vts+sts) x seeds at equal "
                                   "wall-clock budget, then "
                                   "REC fine-tuning; writes results.json, summary.md and a "
                                   "PNG. Rerun the same command to continue a killed one.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="results.json, summary.md, the PNG (and the run folders)")
    p.add_argument("--runs", metavar="DIR", help="run folders (default: OUT/runs)")
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds per variant and seed, pre-training included (default 240)")
    p.add_argument("--pretrain-share", type=float, default=0.4,
                   help="share of the budget spent pre-training (default 0.4)")
    p.add_argument("--seeds", default="0,1,2", help="comma list (default 0,1,2)")
    p.add_argument("--variants", help="comma list (default: every variant: scratch, random, "
                                      "referring, referring+vts, referring+vts+sts)")
    p.add_argument("--pretrain-scenes", type=int, default=0,
                   help="pre-train on train scenes 0..N-1 (default 0: all of the fine-tuning "
                        "run's; STS labels every one of them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set data.train_size=2000")
    p = sub.add_parser("sts-labels", help="STS labels of a split from a trained teacher",
                       description="Per-token semantic target-relation scores lambda_reg * "
                                   "sigmoid(e_reg . w_t) + lambda_img * sigmoid(e_img . w_t) "
                                   "from a teacher, for pre-training with --sts. RefShapes: "
                                   "a side file (--sts-labels); split files: a labelled copy "
                                   "under OUT/{dataset}/ (--split-root OUT); annotation "
                                   "files: a labelled copy in OUT (--annotations OUT).")
    _add_weights_flags(p, "--teacher", "--teacher_model", None, required=True)
    p.add_argument("--out", required=True,
                   help="RefShapes: the labels file (.safetensors); real data: a split root, "
                        "or a folder for annotation files")
    p.add_argument("--split", default="train", help="split to label (default: train)")
    _add_config_flags(p, "sts-labels")
    p.add_argument("--size", type=int,
                   help="RefShapes: label scenes 0..SIZE-1 (default: the teacher run's "
                        "train size)")
    p.add_argument("--lambda-reg", type=float, default=0.5, help="region weight (default 0.5)")
    p.add_argument("--lambda-img", type=float, default=0.5, help="image weight (default 0.5)")
    p.add_argument("--batch-size", type=int, default=128, help="teacher batch (default 128)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_amp_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="cost table, engine comparison, kernel tables, plots",
                       description="Benchmark suite: the paper-style cost table and the "
                                   "engine rows (a)-(e); CPU mode on machines without a GPU.")
    add_bench_arguments(p)
    for command_parser in sub.choices.values():  # -v after the command too; unset keeps the top's
        command_parser.allow_abbrev = False  # --init is not --init-from: named as unknown
        command_parser.add_argument("-v", "--verbose", action="store_true",
                                    default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return parser


# --- train / pretrain ---------------------------------------------------------------------

def _data_values(args, command: str) -> dict:
    """DataConfig fields of the data flags given (paths made absolute). Naming one kind of
    annotation root clears the others a run may have recorded, and a root other than
    ``--refer-root`` its refs file's ``split_by``."""
    values = {key[len("data."):]: value for key, value in _flag_values(args, command).items()
              if key.startswith("data.")}
    roots = ("split_root", "refer_root", "annotations")
    if any(values.get(root) for root in roots):
        cleared = roots if values.get("refer_root") else (*roots, "split_by")
        values = {**dict.fromkeys(cleared, ""), **values}
    return values


def _recipe(args, pretrain: bool, real: bool):
    """The recipe the flags choose, with ``--config FILE`` merged onto it."""
    model = args.model
    # The recipe of the start weights' size; a resume takes its run's (and does not read
    # the start weights again).
    if model is None and args.init_from and not args.resume:
        model = preset_of(args.init_from, trust=bool(args.trust_checkpoint))
    if (args.recipe or ("reference" if real else "refshapes")) == "reference":
        cfg = (tc.reference_pretrain_recipe(model or "base") if pretrain
               else tc.reference_recipe(model or "base"))
    else:
        cfg = (tc.pretrain_recipe() if pretrain else tc.refshapes_res_recipe()
               if getattr(args, "task", None) == "res" else tc.refshapes_recipe())
        if model is not None:
            cfg = tc.apply_overrides(cfg, [f"model={json.dumps(model)}"])
    return tc.load_config_file(args.config, base=cfg) if args.config else cfg


def _recorded_config(args, recipe: tc.TrainConfig) -> tc.TrainConfig | None:
    """With ``--resume``, the settings its run recorded (the ``train_config.json`` of the
    run a named path belongs to; for ``--resume`` alone, of ``-o`` or else the recipe's
    folder), onto which ``--config`` and the flags apply as they would onto a recipe; None
    for a new run or a run folder without them."""
    if not args.resume:
        return None
    if args.resume not in NEWEST:
        folder = run_folder_of(os.path.expanduser(args.resume))
    else:
        folder = Path(os.path.expanduser(args.output_dir or recipe.output_dir))
    path = folder / "train_config.json"
    if not path.is_file():
        return None
    try:
        recorded = tc.TrainConfig.from_record(json.loads(path.read_text()))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a run's settings ({exc})") from exc
    if (recorded.task == "pretrain") != (args.command == "pretrain"):
        other = "pretrain" if recorded.task == "pretrain" else "train"
        raise ValueError(f"{folder} holds a {recorded.task} run: continue it with oneref "
                         f"{other} --resume")
    if args.config:
        recorded = tc.load_config_file(args.config, base=recorded)
    # The run continues where it is (a copied or moved folder: there, not where it began);
    # -o, a flag, still names another.
    return dataclasses.replace(recorded, output_dir=str(folder.resolve()))


def _train_config(args, pretrain: bool):
    command = "pretrain" if pretrain else "train"
    data = _data_values(args, command)
    cfg = _recipe(args, pretrain, data.get("dataset", "refshapes") != "refshapes")
    cfg = _recorded_config(args, cfg) or cfg
    values = _flag_values(args, command, len(cfg.stages))
    values.update({f"data.{name}": value for name, value in data.items()})
    flags = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    cfg = tc.apply_overrides(cfg, flags + list(args.overrides))
    check_sizes(cfg.data, "--train-size" if "train_size" in data else "")
    return cfg


def _cmd_train(args, pretrain: bool = False) -> int:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite replaces "
                         "it: give one of them")
    cfg = _train_config(args, pretrain)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    if trainer.load_report is not None and is_main():
        print(trainer.load_report.summary(cfg.checkpoint.init_from))
    if trainer.resumed_from is not None and is_main():
        print(f"resumed from {trainer.resumed_from} at step {trainer.step}")
    if len(trainer.plan.spans) > 1 and is_main():  # --steps and --epochs set the last one
        print("stages: " + ", ".join(
            f"{span.index} ({span.stage.name}) {span.steps} steps" + (
                " with the backbone frozen" if span.stage.freeze_backbone else "")
            for span in trainer.plan.spans))
    results = trainer.fit()
    if not is_main():
        return 0
    wall = time.perf_counter() - t0
    print(f"run folder: {cfg.output_dir}")
    speed = results["samples_per_s"]
    print(f"steps {results['steps']}, "
          + (f"{speed:.1f} samples/s, " if speed is not None else "")
          + f"train {results['train_seconds']:.0f} s, wall {wall:.0f} s")
    if cfg.task == "pretrain":
        print(f"final loss {results.get('final_loss', float('nan')):.4f}")
        return 0
    for split in (cfg.data.eval_split, cfg.data.test_split):
        if split in results:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in results[split].items() if k != "n")
            print(f"{split} ({results[split]['n']} samples): {metrics}")
    if "colour_guess" in results:
        headline = ("miou", "oiou", "prec@0.5") if cfg.task == "res" else ("acc@0.5",)
        model = results[cfg.data.test_split]
        print(f"RefShapes {cfg.data.test_split}: " + ", ".join(
            f"{k} model {model[k]:.4f} | colour-guess {results['colour_guess'][k]:.4f}"
            for k in headline))
    best = results.get("best")
    if best:
        print(f"best {best['split']} {best['metric']} {best['value']:.4f} at step "
              f"{best['step']}: {Path(cfg.output_dir) / 'best'}")
    if cfg.data.real:
        target = Path(cfg.output_dir) / "best" if best else cfg.output_dir
        print(f"evaluate every split: oneref eval --checkpoint {target}")
    return 0


# --- eval / predict / convert / info ---------------------------------------------------------

def _cmd_eval(args) -> int:
    report = evaluate_checkpoint(
        args.checkpoint, _data_values(args, "eval"),
        splits=[s.strip() for s in args.split.split(",")] if args.split else None,
        task=args.task, preset=args.model, size=args.size, batch_size=args.batch_size,
        device=args.device, trust=args.trust_checkpoint, out=args.out,
        predictions=args.predictions, amp=args.amp)
    if report is None:  # not rank 0
        return 0
    if report.load_summary:
        print(report.load_summary)
    print(report.table)
    if report.kept_splits:
        print(f"({', '.join(report.kept_splits)}: kept from the earlier evaluation of the "
              f"same weights)")
    for path in report.paths:
        print(f"wrote {path}")
    return 0


def _image_format(path: Path) -> str:
    """The image format PIL writes for ``path``'s suffix; ValueError for one it cannot write
    an RGB picture in (tried on one pixel before the model is loaded)."""
    image_format = Image.registered_extensions().get(path.suffix.lower())
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=image_format)
    except (KeyError, OSError, ValueError):  # unknown, read-only, or not for RGB pictures
        raise ValueError(f"--out {path}: cannot write {path.suffix!r} images; use .png or "
                         ".jpg") from None
    return image_format


def _cmd_predict(args) -> int:
    if args.input is None and (args.image is None or args.text is None):
        raise ValueError("give --image and --text, or --input pairs.jsonl with --out-dir")
    if args.input is not None and (args.image or args.text):
        raise ValueError("--input replaces --image/--text; give one or the other")
    if args.input is not None and not args.out_dir:
        raise ValueError("--input needs --out-dir (where predictions.jsonl and the PNGs go)")
    if args.input is None and args.out_dir:
        raise ValueError("--out-dir goes with --input; name the drawing of one --image with "
                         "--out PNG")
    if args.input is not None and args.out:
        raise ValueError("--out names the drawing of one --image; with --input the drawings "
                         "go to --out-dir")
    if args.text is not None and not args.text.strip():
        raise ValueError("--text must be a non-empty expression")
    image = out = None
    if args.image is not None:  # the drawing's file and format, checked before any loading
        out = Path(args.out) if args.out else Path(args.image).with_name(
            Path(args.image).stem + "_pred.png")
        out_format = _image_format(out)
        make_folder(out.parent, "--out's folder")
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; name the PNG to write")
        image = load_image(args.image)
    if args.input is not None:  # created once the input lines are read
        make_folder(args.out_dir, "--out-dir", create=False)
    predictor = load_predictor(args.checkpoint, resolve_device(args.device), args.task,
                               tokenizer=args.tokenizer, preset=args.model,
                               trust=args.trust_checkpoint, amp=args.amp)
    if predictor.report is not None:
        print(predictor.report.summary(args.checkpoint))
    if args.input is not None:
        result = predict_file(predictor, args.input, args.out_dir, args.batch_size,
                              args.on_error)
        print(f"{result['predicted']} predictions, {result['skipped']} lines skipped: "
              f"{result['predictions']}")
        return 0
    pred = predictor.predict(image, args.text)
    if pred.empty:
        print("box: none (the mask is empty)")
    else:
        x1, y1, x2, y2 = pred.box_xyxy
        print(f"box (x1, y1, x2, y2) pixels: {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}")
    print(f"score {pred.score:.3f} (highest patch probability)"
          + ("" if pred.mask is None else f", mask {int(pred.mask.sum())} pixels"))
    draw_prediction(image, pred, args.text).save(out, format=out_format)
    print(f"wrote {out}")
    return 0


def _cmd_convert(args) -> int:
    if (Path(args.source) / "model" / CONFIG_NAME).is_file():
        raise ValueError(f"{args.source} is a run folder: its model/ is a save_pretrained "
                         "folder already; convert one of its checkpoints/step_*.pt instead")
    if not Path(args.source).is_file():
        raise ValueError(f"{args.source} is not a file (an official .pth or a training "
                         "checkpoint step_*.pt is expected)")
    source = ModelSource(args.source, preset=args.model, trust=args.trust_checkpoint)
    make_folder(args.out_dir, "OUT_DIR")
    model = source.build()
    if source.report is not None:  # an official file's renaming and resizing
        print(source.report.summary(args.source))
    model.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir} ({model.config.name}: model.safetensors + config.json)")
    return 0


def _cmd_info(args) -> int:
    if args.model not in PRESETS:
        raise ValueError(f"--model must be one of {sorted(PRESETS)}, got {args.model!r}")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        models = {name: OneRef.from_config(preset) for name, preset in PRESETS.items()}
    print("presets (parameters at image size): " + ", ".join(
        f"{name} {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M at {m.config.img_size} px"
        for name, m in models.items()))
    cfg, model = PRESETS[args.model], models[args.model]
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone_parameters())
    print(f"model {args.model}: img {cfg.img_size}, patch {cfg.patch_size}, dim "
          f"{cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, ffn {cfg.ffn_dim}, "
          f"text {cfg.max_text_len}, sequence {cfg.seq_len}")
    print(f"  parameters: total {total:,}, backbone {backbone:,}, heads {total - backbone:,}")
    default = current_backend()
    per_op = "".join(f"; {op}: {setting}" for op in OPS
                     if (setting := current_backend(op)) != default)
    print(f"op backend setting: {default}{per_op} (ONEREF_BACKEND / use_backend)")
    info()
    return 0


def _cmd_ablate(args) -> int:
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    settings = AblationSettings(
        out=str(Path(args.out).absolute()),
        runs=str(Path(args.runs).absolute()) if args.runs else "", budget_s=args.budget,
        pretrain_share=args.pretrain_share, seeds=seeds,
        variants=(tuple(v.strip() for v in args.variants.split(",") if v.strip())
                  if args.variants else tuple(VARIANTS)),
        overrides=tuple(args.overrides), pretrain_scenes=args.pretrain_scenes)
    results = run_ablation(settings)
    print(summary_markdown(results))
    print(f"\nresults: {Path(args.out) / 'results.json'}")
    return 0


def _cmd_sts_labels(args) -> int:
    data = _data_values(args, "sts-labels")
    path = make_sts_labels(args.teacher, args.out, split=args.split,
                           lambda_reg=args.lambda_reg, lambda_img=args.lambda_img,
                           device=resolve_device(args.device), trust=args.trust_checkpoint,
                           progress=not args.no_progress, data_changes=data, size=args.size,
                           batch_size=args.batch_size, amp=args.amp)
    hint = {".pth": f"--split-root {args.out}",
            ".jsonl": f"--annotations {args.out}"}.get(path.suffix, f"--sts-labels {path}")
    rest = (" with the teacher's --dataset, --data-root and --tokenizer"
            if path.suffix in (".pth", ".jsonl") else "")
    print(f"wrote {path}\npre-train with them: oneref pretrain --sts {hint}{rest}")
    return 0


def _cmd_bench(args) -> int:
    return run_bench(args)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; an unknown option is reported by its subcommand's parser (with that
    command's usage) beside the closest options it has."""
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    if args.command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[args.command]
    options = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for item in unknown:
        close = difflib.get_close_matches(item.split("=")[0], options, n=2)
        hints.append(f"{item} (did you mean {' or '.join(close)}?)" if close else item)
    parser.error(f"unrecognized arguments: {' '.join(hints)}")


#: Commands that do not split their work over torchrun's ranks.
_ONE_PROCESS = ("predict", "convert", "sts-labels", "ablate", "bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(parser, argv)
    if args.command is None:  # `oneref` alone (or with -v) runs the main job
        args = _parse(parser, ["train"] + argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = args.command
    handlers = {"train": lambda a: _cmd_train(a), "pretrain": lambda a: _cmd_train(a, True),
                "eval": _cmd_eval, "predict": _cmd_predict, "convert": _cmd_convert,
                "info": _cmd_info, "bench": _cmd_bench, "ablate": _cmd_ablate,
                "sts-labels": _cmd_sts_labels}
    try:
        if command in _ONE_PROCESS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("runs in one process (every rank would do the whole job and "
                             "write the same files): run it without torchrun")
        code = handlers[command](args)
        try:
            shutdown(finished=True)
        except RuntimeError as exc:  # gloo / NCCL: a peer's process ended without finishing
            print(f"oneref {command}: error: this rank finished its work, but another rank "
                  f"stopped before the end (its own error says why): {exc}", file=sys.stderr)
            return 1
        return code
    except (ValueError, TypeError, OSError, BackendUnavailableError) as exc:
        if args.verbose:  # where it was raised, for a report
            traceback.print_exc()
        print(f"oneref {command}: error: {own_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a training run says where it stopped (TrainingInterrupted)
        print(f"oneref {command}: interrupted" + (f": {exc}" if str(exc) else ""),
              file=sys.stderr)
        return 128 + getattr(exc, "signal_number", signal.SIGINT)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
