"""A run folder's life: stopped by a signal and resumed exactly, saved at epoch ends, not
trained over by accident, resumed from its own recorded settings."""

import dataclasses
import json
import os
import shutil
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from oneref.cli import main
from oneref.train.config import CheckpointConfig, DataConfig, StageConfig, refshapes_recipe
from oneref.train.interrupt import StopRequest, TrainingInterrupted
from oneref.train.trainer import Trainer


def _config(out, steps=6, **changes):
    return refshapes_recipe(
        model="tiny", output_dir=str(out), progress=False, log_interval=1, final_test=False,
        threads=1, time_budget_s=0.0,
        stages=[StageConfig(steps=steps, lr=2e-3, batch_size=4, warmup_steps=1)],
        data=DataConfig(train_size=16, eval_size=8, test_size=8, eval_batch_size=8),
        **changes)


def _signal_at_step(trainer: Trainer, step: int, number=signal.SIGINT) -> None:
    """Send ``number`` to this process while the trainer computes step ``step`` (1-based)."""
    train_step = trainer._train_step

    def step_then_signal(batch):
        losses = train_step(batch)
        if trainer.step + 1 == step:
            signal.raise_signal(number)
        return losses

    trainer._train_step = step_then_signal


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_and_the_resume_is_exact(tmp_path, number):
    straight = Trainer(_config(tmp_path / "straight"))
    straight.fit()
    stopped = Trainer(_config(tmp_path / "stopped"))
    _signal_at_step(stopped, 3, number)
    with pytest.raises(TrainingInterrupted, match=f"{number.name} at step 3: checkpoint "
                                                  r"written .*oneref train -o .* --resume"):
        stopped.fit()
    assert signal.getsignal(number) is not stopped  # the handlers are restored
    assert (tmp_path / "stopped" / "checkpoints" / "step_00000003.pt").is_file()
    resumed = Trainer(_config(tmp_path / "stopped",
                              checkpoint=CheckpointConfig(resume="auto")))
    assert resumed.step == 3
    assert resumed.fit()["steps"] == 6
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_second_signal_stops_at_once():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_training_loader_workers_leave_signals_to_the_main_process(tmp_path):
    """A Ctrl-C reaches the whole process group: the workers must not die under a step that
    is still finishing (what ignore_interrupts does is tested on a live worker below)."""
    from oneref.train.data import train_loader
    from oneref.train.interrupt import ignore_interrupts

    trainer = Trainer(_config(tmp_path))
    data = dataclasses.replace(trainer.config.data, num_workers=1)
    loader, _ = train_loader(trainer.train_set, 4, data, torch.device("cpu"), 0, 1, seed=0)
    assert loader.worker_init_fn is ignore_interrupts


def test_every_epoch_saves_at_each_epoch_end(tmp_path):
    """16 samples in batches of 4: epochs end after steps 4 and 8; the last step's
    checkpoint is the final one."""
    Trainer(_config(tmp_path, steps=10,
                    checkpoint=CheckpointConfig(every_epoch=True, keep_last=0))).fit()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert saved == ["step_00000004.pt", "step_00000008.pt", "step_00000010.pt"]


def test_a_run_folder_is_continued_or_replaced_only_when_asked(tmp_path, capsys):
    tiny = ["train", "--model", "tiny", "--steps", "3", "--batch-size", "4", "--threads", "1",
            "--no-progress", "--set", "data.train_size=16", "--set", "data.eval_size=8",
            "--set", "final_test=false", "--set", "time_budget_s=0"]
    run = tmp_path / "run"
    assert main([*tiny, "-o", str(run)]) == 0
    capsys.readouterr()
    assert main([*tiny, "-o", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert main(["train", "-o", str(run), "--resume"]) == 2  # the recorded settings apply
    assert "has already finished (step 3 of 3)" in capsys.readouterr().err
    # --resume alone continues with the run's own settings (model, data, steps) and flags
    # change them from there.
    assert main(["train", "-o", str(run), "--resume", "--steps", "5", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 5
    assert json.loads((run / "train_config.json").read_text())["model"] == "tiny"
    converted = tmp_path / "converted"  # a training checkpoint converts like an official file
    assert main(["convert", str(run / "checkpoints" / "step_00000005.pt"), str(converted)]) == 0
    weights, final = (load_file(folder / "model.safetensors")
                      for folder in (converted, run / "model"))
    assert weights.keys() == final.keys()
    assert all(torch.equal(weights[name], final[name]) for name in final)
    assert main(["train", "-o", str(run), "--resume", "--steps", "7", "--task", "res"]) == 2
    assert "written by a rec run; it cannot be resumed as res" in capsys.readouterr().err
    stale = run / "checkpoints" / "step_00000005.pt"
    assert main([*tiny, "-o", str(run), "--overwrite"]) == 0
    assert not stale.exists()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3
    assert main(["train", "-o", str(tmp_path / "new"), "--resume",
                 str(tmp_path / "nope" / "step_1.pt")]) == 2
    assert "nope/step_1.pt does not exist (a run folder or a step_*.pt" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main([*tiny, "-o", str(afile)]) == 2
    assert f"--output-dir {afile}: {afile} is a file" in capsys.readouterr().err
    assert main([*tiny, "-o", str(afile / "sub")]) == 2
    assert f"--output-dir {afile / 'sub'}: {afile} is a file" in capsys.readouterr().err
    assert main([*tiny, "-o", ""]) == 2
    assert "--output-dir: empty path" in capsys.readouterr().err
    assert main([*tiny, "-o", str(run), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--batch-size", "64", "--set",
                 "data.train_size=16", "-o", str(run)]) == 2
    assert "batch" in capsys.readouterr().err
    assert not run.exists()


def test_stopped_runs_rerun_resume_elsewhere_and_evaluate(tmp_path, capsys, caplog):
    """A run stopped before its first checkpoint is started again by the same command; one
    stopped later is evaluated from its newest readable checkpoint (named once as a start
    point) and continued into another folder with its own settings; --overwrite keeps files
    it did not write."""
    tiny = ["train", "--model", "tiny", "--batch-size", "4", "--threads", "1", "--no-progress",
            "--set", "data.train_size=16", "--set", "data.eval_size=8", "--set",
            "final_test=false", "--set", "time_budget_s=0", "--checkpoint-interval", "2"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")  # what a start stopped at step 0 leaves
    (run / "metrics.csv").write_text("step,split\n")
    (run / "notes.txt").write_text("mine")
    assert main([*tiny, "--steps", "3", "-o", str(run)]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert main(["eval", "--checkpoint", str(run), "--size", "8"]) == 0  # the final model
    (run / "model" / "config.json").unlink()  # as if stopped after its step-2 checkpoint
    (run / "model" / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--split", "val", "--size", "8"]) == 0
    assert "| val | 8 |" in capsys.readouterr().out
    caplog.clear()
    child = [*tiny[3:], "--steps", "1", "--init-from", str(run), "-o", str(tmp_path / "a")]
    assert main(["train", *child]) == 0  # its preset (tiny) read from the run
    assert [r.getMessage() for r in caplog.records if "no final model" in r.getMessage()] == [
        f"{run} has no final model (a stopped run): using its newest readable checkpoint "
        "step_00000003.pt"]
    newest = run / "checkpoints" / "step_00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn: the one before stands in
    caplog.clear()
    assert main(["eval", "--checkpoint", str(run), "--split", "val", "--size", "8"]) == 0
    assert f"skipping unreadable checkpoint {newest}" in caplog.text
    assert "using its newest readable checkpoint step_00000002.pt" in caplog.text
    caplog.clear()
    assert main(["train", *child[:-1], str(tmp_path / "b")]) == 0  # one warning each
    skipped, *others = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert skipped.startswith(f"skipping unreadable checkpoint {newest}: ")
    assert others == [
        f"using {run / 'checkpoints' / 'step_00000002.pt'}, the newest readable checkpoint",
        f"{run} has no final model (a stopped run): using its newest readable checkpoint "
        "step_00000002.pt"]
    fork = tmp_path / "fork"  # the run's settings (tiny, 16 samples) come with its checkpoint
    assert main(["train", "-o", str(fork), "--resume",
                 str(run / "checkpoints" / "step_00000002.pt"), "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((fork / "metrics.json").read_text())["steps"] == 3
    assert main([*tiny, "--steps", "2", "-o", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and not (run / "eval.json").exists()


def test_a_resume_does_not_read_the_start_weights_again(tmp_path):
    from oneref.model import OneRef

    start = tmp_path / "start"
    OneRef.from_config("tiny").save_pretrained(start)
    run = tmp_path / "run"
    trainer = Trainer(_config(run, checkpoint=CheckpointConfig(init_from=str(start),
                                                               interval=2)))
    _signal_at_step(trainer, 2)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    shutil.rmtree(start)  # moved away after the run began
    resumed = Trainer(_config(run, checkpoint=CheckpointConfig(init_from=str(start),
                                                                resume="auto")))
    assert resumed.step == 2 and resumed.source is None
    # Nor does the command, which reads a new run's start weights for their preset.
    assert main(["train", "-o", str(run), "--resume", "--init-from", str(start),
                 "--no-progress"]) == 0


def test_start_weights_take_the_overrides_that_leave_their_shapes(tmp_path):
    """--init-from weights take model_overrides of the shape-free fields (the reference fp32
    residual stream, a drop-path rate); one that would change the weights' shapes stops the
    run before it starts, naming the field."""
    from oneref.model import OneRef

    start = tmp_path / "start"
    OneRef.from_config("tiny").save_pretrained(start)
    init = CheckpointConfig(init_from=str(start))
    trainer = Trainer(_config(tmp_path / "run", checkpoint=init,
                              model_overrides={"residual_dtype": "params", "drop_path": 0.2}))
    model = trainer.model
    assert model.config.residual_dtype == model.encoder.residual_dtype == "params"
    assert model.encoder.blocks[-1].drop_path.p == 0.2
    with pytest.raises(ValueError, match=r"depth=3 does not fit the weights of .*start "
                                         r"\(depth=2\): with these weights, only drop_path, "
                                         r"ln_eps, sim_scale, residual_dtype can"):
        Trainer(_config(tmp_path / "other", checkpoint=init, model_overrides={"depth": 3}))
    assert not (tmp_path / "other").exists()


def test_official_start_weights_take_another_image_size(tmp_path):
    """An official BEiT-3 file trains at any image size: its vision position table is
    resized to the patch grid (here 4 x 4 -> 3 x 3), and the data follow the model's size."""
    from oneref.config import get_config
    from oneref.testing import official_beit3_state

    start, state = tmp_path / "beit3_tiny.pth", official_beit3_state(get_config("tiny"))
    torch.save({"model": state}, start)
    init = CheckpointConfig(init_from=str(start))
    trainer = Trainer(_config(tmp_path / "run", steps=1, checkpoint=init,
                              model_overrides={"img_size": 48}))
    assert trainer.model.config.img_size == 48
    rows = state["beit3.encoder.embed_positions.A.weight"].shape[0]
    assert trainer.model.embed.vision_pos.weight.shape[0] == rows - 4 * 4 + 3 * 3
    assert trainer.load_report.resized_keys == ["embed.vision_pos.weight"]
    trainer.fit()
    assert trainer.step == 1
    with pytest.raises(ValueError, match=r"with these weights, only drop_path, ln_eps, "
                                         r"sim_scale, residual_dtype, img_size can be changed"):
        Trainer(_config(tmp_path / "other", checkpoint=init, model_overrides={"depth": 3}))


def test_an_error_raised_in_a_loader_worker_reads_as_itself():
    from torch.utils.data import DataLoader

    from oneref.data.records import own_message

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise ValueError("split.pth: record 0: image file 'a.jpg' is truncated")

    with pytest.raises(ValueError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert own_message(caught.value) == "split.pth: record 0: image file 'a.jpg' is truncated"


def test_a_signal_at_the_last_step_lets_the_run_finish_and_an_unfinished_end_resumes(tmp_path):
    trainer = Trainer(_config(tmp_path, steps=4))
    _signal_at_step(trainer, 4)
    assert trainer.fit()["steps"] == 4 and (tmp_path / "metrics.json").is_file()
    # A run stopped in its last moments (checkpoint at the end, no final outputs yet): the
    # resume only finishes it.
    (tmp_path / "metrics.json").unlink()
    resumed = Trainer(_config(tmp_path, steps=4, checkpoint=CheckpointConfig(resume="auto")))
    assert resumed.fit()["steps"] == 4 and (tmp_path / "metrics.json").is_file()
    with pytest.raises(ValueError, match=r"step_00000004.pt has already finished"):
        Trainer(_config(tmp_path, steps=4, checkpoint=CheckpointConfig(resume="auto")))


def test_resume_continues_the_named_run_where_it_is(tmp_path, capsys):
    """A copied run folder continues in the copy; pretrain and train do not continue each
    other's runs; a signal's exit status is 128 + its number."""
    tiny = ["train", "--model", "tiny", "--batch-size", "4", "--threads", "1", "--no-progress",
            "--set", "data.train_size=16", "--set", "data.eval_size=8", "--set",
            "final_test=false", "--set", "time_budget_s=0", "--checkpoint-interval", "2"]
    run, copy = tmp_path / "run", tmp_path / "copy"
    assert main([*tiny, "--steps", "2", "-o", str(run)]) == 0
    shutil.copytree(run, copy)
    before = (run / "metrics.json").read_text()
    assert main(["train", "--resume", str(copy), "--steps", "4", "--no-progress"]) == 0
    assert (run / "metrics.json").read_text() == before
    assert json.loads((copy / "metrics.json").read_text())["steps"] == 4
    # Its checkpoints/ folder (what an interrupted run names) stands for the run too.
    assert main(["train", "--resume", str(copy / "checkpoints"), "--steps", "6",
                 "--no-progress"]) == 0
    assert json.loads((copy / "metrics.json").read_text())["steps"] == 6
    assert main(["pretrain", "--resume", str(copy), "--steps", "6"]) == 2
    assert f"{copy} holds a rec run: continue it with oneref train --resume" in \
        capsys.readouterr().err
    trainer = Trainer(_config(tmp_path / "term"))
    _signal_at_step(trainer, 2, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    assert stopped.value.signal_number == signal.SIGTERM


def test_loader_workers_outlive_a_signal_to_the_process_group():
    from torch.utils.data import DataLoader

    from oneref.train.interrupt import ignore_interrupts

    loader = DataLoader(range(64), batch_size=4, num_workers=1, worker_init_fn=ignore_interrupts)
    batches = iter(loader)
    next(batches)
    for number in (signal.SIGINT, signal.SIGTERM):
        os.kill(batches._workers[0].pid, number)
    assert len(list(batches)) == 15  # the worker went on


def test_a_crash_with_live_loader_workers_exits():
    """Workers that ignore SIGTERM, still alive when the process exits (an uncaught error's
    traceback keeps their loader), are killed at exit rather than waited for for ever."""
    script = """
from torch.utils.data import DataLoader
from oneref.train.interrupt import ignore_interrupts

def train():
    loader = DataLoader(range(64), batch_size=4, num_workers=1, persistent_workers=True,
                        worker_init_fn=ignore_interrupts)
    for batch in loader:
        raise RuntimeError("out of memory")

train()
"""
    import subprocess

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.rstrip().endswith("RuntimeError: out of memory"), done.stderr[-2000:]


def test_a_rank_stops_on_a_signal_another_rank_received(tmp_path, monkeypatch):
    """Ranks agree on the signal (the highest number any of them got): one not signalled
    itself stops with the same one and exits with the same status."""
    import oneref.train.trainer as trainer_module

    trainer = Trainer(_config(tmp_path))
    trainer.info = dataclasses.replace(trainer.info, world_size=2)
    def another_rank_got_sigterm(values):  # the other reductions see one rank's values
        if sys._getframe(1).f_code.co_name != "_stop_signal":
            return values
        return torch.full_like(values, float(signal.SIGTERM))

    monkeypatch.setattr(trainer_module, "all_reduce_max", another_rank_got_sigterm)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 1") as stopped:
        trainer.fit()
    assert stopped.value.signal_number == signal.SIGTERM


def test_a_resume_refuses_to_mix_two_runs_and_finishes_only_what_is_left(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    Trainer(_config(first, steps=2, checkpoint=CheckpointConfig(interval=1))).fit()
    Trainer(_config(second, steps=2, checkpoint=CheckpointConfig(interval=1))).fit()
    with pytest.raises(ValueError, match=f"--output-dir {second} holds another run"):
        Trainer(_config(second, steps=4, checkpoint=CheckpointConfig(
            resume=str(first / "checkpoints" / "step_00000001.pt"))))
    # A finished run asked for more steps, stopped after its new end checkpoint but before
    # its final outputs: the old metrics.json (2 steps) does not make it look finished.
    more = Trainer(_config(first, steps=4, checkpoint=CheckpointConfig(interval=1,
                                                                       resume="auto")))
    more.fit()
    (first / "metrics.json").write_text(json.dumps({"steps": 2}))
    again = Trainer(_config(first, steps=4, checkpoint=CheckpointConfig(resume="auto")))
    assert again.fit()["steps"] == 4
    assert [p.name for p in (first / "checkpoints").glob("step_*.pt")].count(
        "step_00000004.pt") == 1


def test_a_folder_with_checkpoints_but_no_settings_is_a_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00005000.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(_config(tmp_path))
    Trainer(_config(tmp_path, overwrite=True))
    assert not (tmp_path / "checkpoints" / "step_00005000.pt").exists()


class _Unreadable(torch.utils.data.Dataset):
    """A validation split whose images turn out corrupt only when loaded."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        raise ValueError(f"val: record {index}: image file 'x.jpg' is truncated or corrupt")


def test_a_final_evaluation_that_fails_says_the_training_finished(tmp_path):
    """Bad data in an evaluation split, found only at the end (in a loader worker), leaves a
    checkpoint of the last step; the error is itself, and says how to finish the run."""
    config = _config(tmp_path / "run", steps=2,
                     checkpoint=CheckpointConfig(interval=2, keep_last=0))
    trainer = Trainer(dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                           num_workers=1)))

    trainer.eval_set = _Unreadable()
    with pytest.raises(ValueError) as caught:
        trainer.fit()
    assert str(caught.value) == (
        "val: record 0: image file 'x.jpg' is truncated or corrupt (training itself finished "
        f"at step 2; fix it, then evaluate and finish with: oneref train -o {tmp_path / 'run'} "
        "--resume)")
    resumed = Trainer(_config(tmp_path / "run", steps=2,
                              checkpoint=CheckpointConfig(resume="auto", keep_last=0)))
    assert resumed.step == 2 and resumed.fit()["val"]["n"] == 8


def test_a_validation_that_fails_mid_run_keeps_the_epochs_checkpoint(tmp_path):
    """An epoch's checkpoint is written before its validation: bad data found there leaves
    the step to continue from, and the error says how."""
    config = dataclasses.replace(_config(tmp_path / "run", steps=6, checkpoint=CheckpointConfig(
        every_epoch=True, keep_last=0)), eval_every_epoch=True)
    trainer = Trainer(config)

    trainer.eval_set = _Unreadable()
    with pytest.raises(ValueError) as caught:
        trainer.fit()
    epoch = 4  # 16 samples in batches of 4
    assert trainer.step == epoch and str(caught.value) == (
        "val: record 0: image file 'x.jpg' is truncated or corrupt (training reached step "
        f"{epoch}; fix it, then continue with: oneref train -o {tmp_path / 'run'} --resume)")
    assert (tmp_path / "run" / "checkpoints" / f"step_{epoch:08d}.pt").is_file()
