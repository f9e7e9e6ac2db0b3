"""A model from whatever a user points a command at (docs/data.md, "Weights").

* a run folder: ``<run>/model`` (``save_pretrained``) and ``<run>/train_config.json``;
* a ``save_pretrained`` folder: ``config.json`` + ``model.safetensors``;
* one of our training checkpoints (``<run>/checkpoints/step_*.pt``);
* an official ``.pth``: a BEiT-3 start point or a OneRef fine-tuned / MRefM checkpoint. Its
  preset is inferred from the tensor shapes (``preset`` names another size and is checked),
  it is read safely and memory-mapped (:func:`oneref.io.load_pth`), and building
  converts its names and resizes its position table (:func:`oneref.checkpoints.load_official`).

    source = ModelSource("best_checkpoint.pth")
    source.config                    # ModelConfig, before any weights are built
    model = source.build()
    print(source.report.summary())   # official files: loaded / resized / missing / unused
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from oneref.checkpoints import (CONFIG_NAME, WEIGHTS_NAME, LoadReport, load_official,
                                read_checkpoint)
from oneref.conversion import infer_model_config, renamed_tensors
from oneref.config import ModelConfig
from oneref.io import load_pth
from oneref.model import OneRef
from oneref.train.checkpoint import list_checkpoints, load_latest

__all__ = ["ModelSource", "preset_of", "OFFICIAL_ADAPTABLE"]

log = logging.getLogger(__name__)

#: Fields an official file's weights take at any value: building resizes the file's vision
#: position table to the model's patch grid (:func:`oneref.checkpoints.load_official`).
OFFICIAL_ADAPTABLE = ("img_size",)


def preset_of(path: str | Path, trust: bool = False) -> str:
    """The preset name of the model ``path`` holds (an official ``.pth``: the one its shapes
    match, else ValueError). Quiet: the load that follows names a stopped run's checkpoint."""
    return ModelSource(path, trust=trust, quiet=True).config.name


class ModelSource:
    """Where a model comes from; :attr:`config` is known before :meth:`build` loads weights.
    A run folder without a final model stands for its newest readable step checkpoint, with
    a warning (none when ``quiet``).

    Attributes:
        kind: ``run``, ``pretrained``, ``step`` (a training checkpoint) or ``official``.
        config: the :class:`ModelConfig`, with ``overrides`` of its
            :data:`~oneref.config.SHAPE_FREE_FIELDS` applied, and for an official file of
            :data:`OFFICIAL_ADAPTABLE` (other fields only at their value).
        train_config: the run's training config as a dict (``{}`` unless a run folder).
        report: the :class:`LoadReport` of an official file after :meth:`build`, else None.
    """

    def __init__(self, path: str | Path, preset: str | None = None, trust: bool = False,
                 quiet: bool = False, overrides: dict | None = None):
        self.path = Path(path)
        self._read(preset, trust, quiet)
        self.overrides = overrides or {}
        self.config = self.config.with_shape_free(
            self.overrides, where=str(self.path),
            adaptable=OFFICIAL_ADAPTABLE if self.kind == "official" else ())

    def _read(self, preset: str | None, trust: bool, quiet: bool) -> None:
        """Find the model at ``self.path``: its kind, config and (a file's) state."""
        if not self.path.exists():
            raise ValueError(f"checkpoint {self.path} does not exist (a run folder, a "
                             f"save_pretrained folder or an official .pth is expected)")
        self.train_config: dict = {}
        self.report: LoadReport | None = None
        self._state = None
        loaded = None
        if _stopped_run(self.path):  # its newest readable checkpoint
            newest, loaded = load_latest(self.path, trust=trust, flag="stopped run",
                                         quiet=quiet)
            if not quiet:
                log.warning("%s has no final model (a stopped run): using its newest readable "
                            "checkpoint %s", self.path, newest.name)
            self.path = newest
        if self.path.is_file():
            loaded = load_pth(self.path, trust=trust) if loaded is None else loaded
            if isinstance(loaded, dict) and "model_config" in loaded and "model" in loaded:
                self.kind, self._state = "step", loaded["model"]
                self.config = ModelConfig.from_dict(loaded["model_config"])
                self.train_config = loaded.get("config", {})
                self._check_preset(preset)
                return
            self.kind = "official"
            self._state = read_checkpoint(loaded)
            # Shapes only: q/k/v are packed once, when the model is built.
            self.config = infer_model_config(renamed_tensors(self._state), preset)
            return
        self.model_dir, run_dir = self._model_dir(self.path)
        self.kind = "run" if run_dir == self.path else "pretrained"
        self.config = _read_config(self.model_dir / CONFIG_NAME)
        if (run_dir / "train_config.json").is_file():
            self.train_config = json.loads((run_dir / "train_config.json").read_text())
        self._check_preset(preset)

    def _check_preset(self, preset: str | None) -> None:
        """ValueError when ``preset`` (``--model``) names another model than the one here."""
        if preset and preset != self.config.name:
            raise ValueError(f"{self.path} holds a {self.config.name!r} model, not the "
                             f"{preset!r} one asked for (--model, or a config's model): leave "
                             f"it out (the weights set the shape), or give weights of a "
                             f"{preset!r} model")

    @staticmethod
    def _model_dir(path: Path) -> tuple[Path, Path]:
        if (path / "model" / CONFIG_NAME).is_file():
            return path / "model", path
        if (path / CONFIG_NAME).is_file():
            return path, path.absolute().parent  # "." has a parent too
        raise ValueError(f"checkpoint folder {path} holds neither model/{CONFIG_NAME} nor "
                         f"{CONFIG_NAME} (a run folder or a save_pretrained folder is expected)")

    @property
    def weights_file(self) -> Path:
        """The file the weights are read from."""
        return self.path if self.path.is_file() else self.model_dir / WEIGHTS_NAME

    @property
    def run_dir(self) -> Path | None:
        """The run folder this model belongs to, or None."""
        if self.kind == "step":
            return self.path.parent.parent
        return self.model_dir.absolute().parent if self.train_config else None

    def task_for(self, requested: str | None) -> str:
        """The head to run: ``requested``, else the one the run trained (else REC). A head
        the run never trained is an error: REC's in a RES run without a box loss
        (``res_loss.rec_weight`` 0), RES's in a REC run, either in a pre-training run."""
        trained = self.train_config.get("task")
        if trained == "pretrain":
            raise ValueError(f"{self.path} is an MRefM pre-training run: its REC and RES heads "
                             f"never trained (fine-tune it first: oneref train --init-from "
                             f"{self.path})")
        if trained not in ("rec", "res"):  # an official file: its heads are not known
            return requested or "rec"
        box_loss = self.train_config.get("res_loss", {}).get("rec_weight", 0) > 0
        if requested and requested != trained and not (requested == "rec" and box_loss):
            raise ValueError(f"{self.path} was fine-tuned for {trained}: its {requested} head "
                             f"never trained (use --task {trained}, or a run trained with "
                             f"--task {requested})")
        return trained

    def build(self) -> OneRef:
        """The model with its weights (an official file: all heads, converted names), in
        eval mode."""
        if self._state is None:
            return OneRef.from_pretrained(self.model_dir, **self.overrides)
        model = OneRef(self.config)
        if self.kind == "step":
            model.load_state_dict(self._state)
        else:
            self.report = load_official(model, self._state)
        return model.eval()


def _stopped_run(path: Path) -> bool:
    """A run folder with step checkpoints and no final ``model/``."""
    return (path.is_dir() and not (path / "model" / CONFIG_NAME).is_file()
            and bool(list_checkpoints(path / "checkpoints")))


def _read_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid model config: {err}") from err
