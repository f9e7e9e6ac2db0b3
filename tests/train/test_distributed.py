"""torchrun --nproc_per_node=2 on CPU (gloo), DDP and FSDP, matches one process on the same
global batch; an FSDP run resumes from its gathered checkpoint."""

import csv
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oneref.train.distributed import (DistInfo, average_batch_norm_stats, gradient_sync_off,
                                      main_writes, shard_model, wrap_model)

COMMON = ["train", "--model", "tiny", "--steps", "4", "--lr", "0.002", "--train-size", "32",
          "--threads", "1", "--no-progress", "--device", "cpu", "--time-budget", "0",
          "--set", "data.eval_size=12", "--set", "final_test=false", "--set", "log_interval=1",
          "--set", "stages.0.warmup_steps=1", "--set", 'model_overrides={"drop_path": 0.0}',
          "--set", "checkpoint.keep_last=0"]


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done


def _train_rows(run):
    with open(run / "metrics.csv", newline="") as handle:
        return [r for r in csv.DictReader(handle) if r["split"] == "train"]


def _losses(run):
    return [float(r["loss"]) for r in _train_rows(run)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, global batch 8."""
    run = tmp_path_factory.mktemp("single")
    _run([sys.executable, "-m", "oneref.cli", *COMMON, "--batch-size", "8", "-o", str(run)], run)
    return run


def _two_ranks(run, *extra):
    """torchrun on a free local port (``--standalone``), so parallel runs do not collide."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "oneref.cli", *COMMON, "--batch-size", "4",
          "-o", str(run), *extra], run.parent)


def _assert_same_run(two_ranks, single):
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((two_ranks / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["val"]["n"] == one["val"]["n"] == 12  # every sample once, reduced over ranks
    assert two["val"]["miou_box"] == pytest.approx(one["val"]["miou_box"], abs=1e-4)
    assert two["val"]["acc@0.5"] == pytest.approx(one["val"]["acc@0.5"], abs=1e-6)
    assert _losses(two_ranks) == pytest.approx(_losses(single), rel=1e-4)
    assert len(_losses(single)) == 4


#: Two ranks of batch 2 with 2 batches accumulated: the global batch 8 of ``single``.
ACCUMULATED = ("--batch-size", "2", "--grad-accum", "2")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ACCUMULATED], ids=["batch-4", "batch-2x2"])
def test_two_ranks_match_one_process(tmp_path, single, extra):
    _two_ranks(tmp_path / "ddp", *extra)
    _assert_same_run(tmp_path / "ddp", single)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ACCUMULATED], ids=["batch-4", "batch-2x2"])
def test_fsdp_matches_one_process_and_resumes(tmp_path, single, extra):
    run = tmp_path / "fsdp"
    fsdp = ["--set", "dist.strategy=fsdp", "--set", "checkpoint.interval=2", *extra]
    _two_ranks(run, *fsdp)
    _assert_same_run(run, single)
    weights = load_file(run / "model" / "model.safetensors")
    reference = load_file(single / "model" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for key, value in weights.items():  # gathered, not one rank's shard
        assert value.shape == reference[key].shape, key
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-5, msg=key)

    # Lose the last checkpoint and the tail of the log, then resume from step 2.
    (run / "checkpoints" / "step_00000004.pt").unlink()
    _two_ranks(run, *fsdp, "--resume", "auto")
    _assert_same_run(run, single)


def _losses_by_step(run):
    return {int(r["step"]): float(r["loss"]) for r in _train_rows(run)}


@pytest.mark.slow
def test_two_ranks_resume_their_own_random_streams(tmp_path):
    """With drop path on, a two-rank run resumed from its step-2 checkpoint ends with the
    weights of the uninterrupted run: each rank's RNG state is saved and restored."""
    drop = ("--set", 'model_overrides={"drop_path": 0.2}', "--set", "checkpoint.interval=2")
    _two_ranks(tmp_path / "straight", *drop)
    _two_ranks(tmp_path / "resumed", *drop, "--resume",
               str(tmp_path / "straight" / "checkpoints" / "step_00000002.pt"))
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(resumed[key], value) for key, value in straight.items())
    losses = _losses_by_step(tmp_path / "straight")
    assert _losses_by_step(tmp_path / "resumed") == {3: losses[3], 4: losses[4]}


@pytest.mark.slow
def test_a_checkpoint_resumes_on_fewer_ranks_with_the_same_global_batch(tmp_path, single,
                                                                        capsys):
    """Two ranks of batch 4 stop at step 2; one process with 4 x 2 accumulated takes the
    same samples per step and ends where the one-process batch-8 run does."""
    two = tmp_path / "two"
    _two_ranks(two, "--set", "checkpoint.interval=2")
    checkpoint = str(two / "checkpoints" / "step_00000002.pt")
    from oneref.cli import main

    one = [*COMMON, "--resume", checkpoint, "--batch-size", "4"]
    assert main([*one, "-o", str(tmp_path / "refused")]) == 2
    assert ("written by 2 ranks and this run has 1 with other global batches: resume on 2 "
            "ranks, or keep its global batches with --grad-accum 2") in capsys.readouterr().err
    _run([sys.executable, "-m", "oneref.cli", *one, "--grad-accum", "2",
          "-o", str(tmp_path / "one")], tmp_path)
    want = _losses_by_step(single)
    assert _losses_by_step(tmp_path / "one") == pytest.approx({3: want[3], 4: want[4]},
                                                              rel=1e-4)
    weights = load_file(tmp_path / "one" / "model" / "model.safetensors")
    for key, value in load_file(single / "model" / "model.safetensors").items():
        torch.testing.assert_close(weights[key], value, rtol=1e-3, atol=1e-5, msg=key)


def _average_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    torch.manual_seed(rank)
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    head[1].running_mean.fill_(rank + 1.0)
    head[1].running_var.fill_(2.0 * (rank + 1))
    average_batch_norm_stats(head)
    torch.save(head.state_dict(), f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_batch_norm_statistics_are_averaged_over_ranks(tmp_path):
    """Each rank's BatchNorm statistics (the RES head's) become the ranks' mean, so every
    rank evaluates the model rank 0 saves; nothing else is touched."""
    torch.multiprocessing.spawn(_average_on_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    states = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for state in states:
        assert torch.equal(state["1.running_mean"], torch.full((4,), 1.5))
        assert torch.equal(state["1.running_var"], torch.full((4,), 3.0))
        assert state["1.num_batches_tracked"] == 0
    assert not torch.equal(states[0]["0.weight"], states[1]["0.weight"])


def _failed_write(path: str) -> None:
    raise OSError(28, "No space left on device", path)


def _write_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2, timeout=datetime.timedelta(seconds=60))
    outcome = "no error"
    try:
        main_writes(lambda: _failed_write(f"{out}/metrics.json"))
    except OSError as err:
        outcome = f"{type(err).__name__}: {err}"
    with open(f"{out}/{rank}.txt", "w") as handle:
        handle.write(outcome)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_failed_write_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0's write error reaches every rank at once: no rank waits at a barrier for a
    rank that has stopped (the gloo timeout would fail this test, not hang it)."""
    torch.multiprocessing.spawn(_write_on_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    first, second = ((tmp_path / f"{rank}.txt").read_text() for rank in range(2))
    assert first == f"OSError: [Errno 28] No space left on device: '{tmp_path}/metrics.json'"
    assert second == (f"OSError: rank 0 stopped writing the run's files ({first}); this rank "
                      f"stops too")


def test_a_failed_write_in_one_process_raises_it_unchanged(tmp_path):
    with pytest.raises(OSError, match="No space left") as caught:
        main_writes(lambda: _failed_write(str(tmp_path / "x")))
    assert caught.value.errno == 28
    calls = []
    main_writes(lambda: calls.append(1))
    assert calls == [1]


def _sync_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2, timeout=datetime.timedelta(seconds=60))
    info = DistInfo(rank, rank, 2, torch.device("cpu"))
    seen = {}
    ddp = wrap_model(torch.nn.Linear(4, 4), info)
    with gradient_sync_off(torch.compile(ddp)):  # through torch.compile's wrapper
        seen["ddp_inside"] = ddp.require_backward_grad_sync
    seen["ddp_after"] = ddp.require_backward_grad_sync
    fsdp = shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), info)
    with gradient_sync_off(fsdp):
        fsdp(torch.ones(2, 4)).sum().backward()
    # Kept unsharded on the rank until a synchronised backward reduces it into the shards.
    seen["fsdp_grad_inside"] = fsdp[0].weight.grad is not None
    fsdp(torch.ones(2, 4)).sum().backward()
    seen["fsdp_grad_after"] = fsdp[0].weight.grad is not None
    # Both backwards' gradients, averaged over the ranks: 2 x (ones @ ones) rows summed.
    seen["fsdp_grad_value"] = fsdp[0].weight.grad.full_tensor()[0, 0].item()
    torch.save(seen, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gradient_sync_off_defers_the_reduction(tmp_path):
    """DDP (also compiled) skips its all-reduce and FSDP2 its reduce-scatter inside
    gradient_sync_off; the next synchronised backward reduces everything accumulated."""
    torch.multiprocessing.spawn(_sync_on_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    for rank in range(2):
        seen = torch.load(tmp_path / f"{rank}.pt")
        assert seen == {"ddp_inside": False, "ddp_after": True, "fsdp_grad_inside": False,
                        "fsdp_grad_after": True, "fsdp_grad_value": 4.0}
