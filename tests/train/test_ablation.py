"""``oneref ablate`` on a tiny budget: the outputs, resuming a stopped ablation, the
pre-train -> fine-tune hand-over, and random masking at the referring mask's ratio."""

import dataclasses
import json

import pytest
import torch

from oneref.ablation import AblationSettings, run_ablation
from oneref.cli import main
from oneref.data.masking import mask_image, random_mask_like
from oneref.model import OneRef

TINY = ('model="tiny"', "data.train_size=64", "data.eval_size=16", "data.test_size=16",
        "stages.0.batch_size=8", "data.eval_batch_size=16", "log_interval=1")


def _settings(out, seeds, variants=("scratch", "referring")):
    return AblationSettings(out=str(out), budget_s=3.0, seeds=seeds, variants=variants,
                            overrides=TINY, checkpoint_interval=5)


def test_ablation_writes_results_and_continues(tmp_path):
    first = run_ablation(_settings(tmp_path, (0,)))
    assert [(r["variant"], r["seed"]) for r in first["runs"]] == [("scratch", 0),
                                                                   ("referring", 0)]
    done = tmp_path / "runs" / "referring-seed0" / "finetune" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    # A second call with one more seed reads the finished runs back and trains the new ones.
    second = run_ablation(_settings(tmp_path, (0, 1)))
    assert done.stat().st_mtime_ns == stamp
    assert len(second["runs"]) == 4 and second["runs"][:2] == first["runs"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"] == second["runs"] and "date_utc" in saved["environment"]
    for run in saved["runs"]:
        assert set(run) >= {"variant", "seed", "test_acc@0.5", "val_acc@0.5", "pretrain_s",
                            "finetune_s", "steps"}
        assert 0.0 <= run["test_acc@0.5"] <= 1.0 and run["steps"] > 0
        assert (run["pretrain_s"] > 0) == (run["variant"] != "scratch")
        # equal total compute: pre-training + fine-tuning within the shared budget (+ a step)
        assert run["pretrain_s"] + run["finetune_s"] < 3.0 + 2.0
    summary = (tmp_path / "summary.md").read_text()
    assert "| scratch | 2 |" in summary and "| referring | 2 |" in summary
    assert (tmp_path / "finetune_curves.png").stat().st_size > 0
    # Another budget would report the runs made with this one as its own: refused.
    longer = dataclasses.replace(_settings(tmp_path, (0,)), budget_s=6.0)
    with pytest.raises(ValueError, match=r"ablation: .*scratch-seed0/finetune was run with other "
                                         r"settings \(time_budget_s: 3.0 -> 6.0\): give "
                                         "another --out"):
        run_ablation(longer)


def test_fine_tuning_starts_from_the_pretrained_weights(tmp_path):
    """Every weight of the pre-trained model is carried over, heads included (pre-training
    never updates the REC head: it keeps its initialisation)."""
    run_ablation(_settings(tmp_path, (0,), variants=("referring",)))
    from oneref.train.config import apply_overrides, refshapes_recipe
    from oneref.train.trainer import Trainer

    pretrain_run = tmp_path / "runs" / "referring-seed0" / "pretrain"
    pretrained = OneRef.from_pretrained(pretrain_run / "model")
    cfg = apply_overrides(refshapes_recipe(), [*TINY, f'output_dir="{tmp_path / "ft"}"',
                                               f'checkpoint.init_from="{pretrain_run}"'])
    start = Trainer(cfg).model.state_dict()
    for name, value in pretrained.state_dict().items():
        torch.testing.assert_close(start[name], value, rtol=0, atol=0, msg=name)


def test_random_masking_keeps_the_referring_ratio():
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.5]])
    gen = torch.Generator().manual_seed(0)
    referring = mask_image(boxes, 8, gen)
    random = random_mask_like(referring, gen)
    assert torch.equal(random.sum(1), referring.sum(1)) and not torch.equal(random, referring)


def test_ablate_command_rejects_bad_arguments(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path), "--variants", "scratch,mae"]) == 2
    assert "unknown variant(s) mae" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path), "--pretrain-share", "1.5"]) == 2
    assert "pre-training share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablate"])  # --out is required


def test_the_sts_variant_needs_its_teacher_run():
    with pytest.raises(ValueError, match="STS labels from the 'scratch' run of the same seed"):
        _settings("out", (0,), variants=("referring", "referring+vts+sts")).validate()
    _settings("out", (0,), variants=("scratch", "referring+vts+sts")).validate()


def test_the_sts_variant_labels_with_the_scratch_run_and_reads_back(tmp_path):
    settings = AblationSettings(out=str(tmp_path), budget_s=3.0, seeds=(0,),
                                variants=("referring+vts+sts", "scratch"), overrides=TINY,
                                checkpoint_interval=5, pretrain_scenes=32)
    first = run_ablation(settings)  # the teacher (scratch) runs first whatever the order given
    assert [r["variant"] for r in first["runs"]] == ["scratch", "referring+vts+sts"]
    sts = first["runs"][1]
    labels = tmp_path / "runs" / "referring+vts+sts-seed0" / "sts_labels.safetensors"
    assert labels.is_file() and sts["sts_label_s"] > 0 and sts["pretrain_s"] > 0
    pre = json.loads((tmp_path / "runs" / "referring+vts+sts-seed0" / "pretrain"
                      / "train_config.json").read_text())
    assert pre["pretrain"]["sts"] and pre["pretrain"]["sts_labels"] == str(labels)
    assert pre["data"]["train_size"] == 32
    again = run_ablation(settings)  # everything read back, the labelling time too
    assert again["runs"] == first["runs"]


def test_an_interrupted_ablation_is_continued_by_its_own_command(tmp_path, monkeypatch):
    from oneref import ablation
    from oneref.train.interrupt import TrainingInterrupted

    def stopped(settings, variant, seed):
        raise TrainingInterrupted("SIGTERM at step 3: checkpoint written to C", 15,
                                  resume="oneref train -o R --resume")

    monkeypatch.setattr(ablation, "_one", stopped)
    with pytest.raises(TrainingInterrupted) as caught:
        run_ablation(_settings(tmp_path, (0,)), progress=False)
    assert str(caught.value) == ("SIGTERM at step 3: checkpoint written to C; continue with: "
                                 "the same oneref ablate command")
    assert caught.value.signal_number == 15
