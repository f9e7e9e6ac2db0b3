"""checkpoint.keep_best: RUN/best holds the weights of the best validation score; a resume
compares with what RUN/best holds, so a kill, an extension or another folder never leaves a
record that names other weights, and a killed run ends with the uninterrupted run's best."""

import csv
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from oneref.cli import main
from oneref.train.config import CheckpointConfig, DataConfig, StageConfig, refshapes_recipe
from oneref.train.trainer import Trainer


def _config(out, steps=8, interval=2, resume="", **changes):
    """RES on RefShapes: two epochs of 4 steps, validated every 2 steps and at each epoch's
    end, a checkpoint every ``interval`` steps."""
    changes = {"task": "res", "eval_interval": 2, "eval_every_epoch": True, **changes}
    return refshapes_recipe(
        model="tiny", output_dir=str(out), progress=False, log_interval=1, final_test=False,
        threads=1, time_budget_s=0.0,
        stages=[StageConfig(steps=steps, lr=2e-3, batch_size=4, warmup_steps=1)],
        data=DataConfig(train_size=16, eval_size=8, test_size=8, eval_batch_size=8),
        checkpoint=CheckpointConfig(interval=interval, keep_last=0, keep_best=True,
                                    resume=resume), **changes)


@pytest.fixture
def scores(monkeypatch):
    """Validation scores set per step (``scores[step] = miou``) in place of the model's,
    which a few steps of the tiny model leave at 0."""
    table: dict[int, float] = {}
    monkeypatch.setattr(Trainer, "evaluate", lambda self, split: {"miou": table[self.step],
                                                                  "n": 8})
    return table


def _val_steps(run):
    with open(run / "metrics.csv") as handle:
        return [int(r["step"]) for r in csv.DictReader(handle) if r["split"] == "val"]


def _best(run):
    return json.loads((run / "best" / "best.json").read_text())


def _same_weights(folder, state):
    weights = load_file(folder / "model.safetensors")
    return weights.keys() <= state.keys() and all(torch.equal(v, state[k])
                                                  for k, v in weights.items())


def _checkpoint_model(run, step):
    return torch.load(run / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["model"]


def test_best_is_the_highest_score_and_its_weights(tmp_path, scores):
    scores.update({2: 0.2, 4: 0.6, 6: 0.4, 8: 0.5})
    run = tmp_path / "run"
    results = Trainer(_config(run)).fit()
    assert _val_steps(run) == [2, 4, 6, 8]  # the last step once: the end reuses it
    assert _best(run) == results["best"] == {"step": 4, "split": "val", "metric": "miou",
                                             "value": 0.6}
    assert _same_weights(run / "best", _checkpoint_model(run, 4))


def test_a_killed_run_ends_with_the_uninterrupted_runs_best(tmp_path, scores, killed_fit,
                                                            caplog):
    """Killed in step 7: the step-6 best is on disk, the step-4 checkpoint knows only the
    step-4 one. The resume compares with the step-6 weights RUN/best holds."""
    scores.update({2: 0.1, 4: 0.3, 6: 0.5, 8: 0.4})
    Trainer(_config(tmp_path / "straight", interval=4)).fit()
    broken = tmp_path / "broken"
    killed_fit(Trainer(_config(broken, interval=4)), 6)
    assert _best(broken)["step"] == 6
    with caplog.at_level(logging.WARNING):
        Trainer(_config(broken, interval=4, resume="auto")).fit()
    assert _best(broken) == _best(tmp_path / "straight") and _best(broken)["step"] == 6
    assert _same_weights(broken / "best", load_file(
        tmp_path / "straight" / "best" / "model.safetensors"))
    assert "best" not in caplog.text


def test_extending_a_run_keeps_its_best_and_a_new_best_clears_old_evaluations(tmp_path,
                                                                               scores):
    """The end's validation comes after the last checkpoint: an extension keeps that best;
    a later, better one replaces it and the evaluations of the old weights."""
    scores.update({2: 0.1, 4: 0.2, 6: 0.3, 8: 0.9, 10: 0.5, 12: 0.95})
    run = tmp_path / "run"
    Trainer(_config(run)).fit()
    (run / "best" / "eval.json").write_text("{}")
    (run / "best" / "predictions_val.jsonl").write_text("{}\n")
    assert Trainer(_config(run, steps=10, resume="auto")).fit()["best"]["step"] == 8
    assert _same_weights(run / "best", _checkpoint_model(run, 8))
    assert (run / "best" / "eval.json").is_file()
    assert Trainer(_config(run, steps=12, resume="auto")).fit()["best"]["step"] == 12
    assert _same_weights(run / "best", _checkpoint_model(run, 12))
    assert sorted(p.name for p in (run / "best").iterdir()) == [
        "best.json", "config.json", "model.safetensors"]


def test_resumed_into_another_folder_a_run_keeps_its_own_best(tmp_path, scores, caplog):
    scores.update({2: 0.1, 4: 0.6, 6: 0.4, 8: 0.5})
    first = tmp_path / "first"
    Trainer(_config(first)).fit()
    other = tmp_path / "other"
    checkpoint = first / "checkpoints" / "step_00000004.pt"
    with caplog.at_level(logging.WARNING):
        results = Trainer(_config(other, resume=str(checkpoint))).fit()
    # the step-4 checkpoint is written before step 4's validation: it knows step 2's best
    assert "holds no weights of the checkpoint's best miou (step 2)" in caplog.text
    assert _best(other) == results["best"] and results["best"]["step"] == 8  # 0.4, then 0.5
    assert _same_weights(other / "best", _checkpoint_model(other, 8))


def test_keep_best_is_refused_without_validation_and_for_pretraining(tmp_path):
    with pytest.raises(ValueError, match="add --eval-every-epoch .* or turn it off with --set "
                                         "checkpoint.keep_best=false"):
        Trainer(_config(tmp_path / "a", eval_interval=0, eval_every_epoch=False))
    with pytest.raises(ValueError, match="pre-training has no validation score"):
        Trainer(_config(tmp_path / "b", task="pretrain"))


def test_the_command_names_the_best_and_eval_writes_beside_it(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--task", "res", "--model", "tiny", "--steps", "4", "--no-progress",
                 "-o", str(run), "--keep-best", "--set", "eval_interval=2", "--set",
                 "data.train_size=16", "--set", "data.eval_size=8", "--set",
                 "final_test=false", "--set", "time_budget_s=0", "--device", "cpu"]) == 0
    best = _best(run)
    assert (f"best val miou {best['value']:.4f} at step {best['step']}: {run / 'best'}"
            in capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(run / "best"), "--split", "val", "--size", "8",
                 "--device", "cpu"]) == 0
    rows = json.loads((run / "best" / "eval.json").read_text())["rows"]
    assert rows[0]["miou"] == pytest.approx(best["value"], abs=1e-6)
    assert not (run / "eval.json").exists()  # the final model's evaluations stay apart
    monkeypatch.chdir(run / "best")  # the run's recorded data is found from "." too
    assert main(["eval", "--checkpoint", ".", "--split", "val", "--size", "8", "--device",
                 "cpu"]) == 0
    assert main(["train", "--task", "res", "--model", "tiny", "--steps", "1", "--no-progress",
                 "-o", str(run), "--overwrite", "--set", "data.train_size=16", "--set",
                 "data.eval_size=8", "--set", "final_test=false", "--device", "cpu"]) == 0
    assert not (run / "best").exists()  # --overwrite removes every output of the old run
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1
