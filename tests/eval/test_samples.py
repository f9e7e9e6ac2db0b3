"""Per-sample evaluation results (oneref.eval.samples, ``oneref eval --predictions``): the
recorder's rows and worst samples, the canvas-to-pixels mapping, the files on RefShapes and
on image files, and the rows of two ranks joined."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from oneref.cli import main
from oneref.data.transforms import Example, TestTransform
from oneref.eval.predict import canvas_to_pixels, mask_boxes
from oneref.eval.samples import SampleRecorder


def _rec_batch(indices, ious_wanted):
    """Targets and predictions of a REC batch whose IoUs are ``ious_wanted``: the target
    box (0.5, 0.5, 0.4, 0.4) and a prediction of the same centre, width scaled down."""
    n = len(indices)
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4]]).repeat(n, 1)
    predicted = target.clone()
    predicted[:, 2] *= torch.tensor(ious_wanted, dtype=torch.float32)
    return SimpleNamespace(boxes=predicted), {"boxes": target, "indices": torch.tensor(indices)}


def test_rows_and_the_worst_samples_of_batches():
    """Every sample gets a row; the worst are the lowest IoUs, ties to the earlier index."""
    recorder = SampleRecorder("rec", worst=3)
    recorder.update(*_rec_batch([0, 1, 2, 3], [0.9, 0.2, 0.5, 0.2]))
    recorder.update(*_rec_batch([4, 5], [0.1, 1.0]))
    assert [row["index"] for row in recorder.rows] == [0, 1, 2, 3, 4, 5]
    assert recorder.rows[1]["iou"] == pytest.approx(0.2, abs=1e-6)
    assert recorder.rows[5]["box_cxcywh"] == pytest.approx([0.5, 0.5, 0.4, 0.4])
    assert [(i, round(iou, 4)) for i, iou, _ in recorder.worst_samples()] == [
        (4, 0.1), (1, 0.2), (3, 0.2)]


def test_res_rows_keep_the_worst_masks():
    recorder = SampleRecorder("res", worst=1)
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    logits = torch.full((2, 8, 8), -1.0)
    logits[0, 2:6, 2:6] = 1  # exact
    logits[1, 2:4, 2:6] = 1  # half
    recorder.update(SimpleNamespace(mask_logits=logits),
                    {"masks": target, "indices": torch.tensor([7, 8])})
    assert [row["iou"] for row in recorder.rows] == [1.0, 0.5]
    assert recorder.rows[1]["box_cxcywh"] == [0.5, 0.375, 0.5, 0.25]
    (index, iou, mask), = recorder.worst_samples()
    assert (index, iou) == (8, 0.5) and mask.dtype == bool and mask.sum() == 8


@pytest.mark.parametrize("width,height", [(96, 72), (50, 131), (64, 64), (600, 90)])
def test_canvas_to_pixels_inverts_the_test_transform(width, height):
    """Each side is scaled by its own rounded size (600 x 90 on 48: 48 x 7, not 7.2)."""
    image = Image.new("RGB", (width, height))
    box = np.array([5.0, 7.0 * height / 90, width - 9.0, height - 3.0])
    out = TestTransform(48)(Example(image, box, None, "x"))
    back = canvas_to_pixels(out.box.tolist(), width, height, 48)
    assert back == pytest.approx(box.tolist(), abs=1e-4)
    assert canvas_to_pixels([0.5, 0.5, 2.0, 2.0], width, height, 48) == (0, 0, width, height)
    assert np.isfinite(canvas_to_pixels([0.5] * 4, 4000, 3, 48)).all()  # a side under a pixel


def test_mask_boxes():
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, 2:4, 5:10] = True
    masks[1, 9, 0] = True
    torch.testing.assert_close(mask_boxes(masks), torch.tensor(
        [[0.75, 0.3, 0.5, 0.2], [0.05, 0.95, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def refshapes_run(tmp_path_factory):
    """A tiny RefShapes REC run of a few steps."""
    run = tmp_path_factory.mktemp("samples") / "run"
    assert main(["train", "--model", "tiny", "--steps", "4", "--no-progress", "-o", str(run),
                 "--set", "data.train_size=32", "--set", "data.eval_size=8", "--set",
                 "data.test_size=8", "--set", "time_budget_s=0", "--device", "cpu"]) == 0
    return run


def test_eval_writes_rows_that_give_its_metrics(refshapes_run, capsys):
    assert main(["eval", "--checkpoint", str(refshapes_run), "--split", "val", "--size", "20",
                 "--predictions", "--batch-size", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in
            (refshapes_run / "predictions_val.jsonl").read_text().splitlines()]
    assert f"wrote {refshapes_run / 'predictions_val.jsonl'}" in out
    metrics = json.loads((refshapes_run / "eval.json").read_text())["rows"][0]
    assert [row["index"] for row in rows] == list(range(20))
    assert np.mean([row["hit"] for row in rows]) == pytest.approx(metrics["acc@0.5"])
    assert np.mean([row["iou"] for row in rows]) == pytest.approx(metrics["miou_box"],
                                                                 abs=1e-4)
    assert all(row["text"] and len(row["box_cxcywh"]) == 4 and "image" not in row
               for row in rows)
    with Image.open(refshapes_run / "worst_val.png") as picture:  # 16 tiles, 4 columns
        assert picture.width == 4 * 256 and picture.height > 4 * 256


def test_per_sample_files_of_other_weights_go(refshapes_run):
    """Once the weights change, an evaluation removes the per-sample files it does not
    write: they belong to the weights eval.json no longer names."""
    argv = ["eval", "--checkpoint", str(refshapes_run), "--size", "8", "--device", "cpu"]
    assert main([*argv, "--split", "val,test", "--predictions"]) == 0
    assert main([*argv, "--split", "val"]) == 0  # the same weights: test's files stay
    assert (refshapes_run / "predictions_test.jsonl").is_file()
    weights = refshapes_run / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert main([*argv, "--split", "test", "--predictions"]) == 0
    assert sorted(p.name for p in refshapes_run.glob("*_*.*") if "val" in p.name
                  or "test" in p.name) == ["predictions_test.jsonl", "worst_test.png"]


def test_eval_predictions_on_image_files(realdata_like, capsys):
    """Rows of an image dataset name the image and give both boxes in its pixels."""
    run, image_folder = realdata_like
    assert main(["eval", "--checkpoint", str(run), "--split", "val", "--predictions",
                 "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (run / "predictions_val.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 2
    assert [(row["where"], row["image_file"]) for row in rows] == [  # to join back on
        ("val.jsonl:1", "a.jpg"), ("val.jsonl:2", "b.jpg")]
    for row in rows:
        with Image.open(row["image"]) as image:
            width, height = image.size
        assert row["image"].startswith(str(image_folder))
        x1, y1, x2, y2 = row["box_xyxy"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert row["target_xyxy"] == [2.0, 3.0, 22.0, 13.0]


@pytest.fixture(scope="module")
def realdata_like(tmp_path_factory):
    """A run folder of an untrained tiny model recorded as trained on own annotation files
    (two landscape and portrait images), with a toy sentencepiece model."""
    import io

    import sentencepiece as spm

    from oneref.model import OneRef
    from oneref.train.config import DataConfig, refshapes_recipe

    root = tmp_path_factory.mktemp("own")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (40, 30)), ("b.jpg", (30, 50))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(
            root / "images" / name)
    (root / "ann").mkdir()
    (root / "ann" / "val.jsonl").write_text("\n".join(json.dumps(
        {"image": name, "box": [2, 3, 20, 10], "text": "the left cube"})
        for name in ("a.jpg", "b.jpg")) + "\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["the left cube", "a red one"] * 9),
                                   model_writer=model, vocab_size=20, model_type="unigram",
                                   hard_vocab_limit=False, minloglevel=2)
    (root / "t.spm").write_bytes(model.getvalue())
    run = root / "run"
    OneRef.from_config("tiny").save_pretrained(run / "model")
    data = DataConfig(dataset="mine", annotations=str(root / "ann"), root=str(root / "images"),
                      tokenizer=str(root / "t.spm"))
    (run / "train_config.json").write_text(json.dumps(refshapes_recipe(
        model="tiny", data=data).to_dict()))
    return run, root / "images"


def _record_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    recorder = SampleRecorder("rec", worst=2)
    # rank 0 holds samples 0 and 2, rank 1 samples 1 and 3 (the shard sampler's order)
    indices = [rank, rank + 2]
    recorder.update(*_rec_batch(indices, [0.3 + 0.1 * i for i in indices]))
    recorder.gather()
    torch.save((recorder.rows, [(i, iou) for i, iou, _ in recorder.worst_samples()]),
               f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_join_their_rows_and_worst_samples(tmp_path):
    torch.multiprocessing.spawn(_record_on_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    for rank in range(2):
        rows, worst = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert sorted(row["index"] for row in rows) == [0, 1, 2, 3]
        assert [i for i, _ in worst] == [0, 1]
