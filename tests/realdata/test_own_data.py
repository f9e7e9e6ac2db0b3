"""Your own data (``--annotations DIR`` of ``{split}.jsonl`` files) through the ``oneref``
command as a user runs it: REC and RES training from a BEiT-3 .pth, eval of every split from
the run alone, predict, STS labels into a labelled copy and pre-training on it; then the
errors, each naming the flag, the file or the line."""

import json
import logging

import pytest

from oneref.cli import main

from .test_cli_realdata import oneref


def _flags(realdata, name="kitchen"):
    return ["--dataset", name, "--annotations", str(realdata.annotations), "--data-root",
            str(realdata.images), "--tokenizer", str(realdata.spm)]


def _train(realdata, out, *extra, name="kitchen"):
    return ["train", *_flags(realdata, name), "--init-from", realdata.beit3, "--model", "tiny",
            "--set", "stages.0.steps=1", "--steps", "1", "--batch-size", "2", "--device",
            "cpu", "--no-progress", "-o", out, *extra]


@pytest.fixture(scope="module")
def own_run(realdata, tmp_path_factory):
    """A finished REC run on the annotation files, named like RefCOCO's split files."""
    work = tmp_path_factory.mktemp("own")
    done = oneref(*_train(realdata, work / "run", name="unc"), cwd=work)
    return work, work / "run", done.stderr


def test_train_records_the_folder_and_warns_of_unread_keys(own_run, realdata):
    _, run, stderr = own_run
    data = json.loads((run / "train_config.json").read_text())["data"]
    assert data["annotations"] == str(realdata.annotations) and data["split_root"] == ""
    assert "keys that are not read (kept with the records): 'id' (4 of 4 records)" in stderr
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2


def test_eval_every_split_but_train_without_the_papers_numbers(own_run, capsys):
    """The run alone names the data; the default splits are the folder's files but train;
    a dataset named unc is still not RefCOCO's, so no paper column."""
    work, run, _ = own_run
    out = oneref("eval", "--checkpoint", run, "--device", "cpu", cwd=work).stdout
    assert "| test | 4 |" in out and "| val | 4 |" in out and "paper" not in out
    rows = json.loads((run / "eval.json").read_text())["rows"]
    assert sorted(r["split"] for r in rows) == ["test", "val"]
    assert all(0 <= r["acc@0.5"] <= 1 for r in rows)
    from oneref.cli import main

    assert main(["eval", "--checkpoint", str(run), "--split", "vla"]) == 2
    err = capsys.readouterr().err  # a wrong name, not a moved folder
    assert "no split file vla.jsonl" in err and "the run's recorded" not in err


def test_predict_from_the_run(own_run, realdata):
    work, run, _ = own_run
    image = next((realdata.images / "other").rglob("*.jpg"))
    out = oneref("predict", "--checkpoint", run, "--image", image, "--text", "the blue vase",
                 "--out", work / "pred.png", "--device", "cpu", cwd=work).stdout
    assert "box (x1, y1, x2, y2) pixels" in out and (work / "pred.png").is_file()


def test_res_trains_on_polygons_and_rle_and_evaluates(realdata, tmp_path):
    oneref(*_train(realdata, tmp_path / "res", "--task", "res"), cwd=tmp_path)
    out = oneref("eval", "--checkpoint", tmp_path / "res", "--split", "val", "--device", "cpu",
                 cwd=tmp_path).stdout
    assert "| val | 4 |" in out and "mIoU" in out


def test_sts_labels_into_an_annotation_file_then_pretrain(own_run, realdata, capsys):
    """A labelled copy keeps every line's keys and adds one label per token; pre-training
    reads it with --sts; the unlabelled files are refused naming the line."""
    work, run, _ = own_run
    out = work / "sts_ann"
    assert main(["sts-labels", "--teacher", str(run), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert f"--annotations {out}" in capsys.readouterr().out
    original = (realdata.annotations / "train.jsonl").read_text().splitlines()
    labelled = (out / "train.jsonl").read_text().splitlines()
    assert len(labelled) == len(original)
    for old, new in zip(map(json.loads, original), map(json.loads, labelled)):
        assert {k: v for k, v in new.items() if k != "sts"} == old
        assert new["sts"] and all(0.0 < v < 1.0 for v in new["sts"])
    pretrain = ["pretrain", "--dataset", "kitchen", "--data-root", str(realdata.images),
                "--tokenizer", str(realdata.spm), "--model", "tiny", "--steps", "2",
                "--batch-size", "2", "--device", "cpu", "--no-progress", "--sts",
                "--set", "final_test=false"]
    assert main([*pretrain, "--annotations", str(out), "-o", str(work / "pre")]) == 0
    assert "sts" in (work / "pre" / "metrics.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert main([*pretrain, "--annotations", str(realdata.annotations), "-o",
                 str(work / "pre2")]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1: has no 'sts' (STS labels)" in err and "--annotations DIR" in err


# --- errors, in process -------------------------------------------------------------------

def _with_train(realdata, folder, lines):
    """``folder`` holding the set's val and test files and ``lines`` as train.jsonl."""
    folder.mkdir()
    for split in ("val", "test"):
        (folder / f"{split}.jsonl").write_bytes((realdata.annotations / f"{split}.jsonl")
                                                .read_bytes())
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _main(args) -> int:
    return main([str(a) for a in args])


def _replaced(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("replace,extra,message", [
    ({}, ["--set", "data.train_split=trainval"],
     "no split file trainval.jsonl (the splits there: test, train, val)"),
    ({"--dataset": "refshapes"}, [], "--data-root, --annotations, --tokenizer given, but the "
                                     "dataset is refshapes (built in, the default): name the "
                                     "real dataset, e.g. --dataset mydata"),
    ({}, ["--split-root", "{images}"], "real data needs exactly one of --split-root"),
    ({"--annotations": "{images}/nope"}, [], "--annotations {images}/nope is not a folder"),
])
def test_flag_errors_name_the_flag(realdata, tmp_path, capsys, replace, extra, message):
    args = _train(realdata, tmp_path / "run", *(e.format(images=realdata.images) for e in extra))
    for flag, value in replace.items():
        args = _replaced(args, flag, value.format(images=realdata.images))
    assert _main(args) == 2
    assert message.format(images=realdata.images) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_bad_line_stops_the_run_naming_file_and_line(realdata, tmp_path, capsys):
    good = (realdata.annotations / "train.jsonl").read_text().splitlines()
    folder = _with_train(realdata, tmp_path / "bad", [
        *good[:2], "", '{"image": "a.jpg", "bbox": [1, 2, 3, 4], "text": "x"}'])
    assert _main(_replaced(_train(realdata, tmp_path / "run"), "--annotations", folder)) == 2
    assert (f"{folder / 'train.jsonl'}: line 4: needs exactly one of 'box' (x, y, width, "
            f"height) and 'box_xyxy' (x1, y1, x2, y2); keys not read: 'bbox'"
            in capsys.readouterr().err)


def test_skip_counts_bad_lines_and_trains_on_the_rest(realdata, tmp_path, caplog):
    good = (realdata.annotations / "train.jsonl").read_text().splitlines()
    folder = _with_train(realdata, tmp_path / "bad", [
        *good, "not json", '{"image": "a.jpg", "box": [1, 2, 3, 4], "text": "  "}'])
    args = _replaced(_train(realdata, tmp_path / "run", "--set", "data.on_error=skip"),
                     "--annotations", folder)
    with caplog.at_level(logging.INFO):
        assert _main(args) == 0
    assert "skipped 2 malformed record(s); first: line 5: " in caplog.text
    assert "(train 4 samples)" in caplog.text  # the 4 good lines


def test_a_missing_image_is_named_with_its_line(realdata, tmp_path, capsys):
    good = (realdata.annotations / "train.jsonl").read_text().splitlines()
    folder = _with_train(realdata, tmp_path / "bad", [
        *good[:2], json.dumps({"image": "gone/x.jpg", "box": [1, 2, 3, 4], "text": "x"})])
    assert _main(_replaced(_train(realdata, tmp_path / "run"), "--annotations", folder)) == 2
    assert "lacks 1 of the 3 images" in (err := capsys.readouterr().err)
    assert "(first: gone/x.jpg, train.jsonl:3)" in err


def test_eval_rows_of_other_annotation_files_are_not_mixed(own_run, realdata, tmp_path):
    """A split of another annotations folder replaces the earlier rows instead of joining
    them; each file names its data; the rows keep each line's own keys."""
    work, run, _ = own_run
    other = _with_train(realdata, tmp_path / "other", [])
    out = tmp_path / "eval"
    for folder, split in ((realdata.annotations, "test"), (other, "val")):
        assert _main(["eval", "--checkpoint", run, "--annotations", folder, "--split", split,
                      "--device", "cpu", "--out", out, "--predictions"]) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert [row["split"] for row in saved["rows"]] == ["val"]
    assert saved["data"] == f"images {realdata.images}, annotations {other}"
    assert f"Data: images {realdata.images}, annotations {other}" in (
        out / "eval.md").read_text()
    rows = [json.loads(line) for line in (out / "predictions_val.jsonl").read_text()
            .splitlines()]
    assert [row["meta"] for row in rows] == [{"id": k} for k in range(4)]
