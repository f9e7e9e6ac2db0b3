"""Training loop on the tiny preset: a step learns, checkpoints resume exactly."""

import csv
import dataclasses
import json
import os

import pytest
import torch

from oneref.data import collate
from oneref.model.losses import rec_losses
from oneref.ops import reference
from oneref.train.config import (CheckpointConfig, DataConfig, ResLossConfig, StageConfig,
                                 refshapes_recipe)
from oneref.train.trainer import Trainer


def _config(out, steps=6, time_budget_s=0.0, batch_size=4, grad_accum=1, train_size=16,
            **changes):
    return refshapes_recipe(
        model="tiny", output_dir=str(out), progress=False, log_interval=1, final_test=False,
        threads=1, time_budget_s=time_budget_s,
        stages=[StageConfig(steps=steps, lr=2e-3, batch_size=batch_size, grad_accum=grad_accum,
                            warmup_steps=1)],
        data=DataConfig(train_size=train_size, eval_size=8, test_size=8, eval_batch_size=8),
        **changes)


def test_train_step_decreases_loss_on_fixed_batch(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(_config(tmp_path, steps=1,
                              checkpoint=CheckpointConfig(keep_last=0)))
    trainer._apply_stage(0)
    batch = collate([trainer.train_set[i] for i in range(4)])
    from oneref.train.optim import set_lr

    set_lr(trainer.optimizer, 2e-3)
    losses = [float(trainer._train_step([dict(batch)])["loss"]) for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("rec_weight", [0.0, 0.5])
def test_res_step_uses_the_run_loss_weights(tmp_path, rec_weight):
    """The RES step is focal + dice with the run's ``res_loss`` weights and alpha, plus
    ``rec_weight`` x the REC losses of the REC head's boxes against the batch boxes."""
    weights = ResLossConfig(focal_alpha=0.6, focal_weight=5.0, dice_weight=7.0,
                            rec_weight=rec_weight)
    trainer = Trainer(_config(tmp_path, steps=1, task="res", res_loss=weights))
    batch = collate([trainer.train_set[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.task_module(batch)
        out = trainer.model.forward_res(batch["images"], batch["text_ids"],
                                        batch["text_lengths"], with_boxes=True)
    masks = batch["masks"]
    seg = reference.focal_dice_loss(out.mask_logits, masks, 5.0, 7.0, 0.6)
    assert not torch.allclose(seg, reference.focal_dice_loss(out.mask_logits, masks))
    want = seg
    if rec_weight:
        rec = rec_losses(out.boxes, out.sim_logits, batch["boxes"])
        want = seg + rec_weight * rec["loss"]
        torch.testing.assert_close(got["giou"], rec["giou"])
    else:
        assert set(got) == {"loss", "seg"}
    torch.testing.assert_close(got["seg"], seg)
    torch.testing.assert_close(got["loss"], want)


def _csv_losses(run):
    with open(run / "metrics.csv", newline="") as handle:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(handle)
                if r["split"] == "train"]


def _csv_column(run, name):
    with open(run / "metrics.csv", newline="") as handle:
        return [float(r[name]) for r in csv.DictReader(handle) if r["split"] == "train"]


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 1), (2, 2)])
def test_resume_after_kill_is_exact(tmp_path, killed_fit, batch_size, grad_accum):
    # Uninterrupted: 6 steps over two epochs (16 samples / 4 per step = 4 steps per epoch).
    straight = tmp_path / "straight"
    sizes = {"batch_size": batch_size, "grad_accum": grad_accum}
    ref = Trainer(_config(straight, checkpoint=CheckpointConfig(interval=3, keep_last=2),
                          **sizes))
    ref.fit()
    ref_weights = {k: v.clone() for k, v in ref.model.state_dict().items()}

    # Killed during step 5 (after the step-3 checkpoint), then resumed.
    broken = tmp_path / "broken"
    killed_fit(Trainer(_config(broken, checkpoint=CheckpointConfig(interval=3, keep_last=2),
                               **sizes)), 4)
    assert [p.name for p in (broken / "checkpoints").iterdir()] == ["step_00000003.pt"]

    second = Trainer(_config(broken, checkpoint=CheckpointConfig(interval=3, keep_last=2,
                                                                 resume="auto"), **sizes))
    assert second.step == 3
    second.fit()
    assert _csv_losses(broken) == _csv_losses(straight)
    assert len(_csv_losses(broken)) == 6
    for key, value in second.model.state_dict().items():
        assert torch.equal(value, ref_weights[key]), key
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == \
        ["step_00000003.pt", "step_00000006.pt"]


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    """Batch 4 x 2 accumulated takes the optimizer steps of batch 8: the same samples per
    step, the same losses and weights (fp32; REC, whose losses are per-sample means)."""
    runs = {}
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        out = tmp_path / f"b{batch_size}"
        trainer = Trainer(_config(out, steps=5, batch_size=batch_size, grad_accum=grad_accum,
                                  train_size=32, model_overrides={"drop_path": 0.0}))
        results = trainer.fit()
        runs[grad_accum] = trainer, results, out
    (whole, whole_results, whole_out), (accumulated, results, out) = runs[1], runs[2]
    assert results["samples_seen"] == whole_results["samples_seen"] == 5 * 8
    steps, losses = zip(*_csv_losses(out))
    want_steps, want = zip(*_csv_losses(whole_out))
    assert steps == want_steps == (1, 2, 3, 4, 5)  # across the epoch end (4 steps of 8)
    assert [float(v) for v in losses] == pytest.approx([float(v) for v in want], rel=1e-5)
    assert _csv_column(out, "grad_norm") == pytest.approx(_csv_column(whole_out, "grad_norm"),
                                                          rel=1e-4)  # the mean's gradient
    want_weights = whole.model.state_dict()
    for key, value in accumulated.model.state_dict().items():
        # Adam turns rounding differences of near-zero gradients into ~1e-6; a step on
        # other samples would move a weight by about the lr (2e-3).
        torch.testing.assert_close(value, want_weights[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resume_continues_the_time_budget(tmp_path, caplog):
    from oneref.train import checkpoint as ckpt

    first = Trainer(_config(tmp_path, time_budget_s=600.0,
                            checkpoint=CheckpointConfig(interval=2, keep_last=0)))
    first.fit()
    spent = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")["elapsed_s"]
    assert 0 < spent < 600
    (tmp_path / "checkpoints" / "step_00000004.pt").unlink()
    (tmp_path / "checkpoints" / "step_00000006.pt").unlink()
    # A budget that the first two steps already used up: the resumed run trains no step, it
    # only writes its final outputs; then it has finished.
    second = Trainer(_config(tmp_path, time_budget_s=spent,
                             checkpoint=CheckpointConfig(resume="auto", keep_last=0)))
    assert second.step == 2 and second.elapsed_before == spent
    assert f"time budget used ({spent:.0f} s trained): nothing is left to train" in caplog.text
    assert second.fit()["steps"] == 2
    with pytest.raises(ValueError, match=r"already finished \(step 2, its .* s time budget "
                                         r"used .*--time-budget \(the budget counts the whole"):
        Trainer(_config(tmp_path, time_budget_s=spent,
                        checkpoint=CheckpointConfig(resume="auto", keep_last=0)))


def test_a_trainer_trains_once(tmp_path):
    trainer = Trainer(_config(tmp_path, steps=2))
    assert trainer.fit()["steps"] == 2
    with pytest.raises(RuntimeError, match="already run fit.*checkpoint.resume='auto'"):
        trainer.fit()
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2


def test_resume_without_checkpoint_names_folder(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint found"):
        Trainer(_config(tmp_path, checkpoint=CheckpointConfig(resume="auto")))


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 1), (2, 2)])
def test_pretrain_alternates_mim_and_mlm(tmp_path, batch_size, grad_accum):
    from oneref.train.config import pretrain_recipe

    cfg = pretrain_recipe(
        model="tiny", output_dir=str(tmp_path), progress=False, log_interval=1, threads=1,
        stages=[StageConfig(steps=4, lr=1e-3, batch_size=batch_size, grad_accum=grad_accum)],
        data=DataConfig(train_size=16, eval_size=8, test_size=8))
    cfg.pretrain.vts = True
    trainer = Trainer(cfg)
    results = trainer.fit()
    assert results["steps"] == 4 and results["task"] == "pretrain"
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    # Even steps (1st, 3rd) are MIM with VTS, odd steps MLM; the box-mask term is in both.
    assert rows[0]["mim"] and rows[0]["vts"] and not rows[0]["mlm"]
    assert rows[1]["mlm"] and not rows[1]["mim"]
    assert all(float(r["box_mask"]) > 0 for r in rows)
    assert all(float(r["loss"]) > 0 for r in rows)


def test_a_checkpoint_with_one_set_of_random_streams_resumes_exactly(tmp_path):
    """Checkpoints written before each rank's streams were kept hold one RNG state and one
    MRefM mask-generator state, not a list per rank: a one-process run resumes from them
    as exactly as from a new one."""
    from oneref.train.config import pretrain_recipe

    def config(out, resume=""):
        return pretrain_recipe(
            model="tiny", output_dir=str(out), progress=False, log_interval=1, threads=1,
            time_budget_s=0.0,  # else the cosine follows the clock
            stages=[StageConfig(steps=4, lr=1e-3, batch_size=2)],
            data=DataConfig(train_size=16, eval_size=8, test_size=8),
            checkpoint=CheckpointConfig(interval=2, keep_last=0, resume=resume))

    straight = Trainer(config(tmp_path / "straight"))
    straight.fit()
    path = tmp_path / "straight" / "checkpoints" / "step_00000002.pt"
    state = torch.load(path, weights_only=True)
    assert len(state["rng"]) == len(state["mask_generator"]) == 1  # one rank's
    state["rng"], state["mask_generator"] = state["rng"][0], state["mask_generator"][0]
    torch.save(state, tmp_path / "old.pt")
    resumed = Trainer(config(tmp_path / "resumed", resume=str(tmp_path / "old.pt")))
    resumed.fit()
    want = straight.model.state_dict()
    assert all(torch.equal(value, want[key]) for key, value in resumed.model.state_dict().items())


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    from oneref.train import runtime

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "_busy_cores", lambda: 0.0)
    assert runtime.auto_threads() == cores
    monkeypatch.setattr(runtime, "_busy_cores", lambda: cores + 3.0)
    assert runtime.auto_threads() == 1  # never fewer than one


def test_busy_cores_is_a_core_count():
    from oneref.train.runtime import _busy_cores

    assert 0.0 <= _busy_cores(interval=0.05) <= (os.cpu_count() or 1) + 1e-6


def test_features_are_logged_and_a_dropped_one_says_why(tmp_path, caplog):
    from oneref.train.config import DistConfig

    with caplog.at_level("INFO", logger="oneref.train.features"):
        trainer = Trainer(_config(tmp_path, steps=1, grad_checkpointing=True,
                                  dist=DistConfig(strategy="fsdp")))
    assert not trainer.fsdp
    assert "FSDP asked for, but this is a single process" in caplog.text
    assert "grad checkpointing on -> single process -> compile off" in caplog.text
    trainer._apply_stage(0)
    assert trainer.wrapped is trainer.task_module  # nothing to wrap in one process


def test_resuming_past_the_plan_only_finishes_and_says_so(tmp_path, caplog):
    Trainer(_config(tmp_path / "run", steps=4,
                    checkpoint=CheckpointConfig(interval=4, keep_last=0))).fit()
    step4 = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    shorter = Trainer(_config(tmp_path / "fork", steps=2,
                              checkpoint=CheckpointConfig(resume=str(step4), keep_last=0)))
    assert f"{step4} is at step 4, past the 2 steps of this plan: nothing is left to train" \
        in caplog.text
    assert shorter.fit()["steps"] == 4


def test_a_budget_end_names_the_stages_that_never_ran_and_the_one_to_shorten(tmp_path, caplog):
    trainer = Trainer(dataclasses.replace(_config(tmp_path), stages=[
        StageConfig(name="frozen", steps=2, lr=1e-3, batch_size=4, freeze_backbone=True),
        StageConfig(name="full", epochs=1, lr=1e-3, batch_size=4)]))
    trainer.step = 2  # out of time before the first step of the second stage
    trainer._report_budget_end()
    trainer.step = 5  # in the last stage: the budget ends the run as planned
    trainer._report_budget_end()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "the time budget of 0 s ran out after 2 steps: stage(s) 1 (full) never ran; give a "
        "larger --time-budget or shorten stage 0 (--set stages.0.steps=N)"]


def test_batch_norm_statistics_are_averaged_before_each_evaluation_and_save(tmp_path,
                                                                            monkeypatch):
    """With several ranks each rank's BatchNorm statistics differ; the trainer averages them
    (a collective on every rank) right before every evaluation and checkpoint."""
    from oneref.train import trainer as module

    events = []

    def recorded(name, function):
        def call(*args, **kwargs):
            events.append(name)
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(module, "average_batch_norm_stats", recorded("average", lambda m: None))
    monkeypatch.setattr(module, "evaluate", recorded("evaluate", module.evaluate))
    monkeypatch.setattr(module.ckpt, "save_checkpoint",
                        recorded("save", module.ckpt.save_checkpoint))
    Trainer(_config(tmp_path, steps=4, eval_interval=2,
                    checkpoint=CheckpointConfig(interval=2, keep_last=0))).fit()
    # step 2, and the end (step 4 is the last: its evaluation is the end's, not a second one)
    assert events.count("save") == 2 and events.count("evaluate") == 2
    assert all(events[i - 1] == "average" for i, e in enumerate(events) if e != "average")
