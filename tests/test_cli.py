"""The `oneref` command: help on every subcommand, predict / eval / info, clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from oneref.cli import build_parser, main

SUBCOMMANDS = ("train", "pretrain", "eval", "predict", "info", "bench", "ablate", "convert")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: oneref " + command)
    assert "--help" in out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out


def test_train_flags_become_config():
    from oneref.cli import _train_config

    args = build_parser().parse_args(["train", "--model", "tiny", "--steps", "7", "--lr",
                                      "0.01", "--batch-size", "3", "--set", "optim.grad_clip=0",
                                      "--resume"])
    cfg = _train_config(args, pretrain=False)
    assert cfg.model == "tiny" and cfg.stages[-1].steps == 7 and cfg.stages[-1].lr == 0.01
    assert cfg.stages[0].batch_size == 3 and cfg.optim.grad_clip == 0
    assert cfg.checkpoint.resume == "auto" and cfg.task == "rec"
    for order in (["--epochs", "3", "--steps", "9"], ["--steps", "9", "--epochs", "3"]):
        cfg = _train_config(build_parser().parse_args(["train", *order]), pretrain=False)
        assert (cfg.stages[-1].epochs, cfg.stages[-1].steps) == (3, 0)  # --epochs unsets steps
    args = build_parser().parse_args(["pretrain", "--vts", "--steps", "4"])
    cfg = _train_config(args, pretrain=True)
    assert cfg.task == "pretrain" and cfg.pretrain.vts and cfg.stages[-1].steps == 4


def _sample_value(flag, kind):
    """A value for ``flag`` that no recipe has as its default."""
    if flag.choices:
        return flag.choices[-1]
    return {int: "3", float: "0.25", str: "somewhere"}[kind]


@pytest.mark.parametrize("command", ("train", "pretrain"))
def test_every_config_flag_sets_the_field_it_documents(command):
    """The flags are built from the config fields (oneref.train.config.Flag): each one,
    given alone, lands in its field with the value (paths absolute, stage flags on the
    stages their help names), and its help is the field's documentation."""
    import dataclasses
    import os

    from oneref.cli import _train_config
    from oneref.train.config import TrainConfig, command_flags

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    helps = {a.dest: a.help for a in sub._actions}
    flags = list(command_flags(command))
    assert {"data.root", "threads", "stages.*.lr", "checkpoint.init_from"} <= {k for k, *_ in flags}
    for key, flag, kind in flags:
        assert helps[flag.dest] == flag.help
        argv = [command, flag.names[0]]
        if flag.const is None:
            argv.append(_sample_value(flag, kind))
        if key.startswith("data.") and key not in ("data.dataset", "data.train_size"):
            argv += ["--dataset", "unc"]  # real-data flags need a real dataset
        if key == "data.split_by":
            argv += ["--refer-root", "refer"]  # the refs file it picks
        if key == "pretrain.sts_labels":
            argv.append("--sts")
        if key == "checkpoint.keep_best":
            argv.append("--eval-every-epoch")  # the scores it compares
        if key == "checkpoint.init_from":
            argv += ["--model", "tiny"]  # else the recipe is read from the (absent) weights
        cfg = _train_config(parser.parse_args(argv), pretrain=command == "pretrain")
        expected = flag.const if flag.const is not None else kind(argv[2])
        if flag.path and isinstance(expected, str) and expected != "auto":
            expected = os.path.abspath(expected)
        if key.startswith("stages.*."):
            name = key.rsplit(".", 1)[1]
            stages = cfg.stages if flag.stage == "all" else cfg.stages[-1:]
            assert all(getattr(s, name) == expected for s in stages), key
            assert all(getattr(s, r) == 0 for s in stages for r in flag.resets), key
            continue
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == expected, (key, node, expected)
    documented = {f.name for f in dataclasses.fields(TrainConfig) if "help" in f.metadata}
    assert {"threads", "time_budget_s", "on_nan"} <= documented


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding an untrained tiny model and its training config."""
    from oneref.model import OneRef
    from oneref.train.config import DataConfig, refshapes_recipe

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    OneRef.from_config("tiny").save_pretrained(run / "model")
    cfg = refshapes_recipe(model="tiny", data=DataConfig(eval_size=8, test_size=8))
    (run / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    return run


@pytest.fixture()
def scene_png(tmp_path):
    from oneref.data.shapes import render_scene
    from oneref.data.synthetic import RefShapes

    scene = RefShapes("test", size=2, img_size=96).scene(0)
    path = tmp_path / "scene.png"
    render_scene(list(scene.shapes), 96, scene.background).resize((120, 96)).save(path)
    return path


def test_predict_writes_png_with_box(run_dir, scene_png, tmp_path, capsys):
    out = tmp_path / "pred.png"
    code = main(["predict", "--image", str(scene_png), "--text", "the red circle",
                 "--checkpoint", str(run_dir), "--out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "box (x1, y1, x2, y2)" in printed
    x1, y1, x2, y2 = (float(v) for v in printed.split("pixels:")[1].split()[:4])
    assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 96
    drawn = np.asarray(Image.open(out).convert("RGB"))
    original = np.asarray(Image.open(scene_png).convert("RGB"))
    assert drawn.shape == original.shape
    # The box outline is pure red (the scene's shapes are jittered, never exactly red).
    red = np.all(drawn == (255, 0, 0), axis=-1)
    assert red.sum() > 20 and not np.all(original == (255, 0, 0), axis=-1).any()
    # bf16 autocast (--amp bf16; auto does so on CUDA): the box to bf16 rounding.
    assert main(["predict", "--image", str(scene_png), "--text", "the red circle",
                 "--checkpoint", str(run_dir), "--out", str(out), "--amp", "bf16"]) == 0
    bf16_box = [float(v) for v in capsys.readouterr().out.split("pixels:")[1].split()[:4]]
    np.testing.assert_allclose(bf16_box, [x1, y1, x2, y2], atol=3)


def test_predict_res_draws_mask(run_dir, scene_png, tmp_path, capsys):
    """A REC run's RES head never trained: asking it for masks is an error; a RES run (here
    the same weights, recorded as one) draws them without being asked."""
    out = tmp_path / "mask.png"
    predict = ["predict", "--image", str(scene_png), "--text", "the blue square", "--out",
               str(out), "--task", "res", "--device", "cpu", "--checkpoint"]
    assert main([*predict, str(run_dir / "model")]) == 2
    assert "was fine-tuned for rec: its res head never trained" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--task", "res", "--size", "8"]) == 2
    assert "use --task rec" in capsys.readouterr().err
    res_run = tmp_path / "res_run"
    shutil.copytree(run_dir, res_run)
    recorded = json.loads((res_run / "train_config.json").read_text())
    (res_run / "train_config.json").write_text(json.dumps({**recorded, "task": "res"}))
    predict.remove("--task")
    predict.remove("res")
    assert main([*predict, str(res_run)]) == 0
    assert "mask" in capsys.readouterr().out and Image.open(out).size == (120, 96)
    assert main([*predict[:-1], "--task", "rec", "--checkpoint", str(res_run)]) == 2
    assert "fine-tuned for res: its rec head never trained" in capsys.readouterr().err
    recorded["res_loss"]["rec_weight"] = 1.0  # the RefShapes RES recipe trains boxes too
    (res_run / "train_config.json").write_text(json.dumps({**recorded, "task": "res"}))
    assert main([*predict[:-1], "--task", "rec", "--checkpoint", str(res_run)]) == 0
    (res_run / "train_config.json").write_text(json.dumps({**recorded, "task": "pretrain"}))
    assert main([*predict, str(res_run)]) == 2  # no head of a pre-training run trained
    assert main(["eval", "--checkpoint", str(res_run), "--size", "8"]) == 2
    assert capsys.readouterr().err.count(f"{res_run} is an MRefM pre-training run: its REC and "
                                         "RES heads never trained (fine-tune it first") == 2


def test_predict_writes_the_format_its_suffix_names(run_dir, scene_png, tmp_path, capsys):
    predict = ["predict", "--image", str(scene_png), "--text", "the blue square",
               "--checkpoint", str(run_dir), "--device", "cpu", "--out"]
    assert main([*predict, str(tmp_path / "drawn.jpg")]) == 0
    assert Image.open(tmp_path / "drawn.jpg").format == "JPEG"
    assert main([*predict, str(tmp_path / "drawn.xyz")]) == 2
    assert "cannot write '.xyz' images; use .png or .jpg" in capsys.readouterr().err
    for suffix in (".psd", ".xbm"):  # a format PIL only reads; one not for RGB pictures
        assert main([*predict, str(tmp_path / f"drawn{suffix}")]) == 2
        assert f"cannot write '{suffix}' images" in capsys.readouterr().err


def test_an_unknown_option_is_named_by_its_command_with_the_closest(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stpes", "3"])
    err = capsys.readouterr().err
    assert "usage: oneref train" in err
    assert "unrecognized arguments: --stpes (did you mean --steps" in err
    with pytest.raises(SystemExit):
        main(["eval", "--chekpoint", "x"])
    assert "oneref eval: error: unrecognized arguments: --chekpoint (did you mean " \
           "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a prefix is not taken for the longer flag
        main(["train", "--init", "scratch"])
    assert "unrecognized arguments: --init (did you mean --init-from" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "convert"], ["convert", "-v"]])
def test_verbose_before_or_after_the_command_prints_the_traceback(argv, tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    assert main([*argv, missing, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().endswith(f"oneref convert: error: {missing} is not a file (an official "
                                 ".pth or a training checkpoint step_*.pt is expected)")
    assert main(["convert", missing, str(tmp_path / "out")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_predict_bad_inputs(run_dir, scene_png, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    assert main(["predict", "--image", str(corrupt), "--text", "the red circle",
                 "--checkpoint", str(run_dir)]) == 2
    assert str(corrupt) in capsys.readouterr().err
    assert main(["predict", "--image", str(tmp_path / "none.png"), "--text", "x",
                 "--checkpoint", str(run_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", "--image", str(scene_png), "--text", "   ",
                 "--checkpoint", str(run_dir)]) == 2
    assert "non-empty" in capsys.readouterr().err
    assert main(["predict", "--image", str(scene_png), "--text", "the red circle",
                 "--checkpoint", str(tmp_path / "no_run")]) == 2
    assert "no_run" in capsys.readouterr().err


def test_outputs_that_cannot_be_written_name_their_flag(run_dir, scene_png, tmp_path, capsys):
    """A file where a folder must go, or a folder where a file must: named, before the model
    is loaded; a missing folder for the drawing is created."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": str(scene_png), "text": "the red circle"}) + "\n")
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(pairs), "--out-dir",
                 str(scene_png)]) == 2
    assert (f"--out-dir {scene_png}: cannot create the folder (a file is there)"
            in capsys.readouterr().err)
    one = ["predict", "--checkpoint", str(run_dir), "--image", str(scene_png), "--text",
           "the red circle", "--device", "cpu", "--out"]
    assert main([*one, str(tmp_path / "new" / "drawn.png")]) == 0
    assert (tmp_path / "new" / "drawn.png").is_file()
    assert main([*one, str(tmp_path / "drawn.png")]) == 0
    (tmp_path / "folder.png").mkdir()
    assert main([*one, str(tmp_path / "folder.png")]) == 2
    assert f"--out {tmp_path / 'folder.png'} is a folder" in capsys.readouterr().err
    step = _step_checkpoint(tmp_path)
    assert main(["convert", str(step), str(scene_png)]) == 2
    assert (f"OUT_DIR {scene_png}: cannot create the folder (a file is there)"
            in capsys.readouterr().err)


def test_train_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["train", "--config", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"error: config file {bad} is not valid YAML: while parsing" in \
        capsys.readouterr().err


def test_backend_setting_that_cannot_run_is_an_error_before_training(tmp_path, monkeypatch,
                                                                     capsys):
    """An ONEREF_BACKEND item naming a backend that lacks the op fails at start, with the op
    and the reason, and no run folder is written; a typo in an op name is named too."""
    out = tmp_path / "run"
    monkeypatch.setenv("ONEREF_BACKEND", "auto,multiway_attention=cuda")
    assert main(["train", "--time-budget", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("oneref train: error: oneref.ops.multiway_attention: backend 'cuda' "
            "(ONEREF_BACKEND='auto,multiway_attention=cuda') cannot run here") in err
    assert "cuda backend does not implement multiway_attention" in err and not out.exists()
    monkeypatch.setenv("ONEREF_BACKEND", "multiway_atention=torch")
    assert main(["info", "--model", "tiny"]) == 2
    assert "unknown op(s) 'multiway_atention'" in capsys.readouterr().err


def test_a_bad_model_override_value_is_an_error_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--time-budget", "1", "--output-dir", str(out), "--set",
                 "model_overrides.residual_dtype=fp16"]) == 2
    assert ("oneref train: error: residual_dtype must be one of ('compute', 'params'), "
            "got 'fp16'") in capsys.readouterr().err
    assert not out.exists()


def test_info_prints_per_op_settings(monkeypatch, capsys):
    monkeypatch.setenv("ONEREF_BACKEND", "auto,multiway_layer_norm=torch")
    assert main(["info", "--model", "tiny"]) == 0
    assert "op backend setting: auto; multiway_layer_norm: torch" in capsys.readouterr().out


def test_a_rank_whose_peer_stopped_before_the_end_says_so(monkeypatch, capsys):
    """Under torchrun, the final barrier of a rank that finished fails when another rank's
    process ended first: an error naming that, not gloo's traceback."""
    calls = []

    def lost_peer():
        raise RuntimeError("Connection closed by peer [127.0.0.1]:43683")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lost_peer)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append(1))
    assert main(["info", "--model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "oneref info: error: this rank finished its work, but another rank stopped" in err
    assert "Connection closed by peer" in err and "Traceback" not in err
    assert calls  # the group is still ended


def test_eval_refuses_an_output_folder_it_cannot_create_before_evaluating(run_dir, tmp_path,
                                                                          capsys):
    (tmp_path / "file").write_text("")
    assert main(["eval", "--checkpoint", str(run_dir), "--split", "test", "--size", "8",
                 "--device", "cpu", "--out", str(tmp_path / "file" / "x")]) == 2
    assert (f"--out {tmp_path / 'file' / 'x'}: cannot create the folder (Not a directory)"
            in capsys.readouterr().err)


def test_flags_a_refshapes_run_ignores_are_refused_and_old_records_of_them_dropped(
        run_dir, tmp_path, capsys):
    """eval refuses --tokenizer / --split-by for RefShapes data as train does; a run folder
    from before that refusal, which recorded them (they did nothing), still evaluates."""
    eval_test = ["eval", "--split", "test", "--size", "8", "--device", "cpu", "--checkpoint"]
    assert main([*eval_test, str(run_dir), "--tokenizer", str(tmp_path / "x.spm")]) == 2
    assert "--tokenizer given, but the dataset is refshapes" in capsys.readouterr().err
    assert main([*eval_test, str(run_dir), "--split-by", "umd"]) == 2
    assert "--split-by umd picks a refer-toolkit refs(umd).p file" in capsys.readouterr().err
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    recorded = json.loads((old / "train_config.json").read_text())
    recorded["data"].update(tokenizer="/gone/beit3.spm", split_by="umd")
    (old / "train_config.json").write_text(json.dumps(recorded))
    assert main([*eval_test, str(old)]) == 0


def test_eval_and_info(run_dir, capsys):
    assert main(["eval", "--checkpoint", str(run_dir), "--split", "test", "--size", "8",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| split | samples | Acc@0.5 % | colour-guess % | samples/s |" in out
    assert out.count("| test | 8 |") == 1 and "paper" not in out
    saved = json.loads((run_dir / "eval.json").read_text())
    assert [r["split"] for r in saved["rows"]] == ["test"] and saved["rows"][0]["n"] == 8
    assert (run_dir / "eval.md").read_text().count("| test | 8 |") == 1
    # Another split of the same weights: the earlier rows stay, a split evaluated again is
    # replaced; once the weights file changes, only the new rows are written.
    def splits_after(*argv):
        assert main(["eval", "--checkpoint", str(run_dir), "--size", "8", *argv]) == 0
        return [r["split"] for r in json.loads((run_dir / "eval.json").read_text())["rows"]]

    assert splits_after("--split", "val") == ["test", "val"]
    assert "(test: kept from the earlier evaluation of the same weights)" in (
        capsys.readouterr().out)
    assert splits_after("--split", "test") == ["val", "test"]
    # An eval.json written before the precision was recorded: a CPU's was fp32.
    saved = json.loads((run_dir / "eval.json").read_text())
    del saved["precision"]
    (run_dir / "eval.json").write_text(json.dumps(saved))
    assert splits_after("--split", "val") == ["test", "val"]
    # Another precision is another evaluation: its rows are not mixed with fp32 ones.
    assert splits_after("--split", "val", "--amp", "bf16") == ["val"]
    assert json.loads((run_dir / "eval.json").read_text())["precision"] == "bf16"
    assert ", cpu (bf16), " in (run_dir / "eval.md").read_text()
    assert splits_after("--split", "test", "--amp", "bf16") == ["val", "test"]
    weights = run_dir / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert splits_after("--split", "val") == ["val"]
    assert main(["info", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    from oneref.model import OneRef

    total = sum(p.numel() for p in OneRef.from_config("tiny").parameters())
    assert f"total {total:,}" in out and "model tiny" in out
    assert f"tiny {total / 1e6:.1f}M at 64 px" in out and "large " in out  # every preset
    assert "torch" in out and "available" in out


def test_a_model_built_from_a_config_of_its_own_trains_and_evaluates(tmp_path):
    """Its config's name (``custom``) is recorded as the run's model; it is not a preset."""
    from oneref.config import get_config
    from oneref.model import OneRef
    from oneref.sources import ModelSource

    folder = tmp_path / "custom_model"
    OneRef(get_config("tiny").replace(name="custom", depth=1)).save_pretrained(folder)
    assert not ModelSource(folder).build().training
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(folder), "-o", str(run), "--steps", "1",
                 "--batch-size", "2", "--threads", "1", "--no-progress", "--set",
                 "data.train_size=4", "--set", "data.eval_size=4", "--set",
                 "final_test=false", "--set", "time_budget_s=0"]) == 0
    assert json.loads((run / "train_config.json").read_text())["model"] == "custom"
    assert main(["eval", "--checkpoint", str(run), "--size", "4", "--split", "val"]) == 0


def _step_checkpoint(folder):
    """A training checkpoint's model entries (an untrained tiny model) in ``folder``."""
    from oneref.model import OneRef

    model = OneRef.from_config("tiny")
    step = folder / "step_00000001.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, step)
    return step


def test_a_model_flag_that_contradicts_the_weights_is_refused(tmp_path, capsys):
    """--model with weights of another preset is an error, not a silent choice of one."""
    from oneref.model import OneRef

    folder = tmp_path / "tiny_model"
    OneRef.from_config("tiny").save_pretrained(folder)
    assert main(["train", "--init-from", str(folder), "--model", "small", "-o",
                 str(tmp_path / "run")]) == 2
    assert (f"{folder} holds a 'tiny' model, not the 'small' one asked for (--model, or a "
            f"config's model): leave it out" in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
    step = _step_checkpoint(tmp_path)
    assert main(["convert", str(step), str(tmp_path / "out"), "--model", "base"]) == 2
    assert f"{step} holds a 'tiny' model, not the 'base' one" in capsys.readouterr().err


def test_config_file_merges_onto_the_recipe_and_flags_apply_on_top(tmp_path):
    from oneref.cli import _train_config
    from oneref.train.config import refshapes_recipe

    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"optim": {"weight_decay": 0.05}, "seed": 7}))
    args = build_parser().parse_args(["train", "--config", str(path), "--seed", "9",
                                      "--set", "optim.betas=[0.9, 0.95]"])
    cfg = _train_config(args, pretrain=False)
    recipe = refshapes_recipe()
    assert cfg.optim.weight_decay == 0.05  # from the file
    assert cfg.time_budget_s == recipe.time_budget_s and cfg.stages == recipe.stages  # kept
    assert cfg.seed == 9 and cfg.optim.betas == (0.9, 0.95)  # flags, then --set, win
    path.write_text(json.dumps({"optim": {"decay": 1}}))
    with pytest.raises(ValueError, match=r"partial.json: unknown config field 'optim.decay'"):
        _train_config(args, pretrain=False)


@pytest.mark.parametrize("task,headline", [("res", ("miou", "oiou", "prec@0.5")),
                                           ("rec", ("acc@0.5",))])
def test_refshapes_train_reports_the_colour_guess_baseline(task, headline, tmp_path, capsys):
    """``oneref train --task res`` picks the RES recipe; both tasks print the model beside
    the colour-guess baseline in the task's metrics, and metrics.json holds both."""
    run = tmp_path / task
    assert main(["train", "--task", task, "--model", "tiny", "--steps", "3", "--no-progress",
                 "-o", str(run), "--set", "data.train_size=16", "--set", "data.eval_size=8",
                 "--set", "data.test_size=8", "--set", "time_budget_s=0"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["steps"] == 3
    for key in headline:
        assert f"{key} model {metrics['test'][key]:.4f} | colour-guess " \
               f"{metrics['colour_guess'][key]:.4f}" in out
    assert (run / "curve.png").exists()
    config = json.loads((run / "train_config.json").read_text())
    assert config["output_dir"] == str(run) and config["task"] == task
    if task == "res":  # the recipe's loss: focal alpha 0.75 and the REC losses added
        assert config["res_loss"]["focal_alpha"] == 0.75 and config["res_loss"]["rec_weight"] == 1
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"seg", "l1", "giou", "box_mask"} <= set(header)


def test_pretrain_recipe_is_a_budgeted_mrefm_run():
    from oneref.train.config import pretrain_recipe, refshapes_recipe

    cfg = pretrain_recipe()
    assert cfg.task == "pretrain" and cfg.time_budget_s > 0 and cfg.pretrain.vts
    assert cfg.pretrain.masking == "referring"
    assert cfg.data.train_size == refshapes_recipe().data.train_size


def test_a_budget_that_ends_before_the_last_stage_is_warned_about(tmp_path, capsys, caplog):
    stages = [{"name": "frozen", "steps": 3, "lr": 1e-3, "batch_size": 4,
               "freeze_backbone": True}, {"name": "full", "steps": 2, "lr": 1e-3,
                                          "batch_size": 4}]
    assert main(["train", "--model", "tiny", "--threads", "1", "--no-progress", "--set",
                 "data.train_size=16", "--set", "data.eval_size=8", "--set", "final_test=false",
                 "--set", f"stages={json.dumps(stages)}", "--time-budget", "1e-9",
                 "-o", str(tmp_path / "run")]) == 0
    assert "stages: 0 (frozen) 3 steps with the backbone frozen, 1 (full) 2 steps" in \
        capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "the time budget of 1e-09 s ran out after 0 steps: stage(s) 0 (frozen), 1 (full) never "
        "ran; give a larger --time-budget"]


@pytest.mark.parametrize("command", ["predict", "convert", "sts-labels", "ablate", "bench"])
def test_one_process_commands_refuse_torchrun(command, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    arguments = {"predict": ["--checkpoint", "x", "--image", "x.png", "--text", "x"],
                 "convert": ["x.pth", "out"], "sts-labels": ["--teacher", "x", "--out", "y"],
                 "ablate": ["--out", "x"], "bench": []}
    assert main([command, *arguments[command]]) == 2
    assert capsys.readouterr().err.strip() == (
        f"oneref {command}: error: runs in one process (every rank would do the whole job and "
        "write the same files): run it without torchrun")


def test_building_the_parser_does_not_import_dynamo():
    """Dynamo's import (about 1.2 s on 2 cores) is paid by the commands that compile or
    count, not by every start (``oneref --help``, a typo's error)."""
    import subprocess
    import sys

    code = ("import sys; from oneref.cli import build_parser; build_parser(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
