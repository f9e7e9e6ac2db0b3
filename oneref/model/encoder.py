"""BEiT-3 multiway transformer encoder (docs/method.md, "Encoder").

Every block is pre-LN with sub-LayerNorms; each module exists twice (expert A for the vision
rows, expert B for the text rows) while the softmax attention is shared over the joint
sequence::

    x = x + DropPath(proj(subLN(Attn(LN1(x)))))
    x = x + DropPath(fc2(subLN(GELU(fc1(LN2(x))))))

Each residual add runs inside the LayerNorm that follows it
(:func:`oneref.ops.multiway_add_layer_norm`), and the GELU inside the FFN's sub-LN: a block
takes the previous block's FFN branch still to be added, and returns its own. The last one
is added by the final norm. Same function, fewer passes over memory (docs/perf.md).

The q/k/v projections of each expert are packed into one (3D, D) weight; the attention reads
(B, S, H, Dh) views of the packed output (no copies). The key padding mask is built once per
forward and read by every layer's attention (the Triton kernels read the text lengths
instead).

Precision under bf16 autocast: the GEMMs and attention run in bf16; the LayerNorms compute
fp32 statistics and return bf16 (what the next GEMM reads). The residual stream ``x`` is held
in bf16 as well (``residual_dtype="compute"``, each branch added in fp32 and rounded once),
or in the embeddings' dtype, fp32 for fp32 parameters (``"params"``, and under fp16
autocast, whose range is too narrow for the stream). Either way the final norm returns the
embeddings' dtype, so the heads see what they would without the choice.
``tests/model/test_precision.py`` checks this at every block boundary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from oneref import ops
from oneref.config import ModelConfig
from oneref.model.layers import DropPath, MultiwayLayerNorm, MultiwayLinear

__all__ = ["MultiwayAttention", "MultiwayFFN", "Block", "MultiwayEncoder"]


class MultiwayAttention(nn.Module):
    """Packed multiway QKV -> shared attention -> multiway sub-LN -> multiway out projection."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = MultiwayLinear(dim, 3 * dim)
        self.sub_norm = MultiwayLayerNorm(dim, eps)
        self.proj = MultiwayLinear(dim, dim)

    def forward(self, x: torch.Tensor, text_lengths: torch.Tensor, num_vision: int,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, D); text_lengths: (B,); key_mask: their (B, S) key padding mask, when
        built already. Returns (B, S, D)."""
        batch, seq, dim = x.shape
        qkv = self.qkv(x, num_vision).view(batch, seq, 3, self.num_heads, self.head_dim)
        out = ops.packed_multiway_attention(qkv, text_lengths, num_vision, key_mask=key_mask)
        out = out.reshape(batch, seq, dim)
        return self.proj(self.sub_norm(out, num_vision), num_vision)


class MultiwayFFN(nn.Module):
    """fc1 -> multiway sub-LN of GELU (fused) over the FFN width -> fc2."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = MultiwayLinear(dim, hidden)
        self.sub_norm = MultiwayLayerNorm(hidden, eps, activation="gelu")
        self.fc2 = MultiwayLinear(hidden, dim)

    def forward(self, x: torch.Tensor, num_vision: int) -> torch.Tensor:
        """x: (B, S, D) -> (B, S, D)."""
        return self.fc2(self.sub_norm(self.fc1(x, num_vision), num_vision), num_vision)


class Block(nn.Module):
    """One pre-LN multiway transformer layer."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, drop_path: float = 0.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = MultiwayLayerNorm(dim, eps)
        self.attn = MultiwayAttention(dim, num_heads, eps)
        self.norm2 = MultiwayLayerNorm(dim, eps)
        self.mlp = MultiwayFFN(dim, ffn_dim, eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, text_lengths: torch.Tensor, num_vision: int,
                branch: torch.Tensor | None = None, branch_scale: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x: (B, S, D) residual stream; branch, branch_scale: the previous block's FFN
        branch and drop-path factors, added here (None: x is the block's input); key_mask:
        as :class:`MultiwayAttention`.
        Returns (the stream after the attention branch, this block's FFN branch, its
        drop-path factors): the next block, or the final norm, adds them."""
        if branch is None:
            y = self.norm1(x, num_vision)
        else:
            x, y = self.norm1.add(x, branch, num_vision, branch_scale)
        attn = self.attn(y, text_lengths, num_vision, key_mask)
        x, y = self.norm2.add(x, attn, num_vision, self.drop_path.scale(attn))
        ffn = self.mlp(y, num_vision)
        return x, ffn, self.drop_path.scale(ffn)


class MultiwayEncoder(nn.Module):
    """``depth`` blocks with drop path growing linearly 0 -> ``config.drop_path``, then the
    final multiway LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Plain Python (not torch.linspace) so the model also builds on the meta device.
        steps = max(config.depth - 1, 1)
        rates = [config.drop_path * i / steps for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.ffn_dim, rate, config.ln_eps)
            for rate in rates
        )
        self.norm = MultiwayLayerNorm(config.embed_dim, config.ln_eps)
        self.residual_dtype = config.residual_dtype
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, text_lengths: torch.Tensor, num_vision: int) -> torch.Tensor:
        """x: (B, S, D) embeddings; text_lengths: (B,). Returns (B, S, D), stored
        sequence-major (see :mod:`oneref.ops.layout`)."""
        out_dtype = x.dtype
        if self.residual_dtype == "compute" and ops.compute_dtype(x) == torch.bfloat16:
            x = x.to(torch.bfloat16)
        x = ops.sequence_major(x)
        key_mask = ops.key_padding_mask(text_lengths, num_vision, x.shape[1])  # for all layers
        branch = scale = None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, branch, scale = checkpoint(block, x, text_lengths, num_vision, branch, scale,
                                              key_mask, use_reentrant=False)
            else:
                x, branch, scale = block(x, text_lengths, num_vision, branch, scale, key_mask)
        if branch is None:  # depth 0
            return self.norm(x, num_vision, out_dtype=out_dtype)
        return self.norm.add(x, branch, num_vision, scale, out_dtype=out_dtype)[1]
