"""checkpoint.keep_best: RUN/best holds the weights of the best validation score, the same
after a kill and a resume as in a run that was never stopped."""

import csv
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from oneref.cli import main
from oneref.train.config import CheckpointConfig, DataConfig, StageConfig, refshapes_recipe
from oneref.train.trainer import BEST_METRIC, Trainer


def _config(out, **changes):
    """RES on RefShapes (mIoU moves every step, where a few steps of REC score 0), 8 steps
    over two epochs of 16 samples, validated every epoch and every 3 steps."""
    changes = {"task": "res", "eval_interval": 3, "eval_every_epoch": True,
               "checkpoint": CheckpointConfig(interval=2, keep_last=0, keep_best=True),
               **changes}
    return refshapes_recipe(
        model="tiny", output_dir=str(out), progress=False, log_interval=1,
        final_test=False, threads=1, time_budget_s=0.0,
        stages=[StageConfig(steps=8, lr=2e-3, batch_size=4, warmup_steps=1)],
        data=DataConfig(train_size=16, eval_size=8, test_size=8, eval_batch_size=8),
        **changes)


def _val_rows(run, metric="miou"):
    with open(run / "metrics.csv") as handle:
        return [(int(r["step"]), float(r[metric])) for r in csv.DictReader(handle)
                if r["split"] == "val"]


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_best_is_the_highest_validation_score_and_its_weights(tmp_path):
    results = Trainer(_config(tmp_path / "run")).fit()
    rows = _val_rows(tmp_path / "run")
    assert [step for step, _ in rows] == [3, 4, 6, 8]  # every 3 steps, each epoch, the end
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    value = max(v for _, v in rows)
    assert best == results["best"] == {
        "step": next(s for s, v in rows if v == value), "split": "val", "metric": "miou",
        "value": pytest.approx(value, abs=1e-5)}
    saved = tmp_path / "run" / "checkpoints" / f"step_{best['step']:08d}.pt"
    if saved.is_file():  # every 2 steps: the best's own weights
        state = torch.load(saved, weights_only=True)["model"]
        for key, value in _weights(tmp_path / "run" / "best").items():
            assert torch.equal(value, state[key]), key


def test_a_resumed_run_keeps_the_same_best(tmp_path, monkeypatch, caplog, killed_fit):
    """Killed in step 4, after the step-2 checkpoint and the step-3 validation: RUN/best,
    written at step 3, is newer than the checkpoint and goes; the resumed run takes steps
    3 to 8 again and ends with the uninterrupted run's best. REC selects by Acc@0.5, which
    a few steps leave at 0; mean box IoU moves every step, so the comparison has teeth."""
    monkeypatch.setitem(BEST_METRIC, "rec", "miou_box")
    config = dict(task="rec", checkpoint=CheckpointConfig(interval=2, keep_last=0,
                                                          keep_best=True))
    Trainer(_config(tmp_path / "straight", **config)).fit()
    broken = tmp_path / "broken"
    killed_fit(Trainer(_config(broken, **config)), 3)
    assert json.loads((broken / "best" / "best.json").read_text())["step"] == 3
    config["checkpoint"].resume = "auto"
    with caplog.at_level(logging.WARNING):
        Trainer(_config(broken, **config)).fit()
    assert "is from step 3, after the checkpoint of step 2: removed" in caplog.text
    assert _val_rows(broken, "miou_box") == _val_rows(tmp_path / "straight", "miou_box")
    assert (broken / "best" / "best.json").read_text() == (
        tmp_path / "straight" / "best" / "best.json").read_text()
    straight = _weights(tmp_path / "straight" / "best")
    resumed = _weights(broken / "best")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(resumed[key], value) for key, value in straight.items())


def test_keep_best_is_refused_without_validation_and_for_pretraining(tmp_path):
    with pytest.raises(ValueError, match="add --eval-every-epoch"):
        Trainer(_config(tmp_path / "a", eval_interval=0, eval_every_epoch=False))
    with pytest.raises(ValueError, match="pre-training has no validation score"):
        Trainer(_config(tmp_path / "b", task="pretrain"))


def test_the_command_names_the_best_and_eval_writes_beside_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "res", "--model", "tiny", "--steps", "4", "--no-progress",
                 "-o", str(run), "--keep-best", "--set", "eval_interval=2", "--set",
                 "data.train_size=16", "--set", "data.eval_size=8", "--set",
                 "final_test=false", "--set", "time_budget_s=0", "--device", "cpu"]) == 0
    best = json.loads((run / "best" / "best.json").read_text())
    assert (f"best val miou {best['value']:.4f} at step {best['step']}: {run / 'best'}"
            in capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(run / "best"), "--split", "val", "--size", "8",
                 "--device", "cpu"]) == 0
    rows = json.loads((run / "best" / "eval.json").read_text())["rows"]
    assert rows[0]["miou"] == pytest.approx(best["value"], abs=1e-6)
    assert not (run / "eval.json").exists()  # the final model's evaluations stay apart
    assert main(["train", "--task", "res", "--model", "tiny", "--steps", "1", "--no-progress",
                 "-o", str(run), "--overwrite", "--set", "data.train_size=16", "--set",
                 "data.eval_size=8", "--set", "final_test=false", "--device", "cpu"]) == 0
    assert not (run / "best").exists()  # --overwrite removes every output of the old run
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1
