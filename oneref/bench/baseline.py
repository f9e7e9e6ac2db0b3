"""The "official-style" baseline of the benchmark rows (a) and (b).

Backbone: BEiT-3 as the ``torchscale`` package (0.3.0) builds it, configured from a
:class:`~oneref.config.ModelConfig`. Heads and losses: OneRef's REC / RES / MIM / MLM heads
(docs/method.md) written the way research code writes them -- separate ``nn.Linear`` layers,
an explicit similarity map, softmax pooling, an MLP, L1 + GIoU and focal + dice losses in
straightforward torch. Nothing here uses :mod:`oneref.ops`: the point is an independent,
plain implementation to measure the engine against.

Row (a) runs this model in fp32 eager. Row (b) is the same module with its attention swapped
for ``F.scaled_dot_product_attention`` (bool key-padding mask; :func:`use_sdpa`) under bf16
autocast. On a CPU the suite runs (a) only: (b)'s changes target the GPU.

Shapes: B batch, T text length (``config.max_text_len``), G patch grid side, L = G * G,
D width, S image side.
"""

from __future__ import annotations

import logging
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from oneref.config import ModelConfig, get_config

__all__ = ["BaselineOneRef", "encoder_config", "use_sdpa", "import_beit3"]

log = logging.getLogger(__name__)
PAD_ID = 1


def _stub_fairscale() -> None:
    """torchscale imports ``fairscale.nn`` at module load but uses it only for activation
    checkpointing / FSDP wrapping, which the baseline never turns on. Where fairscale is not
    installed (the GPU machines), register a stand-in that raises if those are used."""
    def _unsupported(*args, **kwargs):
        raise RuntimeError("fairscale is not installed; checkpoint_activations/fsdp need it")

    pkg = types.ModuleType("fairscale")
    sub = types.ModuleType("fairscale.nn")
    sub.checkpoint_wrapper = _unsupported
    sub.wrap = _unsupported
    pkg.nn = sub
    sys.modules["fairscale"] = pkg
    sys.modules["fairscale.nn"] = sub
    log.warning("fairscale not installed: using a stand-in for torchscale's import "
                "(activation checkpointing / FSDP are unavailable in the baseline)")


def import_beit3():
    """``(BEiT3, EncoderConfig)`` from torchscale; ImportError names what to install."""
    try:
        import fairscale.nn  # noqa: F401
    except ImportError:
        _stub_fairscale()
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    except ImportError as exc:
        raise ImportError("the baseline rows need torchscale==0.3.0 (and timm): "
                          f"pip install 'oneref[bench]' ({exc})") from exc
    return BEiT3, EncoderConfig


def encoder_config(config: ModelConfig):
    """The torchscale ``EncoderConfig`` of a BEiT-3 with the shape of ``config``
    (multiway, sub-LN pre-norm, normalised output, no output layer, as BEiT-3 uses)."""
    _, EncoderConfig = import_beit3()
    return EncoderConfig(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        vocab_size=config.vocab_size, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, encoder_normalize_before=True,
        subln=True, drop_path_rate=config.drop_path, encoder_embed_dim=config.embed_dim,
        encoder_attention_heads=config.num_heads, encoder_ffn_embed_dim=config.ffn_dim,
        encoder_layers=config.depth, max_source_positions=config.text_positions,
        layernorm_eps=config.ln_eps, checkpoint_activations=False,
    )


def _sdpa_forward(self, query, key, value, incremental_state=None, key_padding_mask=None,
                  attn_mask=None, rel_pos=None, is_first_step=False):
    """torchscale ``MultiheadAttention.forward`` with the attention done by SDPA.

    key_padding_mask: (B, S) bool, True = padded key (torchscale's convention); passed to
    SDPA as a bool mask (B, 1, 1, S), True = attend.
    """
    if incremental_state is not None or attn_mask is not None or rel_pos is not None:
        raise ValueError("the SDPA baseline supports plain self-attention only")
    bsz, seq, dim = query.shape
    shape = (bsz, seq, self.num_heads, self.head_dim)
    q = self.q_proj(query).view(shape).transpose(1, 2)
    k = self.k_proj(key).view(shape).transpose(1, 2)
    v = self.v_proj(value).view(shape).transpose(1, 2)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :].bool()
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
    attn = attn.transpose(1, 2).reshape(bsz, seq, dim)
    if self.inner_attn_ln is not None:
        attn = self.inner_attn_ln(attn)
    return self.out_proj(attn), None


def use_sdpa(model: nn.Module) -> nn.Module:
    """Row (b): route every torchscale attention of ``model`` through SDPA (in place)."""
    from torchscale.component.multihead_attention import MultiheadAttention
    count = 0
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.forward = types.MethodType(_sdpa_forward, module)
            count += 1
    if count == 0:
        raise ValueError("use_sdpa: the model holds no torchscale MultiheadAttention")
    return model


def _python_drop_rates(model: nn.Module) -> nn.Module:
    """torchscale keeps each layer's drop-path rate as a numpy float, which Dynamo cannot
    branch on (a graph break in every layer under ``torch.compile``); the same rates as
    Python floats, so that row (b+) compiles to one graph as a user's fix would."""
    from torchscale.component.droppath import DropPath
    for module in model.modules():
        if isinstance(module, DropPath) and module.drop_prob is not None:
            module.drop_prob = float(module.drop_prob)
    return model


def _mlp(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                         nn.Linear(dim, out))


def _box_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def _giou(a, b):
    """Generalised IoU of matching rows of two (B, 4) xyxy box sets -> (B,)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union
    lt_c, rb_c = torch.min(a[:, :2], b[:, :2]), torch.max(a[:, 2:], b[:, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def _focal(logits, target, alpha=0.25, gamma=2.0):
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean(1).sum() / logits.shape[0]


def _dice(logits, target):
    prob = logits.sigmoid()
    numerator = 2 * (prob * target).sum(1)
    denominator = prob.sum(1) + target.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / logits.shape[0]


def _box_mask_target(boxes, img_size: int, grid: int):
    """GT box drawn at full resolution (B, S, S), then nearest-resized to (B, G, G)."""
    xyxy = _box_xyxy(boxes.float()) * img_size
    pix = torch.arange(img_size, device=boxes.device, dtype=torch.float32)
    in_x = (pix[None] >= xyxy[:, 0:1]) & (pix[None] < xyxy[:, 2:3])
    in_y = (pix[None] >= xyxy[:, 1:2]) & (pix[None] < xyxy[:, 3:4])
    full = (in_y[:, :, None] & in_x[:, None, :]).float()
    return F.interpolate(full[:, None], size=(grid, grid), mode="nearest")[:, 0]


class BaselineOneRef(nn.Module):
    """torchscale BEiT-3 + plain OneRef heads. Same call surface as the engine's ``OneRef``
    for what the benchmark uses: ``forward_rec``, ``rec_loss``, ``forward_res``, ``res_loss``,
    ``mim_loss``, ``mlm_loss``, ``backbone_parameters``, ``head_parameters``."""

    def __init__(self, config: ModelConfig | str):
        super().__init__()
        config = get_config(config)
        self.config = config
        BEiT3, _ = import_beit3()
        self.beit3 = _python_drop_rates(BEiT3(encoder_config(config)))
        dim = config.embed_dim
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        # REC head
        self.visu_proj = nn.Linear(dim, dim)
        self.bbox_embed = _mlp(dim, 4)
        # RES head: three 2x transposed convolutions
        layers = []
        for i in range(3):
            layers += [nn.ConvTranspose2d(dim, dim, 2, stride=2, bias=False), nn.BatchNorm2d(dim)]
            if i < 2:
                layers.append(nn.ReLU())
        self.seg_decoder = nn.Sequential(*layers)
        # pre-training heads (MIM on fused tokens, MLM on raw text features)
        self.mim_head = nn.Linear(dim, config.mim_vocab)
        self.mlm_head = nn.Linear(dim, config.vocab_size)

    # -- backbone -------------------------------------------------------------------------
    def backbone_parameters(self):
        return self.beit3.parameters()

    def head_parameters(self):
        return (p for name, p in self.named_parameters() if not name.startswith("beit3."))

    def encode(self, images, text_ids, text_lengths=None, image_mask=None):
        """-> (vision (B, 1 + L, D), text (B, T, D)) raw encoder outputs."""
        padding = text_ids == PAD_ID
        out = self.beit3(textual_tokens=text_ids, visual_tokens=images,
                         text_padding_position=padding, vision_masked_position=image_mask)
        x = out["encoder_out"]
        split = out["multiway_split_position"]
        return x[:, :split], x[:, split:]

    def _embeddings(self, vision, text):
        e_txt = F.normalize(self.language_head(text[:, 0, :]), dim=-1)
        v_hat = F.normalize(self.vision_head(vision[:, 1:, :]), dim=-1)
        return e_txt, v_hat

    # -- REC ------------------------------------------------------------------------------
    def forward_rec(self, images, text_ids, text_lengths=None):
        """-> dict boxes (B, 4) cxcywh in [0, 1], sim_logits (B, G, G)."""
        vision, text = self.encode(images, text_ids)
        e_txt, v_hat = self._embeddings(vision, text)
        sim = torch.einsum("bld,bd->bl", v_hat, e_txt)
        weights = sim.softmax(dim=-1)
        pooled = (weights.unsqueeze(-1) * self.visu_proj(vision[:, 1:, :])).sum(1)
        boxes = self.bbox_embed(pooled).sigmoid()
        grid = self.config.grid
        return {"boxes": boxes, "sim_logits": sim.view(-1, grid, grid)}

    def rec_loss(self, out, boxes, masks=None):
        """L1 + (1 - GIoU) summed / B, + focal x20 + dice x2 on the similarity map."""
        pred, batch = out["boxes"], boxes.shape[0]
        l1 = F.l1_loss(pred, boxes, reduction="none").sum() / batch
        giou = (1 - _giou(_box_xyxy(pred), _box_xyxy(boxes))).sum() / batch
        grid = self.config.grid
        if masks is None:
            target = _box_mask_target(boxes, self.config.img_size, grid)
        else:
            target = F.interpolate(masks[:, None].float(), size=(grid, grid), mode="nearest")[:, 0]
        logits, target = out["sim_logits"].flatten(1).float(), target.flatten(1)
        box_mask = 20 * _focal(logits, target) + 2 * _dice(logits, target)
        return {"loss": l1 + giou + box_mask, "l1": l1, "giou": giou, "box_mask": box_mask}

    # -- RES ------------------------------------------------------------------------------
    def forward_res(self, images, text_ids, text_lengths=None):
        """-> dict mask_logits (B, S, S), sim_logits (B, G, G)."""
        vision, text = self.encode(images, text_ids)
        e_txt, v_hat = self._embeddings(vision, text)
        grid = self.config.grid
        sim = torch.einsum("bld,bd->bl", v_hat, e_txt).view(-1, grid, grid)
        feats = vision[:, 1:, :].transpose(1, 2).reshape(vision.shape[0], -1, grid, grid)
        feats = F.normalize(self.seg_decoder(feats), dim=1)
        logits = torch.einsum("bchw,bc->bhw", feats, e_txt)
        size = self.config.img_size
        logits = F.interpolate(logits[:, None], size=(size, size), mode="bilinear",
                               align_corners=False)[:, 0]
        return {"mask_logits": logits, "sim_logits": sim}

    def res_loss(self, out, masks):
        logits = out["mask_logits"].flatten(1).float()
        target = masks.flatten(1).float()
        loss = 20 * _focal(logits, target) + 2 * _dice(logits, target)
        return {"loss": loss, "mask": loss}

    # -- MRefM ----------------------------------------------------------------------------
    def mim_loss(self, images, text_ids, text_lengths, boxes, image_mask, mim_targets,
                 use_vts: bool = False):
        """Referring MIM: CE of visual-token ids at masked patches + box-mask constraint."""
        vision, text = self.encode(images, text_ids, image_mask=image_mask)
        e_txt, v_hat = self._embeddings(vision, text)
        fused = F.normalize(e_txt[:, None, :] * v_hat, dim=-1)
        logits = self.mim_head(fused[image_mask])
        mim = F.cross_entropy(logits.float(), mim_targets[image_mask])
        sim = torch.einsum("bld,bd->bl", v_hat, e_txt)
        grid = self.config.grid
        target = _box_mask_target(boxes, self.config.img_size, grid).flatten(1)
        box_mask = 20 * _focal(sim.float(), target) + 2 * _dice(sim.float(), target)
        return {"loss": mim + box_mask, "mim": mim, "box_mask": box_mask}

    def mlm_loss(self, images, masked_text_ids, text_lengths, boxes, mlm_labels,
                 sts_targets=None, drop_worst: float = 0.0):
        """Referring MLM: label-smoothed CE at masked text positions + box-mask constraint."""
        vision, text = self.encode(images, masked_text_ids)
        e_txt, v_hat = self._embeddings(vision, text)
        picked = mlm_labels != -100
        logits = self.mlm_head(text[picked])
        mlm = F.cross_entropy(logits.float(), mlm_labels[picked], label_smoothing=0.1)
        sim = torch.einsum("bld,bd->bl", v_hat, e_txt)
        target = _box_mask_target(boxes, self.config.img_size, self.config.grid).flatten(1)
        box_mask = 20 * _focal(sim.float(), target) + 2 * _dice(sim.float(), target)
        return {"loss": mlm + box_mask, "mlm": mlm, "box_mask": box_mask}
