"""Input embeddings of the joint sequence ``[vision CLS, patches, text]`` (docs/method.md,
"Encoder").

Vision: Conv2d patch embedding, optional MIM mask-token substitution, CLS prepended, learned
absolute positions (table of ``num_vision + 2`` rows). Text: token embedding plus learned
absolute positions (table of ``text_positions`` rows). Both tables are indexed from 2
(the fairseq offset), and padded text rows are zeroed after positions are added.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from oneref import ops
from oneref.config import ModelConfig
from oneref.ops.reference import key_padding_mask

__all__ = ["POSITION_OFFSET", "MultiwayEmbedding"]

# Fairseq reserves position rows 0 and 1 (padding_idx + 1); real positions start at 2.
POSITION_OFFSET = 2


class MultiwayEmbedding(nn.Module):
    """Image + text ids -> (B, num_vision + T, D) embeddings of the joint sequence."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.text_embed = nn.Embedding(config.vocab_size, dim)
        self.patch_embed = nn.Conv2d(config.in_chans, dim, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.vision_pos = nn.Embedding(config.num_vision + POSITION_OFFSET, dim)
        self.text_pos = nn.Embedding(config.text_positions, dim)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_lengths: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, H, W); text_ids (B, T) long; text_lengths (B,); image_mask (B, L)
        bool (True = masked patch) or None. Returns (B, 1 + L + T, D)."""
        batch = images.shape[0]
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, D)
        if image_mask is not None:
            patches = ops.apply_mask_token(patches, image_mask,
                                           self.mask_token.view(-1).to(patches.dtype))
        cls = self.cls_token.expand(batch, -1, -1).to(patches.dtype)
        vision = torch.cat([cls, patches], dim=1)  # (B, 1 + L, D)
        num_vision = vision.shape[1]
        vision = vision + self.vision_pos.weight[POSITION_OFFSET:POSITION_OFFSET + num_vision]

        num_text = text_ids.shape[1]
        text = self.text_embed(text_ids)
        text = text + self.text_pos.weight[POSITION_OFFSET:POSITION_OFFSET + num_text]
        valid = key_padding_mask(text_lengths, 0, num_text)  # (B, T) True = real token
        text = text * valid[..., None].to(text.dtype)
        return torch.cat([vision, text], dim=1)
