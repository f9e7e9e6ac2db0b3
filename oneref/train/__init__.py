"""Training: configs and recipes, the staged resumable loop, checkpoints, distributed set-up."""

from oneref.train.config import (CheckpointConfig, DataConfig, DistConfig, OptimConfig,
                                 PretrainConfig, ResLossConfig, ScheduleConfig, StageConfig,
                                 TrainConfig, apply_overrides, load_config_file,
                                 pretrain_recipe, reference_recipe, refshapes_recipe,
                                 refshapes_res_recipe)

__all__ = ["TrainConfig", "StageConfig", "OptimConfig", "ScheduleConfig", "DataConfig",
           "PretrainConfig", "ResLossConfig", "CheckpointConfig", "DistConfig",
           "refshapes_recipe", "refshapes_res_recipe", "reference_recipe", "pretrain_recipe",
           "load_config_file", "apply_overrides", "Trainer", "train"]


def __getattr__(name):
    # The loop imports the model and data packages: load it on first use.
    if name in ("Trainer", "train"):
        from oneref.train import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'oneref.train' has no attribute {name!r}")
