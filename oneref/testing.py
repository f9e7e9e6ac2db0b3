"""Helpers shared by the test suite (``tests/``) and the micro-benchmarks (``benchmarks/``)."""

from __future__ import annotations

import re

import pytest
import torch

from oneref.model import OneRef
from oneref.train.distributed import seed_everything

__all__ = ["seed_everything", "skip_gpu_items", "official_beit3_state", "official_oneref_state"]


def skip_gpu_items(items, reason: str) -> None:
    """Mark every collected item carrying the ``gpu`` marker as skipped when CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def official_beit3_state(config, seed: int = 0, prefix: str = "beit3.") -> dict[str, torch.Tensor]:
    """Random tensors under the official torchscale BEiT-3 names for a ModelConfig (what a
    ``beit3_*_patch16_224.pth`` holds under ``model``)."""
    gen = torch.Generator().manual_seed(seed)
    d, f = config.embed_dim, config.ffn_dim
    shapes = {
        "text_embed.weight": (config.vocab_size, d),
        "vision_embed.proj.weight": (d, config.in_chans, config.patch_size, config.patch_size),
        "vision_embed.proj.bias": (d,),
        "vision_embed.cls_token": (1, 1, d),
        "vision_embed.mask_token": (1, 1, d),
        "encoder.embed_positions.A.weight": (config.num_vision + 2, d),
        "encoder.embed_positions.B.weight": (config.text_positions, d),
    }
    for e in "AB":
        shapes[f"encoder.layer_norm.{e}.weight"] = (d,)
        shapes[f"encoder.layer_norm.{e}.bias"] = (d,)
        for i in range(config.depth):
            pre = f"encoder.layers.{i}."
            for proj in ("q", "k", "v", "out"):
                shapes[f"{pre}self_attn.{proj}_proj.{e}.weight"] = (d, d)
                shapes[f"{pre}self_attn.{proj}_proj.{e}.bias"] = (d,)
            for ln, dim in (("self_attn.inner_attn_ln", d), ("self_attn_layer_norm", d),
                            ("final_layer_norm", d), (f"ffn.{e}.ffn_layernorm", f)):
                name = f"{pre}{ln}.{e}" if not ln.startswith("ffn") else f"{pre}{ln}"
                shapes[f"{name}.weight"] = (dim,)
                shapes[f"{name}.bias"] = (dim,)
            shapes[f"{pre}ffn.{e}.fc1.weight"] = (f, d)
            shapes[f"{pre}ffn.{e}.fc1.bias"] = (f,)
            shapes[f"{pre}ffn.{e}.fc2.weight"] = (d, f)
            shapes[f"{pre}ffn.{e}.fc2.bias"] = (d,)
    return {prefix + k: torch.randn(s, generator=gen) for k, s in shapes.items()}

# Our head names -> the official OneRef names (the inverse of the head rules of
# oneref.conversion.RENAME_RULES), for writing files in the official layout.
_OFFICIAL_HEADS = [(r"^rec_head\.visu_proj\.", "visu_proj."),
                   (r"^rec_head\.bbox_mlp\.layers\.", "bbox_embed.layers."),
                   (r"^res_head\.conv(\d)\.", r"seg_conv\1."), (r"^res_head\.bn(\d)\.", r"bn\1."),
                   (r"^(vision|language)_head\.", r"\1_head.")]


def official_oneref_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`official_beit3_state` plus the REC / RES heads under official OneRef names
    (what a fine-tuned ``best_checkpoint.pth`` holds under ``model``), random, and the
    unused extras those files carry (``logit_scale``, ``text_proj``)."""
    state = official_beit3_state(config, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in OneRef(config, heads=("rec", "res")).state_dict().items()}
    for key, shape in shapes.items():
        for pattern, replacement in _OFFICIAL_HEADS:
            if re.match(pattern, key):
                name = re.sub(pattern, replacement, key)
                state[name] = (torch.randn(shape, generator=gen) * 0.05 if len(shape) else
                               torch.tensor(1))
                break
    for name in [k for k in state if re.match(r"^bn\d\.running_var$", k)]:
        state[name] = state[name].abs() + 0.5
    state["logit_scale"] = torch.tensor(2.6)
    state["text_proj.weight"] = torch.randn(config.embed_dim, config.embed_dim, generator=gen)
    return state
