"""Real data end to end through the ``oneref`` command, as a user runs it (subprocesses), on
the official-layout set of conftest.py: two-stage training from a BEiT-3 .pth, resume, eval
over two splits, predict (run folder, official .pth, JSON lines), convert; then the errors."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oneref.cli import build_parser, main
from oneref.config import get_config

COCO_IMAGE = "other/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"


def oneref(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "oneref.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"oneref {args} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _train_args(realdata, out, *extra):
    return ["train", *realdata.flags("unc"), "--init-from", realdata.beit3, "--model", "tiny",
            "--set", "stages.0.steps=2", "--steps", "2", "--batch-size", "2",
            "--checkpoint-interval", "1", "--set", "checkpoint.keep_last=0", "--device", "cpu",
            "--no-progress", "-o", out, *extra]


@pytest.fixture(scope="module")
def trained(realdata, tmp_path_factory):
    """A finished two-stage run (frozen backbone 2 steps, then full 2 steps)."""
    work = tmp_path_factory.mktemp("work")
    done = oneref(*_train_args(realdata, work / "run"), cwd=work)
    return work, work / "run", done.stdout


def test_train_two_stages_from_official_beit3(trained, realdata):
    work, run, stdout = trained
    assert f"loaded 75 tensors from {realdata.beit3}" in stdout
    assert "resized: 1 (embed.vision_pos.weight)" in stdout  # saved at 32 px, model at 64
    assert "missing, left as initialised" in stdout and "rec_head (8)" in stdout
    saved = json.loads((run / "train_config.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["frozen", "full"]  # the reference recipe
    assert saved["data"]["root"] == str(realdata.images)  # recorded absolute
    assert saved["data"]["tokenizer"] == str(realdata.spm)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step_{k:08d}.pt" for k in range(1, 5)]


def test_resume_between_stages_is_exact(trained, realdata):
    work, run, _ = trained
    resumed = work / "resumed"
    oneref(*_train_args(realdata, resumed, "--resume", run / "checkpoints/step_00000002.pt"),
           cwd=work)
    first = load_file(run / "model" / "model.safetensors")
    second = load_file(resumed / "model" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_eval_two_splits_from_the_run_alone(trained):
    work, run, _ = trained
    out = oneref("eval", "--checkpoint", run, "--split", "val,testA", "--device", "cpu",
                 cwd=work).stdout
    assert out.count("| val | 4 |") == 1 and out.count("| testA | 4 |") == 1
    rows = json.loads((run / "eval.json").read_text())["rows"]
    assert [r["split"] for r in rows] == ["val", "testA"]
    assert all(0 <= r["acc@0.5"] <= 1 and r["samples_per_s"] > 0 for r in rows)
    assert "| testA | 4 |" in (run / "eval.md").read_text()


def test_eval_on_another_layout_than_the_run_recorded(trained, realdata, tmp_path, capsys):
    """A run recorded with the refer-toolkit layout (refcoco split by unc) evaluates on the
    split files of the same splits: --split-root clears the recorded refs folder and its
    --split-by; a new --refer-root keeps the scheme."""
    work, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    settings = json.loads((copy / "train_config.json").read_text())
    settings["data"].update(dataset="refcoco", split_root="", refer_root="/moved/refer",
                            split_by="unc")
    (copy / "train_config.json").write_text(json.dumps(settings))
    assert main(["eval", "--checkpoint", str(copy), "--device", "cpu"]) == 2
    assert ("--refer-root /moved/refer is not a folder (the run's recorded --refer-root; give "
            "--refer-root for where the files are now)") in capsys.readouterr().err
    for root, samples in ((["--dataset", "unc", "--split-root", realdata.splits], 4),
                          (["--refer-root", realdata.refer], 1)):
        out = oneref("eval", "--checkpoint", copy, "--split", "val", "--device", "cpu", *root,
                     cwd=work).stdout
        assert f"| val | {samples} |" in out
    assert json.loads((copy / "eval.json").read_text())["data"].endswith(
        f"annotations {realdata.refer} (split by unc)")


def test_predict_from_run_and_official_pth(trained, realdata):
    work, run, _ = trained
    image = realdata.images / COCO_IMAGE
    out = oneref("predict", "--checkpoint", run, "--image", image, "--text", "the man",
                 "--out", work / "a.png", "--device", "cpu", cwd=work).stdout
    x1, y1, x2, y2 = (float(v) for v in out.split("pixels:")[1].split()[:4])
    assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 72 and (work / "a.png").is_file()
    out = oneref("predict", "--checkpoint", realdata.oneref, "--tokenizer", realdata.spm,
                 "--image", image, "--text", "the man", "--task", "res", "--out",
                 work / "b.png", "--device", "cpu", cwd=work).stdout
    assert "in the file, not used: 2 (logit_scale, text_proj.weight)" in out  # the report
    assert "pixels, mask" not in out and " pixels" in out.split("score")[1]
    assert (work / "b.png").is_file()


def test_predict_json_lines(trained, realdata):
    work, run, _ = trained
    image = realdata.images / COCO_IMAGE
    lines = [json.dumps({"image": str(image), "text": "a dog", "id": "dog-1"}), "not json",
             json.dumps({"image": "missing.jpg", "text": "x"}),
             json.dumps({"image": str(image), "text": "  "}),
             json.dumps({"image": str(image), "text": "the cat"})]
    (work / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    done = oneref("predict", "--checkpoint", run, "--input", work / "pairs.jsonl", "--out-dir",
                  work / "preds", "--batch-size", "2", "--device", "cpu", cwd=work)
    assert "2 predictions, 3 lines skipped" in done.stdout
    for number, problem in ((2, "not JSON"), (3, f"image file {work / 'missing.jpg'} does not "
                                             f"exist"), (4, "empty expression")):
        assert f"pairs.jsonl:{number}: {problem}" in done.stderr
    records = [json.loads(line) for line in
               (work / "preds" / "predictions.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 5]
    assert records[0]["id"] == "dog-1" and "id" not in records[1]  # a line's own keys stay
    assert all(len(r["box_xyxy"]) == 4 and 0 <= r["score"] <= 1 for r in records)
    assert sorted(p.name for p in (work / "preds").glob("*.png")) == [
        "000001_COCO_train2014_000000000001.png", "000005_COCO_train2014_000000000001.png"]
    assert main(["predict", "--checkpoint", str(run), "--input", str(work / "pairs.jsonl"),
                 "--out-dir", str(work / "strict"), "--on-error", "raise", "--device",
                 "cpu"]) == 2
    assert not (work / "strict").exists()  # a bad line is found before anything is written


def test_convert_official_oneref_checkpoint(realdata, tmp_path):
    done = oneref("convert", realdata.oneref, tmp_path / "model", cwd=tmp_path)
    assert f"loaded 103 tensors from {realdata.oneref}" in done.stdout
    assert "in the file, not used: 2 (logit_scale, text_proj.weight)" in done.stdout
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["name"] == "tiny" and config["img_size"] == 64  # preset from the shapes
    weights = load_file(tmp_path / "model" / "model.safetensors")
    official = torch.load(realdata.oneref, weights_only=False)["model"]
    assert torch.equal(weights["rec_head.visu_proj.weight"], official["visu_proj.weight"])


def test_sts_labels_into_a_split_file_then_pretrain(trained, realdata, capsys):
    """The run as teacher labels unc_train.pth; the copy keeps the 5 fields and adds one
    label per token; pre-training reads them with --sts; the refer-toolkit layout and the
    unlabelled split root are refused with the reason."""
    work, run, _ = trained
    out = work / "sts_splits"
    assert main(["sts-labels", "--teacher", str(run), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    original = torch.load(realdata.splits / "unc" / "unc_train.pth", weights_only=False)
    labelled = torch.load(out / "unc" / "unc_train.pth", weights_only=True)
    assert len(labelled) == len(original)
    spm = __import__("sentencepiece").SentencePieceProcessor(model_file=str(realdata.spm))
    for old, new in zip(original, labelled):
        assert tuple(new[:5]) == tuple(old)
        assert len(new[5]) == min(len(spm.encode(old[3])) + 2, get_config("tiny").max_text_len)
        assert all(0.0 < v < 1.0 for v in new[5])  # lambdas 0.5 + 0.5 of two sigmoids
    pretrain = ["pretrain", "--dataset", "unc", "--data-root", str(realdata.images),
                "--tokenizer", str(realdata.spm), "--model", "tiny", "--steps", "2",
                "--batch-size", "2", "--device", "cpu", "--no-progress", "--sts",
                "--set", "final_test=false", "-o", str(work / "sts_pre")]
    assert main([*pretrain, "--split-root", str(out)]) == 0
    assert "sts" in (work / "sts_pre" / "metrics.csv").read_text().splitlines()[0]
    capsys.readouterr()
    pretrain[-1] = str(work / "sts_pre2")  # sts_pre holds a run now
    assert main([*pretrain, "--split-root", str(realdata.splits)]) == 2
    assert "unc_train.pth[0]: has no 6th element (STS labels)" in capsys.readouterr().err
    assert main(["sts-labels", "--teacher", str(run), "--out", str(work / "x"), "--dataset",
                 "refcoco", "--refer-root", str(realdata.refer), "--split-by", "unc",
                 "--no-progress"]) == 2
    assert "refer-toolkit layout has neither" in capsys.readouterr().err


# --- errors, in process -------------------------------------------------------------------

def _train(realdata, tmp_path, *flags):
    return main(["train", "--model", "tiny", "--steps", "1", "--device", "cpu", "--no-progress",
                 "-o", str(tmp_path / "run"), "--tokenizer", str(realdata.spm), *flags])


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "unc", "--data-root", "{root}/nope", "--split-root", "{splits}"],
     "--data-root {root}/nope is not a folder"),
    (["--dataset", "unc", "--data-root", "{images}", "--split-root", "{root}/nope"],
     "--split-root {root}/nope is not a folder"),
    (["--dataset", "uncc", "--data-root", "{images}", "--split-root", "{splits}"],
     "unknown dataset 'uncc'"),
    (["--dataset", "gref", "--data-root", "{images}", "--split-root", "{splits}"],
     "split file {splits}/gref/gref_train.pth does not exist"),
    (["--dataset", "unc", "--data-root", "{images}/referit", "--split-root", "{splits}"],
     "image folder {images}/referit/other/images/mscoco/images/train2014 does not exist"),
    (["--dataset", "unc", "--data-root", "{images}"], "exactly one of --split-root"),
    (["--dataset", "flickr", "--task", "res", "--data-root", "{images}", "--split-root",
      "{splits}"], "'flickr' has no segmentation masks"),
    (["--dataset", "refcoco", "--split-by", "google", "--data-root", "{images}",
      "--refer-root", "{root}/refer"], "{root}/refer/refcoco/refs(google).p does not exist"),
    (["--dataset", "unc", "--split-by", "umd", "--data-root", "{images}", "--split-root",
      "{splits}"], "--split-by umd picks a refer-toolkit refs(umd).p file and needs --refer-root"),
    (["--dataset", "unc", "--data-root", "{images}", "--split-root", "{splits}",
      "--train-size", "2"], "--train-size sizes the built-in RefShapes splits"),
    (["--data-root", "{images}", "--split-root", "{splits}"],
     "--data-root, --split-root, --tokenizer given, but the dataset is refshapes"),
    (["--dataset", "unc", "--recipe", "refshapes", "--data-root", "{images}", "--split-root",
      "{splits}"], "dataset 'unc' has no split 'test'"),  # the final test split
    (["--dataset", "unc", "--data-root", "{images}", "--split-root", "{splits}", "--tokenizer",
      "{root}/gone.model"], "--tokenizer: sentencepiece model '{root}/gone.model' does not "
                            "exist"),
], ids=["data-root", "split-root", "dataset", "split-file", "image-folder", "two-roots",
        "res-no-masks", "refer-split-by", "split-by-without-refer", "train-size", "no-dataset",
        "test-split", "tokenizer"])
def test_data_errors_name_the_path(realdata, tmp_path, capsys, flags, message):
    paths = {"root": realdata.root, "images": realdata.images, "splits": realdata.splits}
    flags = [f.format(**paths) for f in flags]
    assert _train(realdata, tmp_path, *flags) == 2
    assert message.format(**paths) in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()  # stopped before any model was built


def test_missing_images_and_unknown_split(realdata, tmp_path, capsys, caplog):
    image = realdata.images / COCO_IMAGE.replace("000000000001", "000000000002")
    moved = tmp_path / "moved.jpg"
    image.rename(moved)
    try:
        assert _train(realdata, tmp_path, *realdata.flags("unc")) == 2
        err = capsys.readouterr().err
        assert "lacks 1 of the 4 images" in err and "COCO_train2014_000000000002.jpg" in err
        # skip drops and counts the records of a missing image, as those of a bad box
        assert _train(realdata, tmp_path, *realdata.flags("unc"), "--set",
                      "data.on_error=skip", "--set", "stages.0.steps=1", "--batch-size", "1") == 0
    finally:
        moved.rename(image)
    skipped = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert skipped and all(f"image file '{image}' does not exist" in m for m in skipped)
    assert main(["eval", "--checkpoint", str(realdata.oneref), *realdata.flags("unc"),
                 "--split", "val,bogus", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no split 'bogus'; its splits are train, val, trainval, testA, testB" in err


def test_unsafe_checkpoint_needs_trust(realdata, tmp_path, capsys):
    state = torch.load(realdata.beit3, weights_only=False)
    state["args"] = print  # a callable: unpickling it would hand the file code to run
    torch.save(state, tmp_path / "hostile.pth")
    assert main(["convert", str(tmp_path / "hostile.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pickles builtins.print" in err and "--trust-checkpoint" in err
    assert main(["convert", str(tmp_path / "hostile.pth"), str(tmp_path / "out"),
                 "--trust-checkpoint"]) == 0


def test_predict_needs_a_tokenizer_for_official_files(realdata, capsys):
    assert main(["predict", "--checkpoint", str(realdata.oneref), "--image",
                 str(realdata.images / COCO_IMAGE), "--text", "a man"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(realdata.oneref), "--image",
                 str(realdata.images / COCO_IMAGE), "--text", "a man", "--tokenizer",
                 "gone.model"]) == 2
    assert "error: --tokenizer: sentencepiece model 'gone.model' does not exist" in \
        capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(realdata.oneref), "--input", "x.jsonl"]) == 2
    assert "--input needs --out-dir" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(realdata.oneref), "--image",
                 str(realdata.images / COCO_IMAGE), "--text", "a man", "--out-dir", "x"]) == 2
    assert "--out-dir goes with --input; name the drawing of one --image with --out PNG" in \
        capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(realdata.oneref), "--input", "x.jsonl",
                 "--out-dir", "x", "--out", "x.png"]) == 2
    assert "--out names the drawing of one --image" in capsys.readouterr().err


# --- the other layouts, and what the flags become -----------------------------------------

@pytest.mark.parametrize("dataset,split,extra", [
    ("referit", "test", []), ("flickr", "val", []), ("mixup", "train", ["--seg-mask"]),
    ("refcoco", "testA", ["--task", "res"]),
])
def test_every_layout_builds(realdata, dataset, split, extra):
    from oneref.cli import _train_config
    from oneref.train.data import build_dataset, check_data

    root = ["--refer-root", str(realdata.refer)] if dataset == "refcoco" else [
        "--split-root", str(realdata.splits)]
    flags = ["--dataset", dataset, "--data-root", str(realdata.images), "--tokenizer",
             str(realdata.spm), *root, "--model", "tiny", *extra]
    cfg = _train_config(build_parser().parse_args(["train", *flags]), pretrain=False)
    check_data(cfg.data, [split])
    ds = build_dataset(cfg.data, get_config("tiny"), split, cfg.task)
    sample = ds[0]
    assert sample["image"].shape == (3, 64, 64) and sample["text_length"] >= 3
    if dataset == "mixup":
        assert {r.source for r in ds.records} == {"coco", "referit", "flickr"}
    if cfg.task == "res" or cfg.data.seg_mask:
        assert any(ds[i]["has_mask"] for i in range(len(ds)))


def test_weights_of_another_tokenizer_are_warned(trained, realdata, tmp_path, caplog):
    """Start weights or a --tokenizer other than the run's: the text ids mean other pieces."""
    from oneref.cli import _train_config
    from oneref.eval.predict import load_predictor
    from oneref.train.trainer import Trainer

    _, run, _ = trained
    args = build_parser().parse_args(["train", "--init-from", str(run), "--device", "cpu",
                                      "--train-size", "16", "-o", str(tmp_path / "shapes")])
    with caplog.at_level(logging.WARNING):
        Trainer(_train_config(args, pretrain=False))
        assert (f"--init-from {run} was trained with tokenizer {realdata.spm} and this run "
                f"reads text with refshapes") in caplog.text
        caplog.clear()
        load_predictor(run, tokenizer=str(realdata.spm))  # the same file: quiet
        assert not caplog.records
        load_predictor(run, tokenizer="refshapes")
    assert (f"{run} was trained with tokenizer {realdata.spm}; --tokenizer refshapes reads "
            f"text into other ids") in caplog.text


def test_real_data_from_random_weights_is_warned(realdata, tmp_path, caplog):
    from oneref.cli import _train_config
    from oneref.train.trainer import Trainer

    args = build_parser().parse_args(["train", *realdata.flags("unc"), "--model", "tiny",
                                      "--batch-size", "2", "--set", "stages.0.batch_size=2",
                                      "--device", "cpu", "-o", str(tmp_path / "run")])
    with caplog.at_level(logging.WARNING, logger="oneref.train.trainer"):
        Trainer(_train_config(args, pretrain=False))
    assert "training on unc from randomly initialised weights" in caplog.text
    assert "with the backbone frozen in a stage" in caplog.text and "--init-from" in caplog.text


def test_real_dataset_selects_the_reference_recipe(realdata):
    from oneref.cli import _train_config

    args = build_parser().parse_args(["train", *realdata.flags("unc"), "--init-from",
                                      str(realdata.beit3)])
    cfg = _train_config(args, pretrain=False)
    assert [s.name for s in cfg.stages] == ["frozen", "full"] and cfg.model == "tiny"
    assert cfg.data.num_workers == -1  # auto: the usable cores on a GPU run, 0 on a CPU
    args = build_parser().parse_args(["train"])
    assert _train_config(args, pretrain=False).data.dataset == "refshapes"


def test_eval_checks_data_before_loading_weights(realdata, capsys):
    assert main(["eval", "--checkpoint", str(realdata.oneref), "--device", "cpu"]) == 2
    assert "records no data: name it with --dataset" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(realdata.oneref), "--dataset", "unc",
                 "--data-root", str(realdata.root / "nope"), "--split-root",
                 str(realdata.splits), "--tokenizer", str(realdata.spm)]) == 2
    out = capsys.readouterr()
    assert "is not a folder" in out.err and "loaded" not in out.out  # no weights read
    assert main(["eval", "--checkpoint", str(realdata.oneref), *realdata.flags("unc"),
                 "--size", "2"]) == 2  # RefShapes' split sizes: refused, not ignored
    assert ("--size sizes the built-in RefShapes splits; dataset 'unc' reads every sample"
            in capsys.readouterr().err)
    assert main(["eval", "--checkpoint", str(realdata.oneref), *realdata.flags("unc"),
                 "--split", "val,testA,val"]) == 2
    assert "--split names val more than once" in capsys.readouterr().err


def test_training_checkpoint_as_checkpoint(trained, realdata, capsys):
    work, run, _ = trained
    assert main(["predict", "--checkpoint", str(run / "checkpoints/step_00000003.pt"),
                 "--image", str(realdata.images / COCO_IMAGE), "--text", "a man",
                 "--out", str(work / "c.png"), "--device", "cpu"]) == 0
    assert "box (x1, y1, x2, y2)" in capsys.readouterr().out


def test_annotation_files_never_run_code(realdata, tmp_path, capsys):
    import pickle
    import shutil

    splits, refer = tmp_path / "splits", tmp_path / "refer"
    shutil.copytree(realdata.splits, splits)
    shutil.copytree(realdata.refer, refer)
    items = torch.load(splits / "unc" / "unc_train.pth", weights_only=True)
    torch.save(items + [print], splits / "unc" / "unc_train.pth")
    assert _train(realdata, tmp_path, "--dataset", "unc", "--data-root", str(realdata.images),
                  "--split-root", str(splits)) == 2
    err = capsys.readouterr().err
    assert "unc_train.pth' pickles builtins.print" in err and "--trust-data" in err
    with open(refer / "refcoco" / "refs(unc).p", "rb") as handle:
        refs = pickle.load(handle)
    with open(refer / "refcoco" / "refs(unc).p", "wb") as handle:
        pickle.dump(refs + [print], handle)
    assert _train(realdata, tmp_path, "--dataset", "refcoco", "--data-root",
                  str(realdata.images), "--refer-root", str(refer)) == 2
    assert "pickles builtins.print besides plain data" in capsys.readouterr().err


def test_each_epoch_augments_anew(realdata):
    from oneref.train.config import DataConfig
    from oneref.train.data import build_dataset, train_loader

    data = DataConfig(dataset="unc", root=str(realdata.images), split_root=str(realdata.splits),
                      tokenizer=str(realdata.spm), num_workers=1)
    ds = build_dataset(data, get_config("tiny"), "train", train=True)
    loader, sampler = train_loader(ds, 4, data, torch.device("cpu"), 0, 1, seed=0)
    seen = []
    for epoch in range(2):  # one persistent worker serves both epochs
        sampler.set_epoch(epoch)
        batch = next(iter(loader))
        seen.append(dict(zip(batch["indices"].tolist(), batch["images"])))
    common = sorted(set(seen[0]) & set(seen[1]))
    assert common and all(not torch.equal(seen[0][i], seen[1][i]) for i in common)
