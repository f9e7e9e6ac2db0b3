"""Checkpoints in and out.

* Official BEiT-3 checkpoints (``beit3_{base,large}_*_patch16_224.pth``, a dict with key
  ``model``, torchscale parameter names, often prefixed ``beit3.``) and official OneRef
  fine-tuned checkpoints (the same backbone keys plus head keys) load through
  :func:`load_official`: names are converted by the renaming rules below (timm style), the
  per-expert q/k/v projections are concatenated into our packed QKV weight, and the vision
  position table is resized bicubically when the checkpoint was trained at another image
  size (the first 3 rows - 2 fairseq offset rows + CLS - are kept). Missing and unexpected
  keys are returned and logged by name; a shape mismatch is refused with the key and both
  shapes.
* Our own format: ``model.safetensors`` + ``config.json`` in a directory
  (:func:`save_pretrained` / :func:`load_pretrained`), both written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oneref.config import PRESETS, ModelConfig, get_config
from oneref.io import atomic_write, load_pth, write_json

__all__ = ["RENAME_RULES", "QKV_RULE", "LoadReport", "convert_official_state_dict",
           "renamed_tensors", "resize_vision_positions", "load_official", "read_checkpoint",
           "infer_model_config", "save_pretrained", "load_pretrained", "WEIGHTS_NAME",
           "CONFIG_NAME"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Prefixes stripped from official keys before the rules apply.
STRIP_PREFIXES = ("module.", "beit3.")
# Rows of the vision position table before the patch grid: 2 fairseq offset rows + CLS.
KEPT_POSITION_ROWS = 3
_LAYER = r"^encoder\.layers\.(\d+)\."
_BLOCK = r"encoder.blocks.\1."

# (official key pattern, our key) - applied in order, first match wins.
RENAME_RULES: list[tuple[str, str]] = [
    # BEiT-3 backbone (torchscale names)
    (r"^text_embed\.weight$", "embed.text_embed.weight"),
    (r"^vision_embed\.proj\.(weight|bias)$", r"embed.patch_embed.\1"),
    (r"^vision_embed\.cls_token$", "embed.cls_token"),
    (r"^vision_embed\.mask_token$", "embed.mask_token"),
    (r"^encoder\.embed_positions\.A\.weight$", "embed.vision_pos.weight"),
    (r"^encoder\.embed_positions\.B\.weight$", "embed.text_pos.weight"),
    (_LAYER + r"self_attn\.out_proj\.([AB])\.(weight|bias)$", _BLOCK + r"attn.proj.\2.\3"),
    (_LAYER + r"self_attn\.inner_attn_ln\.([AB])\.(weight|bias)$", _BLOCK + r"attn.sub_norm.\2.\3"),
    (_LAYER + r"self_attn_layer_norm\.([AB])\.(weight|bias)$", _BLOCK + r"norm1.\2.\3"),
    # torchscale's "final_layer_norm" is the pre-FFN LayerNorm of each layer
    (_LAYER + r"final_layer_norm\.([AB])\.(weight|bias)$", _BLOCK + r"norm2.\2.\3"),
    (_LAYER + r"ffn\.([AB])\.fc1\.(weight|bias)$", _BLOCK + r"mlp.fc1.\2.\3"),
    (_LAYER + r"ffn\.([AB])\.fc2\.(weight|bias)$", _BLOCK + r"mlp.fc2.\2.\3"),
    (_LAYER + r"ffn\.([AB])\.ffn_layernorm\.(weight|bias)$", _BLOCK + r"mlp.sub_norm.\2.\3"),
    (r"^encoder\.layer_norm\.([AB])\.(weight|bias)$", r"encoder.norm.\1.\2"),
    # OneRef heads (official fine-tuned / MRefM checkpoints)
    (r"^(vision_head|language_head)\.weight$", r"\1.weight"),
    (r"^visu_proj\.(weight|bias)$", r"rec_head.visu_proj.\1"),
    (r"^bbox_embed\.layers\.(\d+)\.(weight|bias)$", r"rec_head.bbox_mlp.layers.\1.\2"),
    (r"^seg_conv([123])\.weight$", r"res_head.conv\1.weight"),
    (r"^bn([123])\.(weight|bias|running_mean|running_var|num_batches_tracked)$",
     r"res_head.bn\1.\2"),
    (r"^mim_head\.(weight|bias)$", r"mim_head.proj.\1"),
    (r"^mim_vts_head\.layers\.(\d+)\.(weight|bias)$", r"vts_head.layers.\1.\2"),
    (r"^mlm_head\.(weight|bias)$", r"mlm_head.proj.\1"),
    (r"^mlm_sts_head\.layers\.(\d+)\.(weight|bias)$", r"sts_head.layers.\1.\2"),
]
# q/k/v of each expert are stacked (in this order) into one packed (3D, D) weight / (3D,) bias.
QKV_RULE = (_LAYER + r"self_attn\.([qkv])_proj\.([AB])\.(weight|bias)$", _BLOCK + r"attn.qkv.\3.\4")
_QKV_ORDER = {"q": 0, "k": 1, "v": 2}


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
        groups.setdefault(_strip(key).split(".")[0], []).append(key)
    parts = [members[0] if len(members) == 1 else f"{name} ({len(members)})"
             for name, members in groups.items()]
    return ", ".join(parts[:most]) + (f", +{len(parts) - most} more" if len(parts) > most else "")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


_RULES = [(re.compile(p), r) for p, r in RENAME_RULES]
_QKV_PATTERN = re.compile(QKV_RULE[0])


def _renamed(name: str) -> str | None:
    """Our name for a stripped official name by :data:`RENAME_RULES` (None: no rule)."""
    for pattern, replacement in _RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def renamed_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors :data:`RENAME_RULES` map, under our names, uncopied: enough to read a
    checkpoint's shapes (:func:`infer_model_config`) without packing q/k/v."""
    out = {}
    for key, tensor in state.items():
        target = _renamed(_strip(key))
        if target is not None:
            out[target] = tensor
    return out


def convert_official_state_dict(state: Mapping[str, torch.Tensor]
                                ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Official names -> ours.

    Returns ``(converted, unexpected, sources)``: converted tensors under our names, the
    official keys no rule matched (or q/k/v groups left incomplete), and for every converted
    key the official key(s) it came from (for error messages).
    """
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unexpected: list[str] = []
    qkv_parts: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        name = _strip(key)
        match = _QKV_PATTERN.match(name)
        if match:
            target = _QKV_PATTERN.sub(QKV_RULE[1], name)
            qkv_parts.setdefault(target, {})[_QKV_ORDER[match.group(2)]] = (key, tensor)
            continue
        target = _renamed(name)
        if target is None:
            unexpected.append(key)
        else:
            converted[target] = tensor
            sources[target] = key
    for target, parts in qkv_parts.items():
        if len(parts) != 3:
            unexpected.extend(k for k, _ in parts.values())
            continue
        tensors = [parts[i][1] for i in range(3)]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            names = [parts[i][0] for i in range(3)]
            raise ValueError(f"q/k/v projections for {target} have different shapes "
                             f"{[tuple(t.shape) for t in tensors]} ({names})")
        converted[target] = torch.cat(tensors, dim=0)
        sources[target] = "+".join(parts[i][0] for i in range(3))
    return converted, unexpected, sources


def resize_vision_positions(table: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Vision position table (3 + g*g, D) -> (3 + num_patches, D).

    The first 3 rows (2 offset rows + CLS) are kept; the g x g grid is resized bicubically
    (align_corners False) to sqrt(num_patches) per side, in fp32.
    """
    src = table.shape[0] - KEPT_POSITION_ROWS
    src_grid, dst_grid = math.isqrt(src), math.isqrt(num_patches)
    if src_grid * src_grid != src or dst_grid * dst_grid != num_patches:
        raise ValueError(f"vision position table with {table.shape[0]} rows cannot be resized to "
                         f"{KEPT_POSITION_ROWS + num_patches} rows: patch grids must be square")
    dim = table.shape[1]
    grid = table[KEPT_POSITION_ROWS:].float().reshape(1, src_grid, src_grid, dim)
    grid = grid.permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst_grid, dst_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(num_patches, dim).to(table.dtype)
    return torch.cat([table[:KEPT_POSITION_ROWS], grid], dim=0)


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


def infer_model_config(state: Mapping[str, torch.Tensor],
                       preset: str | ModelConfig | None = None) -> ModelConfig:
    """The model config of official tensors under our names (:func:`renamed_tensors`).

    The preset is the one whose width and depth the tensors have (``base``, ``large``), or
    ``preset`` when given (checked against them); the vocabulary, text-position and
    visual-token sizes are the file's. ValueError when no preset fits.
    """
    try:
        vocab, dim = state["embed.text_embed.weight"].shape
        ffn = state["encoder.blocks.0.mlp.fc1.A.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a BEiT-3 / OneRef checkpoint: it has no {err.args[0]!r} "
                         f"(after renaming)") from None
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    found = {"embed_dim": int(dim), "depth": depth, "ffn_dim": int(ffn)}
    if preset is None:
        matches = [name for name, cfg in PRESETS.items()
                   if all(getattr(cfg, k) == v for k, v in found.items())]
        if not matches:
            raise ValueError(f"checkpoint has width {dim}, depth {depth}, FFN {ffn}: no preset "
                             f"({', '.join(PRESETS)}) matches; pass --model NAME")
        preset = matches[0]
    config = get_config(preset)
    wrong = {k: (v, getattr(config, k)) for k, v in found.items() if getattr(config, k) != v}
    if wrong:
        detail = ", ".join(f"{k} {got} (preset {want})" for k, (got, want) in wrong.items())
        raise ValueError(f"checkpoint does not fit preset {config.name!r}: {detail}")
    sizes = {"vocab_size": int(vocab)}
    if "embed.text_pos.weight" in state:
        sizes["text_positions"] = int(state["embed.text_pos.weight"].shape[0])
    if "mim_head.proj.weight" in state:
        sizes["mim_vocab"] = int(state["mim_head.proj.weight"].shape[0])
    return config.replace(**sizes)


def load_official(model, source, *, allow_pickle: bool = False) -> LoadReport:
    """Load an official BEiT-3 or OneRef checkpoint into a :class:`~oneref.model.OneRef`.

    Args:
        model: the target model (its config decides the image size).
        source: path to a ``.pth`` file or an already-loaded dict.
    Returns:
        :class:`LoadReport`. Model keys the checkpoint does not provide keep their values.
    Raises:
        ValueError: a tensor's shape differs from the model's (after QKV packing and
            position resizing); the message names both keys and both shapes.
    """
    state = read_checkpoint(source, allow_pickle=allow_pickle)
    converted, unexpected, sources = convert_official_state_dict(state)
    own = model.state_dict()
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


def load_pretrained(directory, map_location="cpu"):
    """Rebuild a :class:`~oneref.model.OneRef` from :func:`save_pretrained` output."""
    from oneref.model import OneRef

    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist (expected a directory written "
                                    f"by save_pretrained)")
    with open(config_path) as fh:
        try:
            config = ModelConfig.from_dict(json.load(fh))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{str(config_path)!r} is not a valid model config: {err}") from err
    with safe_open(str(weights), framework="pt") as fh:
        heads_meta = (fh.metadata() or {}).get("heads")
    heads = tuple(h for h in heads_meta.split(",") if h) if heads_meta is not None else None
    model = OneRef(config) if heads is None else OneRef(config, heads=heads)
    state = load_file(str(weights), device=str(map_location))
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
    return model.to(map_location)
