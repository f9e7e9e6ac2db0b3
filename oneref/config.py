"""Model size presets.

``base`` and ``large`` are the BEiT-3 encoders OneRef is built on (384x384 input, 64 text
tokens). ``tiny`` keeps unit tests to seconds on a CPU; ``small`` is the CPU demo model that
``oneref train`` fits on the built-in RefShapes data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ModelConfig", "PRESETS", "RESIDUAL_DTYPES", "SHAPE_FREE_FIELDS", "get_config"]

#: Values of :attr:`ModelConfig.residual_dtype`.
RESIDUAL_DTYPES = ("compute", "params")

#: ModelConfig fields that set how weights are used, not their shapes: a model loaded from
#: weights may take other values of these.
SHAPE_FREE_FIELDS = ("drop_path", "ln_eps", "sim_scale", "residual_dtype")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a OneRef model and how it computes. Every field is a plain number or string,
    so a config round-trips as JSON."""

    name: str = "custom"
    img_size: int = 384
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    vocab_size: int = 64010
    max_text_len: int = 64
    # Rows of the text position table. BEiT-3 uses 1024 (max_source_positions); positions
    # are indexed from 2 (fairseq offset) so at most text_positions - 2 tokens fit.
    text_positions: int = 1024
    # Stochastic depth grows linearly from 0 to this value over the layers (training only).
    drop_path: float = 0.1
    ln_eps: float = 1e-5
    # The residual stream's dtype between blocks (docs/perf.md, "Residual stream"): "compute"
    # holds it in bf16 when the GEMMs compute in bf16 (bf16 autocast), else in the
    # parameters' dtype; "params" always keeps the parameters' dtype (fp32), each bf16
    # branch added in fp32, as the reference code under autocast does.
    residual_dtype: str = "compute"
    # Visual-token vocabulary of the MIM target (BEiT v2 VQ-KD codebook size).
    mim_vocab: int = 8192
    # Multiplies the cosine logits: the REC similarity map M_sim before it is used as the
    # pooling softmax and as box-mask logits, and the RES mask logits before the loss.
    # OneRef uses none (1.0), which pretrained BEiT-3 features do not need; trained from
    # scratch, a +-1 range keeps these signals weak (sigmoid(1) = 0.73: no confident mask).
    sim_scale: float = 1.0
    # Transposed 2x2 convolutions of the RES head: 3 (OneRef: a map at 8x the patch grid)
    # down to 1; the map is then upsampled bilinearly to the image size.
    res_upsamples: int = 3

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if not self.sim_scale > 0:
            raise ValueError(f"sim_scale must be > 0, got {self.sim_scale}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype must be one of {RESIDUAL_DTYPES}, "
                             f"got {self.residual_dtype!r}")
        if self.res_upsamples not in (1, 2, 3):
            raise ValueError(f"res_upsamples must be 1, 2 or 3, got {self.res_upsamples}")
        if self.max_text_len + 2 > self.text_positions:
            raise ValueError(
                f"max_text_len ({self.max_text_len}) needs max_text_len + 2 <= text_positions "
                f"({self.text_positions}) because positions start at 2"
            )

    @property
    def grid(self) -> int:
        """Patches per side (24 for 384 / 16)."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_vision(self) -> int:
        """Vision tokens: [CLS] + patches (577 for base)."""
        return self.num_patches + 1

    @property
    def seq_len(self) -> int:
        """Joint sequence length (641 for base)."""
        return self.num_vision + self.max_text_len

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_shape_free(self, overrides: dict, where: str,
                        adaptable: tuple[str, ...] = ()) -> "ModelConfig":
        """This config of the weights in ``where`` with ``overrides`` applied: any value of
        :data:`SHAPE_FREE_FIELDS` and of ``adaptable`` (fields the weights' loader adapts
        them to), other fields only at the value they have (else a ValueError naming the
        field, since the weights could not load)."""
        self._check_known(overrides)
        free = (*SHAPE_FREE_FIELDS, *adaptable)
        for key, value in overrides.items():
            if key not in free and value != getattr(self, key):
                raise ValueError(f"{key}={value!r} does not fit the weights of {where} "
                                 f"({key}={getattr(self, key)!r}): with these weights, only "
                                 f"{', '.join(free)} can be changed")
        return self.replace(**overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        cls._check_known(values)
        return cls(**values)

    @classmethod
    def _check_known(cls, values: dict) -> None:
        """ValueError naming the keys of ``values`` that are not fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", img_size=64, embed_dim=64, depth=2, num_heads=2, ffn_dim=128,
        vocab_size=1024, max_text_len=24, text_positions=64, mim_vocab=64,
    ),
    # The CPU demo (`oneref train` on RefShapes, 2 cores, minutes): 96 px -> 6 x 6 patches
    # (RefShapes shapes are 1-2 patches wide), 12 text tokens (the longest RefShapes
    # expression), width 128 with four 32-dim heads and a 2x FFN (30% faster steps than 4x,
    # same accuracy per step on RefShapes); no stochastic depth for short from-scratch runs;
    # similarity map x10 (see ``sim_scale``); a RES head of two upsamplings (a 24 x 24 map,
    # 4 px a cell: the steps run 2x faster than with three, README "RES and MRefM").
    "small": ModelConfig(
        name="small", img_size=96, embed_dim=128, depth=4, num_heads=4, ffn_dim=256,
        vocab_size=1024, max_text_len=12, text_positions=64, mim_vocab=512, drop_path=0.0,
        sim_scale=10.0, res_upsamples=2,
    ),
    "base": ModelConfig(name="base"),
    "large": ModelConfig(name="large", embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096),
}


def get_config(name_or_config: str | ModelConfig, **overrides) -> ModelConfig:
    """Return a preset by name (``tiny``, ``small``, ``base``, ``large``) with overrides applied."""
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config
    elif name_or_config in PRESETS:
        config = PRESETS[name_or_config]
    else:
        raise ValueError(f"unknown preset {name_or_config!r}; choose one of {sorted(PRESETS)}")
    return config.replace(**overrides) if overrides else config
