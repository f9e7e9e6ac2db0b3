"""Train config: recipes, overrides, files, validation, the staged lr plan, the sampler."""

import dataclasses
import json

import pytest

from oneref.train.config import (ScheduleConfig, StageConfig, TrainConfig, apply_overrides,
                                 load_config_file, pretrain_recipe, reference_recipe,
                                 refshapes_recipe, refshapes_res_recipe)
from oneref.train.optim import StagePlan
from oneref.train.sampler import ResumableSampler, ShardSampler


def test_reference_recipe_values():
    cfg = reference_recipe("base")
    assert [s.freeze_backbone for s in cfg.stages] == [True, False]
    assert [s.epochs for s in cfg.stages] == [10, 20]
    assert [s.lr for s in cfg.stages] == [2.5e-4, 3e-5]
    assert [s.batch_size for s in cfg.stages] == [64, 24]
    assert reference_recipe("large").stages[1].batch_size == 8
    assert cfg.optim.weight_decay == 1e-4 and cfg.seed == 13
    assert cfg.schedule.interval == "epoch" and cfg.stages[0].warmup_steps == 0


def test_roundtrip_and_overrides(tmp_path):
    cfg = refshapes_recipe()
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    cfg2 = apply_overrides(cfg, ["optim.grad_clip=0", "stages.0.lr=0.002", "task=res",
                                 "model_overrides.depth=2", "output_dir=/x/y"])
    assert cfg2.optim.grad_clip == 0 and cfg2.stages[0].lr == 0.002
    assert cfg2.task == "res" and cfg2.model_overrides == {"depth": 2}
    assert cfg2.output_dir == "/x/y"
    with pytest.raises(ValueError, match="unknown field"):
        apply_overrides(cfg, ["optim.nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["optim.grad_clip"])
    with pytest.raises(ValueError, match="task must be"):
        apply_overrides(cfg, ["task=detect"])
    with pytest.raises(TypeError, match="config section optim must be a mapping, got list"):
        apply_overrides(cfg, ["optim=[1]"])
    with pytest.raises(ValueError, match="data.train_size must be >= 1, got -5"):
        apply_overrides(cfg, ["data.train_size=-5"])
    with pytest.raises(ValueError, match=r"threads must be >= 0 \(0: the idle cores\), got -3"):
        apply_overrides(cfg, ["threads=-3"])
    path = tmp_path / "c.yaml"
    path.write_text("task: res\nstages:\n  - {steps: 5, lr: 0.01, batch_size: 4}\n"
                    "optim: {weight_decay: 0.05}\n")
    loaded = load_config_file(path)
    assert loaded.task == "res" and loaded.stages[0].steps == 5
    assert loaded.optim.weight_decay == 0.05
    recipe = refshapes_recipe()
    path.write_text("stages:\n  - {batch_size: 8}\n  - {batch_size: 2, lr: 0.5}\n")
    first, second = load_config_file(path, base=recipe).stages
    assert first == dataclasses.replace(recipe.stages[0], batch_size=8)  # the rest kept
    assert (second.batch_size, second.lr, second.name) == (2, 0.5, "full")  # past the end
    path.write_text("stages:\n  - {batch_sise: 8}\n")
    with pytest.raises(ValueError, match="unknown config field 'stages.0.batch_sise'"):
        load_config_file(path, base=recipe)
    bad = tmp_path / "c.json"
    bad.write_text('{"optim": {"wd": 1}}')
    with pytest.raises(ValueError, match="optim.wd"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(tmp_path / "missing.json")


@pytest.mark.parametrize("override, message", [
    ("compile=maybe", "compile must be true or false, got 'maybe'"),
    ("seed=abc", "seed must be an integer, got 'abc'"),
    ("seed=1.5", "seed must be an integer, got 1.5"),
    ("optim.grad_clip=abc", "optim.grad_clip must be a number"),
    ("data.eval_size=abc", "data.eval_size must be an integer"),
    ("stages.0.freeze_backbone=1", "stages.0.freeze_backbone must be true or false"),
    ("output_dir=true", "output_dir must be a string, got True"),
    ("model_overrides.depth=2.5", "model_overrides.depth must be an integer"),
    ("stages.0.lr=NaN", "stages.0.lr must be a number, got nan"),
    ("stages.0.lr=inf", "stages.0.lr must be a number, got inf"),
    ("output_dir=", "output_dir must name a folder"),
])
def test_overrides_are_checked_against_the_field_types(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(refshapes_recipe(), [override])


def test_overrides_take_the_spellings_of_their_types(tmp_path):
    """Python's True/False for a bool, a whole number for an int, an int for a float; a
    config file's values are checked the same way."""
    cfg = apply_overrides(refshapes_recipe(), ["compile=False", "final_test=FALSE",
                                               "seed=1e3", "stages.0.lr=1"])
    assert cfg.compile is False and cfg.final_test is False
    assert cfg.seed == 1000 and isinstance(cfg.seed, int)
    assert cfg.stages[0].lr == 1.0 and isinstance(cfg.stages[0].lr, float)
    assert apply_overrides(refshapes_recipe(), ["data.train_split=2014"]).data.train_split \
        == "2014"
    path = tmp_path / "c.json"
    path.write_text('{"data": {"eval_size": "all"}}')
    with pytest.raises(ValueError, match=f"config file {path}: data.eval_size must be an int"):
        load_config_file(path)
    yaml = tmp_path / "c.yaml"  # YAML 1.1 reads 1e-4 as text, ~ as nothing
    yaml.write_text("stages:\n  - {lr: 1e-4, steps: '5'}\ncheckpoint: {init_from: ~}\n"
                    "seed: '9007199254740993'\n")
    loaded = load_config_file(yaml)
    assert loaded.stages[0].lr == 1e-4 and loaded.stages[0].steps == 5
    assert loaded.seed == 2 ** 53 + 1  # an int's digits read exactly
    assert loaded.checkpoint.init_from == ""


def test_stage_plan_layout_and_lr():
    stages = [StageConfig(name="frozen", epochs=2, lr=1.0, batch_size=10, freeze_backbone=True),
              StageConfig(name="full", epochs=1, lr=0.5, batch_size=5, warmup_steps=2)]
    plan = StagePlan(stages, train_samples=105, world_size=2, schedule=ScheduleConfig())
    # stage 0: 105 // 20 = 5 steps/epoch x 2 epochs; stage 1: 105 // 10 = 10 steps.
    assert [(s.start, s.steps, s.steps_per_epoch) for s in plan.spans] == [(0, 10, 5),
                                                                           (10, 10, 10)]
    assert plan.total_steps == 20
    span, epoch, index = plan.locate(7)
    assert (span.index, epoch, index) == (0, 1, 2)
    # Cosine per epoch, no warm-up: epoch 0 at the peak, epoch 1 at the midpoint.
    assert plan.lr_at(0) == pytest.approx(1.0) and plan.lr_at(4) == pytest.approx(1.0)
    assert plan.lr_at(5) == pytest.approx(0.5)
    # Stage 1: linear warm-up 0.25, 0.5, then the cosine.
    assert plan.lr_at(10) == pytest.approx(0.25) and plan.lr_at(11) == pytest.approx(0.5)
    step_plan = StagePlan([StageConfig(steps=11, lr=1.0, batch_size=1, warmup_steps=1)], 50, 1,
                          ScheduleConfig(interval="step", min_lr_ratio=0.1))
    assert step_plan.lr_at(1) == pytest.approx(1.0)
    assert step_plan.lr_at(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert step_plan.lr_at(6, time_fraction=1.0) == pytest.approx(0.1)
    # A budget and a step count: the cosine follows whichever is further along.
    assert step_plan.lr_at(6, time_fraction=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert step_plan.lr_at(2, time_fraction=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    with pytest.raises(ValueError, match="past the end"):
        step_plan.locate(11)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        StagePlan([StageConfig(batch_size=8)], 10, 2, ScheduleConfig())


def test_sampler_shards_and_resumes():
    full = ResumableSampler(40, batch_size=4, rank=0, world_size=1, seed=3)
    full.set_epoch(2)
    order = list(full)
    ranks = []
    for r in range(2):
        s = ResumableSampler(40, batch_size=2, rank=r, world_size=2, seed=3)
        s.set_epoch(2)
        ranks.append(list(s))
    # Step k of the 2-rank run sees the same samples as step k of one process.
    for k in range(10):
        assert sorted(ranks[0][2 * k:2 * k + 2] + ranks[1][2 * k:2 * k + 2]) == \
            sorted(order[4 * k:4 * k + 4])
    full.set_epoch(2, start_batch=3)
    assert list(full) == order[12:] and len(full) == 28
    assert list(ShardSampler(5, 1, 2)) == [1, 3]


@pytest.mark.parametrize("override,message", [
    ("model_overrides.img_sise=96", r"unknown model_overrides field\(s\) \['img_sise'\]"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two values in"),
    ("optim.grad_clip=-1", "grad_clip >= 0"),
    ("schedule.min_lr_ratio=2", r"schedule.min_lr_ratio must be in \[0, 1\]"),
    ("pretrain.inside_ratio=1.5", "inside 1.5"),
    ("res_loss.focal_alpha=1.5", r"res_loss: focal_alpha in \[0, 1\].*got focal_alpha 1.5"),
    ("checkpoint.keep_last=-1", "keep_last must be >= 0"),
    ("dist.strategy=zero", "dist.strategy must be one of ddp, fsdp"),
    ("stages.0.warmup_steps=-3", r"stages.0 \(full\).*warmup_steps"),
])
def test_every_section_validates_itself(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(refshapes_recipe(), [override])
    assert apply_overrides(refshapes_recipe(), ["model_overrides.img_size=96"]).model_overrides


def test_python_callers_get_named_type_errors():
    with pytest.raises(TypeError, match="checkpoint.resume must be a string.*'auto'.*got True"):
        dataclasses.replace(refshapes_recipe(), checkpoint=dataclasses.replace(
            refshapes_recipe().checkpoint, resume=True))
    with pytest.raises(TypeError, match="stages.0 must be a StageConfig, got dict"):
        refshapes_recipe(stages=[{"lr": 1e-3}])
    with pytest.raises(TypeError, match=r"overrides must be a list.*write \['seed=3'\]"):
        apply_overrides(refshapes_recipe(), "seed=3")


def test_a_refshapes_recipe_asked_for_another_task_is_that_task_s_recipe():
    res = refshapes_recipe(task="res", seed=3)
    assert res == refshapes_res_recipe(seed=3) and res.res_loss.focal_alpha == 0.75
    assert res.output_dir == "runs/refshapes_res"
    assert refshapes_recipe(task="pretrain") == pretrain_recipe()
    assert pretrain_recipe(task="rec", seed=4) == refshapes_recipe(seed=4)
    assert refshapes_res_recipe(task="rec") == refshapes_recipe()
    with pytest.raises(ValueError, match="task must be one of"):
        refshapes_recipe(task="seg")
