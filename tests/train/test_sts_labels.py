"""STS labels (``oneref sts-labels``): the score against a hand-computed case, the region
crop, the teacher pass, the RefShapes side file and the split-file 6th element, and
pre-training with them."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from oneref.cli import main
from oneref.config import get_config
from oneref.data.collate import collate
from oneref.data.records import RefRecord, check_sts_labels
from oneref.data.synthetic import RefShapes
from oneref.model import OneRef
from oneref.sts import (load_refshapes_labels, region_crops, sts_scores, teacher_labels,
                        write_refshapes_labels)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_scores_match_a_hand_computed_case():
    e_reg = torch.tensor([[1.0, 0.0]])
    e_img = torch.tensor([[0.6, 0.8]])
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]]])
    got = sts_scores(e_reg, e_img, w, lambda_reg=0.7, lambda_img=0.3)
    # token 0: reg 1, img 0.6; token 1: reg 0, img 0.8; token 2: reg -0.6, img -1
    want = [0.7 * _sigmoid(1.0) + 0.3 * _sigmoid(0.6), 0.7 * 0.5 + 0.3 * _sigmoid(0.8),
            0.7 * _sigmoid(-0.6) + 0.3 * _sigmoid(-1.0)]
    torch.testing.assert_close(got, torch.tensor([want]), rtol=1e-6, atol=1e-6)


def test_region_crop_takes_the_box_and_resizes():
    images = torch.zeros(2, 1, 8, 8)
    images[0, 0, 2:4, 4:8] = 1.0   # the box of sample 0: x 4..8, y 2..4
    images[1] = torch.arange(64.0).view(8, 8)
    boxes = torch.tensor([[0.75, 0.375, 0.5, 0.25],   # cx, cy, w, h of x 4..8, y 2..4
                          [0.5, 0.5, 0.0, 0.0]])      # empty box: one pixel at (4, 4)
    crops = region_crops(images, boxes)
    assert crops.shape == (2, 1, 8, 8)
    torch.testing.assert_close(crops[0], torch.ones(1, 8, 8))
    torch.testing.assert_close(crops[1], torch.full((1, 8, 8), 36.0))


def test_teacher_labels_are_the_formula_on_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = OneRef(get_config("tiny")).eval()
    data = RefShapes("train", size=6, img_size=64, max_text_len=24)
    batch = collate([data[i] for i in range(6)])
    labels = teacher_labels(teacher, [batch], 0.25, 0.75, torch.device("cpu"), progress=False)
    with torch.no_grad():
        e_img, w = teacher.relation_embeddings(batch["images"], batch["text_ids"],
                                               batch["text_lengths"])
        for k in range(6):
            x1, y1, x2, y2 = [round(float(v) * 64) for v in (
                batch["boxes"][k, 0] - batch["boxes"][k, 2] / 2,
                batch["boxes"][k, 1] - batch["boxes"][k, 3] / 2,
                batch["boxes"][k, 0] + batch["boxes"][k, 2] / 2,
                batch["boxes"][k, 1] + batch["boxes"][k, 3] / 2)]
            crop = torch.nn.functional.interpolate(
                batch["images"][k:k + 1, :, y1:y2, x1:x2], size=(64, 64), mode="bilinear")
            e_reg, _ = teacher.relation_embeddings(crop, batch["text_ids"][k:k + 1],
                                                   batch["text_lengths"][k:k + 1])
            n = int(batch["text_lengths"][k])
            want = [0.25 * _sigmoid(float(e_reg[0] @ w[k, t])) + 0.75 * _sigmoid(
                float(e_img[k] @ w[k, t])) for t in range(n)]
            assert len(labels[k]) == n
            torch.testing.assert_close(torch.tensor(labels[k]), torch.tensor(want),
                                       rtol=1e-5, atol=1e-5)


def test_refshapes_side_file_round_trip_and_checks(tmp_path):
    data = RefShapes("train", size=4, img_size=64, max_text_len=24)
    rows = [[0.1 * (k + 1)] * int(data[k]["text_length"]) for k in range(4)]
    path = write_refshapes_labels(tmp_path / "sts.safetensors", rows, data, {"teacher": "t"})
    table = load_refshapes_labels(path, data)
    assert table.shape == (4, 24) and table[2, 0] == pytest.approx(0.3) and table[2, -1] == 0
    data.sts_labels = table
    assert collate([data[0], data[1]])["sts_targets"].shape == (2, 24)
    fewer = RefShapes("train", size=3, img_size=64, max_text_len=24)
    assert load_refshapes_labels(path, fewer).shape == (3, 24)  # a prefix of the scenes
    more = RefShapes("train", size=5, img_size=64, max_text_len=24)
    with pytest.raises(ValueError, match="labels 4 scenes, the train split has 5"):
        load_refshapes_labels(path, more)
    other = RefShapes("train", size=4, img_size=64, max_text_len=24, seed=3)
    with pytest.raises(ValueError, match="seed 0 .dataset: 3."):
        load_refshapes_labels(path, other)
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read STS labels file .*torn"):
        load_refshapes_labels(tmp_path / "torn.safetensors", data)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    save_file({"sts_labels": torch.zeros(4, 10)}, tmp_path / "narrow.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"holds a \(4, 10\) table, expected \(scenes, 24\)"):
        load_refshapes_labels(tmp_path / "narrow.safetensors", data)
    save_file({"x": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="wrong.safetensors"):
        load_refshapes_labels(tmp_path / "wrong.safetensors", data)


@pytest.mark.parametrize("extra,message", [
    (None, "has no 6th element"), ([], "not a non-empty list"), ("0.5", "not a non-empty list"),
    ([0.5, float("nan")], "not finite numbers")])
def test_split_records_without_usable_labels_are_named(extra, message):
    record = RefRecord("a.jpg", (0.0, 0.0, 1.0, 1.0), "a dog", where="unc_train.pth[7]",
                       extra=extra)
    pattern = rf"unc_train.pth\[7\]: .*{message}.*oneref sts-labels"
    with pytest.raises(ValueError, match=pattern):
        check_sts_labels([record], "unc_train.pth")


def test_split_labels_may_be_numpy_and_must_match_the_tokens():
    import numpy as np

    good = RefRecord("a.jpg", (0.0, 0.0, 1.0, 1.0), "a dog", extra=np.array([0.5, 0.4, 0.6]))
    check_sts_labels([good], "f.pth")  # numpy arrays (and numpy scalars) are numbers too
    from oneref.data.refer import ReferringDataset

    dataset = ReferringDataset.__new__(ReferringDataset)
    dataset.max_text_len = 6
    torch.testing.assert_close(dataset._sts_targets(good, 3),
                               torch.tensor([0.5, 0.4, 0.6, 0.0, 0.0, 0.0]))
    good.where = "f.pth[2]"
    with pytest.raises(ValueError, match=r"f.pth\[2\]: 3 STS labels for an expression of 4"):
        dataset._sts_targets(good, 4)


def test_teacher_forwards_run_under_the_given_autocast():
    """The teacher's forwards under bf16 autocast, the scores in fp32: labels within bf16
    rounding of the fp32 teacher's."""
    torch.manual_seed(0)
    teacher = OneRef(get_config("tiny")).eval()
    data = RefShapes("train", size=4, img_size=64, max_text_len=24)
    batch = collate([data[i] for i in range(4)])
    forward, seen = teacher.relation_embeddings, []
    teacher.relation_embeddings = (
        lambda *args: seen.append(torch.is_autocast_enabled("cpu")) or forward(*args))
    cpu = torch.device("cpu")
    fp32 = teacher_labels(teacher, [batch], 0.5, 0.5, cpu, progress=False)
    bf16 = teacher_labels(teacher, [batch], 0.5, 0.5, cpu, progress=False,
                          autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == [False, False, True, True]
    for got, want in zip(bf16, fp32):
        assert len(got) == len(want)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=0.02, rtol=0)


def test_cli_labels_then_pretrains_with_sts(tmp_path, capsys):
    tiny = ["--model", "tiny", "--device", "cpu", "--no-progress", "--threads", "1",
            "--set", "data.eval_size=8", "--set", "data.test_size=8", "--set",
            "time_budget_s=0"]
    assert main(["train", *tiny, "--steps", "2", "--set", "data.train_size=16", "-o",
                 str(tmp_path / "teacher")]) == 0
    labels = tmp_path / "sts.safetensors"
    assert main(["sts-labels", "--teacher", str(tmp_path / "teacher"), "--out", str(labels),
                 "--size", "24", "--no-progress"]) == 0
    assert f"--sts-labels {labels}" in capsys.readouterr().out
    assert main(["sts-labels", "--teacher", str(tmp_path / "teacher"), "--out",
                 str(tmp_path / "sts_bf16.safetensors"), "--size", "24", "--no-progress",
                 "--amp", "bf16"]) == 0
    torch.testing.assert_close(load_file(tmp_path / "sts_bf16.safetensors")["sts_labels"],
                               load_file(labels)["sts_labels"], atol=0.02, rtol=0)
    pre = ["pretrain", *tiny, "--steps", "4", "-o", str(tmp_path / "pre"), "--sts"]
    assert main([*pre, "--set", "data.train_size=24", "--sts-labels", str(labels)]) == 0
    header = (tmp_path / "pre" / "metrics.csv").read_text().splitlines()[0].split(",")
    rows = [dict(zip(header, line.split(",")))
            for line in (tmp_path / "pre" / "metrics.csv").read_text().splitlines()[1:]]
    sts = [float(r["sts"]) for r in rows if r.get("sts") not in (None, "")]
    assert sts and all(math.isfinite(v) and v >= 0 for v in sts)
    capsys.readouterr()
    pre[pre.index("-o") + 1] = str(tmp_path / "pre2")  # pre holds a run now
    assert main([*pre, "--set", "data.train_size=24"]) == 2
    assert "--sts needs teacher scores" in capsys.readouterr().err
    assert main([*pre, "--set", "data.train_size=30", "--sts-labels", str(labels)]) == 2
    assert "labels 24 scenes, the train split has 30" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --teacher is required
        main(["sts-labels", "--out", str(labels)])
    assert "the following arguments are required: --teacher" in capsys.readouterr().err
