"""The per-task training step as one ``nn.Module`` (what DDP / FSDP / ``torch.compile`` wrap).

``TaskModule(model, task)(batch, mode)`` returns the loss dict of the model's loss method:

* ``rec``: ``forward_rec`` + ``rec_loss`` (L1 + GIoU + box-mask constraint);
* ``res``: ``forward_res`` + ``res_loss`` (focal + dice, optionally the REC losses as an
  auxiliary term; weights from ``ResLossConfig``);
* ``pretrain``: ``mode="mim"`` -> ``mim_loss`` (referring-aware image masking, VQ-KD or pixel
  targets, optional VTS); ``mode="mlm"`` -> ``mlm_loss`` (subject/object-first text masking,
  optional STS, drop-worst).

:class:`MRefMBatches` adds what an MRefM step needs to its batch (the step's mode, the
masks, the MIM targets) outside the compiled step. Its masks come from a dedicated
``torch.Generator`` (part of the checkpoint), so a resumed run masks exactly the same
positions.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from oneref.config import ModelConfig
from oneref.data.masking import mask_image, mask_text, random_mask_like
from oneref.model.vqkd import VQKDTokenizer
from oneref.train.config import PretrainConfig, ResLossConfig

__all__ = ["TaskModule", "MRefMBatches", "IMAGENET_MEAN", "IMAGENET_STD", "unnormalise",
           "prepare_mim", "prepare_mlm", "mrefm_mode", "mim_tokenizer"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mrefm_mode(step: int) -> str:
    """Even steps: referring MIM; odd steps: referring MLM (docs/method.md, "MRefM
    pre-training")."""
    return "mim" if step % 2 == 0 else "mlm"


def unnormalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, S, S) -> [0, 1] (the VQ-KD tokenizer's input)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0.0, 1.0)


def prepare_mim(batch: dict, grid: int, generator: torch.Generator, cfg: PretrainConfig,
                tokenizer: nn.Module | None) -> dict:
    """Add ``image_mask`` (B, G*G) bool (referring-aware masking, or random at its ratio
    with ``cfg.masking == "random"``; noise from ``generator``) and ``mim_targets`` (B, G*G)
    long from the VQ-KD tokenizer, or None (pixel target)."""
    mask = mask_image(batch["boxes"], grid, generator, cfg.outside_ratio, cfg.inside_ratio)
    batch["image_mask"] = random_mask_like(mask, generator) if cfg.masking == "random" else mask
    batch["mim_targets"] = (tokenizer(unnormalise(batch["images"])) if tokenizer is not None
                            else None)
    return batch


def prepare_mlm(batch: dict, generator: torch.Generator, cfg: PretrainConfig, mask_id: int,
                vocab_size: int) -> dict:
    """Add ``masked_text_ids`` (B, T) and ``mlm_labels`` (B, T) (-100 = not masked): subject
    word, then object word, then random positions (docs/method.md, "MRefM pre-training");
    uniform positions only with ``cfg.masking == "random"``."""
    ids = batch["text_ids"]
    positions = batch["word_positions"].cpu()
    if cfg.masking == "random":
        positions = torch.full_like(positions, -1)
    masked, labels = mask_text(ids.cpu(), batch["text_lengths"].cpu(), positions, mask_id,
                               vocab_size, generator, ratio=cfg.text_mask_ratio)
    batch["masked_text_ids"] = masked.to(ids.device)
    batch["mlm_labels"] = labels.to(ids.device)
    return batch


def mim_tokenizer(path: str, model: ModelConfig, device: torch.device) -> nn.Module | None:
    """The VQ-KD tokenizer of ``path`` on ``device``, its codebook checked against the
    model's ``mim_vocab``; None (the pixel target) when ``path`` is empty."""
    if not path:
        log.info("MIM targets: pixel fallback (no pretrain.vqkd_checkpoint given)")
        return None
    tokenizer = VQKDTokenizer.from_checkpoint(path, image_size=model.img_size)
    if tokenizer.codebook_size != model.mim_vocab:
        raise ValueError(f"VQ-KD codebook of {path} has {tokenizer.codebook_size} codes but "
                         f"the model's mim_vocab is {model.mim_vocab}")
    return tokenizer.to(device)


class MRefMBatches:
    """The MRefM part of a pre-training batch (docs/method.md, "MRefM pre-training").

    ``prepare(batch, step)`` adds the step's masks (and MIM targets) and returns its mode and
    drop-worst share, the extra arguments of :class:`TaskModule`.

    Args:
        model: the model's config (patch grid, vocabulary, MIM codebook size).
        cfg: the pre-training switches and ratios.
        mask_id: the tokenizer's [MASK] id.
        seed: seed of the masking generator (``generator``: checkpoint its state).
        device: where the VQ-KD tokenizer runs.
    """

    def __init__(self, model: ModelConfig, cfg: PretrainConfig, mask_id: int, seed: int,
                 device: torch.device) -> None:
        self.model, self.cfg, self.mask_id = model, cfg, mask_id
        self.generator = torch.Generator().manual_seed(seed)
        self.tokenizer = mim_tokenizer(cfg.vqkd_checkpoint, model, device)

    def prepare(self, batch: dict, step: int) -> tuple[str, float]:
        mode = mrefm_mode(step)
        if mode == "mim":
            prepare_mim(batch, self.model.grid, self.generator, self.cfg, self.tokenizer)
            return mode, 0.0
        prepare_mlm(batch, self.generator, self.cfg, self.mask_id, self.model.vocab_size)
        return mode, self.cfg.drop_worst if step >= self.cfg.drop_worst_after else 0.0


class TaskModule(nn.Module):
    """Loss of one task on one batch; the unit that distributed wrappers see.

    Args:
        model: a ``OneRef``.
        task: ``rec``, ``res`` or ``pretrain``.
        pretrain: VTS / STS switches for MRefM.
        res_loss: the RES loss weights (default OneRef's).
        seg_mask: REC's box-mask constraint against ``batch["masks"]`` (the segmentation
            where the sample has one, else its rasterised box) instead of the box.
    """

    def __init__(self, model: nn.Module, task: str, pretrain: PretrainConfig | None = None,
                 res_loss: ResLossConfig | None = None, seg_mask: bool = False):
        super().__init__()
        self.model = model
        self.task = task
        self.pretrain = pretrain or PretrainConfig()
        self.res_loss = res_loss or ResLossConfig()
        self.seg_mask = seg_mask

    def forward(self, batch: dict, mode: str = "", drop_worst: float = 0.0) -> dict:
        m = self.model
        if self.task == "rec":
            out = m.forward_rec(batch["images"], batch["text_ids"], batch["text_lengths"])
            return m.rec_loss(out, batch["boxes"], batch["masks"] if self.seg_mask else None)
        if self.task == "res":
            weights = self.res_loss
            out = m.forward_res(batch["images"], batch["text_ids"], batch["text_lengths"],
                                with_boxes=weights.rec_weight > 0)
            return m.res_loss(out, batch["masks"], focal_weight=weights.focal_weight,
                              dice_weight=weights.dice_weight, alpha=weights.focal_alpha,
                              boxes=batch["boxes"], rec_weight=weights.rec_weight)
        if mode == "mim":
            return m.mim_loss(batch["images"], batch["text_ids"], batch["text_lengths"],
                              batch["boxes"], batch["image_mask"], batch["mim_targets"],
                              use_vts=self.pretrain.vts)
        if mode == "mlm":
            sts = batch.get("sts_targets") if self.pretrain.sts else None
            if self.pretrain.sts and sts is None:
                raise ValueError("pretrain.sts is on but the batches carry no 'sts_targets' "
                                 "(teacher scores); turn STS off or use data with STS labels")
            return m.mlm_loss(batch["images"], batch["masked_text_ids"], batch["text_lengths"],
                              batch["boxes"], batch["mlm_labels"], sts, drop_worst=drop_worst)
        raise ValueError(f"pretrain step mode must be 'mim' or 'mlm', got {mode!r}")
