"""Task heads on top of the encoder (docs/method.md).

Notation (B batch, L = G * G patches, T text tokens, D features):
  ``v`` raw patch features (B, L, D); ``w`` raw text features (B, T, D);
  ``v_hat = normalize(vision_head(v))``, ``e_img = normalize(vision_head(vision CLS))``,
  ``w_hat = normalize(language_head(w))``, ``e_txt = w_hat[:, 0]`` (the ``<s>`` token).
The output projections ``vision_head`` / ``language_head`` (Linear(D, D, bias=False), then L2
normalisation) are plain attributes of :class:`~oneref.model.OneRef` (official key names).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from oneref import ops
from oneref.model.layers import MLP

__all__ = ["RECHead", "RESHead", "upsample_2x", "MIMHead", "MLMHead", "similarity_map",
           "patchify", "pixel_targets"]


def similarity_map(e_txt: torch.Tensor, v_hat: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cosine similarity of the text query with every patch, times ``scale``:
    (B, D), (B, L, D) -> (B, L)."""
    sim = torch.einsum("bd,bld->bl", e_txt, v_hat)
    return sim if scale == 1.0 else sim * scale


class RECHead(nn.Module):
    """Box from similarity-weighted pooling (docs/method.md, "REC head").

    ``a = softmax(M_sim)`` over patches; ``h = sum_i a_i visu_proj(v_i)``; box =
    ``sigmoid(MLP(h))`` with MLP D -> D -> D -> 4. Because ``visu_proj`` is affine and the
    weights sum to one, ``h = visu_proj(sum_i a_i v_i)``: the projection runs on one pooled row
    per sample instead of L rows (same value). 1,774,852 parameters at D = 768.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.visu_proj = nn.Linear(dim, dim)
        self.bbox_mlp = MLP(dim, dim, 4, 3)

    def forward(self, patches: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """patches (B, L, D) raw features; sim (B, L) cosine logits -> boxes (B, 4) cxcywh."""
        weights = sim.softmax(dim=-1).to(patches.dtype)
        pooled = torch.einsum("bl,bld->bd", weights, patches)
        return self.bbox_mlp(self.visu_proj(pooled)).sigmoid()


class RESHead(nn.Module):
    """Mask logits (docs/method.md, "RES head"): patches (B, L = G * G, D) as a G x G map ->
    ``upsamples`` x [ConvTranspose2d(D, D, 2, 2) + BN] (ReLU after all but the last; OneRef:
    3) -> a 2^n G x 2^n G map of D channels; per-pixel L2 normalisation, dot with ``e_txt``;
    bilinear upsampling (align_corners False) to the image size.

    The maps stay channels-last, the layout the patches arrive in: a 2x2 stride-2 transposed
    convolution is one GEMM (every input pixel times the (D, 2 * 2 * D) weight) and a pixel
    shuffle, and the cosine divides the dot product by the pixel norm instead of writing a
    normalised copy of the map. Same function as the modules' own forward in half the time
    (docs/perf.md, "RES head").
    """

    def __init__(self, dim: int, upsamples: int = 3) -> None:
        super().__init__()
        self.upsamples = upsamples
        for i in range(1, upsamples + 1):
            self.add_module(f"conv{i}", nn.ConvTranspose2d(dim, dim, 2, stride=2, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(dim))

    def forward(self, patches: torch.Tensor, e_txt: torch.Tensor, img_size: int) -> torch.Tensor:
        """patches (B, L, D); e_txt (B, D) unit norm -> logits (B, img_size, img_size)."""
        batch, num, dim = patches.shape
        grid = int(round(num ** 0.5))
        x = patches.reshape(batch, grid, grid, dim)
        for i in range(1, self.upsamples + 1):
            x = upsample_2x(x, getattr(self, f"conv{i}").weight)
            # (B, D, H, W) view of the channels-last map: BatchNorm2d keeps its layout.
            x = getattr(self, f"bn{i}")(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            if i < self.upsamples:
                x = F.relu(x)
        dots = torch.einsum("bhwc,bc->bhw", x, e_txt.to(x.dtype))
        # F.normalize's eps. Under CUDA autocast the norm is fp32, so the logits are too.
        logits = dots / torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)
        return F.interpolate(logits[:, None], size=(img_size, img_size), mode="bilinear",
                             align_corners=False)[:, 0]


def upsample_2x(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``ConvTranspose2d(kernel 2, stride 2, no bias)`` on a channels-last map: x (B, H, W, C),
    weight (C, O, 2, 2) -> (B, 2H, 2W, O). Output pixel (2h + i, 2w + j) is
    ``x[h, w] @ weight[:, :, i, j]``."""
    batch, height, width, chans = x.shape
    out = weight.shape[1]
    y = x.reshape(-1, chans) @ weight.permute(0, 2, 3, 1).reshape(chans, 4 * out)
    y = y.view(batch, height, width, 2, 2, out).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(batch, 2 * height, 2 * width, out)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch_size * patch_size * C), patches row-major, pixels (p, q, c)."""
    batch, chans, height, width = images.shape
    gh, gw = height // patch_size, width // patch_size
    x = images.reshape(batch, chans, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, gh * gw, patch_size * patch_size * chans)


def pixel_targets(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Pixel fallback MIM target: each patch normalised to zero mean / unit variance over its
    own pixels (MAE's ``norm_pix_loss`` target). (B, C, H, W) -> (B, L, P * P * C)."""
    patches = patchify(images.float(), patch_size)
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


class MIMHead(nn.Module):
    """Referring MIM prediction (docs/method.md, "MRefM pre-training").

    ``proj``: Linear(D, mim_vocab) on ``normalize(e_txt * v_hat_i)`` at masked patches, CE
    against visual-token ids (VQ-KD codes). ``pixel``: Linear(D, P * P * C) on the same
    features, used only for the pixel fallback target (no tokenizer): mean squared error
    against :func:`pixel_targets` at masked patches.
    """

    def __init__(self, dim: int, vocab: int, patch_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, vocab)
        self.pixel = nn.Linear(dim, patch_dim)

    def token_loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """feats (N, D) normalised masked features; targets (N,) long -> mean CE."""
        return ops.linear_cross_entropy(feats, self.proj.weight, targets, self.proj.bias)

    def pixel_loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """feats (N, D); targets (N, P * P * C) -> MSE averaged over rows and values."""
        return F.mse_loss(self.pixel(feats).float(), targets.float())


class MLMHead(nn.Module):
    """Referring MLM prediction: Linear(D, vocab) on raw text features at masked positions,
    label-smoothed CE through :func:`oneref.ops.linear_cross_entropy` (no B x T x V logits)."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, vocab)

    def loss(self, feats: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1,
             drop_worst: float = 0.0) -> torch.Tensor:
        """feats (N, D), targets (N,) -> scalar.

        Label smoothing is torch's (``eps / V`` on every class); the reference code's KL
        against ``eps / (V - 1)`` off-target differs by a constant plus O(eps / V^2).
        ``drop_worst`` in [0, 1): only the ``max(1, int(N * (1 - drop_worst)))`` smallest
        token losses are averaged (as the reference code does).
        """
        if drop_worst <= 0.0:
            return ops.linear_cross_entropy(feats, self.proj.weight, targets, self.proj.bias,
                                            label_smoothing=label_smoothing)
        losses = ops.linear_cross_entropy(feats, self.proj.weight, targets, self.proj.bias,
                                          label_smoothing=label_smoothing, reduction="none")
        keep = max(1, int(losses.numel() * (1.0 - drop_worst)))
        return losses.sort().values[:keep].mean()
