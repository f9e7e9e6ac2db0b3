"""The ``oneref`` command: train | pretrain | eval | predict | info | bench.

``oneref train`` with no arguments trains REC on the built-in RefShapes data with the
``small`` preset (the CPU demo: a few minutes on 2 cores), then prints Acc@0.5 on the test
split beside a colour-guess baseline. Settings come from the recipe, then ``--config FILE``
(JSON or YAML), then the flags, then ``--set key=value`` overrides (dotted keys).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


def _add_train_flags(p: argparse.ArgumentParser, pretrain: bool) -> None:
    p.add_argument("--config", metavar="FILE", help="TrainConfig as .json or .yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.grad_clip=0 (repeatable)")
    if not pretrain:
        p.add_argument("--task", choices=("rec", "res"), help="rec (boxes) or res (masks)")
        p.add_argument("--recipe", choices=("refshapes", "reference"), default="refshapes",
                       help="refshapes: CPU demo from scratch (default); reference: the "
                            "paper's two-stage fine-tuning for real data")
    p.add_argument("--model", help="preset: tiny, small, base, large")
    p.add_argument("--dataset", help="refshapes or a real dataset name (unc, gref, ...)")
    p.add_argument("--data-root", help="folder of split files and images (real data)")
    p.add_argument("--steps", type=int, help="optimizer steps of the (last) stage")
    p.add_argument("--epochs", type=int, help="epochs of the (last) stage (steps unset)")
    p.add_argument("--batch-size", type=int, help="per-rank batch of every stage")
    p.add_argument("--lr", type=float, help="peak lr of the (last) stage")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="wall-clock budget of the training loop (0: off)")
    p.add_argument("--train-size", type=int, help="RefShapes training samples")
    p.add_argument("--output-dir", "-o", help="run folder")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from the newest checkpoint of the run folder (or PATH)")
    p.add_argument("--init-from", metavar="DIR", help="start weights (save_pretrained folder)")
    p.add_argument("--checkpoint-interval", type=int, help="save every N steps")
    p.add_argument("--threads", type=int, help="CPU threads (0: torch default)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"))
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the step")
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--fsdp", action="store_true", help="FSDP instead of DDP (torchrun)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if pretrain:
        p.add_argument("--vts", action="store_true", default=None, help="VTS loss on MIM steps")
        p.add_argument("--sts", action="store_true", default=None, help="STS loss on MLM steps")
        p.add_argument("--vqkd", metavar="FILE", help="VQ-KD tokenizer checkpoint (MIM targets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneref", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="REC/RES fine-tuning (default: REC on RefShapes, small)",
                       description="Train REC or RES. Default: REC on RefShapes, small preset.")
    _add_train_flags(p, pretrain=False)
    p = sub.add_parser("pretrain", help="MRefM pre-training (alternating MIM / MLM)",
                       description="Mask Referring Modeling pre-training on RefShapes or "
                                   "real data.")
    _add_train_flags(p, pretrain=True)
    p = sub.add_parser("eval", help="metrics of a trained model on a split",
                       description="REC Acc@0.5 or RES mIoU/oIoU/Prec@X of a trained model.")
    p.add_argument("--checkpoint", default="runs/refshapes_rec", metavar="DIR",
                   help="run folder or save_pretrained folder (default: runs/refshapes_rec)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--task", choices=("rec", "res"), help="default: the run's task")
    p.add_argument("--size", type=int, help="RefShapes split size (default: the run's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p = sub.add_parser("predict", help="ground one expression in one image",
                       description="Print the predicted box and write a PNG with it drawn.")
    p.add_argument("--image", required=True, metavar="PATH", help="input image")
    p.add_argument("--text", required=True, help="referring expression")
    p.add_argument("--checkpoint", default="runs/refshapes_rec", metavar="DIR",
                   help="run folder or save_pretrained folder (default: runs/refshapes_rec)")
    p.add_argument("--out", metavar="PNG", help="output image (default: <image>_pred.png)")
    p.add_argument("--task", choices=("rec", "res"), help="default: the run's task")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p = sub.add_parser("info", help="model presets, parameter counts, op backends",
                       description="Print presets with parameter counts and the op backend "
                                   "in use on each device.")
    p.add_argument("--model", default="small", help="preset to count (default: small)")
    from oneref.bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="cost table, engine comparison, kernel tables, plots",
                       description="Benchmark suite: the paper-style cost table and the "
                                   "engine rows (a)-(e); CPU mode on machines without a GPU.")
    add_bench_arguments(p)
    return parser


# --- train / pretrain ---------------------------------------------------------------------

def _train_config(args, pretrain: bool):
    from oneref.train import config as tc

    if args.config:
        cfg = tc.load_config_file(args.config)
    elif pretrain:
        cfg = tc.pretrain_recipe()
    elif args.recipe == "reference":
        cfg = tc.reference_recipe(args.model or "base")
    else:
        cfg = tc.refshapes_recipe()
    flags = []
    last = len(cfg.stages) - 1
    simple = {"task": "task", "model": "model", "dataset": "data.dataset",
              "data_root": "data.root", "train_size": "data.train_size",
              "output_dir": "output_dir", "resume": "checkpoint.resume",
              "init_from": "checkpoint.init_from", "threads": "threads",
              "checkpoint_interval": "checkpoint.interval", "num_workers": "data.num_workers",
              "device": "device", "amp": "amp", "compile": "compile",
              "grad_checkpointing": "grad_checkpointing", "seed": "seed",
              "time_budget": "time_budget_s", "vts": "pretrain.vts", "sts": "pretrain.sts",
              "vqkd": "pretrain.vqkd_checkpoint", "steps": f"stages.{last}.steps",
              "lr": f"stages.{last}.lr"}
    for attr, key in simple.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")
    if args.epochs is not None:
        flags += [f"stages.{last}.epochs={args.epochs}", f"stages.{last}.steps=0"]
    if args.batch_size is not None:
        flags += [f"stages.{i}.batch_size={args.batch_size}" for i in range(len(cfg.stages))]
    if args.fsdp:
        flags.append('dist.strategy="fsdp"')
    if args.no_progress:
        flags.append("progress=false")
    return tc.apply_overrides(cfg, flags + list(args.overrides))


def _cmd_train(args, pretrain: bool = False) -> int:
    from oneref.train.distributed import is_main
    from oneref.train.trainer import Trainer

    cfg = _train_config(args, pretrain)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    results = trainer.fit()
    if not is_main():
        return 0
    wall = time.perf_counter() - t0
    print(f"run folder: {cfg.output_dir}")
    print(f"steps {results['steps']}, {results['samples_per_s']:.1f} samples/s, "
          f"train {results['train_seconds']:.0f} s, wall {wall:.0f} s")
    if cfg.task == "pretrain":
        print(f"final loss {results.get('final_loss', float('nan')):.4f}")
        return 0
    for split in (cfg.data.eval_split, cfg.data.test_split):
        if split in results:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in results[split].items() if k != "n")
            print(f"{split} ({results[split]['n']} samples): {metrics}")
    if cfg.data.dataset == "refshapes" and cfg.task == "rec" and cfg.final_test:
        from oneref.data.synthetic import colour_guess_accuracy
        from oneref.train.data import build_dataset
        from oneref.train.logger import write_json

        test = build_dataset(cfg.data, trainer.model.config, cfg.data.test_split)
        baseline = colour_guess_accuracy(test, seed=0)
        acc = results[cfg.data.test_split]["acc@0.5"]
        print(f"RefShapes {cfg.data.test_split} Acc@0.5: model {acc:.4f} | colour-guess "
              f"baseline {baseline:.4f}")
        results["colour_guess_baseline"] = baseline
        results["wall_seconds"] = wall
        write_json(Path(cfg.output_dir) / "metrics.json", results)
    return 0


# --- eval / predict / info ------------------------------------------------------------------

def _cmd_eval(args) -> int:
    from oneref.eval.evaluate import evaluate
    from oneref.eval.predict import _find_model_dir
    from oneref.model import OneRef
    from oneref.train.config import TrainConfig
    from oneref.train.data import build_dataset, eval_loader
    from oneref.train.distributed import resolve_device

    model_dir, train_cfg = _find_model_dir(Path(args.checkpoint))
    cfg = TrainConfig.from_dict(train_cfg) if train_cfg else TrainConfig()
    task = args.task or (cfg.task if cfg.task in ("rec", "res") else "rec")
    if args.size is not None:
        cfg.data.test_size = cfg.data.eval_size = args.size
    cfg.data.eval_batch_size = args.batch_size
    device = resolve_device(args.device)
    model = OneRef.from_pretrained(model_dir).to(device)
    dataset = build_dataset(cfg.data, model.config, args.split)
    loader = eval_loader(dataset, cfg.data, device, 0, 1)
    t0 = time.perf_counter()
    metrics = evaluate(model, loader, task, device)
    seconds = time.perf_counter() - t0
    print(f"{args.split} ({metrics['n']} samples, {metrics['n'] / seconds:.1f} samples/s): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n"))
    if cfg.data.dataset == "refshapes" and task == "rec":
        from oneref.data.synthetic import colour_guess_accuracy

        print(f"colour-guess baseline: {colour_guess_accuracy(dataset, seed=0):.4f}")
    return 0


def _cmd_predict(args) -> int:
    from oneref.eval.predict import draw_prediction, load_image, load_predictor
    from oneref.train.distributed import resolve_device

    if not args.text.strip():
        raise ValueError("--text must be a non-empty expression")
    image = load_image(args.image)
    predictor = load_predictor(args.checkpoint, resolve_device(args.device), args.task)
    pred = predictor.predict(image, args.text)
    x1, y1, x2, y2 = pred.box_xyxy
    print(f"box (x1, y1, x2, y2) pixels: {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}")
    out = Path(args.out) if args.out else Path(args.image).with_name(
        Path(args.image).stem + "_pred.png")
    draw_prediction(image, pred, args.text).save(out, format="PNG")
    print(f"wrote {out}")
    return 0


def _cmd_info(args) -> int:
    import torch

    from oneref.config import PRESETS
    from oneref.model import OneRef
    from oneref.info import info
    from oneref.ops.dispatch import current_backend

    if args.model not in PRESETS:
        raise ValueError(f"--model must be one of {sorted(PRESETS)}, got {args.model!r}")
    cfg = PRESETS[args.model]
    with torch.device("meta"):
        model = OneRef.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone_parameters())
    print(f"model {args.model}: img {cfg.img_size}, patch {cfg.patch_size}, dim "
          f"{cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, ffn {cfg.ffn_dim}, "
          f"text {cfg.max_text_len}, sequence {cfg.seq_len}")
    print(f"  parameters: total {total:,}, backbone {backbone:,}, heads {total - backbone:,}")
    print(f"op backend setting: {current_backend()} (ONEREF_BACKEND / use_backend)")
    info()
    return 0


def _cmd_bench(args) -> int:
    from oneref.bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = args.command or "train"
    if args.command is None:
        args = parser.parse_args(["train"] + (argv if argv is not None else sys.argv[1:]))
    handlers = {"train": lambda a: _cmd_train(a), "pretrain": lambda a: _cmd_train(a, True),
                "eval": _cmd_eval, "predict": _cmd_predict, "info": _cmd_info,
                "bench": _cmd_bench}
    try:
        return handlers[command](args)
    except (ValueError, TypeError) as exc:
        print(f"oneref {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
