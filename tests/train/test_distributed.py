"""torchrun --nproc_per_node=2 on CPU (gloo) matches one process on the same global batch."""

import csv
import json
import os
import subprocess
import sys

import pytest

COMMON = ["train", "--model", "tiny", "--steps", "4", "--lr", "0.002", "--train-size", "32",
          "--threads", "1", "--no-progress", "--device", "cpu", "--time-budget", "0",
          "--set", "data.eval_size=12", "--set", "final_test=false", "--set", "log_interval=1",
          "--set", "stages.0.warmup_steps=1", "--set", 'model_overrides={"drop_path": 0.0}',
          "--set", "checkpoint.keep_last=0"]


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(run):
    with open(run / "metrics.csv", newline="") as handle:
        return [float(r["loss"]) for r in csv.DictReader(handle) if r["split"] == "train"]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    _run([sys.executable, "-m", "oneref.cli", *COMMON, "--batch-size", "8", "-o", str(single)],
         tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
          "--master_port=29533", "-m", "oneref.cli", *COMMON, "--batch-size", "4",
          "-o", str(double)], tmp_path)
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((double / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["val"]["n"] == one["val"]["n"] == 12  # every sample once, reduced over ranks
    assert two["val"]["miou_box"] == pytest.approx(one["val"]["miou_box"], abs=1e-4)
    assert two["val"]["acc@0.5"] == pytest.approx(one["val"]["acc@0.5"], abs=1e-6)
    assert _losses(double) == pytest.approx(_losses(single), rel=1e-4)
    assert len(_losses(single)) == 4
