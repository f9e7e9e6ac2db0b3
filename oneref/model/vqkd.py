"""BEiT v2 VQ-KD visual tokenizer: the frozen target of Referring MIM (docs/method.md, "MRefM
pre-training").

BEiT v2 (Peng et al., arXiv 2208.06366) trains a "vector-quantised knowledge distillation"
tokenizer; only its encoder half is needed to turn an image into visual-token ids:

    x = 2 * images01 - 1                               # official "default" pre-processing
    f = ViT-B/16(x)[:, 1:]                             # patch tokens after fc_norm, (B, L, 768)
    z = Linear(768, 32)(tanh(Linear(768, 768)(f)))     # encode_task_layer, fp32
    code = argmax_k <z / |z|, e_k / |e_k|>             # 8192 x 32 codebook, cosine    (B, L)

Facts taken from the official code (microsoft/unilm ``beit2/modeling_vqkd.py``,
``modeling_finetune.py``, ``norm_ema_quantizer.py``), which this module mirrors:

- Pre-processing: ``VQKD.pre_process`` with the default ``process_type="default"`` (the one
  BEiT v2 pre-training uses) maps [0, 1] to [-1, 1] (``x * 255 / 127.5 - 1``); it does *not*
  apply ImageNet mean/std (that is the non-default ``"imagenet_norm"``, offered here as an
  option).
- Encoder ``VisionTransformer`` config: patch 16, dim 768, depth 12, heads 12, MLP ratio 4,
  exact GELU, LayerNorm eps 1e-6, ``qkv_bias=True`` stored as separate ``q_bias``/``v_bias``
  (the key bias is zero), no layer-scale (``init_values=0``, so no ``gamma_1/2``), absolute
  position embedding, no relative position bias, ``use_mean_pooling=True`` so ``norm`` is an
  identity and the final LayerNorm is ``fc_norm``, applied to the patch tokens only.
- Other grids: the 14x14 patch position table is resized bicubically with
  ``scale_factor = (grid + 0.1) / 14`` (``align_corners=False``); the CLS row is kept.
- Quantiser: tokens are L2-normalised and matched to the codebook by the smallest squared
  distance; the trained codebook rows are unit vectors (EMA updates re-normalise them), so
  this is the largest cosine, which is what is computed here (codes are re-normalised).

Checkpoint layout (``vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth``): a dict with
``"model"`` (the official loader also accepts ``"state_dict"``) holding

    encoder.cls_token (1,1,D)   encoder.pos_embed (1,1+G*G,D)
    encoder.patch_embed.proj.{weight (D,3,P,P), bias}
    encoder.blocks.N.norm1.{weight,bias}   encoder.blocks.N.norm2.{weight,bias}
    encoder.blocks.N.attn.qkv.weight (3D,D)  encoder.blocks.N.attn.{q_bias,v_bias} (D,)
    encoder.blocks.N.attn.proj.{weight,bias}
    encoder.blocks.N.mlp.fc1.{weight (4D,D),bias}  encoder.blocks.N.mlp.fc2.{weight,bias}
    encoder.fc_norm.{weight,bias}
    encode_task_layer.0.{weight,bias} (D,D)   encode_task_layer.2.{weight (C,D),bias}
    quantize.embedding.weight (K,C)

plus decoder / EMA statistics / teacher entries that the tokenizer does not use
(``decoder.*``, ``decode_task_layer.*``, ``quantize.cluster_size``,
``quantize.embedding.{cluster_size,embed_avg,initted}``, ``teacher_model.*``, ...).
This module's own ``state_dict()`` uses exactly the names above.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from oneref.io import load_pth

__all__ = ["VQKDTokenizer", "load_vqkd_state_dict"]

logger = logging.getLogger(__name__)

# Entries of an official checkpoint that do not take part in tokenisation.
_IGNORED_PREFIXES = (
    "decoder.",
    "decode_task_layer.",
    "teacher_model.",
    "scaling_layer.",
    "loss",
)
_IGNORED_KEYS = frozenset(
    {
        "quantize.cluster_size",
        "quantize.embedding.cluster_size",
        "quantize.embedding.embed_avg",
        "quantize.embedding.initted",
    }
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PROCESS_TYPES = ("default", "imagenet_norm")
# Rows of (B*L) tokens matched against the codebook per step: bounds the (rows, K) score
# matrix to 256 MiB in fp32 for K = 8192.
_MATCH_CHUNK = 8192


class _PatchEmbed(nn.Module):
    """Conv2d(3, D, P, stride P): (B, 3, H, W) -> (B, H/P * W/P, D), row-major."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """BEiT self-attention: packed qkv weight without bias, separate q/v biases, zero k bias."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); softmax(q k^T / sqrt(Dh)) v over all N tokens."""
        b, n, d = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-LN ViT block without layer-scale: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Encoder(nn.Module):
    """The VQ-KD encoder ViT; returns fc_norm(patch tokens) (B, L, D)."""

    def __init__(
        self, patch_size: int, dim: int, depth: int, num_heads: int, mlp_hidden: int,
        pos_grid: int, eps: float,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.patch_embed = _PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.blocks = nn.ModuleList(
            [_Block(dim, num_heads, mlp_hidden, eps) for _ in range(depth)]
        )
        self.fc_norm = nn.LayerNorm(dim, eps=eps)

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, D): the stored table, bicubically resized to the input grid.

        Mirrors the official ``interpolate_pos_encoding``: scale factors (grid + 0.1) / G so
        the output size floors to the grid, and the interpolation uses those factors.
        """
        g = self.pos_grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        table = patch_pos.reshape(1, g, g, dim).permute(0, 3, 1, 2)
        table = F.interpolate(
            table.float(),
            scale_factor=((grid_h + 0.1) / g, (grid_w + 0.1) / g),
            mode="bicubic",
            align_corners=False,
        ).to(patch_pos.dtype)
        if table.shape[-2:] != (grid_h, grid_w):  # cannot happen for grids >= 1; kept as a guard
            raise RuntimeError(f"position interpolation gave {tuple(table.shape[-2:])}, "
                               f"wanted {(grid_h, grid_w)}")
        table = table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((cls_pos, table), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) pre-processed -> patch features (B, H/P * W/P, D)."""
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self.position_table(grid_h, grid_w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.fc_norm(tokens[:, 1:])


class _Quantizer(nn.Module):
    """Holds the codebook under the official name ``quantize.embedding.weight`` (K, C)."""

    def __init__(self, codebook_size: int, code_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, C) -> (N,) long: index of the codebook row with the largest cosine to z."""
        codebook = F.normalize(self.embedding.weight.float(), dim=-1)
        z = F.normalize(z.float(), dim=-1)
        return torch.cat(
            [(rows @ codebook.t()).argmax(dim=-1) for rows in z.split(_MATCH_CHUNK)]
        )


class VQKDTokenizer(nn.Module):
    """Frozen BEiT v2 VQ-KD tokenizer: images in [0, 1] -> visual-token ids.

    Args:
        image_size: input side length the tokenizer expects (e.g. 384 for OneRef); must be a
            multiple of ``patch_size``.
        patch_size, dim, depth, num_heads, mlp_ratio: encoder ViT shape (official: 16, 768,
            12, 12, 4.0). Small values build the tiny models the tests use.
        codebook_size, code_dim: codebook shape (official: 8192 codes of 32 dims).
        pos_grid: side of the stored position table (official: 14, from 224 / 16); defaults to
            ``image_size // patch_size``. Inputs on another grid use a resized table.
        ln_eps: LayerNorm epsilon (official: 1e-6).
        process_type: ``"default"`` (x -> 2x - 1, as the official tokenizer) or
            ``"imagenet_norm"`` ((x - mean) / std with ImageNet statistics).

    The module is always in eval mode and every parameter has ``requires_grad=False``.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        codebook_size: int = 8192,
        code_dim: int = 32,
        pos_grid: int | None = None,
        ln_eps: float = 1e-6,
        process_type: str = "default",
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size),
                            ("dim", dim), ("depth", depth), ("num_heads", num_heads),
                            ("codebook_size", codebook_size), ("code_dim", code_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if process_type not in _PROCESS_TYPES:
            raise ValueError(f"process_type must be one of {_PROCESS_TYPES}, got {process_type!r}")
        if pos_grid is None:
            pos_grid = image_size // patch_size
        if not isinstance(pos_grid, int) or pos_grid < 1:
            raise ValueError(f"pos_grid must be a positive int, got {pos_grid!r}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.process_type = process_type
        self.encoder = _Encoder(
            patch_size, dim, depth, num_heads, round(dim * mlp_ratio), pos_grid, ln_eps
        )
        self.encode_task_layer = nn.Sequential(
            nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, code_dim)
        )
        self.quantize = _Quantizer(codebook_size, code_dim)
        mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
        self.register_buffer("_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", std.view(1, 3, 1, 1), persistent=False)
        self._init_random()
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction
    def _init_random(self) -> None:
        """Random weights (trunc-normal 0.02, as the official init) and unit-norm codes."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)
        nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02)
        with torch.no_grad():
            weight = self.quantize.embedding.weight
            weight.copy_(F.normalize(torch.randn_like(weight), dim=-1))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        image_size: int = 384,
        *,
        num_heads: int | None = None,
        strict: bool = True,
        weights_only: bool = True,
        **kwargs,
    ) -> "VQKDTokenizer":
        """Build the tokenizer from an official VQ-KD checkpoint file.

        Shapes (dim, depth, patch size, position grid, codebook, MLP ratio) are read from the
        file; ``num_heads`` cannot be, and defaults to ``dim // 64`` (12 for ViT-B).
        ``image_size`` is the input size the tokenizer will be fed (384 -> 24x24 codes).
        With ``strict`` (default) missing or unexpected tokenizer keys raise ValueError; with
        ``strict=False`` unexpected ones are logged and missing ones still raise. Set
        ``weights_only=False`` only for trusted files that pickle more than tensors.
        """
        state = load_vqkd_state_dict(path, weights_only=weights_only)
        shape = _infer_shape(state, path)
        if num_heads is None:
            num_heads = max(1, shape["dim"] // 64)
        shape.update(kwargs)
        model = cls(image_size=image_size, num_heads=num_heads, **shape)
        model.load_official_state_dict(state, strict=strict, source=str(path))
        logger.info(
            "loaded VQ-KD tokenizer from %s: dim %d, depth %d, %d codes x %d, "
            "position grid %d -> input grid %d",
            path, shape["dim"], shape["depth"], shape["codebook_size"], shape["code_dim"],
            shape["pos_grid"], image_size // shape["patch_size"],
        )
        return model

    def load_official_state_dict(
        self, state: Mapping[str, torch.Tensor], strict: bool = True, source: str = "state dict"
    ) -> None:
        """Copy tokenizer weights from an official-layout state dict (decoder keys ignored).

        Raises ValueError naming the keys that are missing, have the wrong shape, or (with
        ``strict``) are unexpected tokenizer keys.
        """
        own = self.state_dict()
        wanted, ignored, unexpected = {}, [], []
        for key, value in state.items():
            if key in own:
                wanted[key] = value
            elif key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
                ignored.append(key)
            else:
                unexpected.append(key)
        missing = sorted(set(own) - set(wanted))
        if missing:
            raise ValueError(f"{source}: missing tokenizer keys {missing}")
        bad_shapes = [
            f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            for key, value in wanted.items()
            if not isinstance(value, torch.Tensor) or value.shape != own[key].shape
        ]
        if bad_shapes:
            raise ValueError(f"{source}: shape mismatch for " + "; ".join(bad_shapes))
        if unexpected:
            message = f"{source}: unexpected tokenizer keys {sorted(unexpected)}"
            if strict:
                raise ValueError(message + " (pass strict=False to ignore them)")
            logger.warning(message)
        if ignored:
            logger.debug("%s: ignoring %d decoder/statistics keys", source, len(ignored))
        self.load_state_dict(wanted, strict=True)
        codebook_norms = self.quantize.embedding.weight.norm(dim=-1)
        if not torch.allclose(codebook_norms, torch.ones_like(codebook_norms), atol=1e-3):
            logger.warning(
                "%s: codebook rows are not unit vectors (norms %.4g..%.4g); codes use cosine "
                "similarity, which may differ from the official squared-distance match",
                source, codebook_norms.min().item(), codebook_norms.max().item(),
            )

    # ------------------------------------------------------------------ behaviour
    def train(self, mode: bool = True) -> "VQKDTokenizer":
        """The tokenizer is a frozen target: it stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    @property
    def codebook_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    def grid(self, image_size: int | None = None) -> int:
        """Codes per side for a square input (24 for 384 / 16)."""
        return (image_size or self.image_size) // self.patch_size

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the encoder's input scale (see ``process_type``)."""
        if self.process_type == "default":
            return images01 * 2.0 - 1.0
        return (images01 - self._mean.to(images01)) / self._std.to(images01)

    def encode_features(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> quantiser inputs (B, L, C) in fp32 (not normalised).

        The encoder follows the caller's autocast; the task layer runs in fp32, as the
        official ``VQKD.encode`` does.
        """
        features = self.encoder(self.preprocess(images01))
        with torch.autocast(device_type=images01.device.type, enabled=False):
            return self.encode_task_layer(features.float())

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """images01 (B, 3, S, S) float in [0, 1], S = image_size -> codes (B, (S/P)^2) long.

        Codes are in row-major patch order (row 0: columns 0..S/P-1, then row 1, ...).
        """
        self._check_images(images01)
        z = self.encode_features(images01)
        b, length, c = z.shape
        return self.quantize(z.reshape(b * length, c)).view(b, length)

    def _check_images(self, images01: torch.Tensor) -> None:
        if not isinstance(images01, torch.Tensor):
            raise TypeError(f"images01 must be a torch.Tensor, got {type(images01).__name__}")
        if not images01.is_floating_point():
            raise TypeError(f"images01 must be a float tensor in [0, 1], got {images01.dtype}")
        expected = (3, self.image_size, self.image_size)
        if images01.dim() != 4 or tuple(images01.shape[1:]) != expected:
            raise ValueError(
                f"images01 must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images01.shape)}"
            )
        if images01.numel():
            low, high = torch.aminmax(images01.detach())
            low, high = low.item(), high.item()
            if low < -1e-3 or high > 1.0 + 1e-3:
                raise ValueError(
                    f"images01 must be un-normalised images in [0, 1], got values in "
                    f"[{low:.4g}, {high:.4g}] (pass the image before ImageNet normalisation)"
                )


# ---------------------------------------------------------------------- checkpoint files
def load_vqkd_state_dict(path: str | os.PathLike, weights_only: bool = True) -> dict:
    """Read an official VQ-KD checkpoint and return its state dict (``"model"`` entry).

    Accepts ``{"model": sd}``, ``{"state_dict": sd}`` (both read by the official loader) or a
    bare state dict whose keys start with ``encoder.``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"VQ-KD checkpoint {path!r} does not exist or is not a file")
    obj = load_pth(path, trust=not weights_only, what="VQ-KD checkpoint",
                   hint="weights_only=False")
    if not isinstance(obj, Mapping):
        raise ValueError(f"VQ-KD checkpoint {path!r} must hold a dict, got {type(obj).__name__}")
    for entry in ("model", "state_dict"):
        if entry in obj:
            state = obj[entry]
            break
    else:
        if any(isinstance(k, str) and k.startswith("encoder.") for k in obj):
            state = obj
        else:
            raise ValueError(
                f"VQ-KD checkpoint {path!r} has no 'model' entry (top-level keys: "
                f"{sorted(map(str, obj))[:10]})"
            )
    if not isinstance(state, Mapping):
        raise ValueError(f"VQ-KD checkpoint {path!r}: 'model' must be a dict of tensors")
    return dict(state)


def _require(state: Mapping, key: str, ndim: int, path) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{path}: missing tokenizer key {key!r}")
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dim() != ndim:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{path}: {key!r} must be a {ndim}-d tensor, got {shape}")
    return value


def _infer_shape(state: Mapping, path) -> dict:
    """Constructor arguments read from the tensor shapes of an official state dict."""
    proj = _require(state, "encoder.patch_embed.proj.weight", 4, path)  # (D, 3, P, P)
    pos = _require(state, "encoder.pos_embed", 3, path)  # (1, 1 + G*G, D)
    codebook = _require(state, "quantize.embedding.weight", 2, path)  # (K, C)
    dim, patch_size = proj.shape[0], proj.shape[-1]
    if proj.shape[-2] != patch_size:
        raise ValueError(f"{path}: encoder.patch_embed.proj.weight has non-square patches "
                         f"{tuple(proj.shape)}")
    pos_grid = math.isqrt(pos.shape[1] - 1)
    if pos_grid * pos_grid != pos.shape[1] - 1 or pos.shape[2] != dim:
        raise ValueError(
            f"{path}: encoder.pos_embed {tuple(pos.shape)} is not (1, 1 + G*G, {dim}) "
            "for a square grid G"
        )
    depth = 0
    while f"encoder.blocks.{depth}.attn.qkv.weight" in state:
        depth += 1
    if depth == 0:
        raise ValueError(f"{path}: missing tokenizer key 'encoder.blocks.0.attn.qkv.weight'")
    fc1 = _require(state, "encoder.blocks.0.mlp.fc1.weight", 2, path)  # (hidden, D)
    return {
        "patch_size": int(patch_size),
        "dim": int(dim),
        "depth": depth,
        "mlp_ratio": fc1.shape[0] / dim,
        "pos_grid": pos_grid,
        "codebook_size": int(codebook.shape[0]),
        "code_dim": int(codebook.shape[1]),
    }
