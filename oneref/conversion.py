"""Official BEiT-3 / OneRef checkpoint names and shapes -> ours (the rules only; loading is
:mod:`oneref.checkpoints`).

Official keys are torchscale parameter names, often prefixed ``beit3.`` (or ``module.``).
The prefixes are stripped, then :data:`RENAME_RULES` map each name (timm style, first match
wins); each expert's q/k/v projections are stacked into our packed QKV weight
(:data:`QKV_RULE`); a vision position table trained at another image size is resized
bicubically, keeping its first 3 rows (2 fairseq offset rows + CLS).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F

from oneref.config import PRESETS, ModelConfig, get_config

__all__ = ["RENAME_RULES", "QKV_RULE", "STRIP_PREFIXES", "strip_prefixes", "renamed_tensors",
           "convert_official_state_dict", "resize_vision_positions", "infer_model_config"]

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


def strip_prefixes(key: str) -> str:
    """``key`` without the leading :data:`STRIP_PREFIXES` (repeated ones too)."""
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
        target = _renamed(strip_prefixes(key))
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
        name = strip_prefixes(key)
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
