"""Checkpoints in and out.

* Official BEiT-3 checkpoints (``beit3_{base,large}_*_patch16_224.pth``, a dict with key
  ``model``) and official OneRef fine-tuned checkpoints (the same backbone keys plus head
  keys) load through :func:`load_official`, by the conversion rules of
  :mod:`oneref.conversion`. Missing and unexpected keys are returned and logged by name; a
  shape mismatch is refused with the key and both shapes.
* Our own format: ``model.safetensors`` + ``config.json`` in a directory
  (:func:`save_pretrained`; :func:`read_pretrained` and :func:`load_pretrained_state` for
  ``OneRef.from_pretrained``), both written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from oneref.config import ModelConfig
from oneref.conversion import (convert_official_state_dict, resize_vision_positions,
                               strip_prefixes)
from oneref.io import atomic_write, load_pth, write_json

__all__ = ["LoadReport", "load_official", "read_checkpoint", "save_pretrained",
           "read_pretrained", "load_pretrained_state", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

logger = logging.getLogger(__name__)

@dataclass
class LoadReport:
    """What :func:`load_official` did: our keys the checkpoint lacked, checkpoint keys with no
    place in the model (official names), and keys whose tensors were resized."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    resized_keys: list[str] = field(default_factory=list)
    loaded: int = 0

    def summary(self, source: str = "checkpoint") -> str:
        """A short block: tensors loaded, then resized / missing / unused keys grouped by
        their leading module name (``rec_head (5)``)."""
        lines = [f"loaded {self.loaded} tensors from {source}"]
        for label, keys in (("resized", self.resized_keys),
                            ("missing, left as initialised", self.missing_keys),
                            ("in the file, not used", self.unexpected_keys)):
            if keys:
                lines.append(f"  {label}: {len(keys)} ({_group_keys(keys)})")
        return "\n".join(lines)


def _group_keys(keys: list[str], most: int = 6) -> str:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(strip_prefixes(key).split(".")[0], []).append(key)
    parts = [members[0] if len(members) == 1 else f"{name} ({len(members)})"
             for name, members in groups.items()]
    return ", ".join(parts[:most]) + (f", +{len(parts) - most} more" if len(parts) > most else "")


def read_checkpoint(source, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load an official ``.pth`` (or take a dict) and return its flat state dict.

    Accepts ``{"model": state}``, ``{"module": state}``, ``{"state_dict": state}`` or a
    state dict. Files are read by :func:`oneref.io.load_pth` (safe by default);
    ``allow_pickle=True`` unpickles any object, for trusted files only.
    """
    obj = source if isinstance(source, Mapping) else load_pth(source, trust=allow_pickle,
                                                                      what="checkpoint")
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a state dict or "
                         f"a dict with key 'model'")
    for key in ("model", "module", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries {bad[:5]} are not tensors; expected a state dict "
                         f"or a dict with key 'model'")
    return dict(obj)


def load_official(model, source, *, allow_pickle: bool = False) -> LoadReport:
    """Load an official BEiT-3 or OneRef checkpoint into a :class:`~oneref.model.OneRef`.

    Args:
        model: the target model (its config decides the image size).
        source: path to a ``.pth`` file or an already-loaded dict.
    Returns:
        :class:`LoadReport`. Model keys the checkpoint does not provide keep their values.
    Raises:
        ValueError: a tensor's shape differs from the model's (after QKV packing and
            position resizing); the message names both keys and both shapes. Or no tensor
            of the file is an encoder weight (not an official checkpoint).
    """
    state = read_checkpoint(source, allow_pickle=allow_pickle)
    converted, unexpected, sources = convert_official_state_dict(state)
    own = model.state_dict()
    if not any(key.startswith("encoder.") and key in own for key in converted):
        name = "the dict" if isinstance(source, Mapping) else str(source)
        raise ValueError(f"{name}: none of its {len(state)} tensors ({_group_keys(list(state))}) "
                         f"is a BEiT-3 / OneRef encoder weight, so it is not an official "
                         f"checkpoint; oneref's own files load with OneRef.from_pretrained (a "
                         f"save_pretrained folder) or oneref.sources.ModelSource (a run folder "
                         f"or a training checkpoint)")
    report = LoadReport(unexpected_keys=list(unexpected))
    for key in list(converted):
        if key not in own:  # e.g. a head this model was built without
            report.unexpected_keys.append(sources[key])
            del converted[key]
            continue
        tensor, expected = converted[key], own[key].shape
        if key == "embed.vision_pos.weight" and tensor.shape != expected \
                and tensor.dim() == 2 and tensor.shape[1] == expected[1]:
            tensor = resize_vision_positions(tensor, model.config.num_patches)
            report.resized_keys.append(key)
            logger.info("resized %s from %s to %s", sources[key], tuple(converted[key].shape),
                        tuple(tensor.shape))
        if tensor.shape != expected:
            raise ValueError(f"shape mismatch: checkpoint {sources[key]!r} has shape "
                             f"{tuple(tensor.shape)} but model parameter {key!r} has shape "
                             f"{tuple(expected)}")
        converted[key] = tensor
    result = model.load_state_dict(converted, strict=False)
    report.loaded = len(converted)
    report.missing_keys = sorted(result.missing_keys)
    if report.missing_keys:
        logger.info("keys not in the checkpoint (left as initialised): %s", report.missing_keys)
    if report.unexpected_keys:
        logger.info("checkpoint keys not used by the model: %s", report.unexpected_keys)
    return report


def save_pretrained(model, directory, state_dict: dict | None = None) -> None:
    """Write ``model.safetensors`` (all parameters and buffers, or ``state_dict`` when given:
    the gathered weights of a sharded model) and ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": "pt", "heads": ",".join(model.heads)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_json(directory / CONFIG_NAME, model.config.to_dict())


def read_pretrained(directory, map_location="cpu"
                    ) -> tuple[ModelConfig, tuple[str, ...] | None, dict[str, torch.Tensor]]:
    """The model config, head names (None: all) and tensors of :func:`save_pretrained`
    output."""
    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if (directory / "model" / WEIGHTS_NAME).is_file():  # a training run's folder
        raise FileNotFoundError(f"{str(directory)!r} is a run folder: its model is "
                                f"{str(directory / 'model')!r} (oneref.sources.ModelSource "
                                f"takes either)")
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist (expected a directory written "
                                    f"by save_pretrained)")
    with open(config_path) as fh:
        try:
            config = ModelConfig.from_dict(json.load(fh))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{str(config_path)!r} is not a valid model config: {err}") from err
    try:
        with safe_open(str(weights), framework="pt") as fh:
            heads_meta = (fh.metadata() or {}).get("heads")
        state = load_file(str(weights), device=str(map_location))
    except SafetensorError as err:  # truncated or not safetensors at all
        raise ValueError(f"cannot read {str(weights)!r} (damaged or not a safetensors "
                         f"file): {err}") from None
    heads = tuple(h for h in heads_meta.split(",") if h) if heads_meta is not None else None
    return config, heads, state


def load_pretrained_state(model, state: Mapping[str, torch.Tensor], directory) -> None:
    """Load :func:`read_pretrained` tensors into ``model`` built from its config: every key
    must be there with its shape (errors name the file)."""
    weights = Path(directory) / WEIGHTS_NAME
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise ValueError(f"shape mismatch in {str(weights)!r}: {key!r} has shape "
                             f"{tuple(tensor.shape)}, config.json implies {tuple(own[key].shape)}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{str(weights)!r} does not match its config: missing "
                         f"{sorted(result.missing_keys)}, unexpected "
                         f"{sorted(result.unexpected_keys)}")
