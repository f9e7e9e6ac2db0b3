"""The loop under faults: a non-finite step stops the run naming it, or is skipped within a
limit, and never reaches the weights; a torn newest checkpoint falls back to the previous;
a resume names the settings that changed."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from oneref.train.config import (CheckpointConfig, DataConfig, ResLossConfig, StageConfig,
                                 refshapes_recipe)
from oneref.train.trainer import Trainer


def _config(out, steps=4, **changes):
    return refshapes_recipe(
        model="tiny", output_dir=str(out), progress=False, log_interval=1, final_test=False,
        threads=1, time_budget_s=0.0,
        stages=[StageConfig(steps=steps, lr=2e-3, batch_size=4, warmup_steps=1)],
        data=DataConfig(train_size=16, eval_size=8, test_size=8, eval_batch_size=8), **changes)


def _poison_step(trainer, bad_steps):
    """Make the loss of the given (1-based) steps NaN."""
    real = trainer.task_module.forward

    def forward(batch, *args):
        losses = real(batch, *args)
        if trainer.step + 1 in bad_steps:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    trainer.task_module.forward = forward


def test_non_finite_step_stops_the_run_naming_it(tmp_path):
    trainer = Trainer(_config(tmp_path))
    _poison_step(trainer, {3})
    with pytest.raises(ValueError, match=r"step 3: non-finite loss or gradient \(.*box_mask .*"
                                         r"grad_norm nan.*loss nan.*--on-nan skip"):
        trainer.fit()
    assert not (tmp_path / "model").exists()  # no model of a diverged run


def test_skipped_steps_never_reach_the_weights(tmp_path, caplog):
    trainer = Trainer(_config(tmp_path, on_nan="skip", max_skipped_steps=1))
    _poison_step(trainer, {2})
    with caplog.at_level(logging.WARNING, logger="oneref.train.trainer"):
        results = trainer.fit()
    assert results["skipped_steps"] == 1 and results["steps"] == 4
    assert "step 2: non-finite loss or gradient" in caplog.text
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    trainer = Trainer(_config(tmp_path / "again", on_nan="skip", max_skipped_steps=1))
    _poison_step(trainer, {2, 3})
    with pytest.raises(ValueError, match="2 steps skipped, more than max_skipped_steps = 1"):
        trainer.fit()


def test_resume_falls_back_past_a_torn_checkpoint(tmp_path, caplog):
    first = Trainer(_config(tmp_path, checkpoint=CheckpointConfig(interval=1, keep_last=0)))
    first.fit()
    newest = tmp_path / "checkpoints" / "step_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # torn by a crash mid-copy
    with caplog.at_level(logging.WARNING, logger="oneref.train.checkpoint"):
        resumed = Trainer(_config(tmp_path, checkpoint=CheckpointConfig(resume="auto")))
    assert resumed.resumed_from.name == "step_00000003.pt" and resumed.step == 3
    assert "skipping unreadable checkpoint" in caplog.text and "step_00000004.pt" in caplog.text
    for name in ("step_00000001.pt", "step_00000002.pt", "step_00000003.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        Trainer(_config(tmp_path, checkpoint=CheckpointConfig(resume="auto")))


def test_resume_names_the_settings_that_changed_since_the_checkpoint(tmp_path, caplog):
    """A resume with other settings than the run's (a flag, or a recipe default changed by
    an upgrade) continues with them, and the warning names each changed field."""
    Trainer(_config(tmp_path, steps=2, checkpoint=CheckpointConfig(interval=1))).fit()
    (tmp_path / "checkpoints" / "step_00000002.pt").unlink()  # resume the unfinished run
    with caplog.at_level(logging.WARNING, logger="oneref.train.trainer"):
        Trainer(_config(tmp_path, steps=2, checkpoint=CheckpointConfig(interval=1,
                                                                       resume="auto")))
    assert "settings other than" not in caplog.text  # only the resume flag differs
    changed = _config(tmp_path, steps=2, checkpoint=CheckpointConfig(interval=1, resume="auto"),
                      res_loss=ResLossConfig(focal_alpha=0.5))
    changed.stages[0].lr = 1e-3
    with caplog.at_level(logging.WARNING, logger="oneref.train.trainer"):
        Trainer(changed)
    assert "step_00000001.pt with settings other than its run's" in caplog.text
    assert "res_loss.focal_alpha: 0.25 -> 0.5" in caplog.text
    assert "stages.0.lr: " in caplog.text and "-> 0.001" in caplog.text


def test_resume_refuses_a_checkpoint_of_another_model_or_task(tmp_path):
    """A preset that changed since the checkpoint was written (here: the RES head's
    upsamplings) or a checkpoint of another task stops the resume with what to do."""
    Trainer(_config(tmp_path, steps=2, checkpoint=CheckpointConfig(interval=1))).fit()
    changed = _config(tmp_path, checkpoint=CheckpointConfig(resume="auto"),
                      model_overrides={"res_upsamples": 2})
    with pytest.raises(ValueError, match=r"res_upsamples=3, but this run builds "
                                         r"res_upsamples=2; resume with --set "
                                         r"model_overrides.res_upsamples=3"):
        Trainer(changed)
    pretrain = _config(tmp_path, checkpoint=CheckpointConfig(resume="auto"), task="pretrain")
    with pytest.raises(ValueError, match="written by a rec run; it cannot be resumed as "
                                         "pretrain .start a new run from its weights"):
        Trainer(pretrain)
