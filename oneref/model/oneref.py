"""OneRef: a modality-shared BEiT-3 one-tower model for referring expression comprehension
(REC), segmentation (RES) and Mask Referring Modeling pre-training (MRefM).

Paper: "OneRef: Unified One-tower Expression Grounding and Segmentation with Mask Referring
Modeling", NeurIPS 2024, https://arxiv.org/abs/2410.08021. Backbone: BEiT-3,
https://arxiv.org/abs/2208.10442. Architecture details in docs/method.md.

Entry points and the heads each one uses (a head a step does not use gets no gradient; set
``model.touch_unused_parameters = True`` under DDP without ``find_unused_parameters``, which
adds ``0 * p`` for every trainable parameter so all of them take part in every step):

=============  ============================================================================
entry point    modules used (besides the encoder)
=============  ============================================================================
forward_rec    vision_head, language_head, rec_head (mask_token unused: no image mask)
forward_res    vision_head (similarity map only), language_head, res_head; rec_head with
               ``with_boxes=True``
res_loss       the RES logits: res_head, language_head (vision_head gets no gradient unless
               ``rec_weight > 0`` adds the REC losses of ``with_boxes``)
mim_loss       vision_head, language_head, mim_head (``proj`` for token targets, ``pixel``
               for the pixel fallback), vts_head when ``use_vts``; mask_token
mlm_loss       vision_head, language_head, mlm_head, sts_head when ``sts_targets`` is given
=============  ============================================================================

Under DDP call the steps through ``forward`` (``model(images, ids, lengths, task="mim_loss",
boxes=..., image_mask=...)``) so the wrapper sees every step; a model built with only the
heads a run needs (``heads=("rec",)``) has fewer idle parameters to begin with.
"""

from __future__ import annotations

import logging
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from oneref import ops
from oneref.ops.reference import DICE_WEIGHT, FOCAL_ALPHA, FOCAL_WEIGHT
from oneref.checkpoints import load_pretrained_state, read_pretrained, save_pretrained
from oneref.config import ModelConfig, get_config
from oneref.model import validation as check
from oneref.model.embeddings import MultiwayEmbedding
from oneref.model.encoder import MultiwayEncoder
from oneref.model.heads import MIMHead, MLMHead, RECHead, RESHead, pixel_targets, similarity_map
from oneref.model.layers import MLP
from oneref.model.losses import (box_cxcywh_to_xyxy, rec_losses, res_losses,
                                 similarity_constraint)

__all__ = ["OneRef", "EncoderOutput", "RECOutput", "RESOutput", "HEADS"]

logger = logging.getLogger(__name__)

HEADS = ("rec", "res", "mim", "vts", "mlm", "sts")
# Parameter-name prefixes of the BEiT-3 backbone (frozen in fine-tuning stage 1).
BACKBONE_PREFIXES = ("embed.", "encoder.")


class EncoderOutput(NamedTuple):
    vision: torch.Tensor  # (B, 1 + L, D): vision CLS then patches
    text: torch.Tensor  # (B, T, D)


class RECOutput(NamedTuple):
    boxes: torch.Tensor  # (B, 4) cx, cy, w, h in [0, 1] of the padded canvas
    sim_logits: torch.Tensor  # (B, G, G) cosine similarity of e_txt with each patch


class RESOutput(NamedTuple):
    mask_logits: torch.Tensor  # (B, img_size, img_size)
    sim_logits: torch.Tensor  # (B, G, G)
    boxes: torch.Tensor | None = None  # (B, 4) REC head boxes (forward_res(with_boxes=True))


class OneRef(nn.Module):
    """BEiT-3 multiway encoder + output projections + REC/RES/MRefM heads.

    Args:
        config: model shape (see :mod:`oneref.config`).
        heads: which task heads to build, a subset of ``("rec", "res", "mim", "vts", "mlm",
            "sts")`` (default all). The output projections are always built.
    """

    def __init__(self, config: ModelConfig, heads: Sequence[str] = HEADS) -> None:
        super().__init__()
        if isinstance(heads, str):
            heads = (heads,)
        unknown = sorted(set(heads) - set(HEADS))
        if unknown:
            raise ValueError(f"unknown heads {unknown}; choose from {list(HEADS)}")
        self.config = config
        self.heads = tuple(h for h in HEADS if h in heads)
        dim = config.embed_dim
        self.embed = MultiwayEmbedding(config)
        self.encoder = MultiwayEncoder(config)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        patch_dim = config.patch_size * config.patch_size * config.in_chans
        self.rec_head = RECHead(dim) if "rec" in heads else None
        self.res_head = RESHead(dim, config.res_upsamples) if "res" in heads else None
        self.mim_head = MIMHead(dim, config.mim_vocab, patch_dim) if "mim" in heads else None
        self.vts_head = MLP(dim, dim, 4, 3) if "vts" in heads else None
        self.mlm_head = MLMHead(dim, config.vocab_size) if "mlm" in heads else None
        self.sts_head = MLP(dim, dim, 1, 3) if "sts" in heads else None
        # Value checks (token ids and lengths, boxes, masks, MRefM targets) cost a host sync
        # each; a tuned loop may switch them off once its data pipeline is trusted.
        self.validate_inputs = True
        self.touch_unused_parameters = False
        self.apply(_init_weights)
        _normal_init(self.embed.cls_token)
        _normal_init(self.embed.mask_token)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, name_or_config: str | ModelConfig = "base",
                    heads: Sequence[str] = HEADS, **overrides) -> "OneRef":
        """Build from a preset name (``tiny``, ``small``, ``base``, ``large``) or a
        :class:`ModelConfig`, with field overrides (``img_size=...``)."""
        return cls(get_config(name_or_config, **overrides), heads=heads)

    @classmethod
    def from_pretrained(cls, path, map_location: str | torch.device = "cpu",
                        **overrides) -> "OneRef":
        """Load a directory written by :meth:`save_pretrained` (``model.safetensors`` +
        ``config.json``), in eval mode (``model.train()`` before fine-tuning it), with
        overrides of its config's :data:`~oneref.config.SHAPE_FREE_FIELDS`
        (``residual_dtype="params"``)."""
        config, heads, state = read_pretrained(path, map_location)
        config = config.with_shape_free(overrides, where=str(path))
        model = cls(config) if heads is None else cls(config, heads=heads)
        load_pretrained_state(model, state, path)
        return model.to(map_location).eval()

    def save_pretrained(self, path, state_dict: dict | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` into directory ``path`` (atomic);
        ``state_dict`` replaces this module's own (gathered weights of a sharded copy)."""
        save_pretrained(self, path, state_dict)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in the backward pass (activation checkpointing)."""
        self.encoder.grad_checkpointing = bool(enable)
        logger.info("activation checkpointing of the %d encoder blocks %s",
                    len(self.encoder.blocks), "on" if enable else "off")

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the BEiT-3 encoder incl. embeddings (frozen in stage 1)."""
        return (p for n, p in self.named_parameters() if n.startswith(BACKBONE_PREFIXES))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Output projections and task heads."""
        return (p for n, p in self.named_parameters() if not n.startswith(BACKBONE_PREFIXES))

    # ------------------------------------------------------------------ encoder
    @property
    def _patch_weight(self) -> torch.Tensor:
        """The patch-embedding weight: where the model's device and compute dtype are read."""
        return self.embed.patch_embed.weight

    def encode(self, images: torch.Tensor, text_ids: torch.Tensor, text_lengths: torch.Tensor,
               image_mask: torch.Tensor | None = None) -> EncoderOutput:
        """Joint encoding of ``[CLS, patches, text]``.

        Args:
            images: (B, C, img_size, img_size) normalised images.
            text_ids: (B, T) long, T <= max_text_len, padded at the end (pad id 1).
            text_lengths: (B,) integer in [1, T]: real tokens incl. ``<s>``/``</s>``.
            image_mask: (B, L) bool, True = patch replaced by the mask token, or None.
        Returns:
            :class:`EncoderOutput` with vision (B, 1 + L, D) and text (B, T, D).
        """
        self._check_inputs(images, text_ids, text_lengths, image_mask=image_mask)
        return self._encode(images, text_ids, text_lengths, image_mask)

    def relation_embeddings(self, images: torch.Tensor, text_ids: torch.Tensor,
                            text_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the target-relation scores compare: the normalised image embedding e_img
        (B, D) (vision head on the CLS token) and token embeddings w_hat (B, T, D) (language
        head on every text token) of the joint encoding."""
        enc = self.encode(images, text_ids, text_lengths)
        return (F.normalize(self.vision_head(enc.vision[:, 0]), dim=-1),
                F.normalize(self.language_head(enc.text), dim=-1))

    def _encode(self, images, text_ids, text_lengths, image_mask=None) -> EncoderOutput:
        """:meth:`encode` without the argument checks (callers have done them)."""
        x = self.embed(images, text_ids, text_lengths, image_mask)
        num_vision = self.config.num_vision
        x = self.encoder(x, text_lengths, num_vision)
        return EncoderOutput(x[:, :num_vision], x[:, num_vision:])

    def _check_inputs(self, images, text_ids, text_lengths, image_mask=None,
                      text_name: str = "text_ids") -> None:
        param = self._patch_weight
        check.check_images(images, self.config, param.dtype, param.device)
        batch = images.shape[0]
        check.check_text(text_ids, text_lengths, self.config, batch, param.device,
                         check_values=self._check_values, name=text_name)
        if image_mask is not None:
            check.check_image_mask(image_mask, self.config, batch, param.device)

    @property
    def _check_values(self) -> bool:
        """Value checks read tensors on the host: off when disabled or while compiling."""
        return self.validate_inputs and not torch.compiler.is_compiling()

    def _project(self, enc: EncoderOutput):
        """-> patches (B, L, D) raw, e_txt (B, D), v_hat (B, L, D), sim (B, L)."""
        patches = enc.vision[:, 1:]
        e_txt = F.normalize(self.language_head(enc.text[:, 0]), dim=-1)
        v_hat = F.normalize(self.vision_head(patches), dim=-1)
        return patches, e_txt, v_hat, similarity_map(e_txt, v_hat, self.config.sim_scale)

    def _grid(self, sim: torch.Tensor) -> torch.Tensor:
        grid = self.config.grid
        return sim.view(sim.shape[0], grid, grid)

    def _require(self, head: str) -> nn.Module:
        module = getattr(self, f"{head}_head")
        if module is None:
            raise ValueError(f"this model was built without the {head!r} head (heads="
                             f"{list(self.heads)}); build it with heads including {head!r}")
        return module

    # ------------------------------------------------------------------ REC / RES
    def forward_rec(self, images, text_ids, text_lengths) -> RECOutput:
        """Boxes (B, 4) cxcywh in [0, 1] and similarity logits (B, G, G)."""
        rec_head = self._require("rec")
        patches, e_txt, v_hat, sim = self._project(self.encode(images, text_ids, text_lengths))
        return RECOutput(rec_head(patches, sim), self._grid(sim))

    _TASKS = ("rec", "res", "encode", "mim_loss", "mlm_loss")

    def forward(self, *args, task: str = "rec", **kwargs):
        """Dispatch to an entry point so that a DDP wrapper sees every step through
        ``forward``: ``task`` in ``rec`` (forward_rec), ``res`` (forward_res), ``encode``,
        ``mim_loss``, ``mlm_loss``; the other arguments are passed through."""
        if task not in self._TASKS:
            raise ValueError(f"task must be one of {list(self._TASKS)}, got {task!r}")
        name = {"rec": "forward_rec", "res": "forward_res"}.get(task, task)
        return getattr(self, name)(*args, **kwargs)

    @torch.no_grad()
    def predict_boxes(self, images, text_ids, text_lengths) -> torch.Tensor:
        """Inference helper: (B, 4) boxes x1, y1, x2, y2 clamped to [0, 1], computed in eval
        mode (no drop path) and without gradients; each submodule's mode is restored."""
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            boxes = self.forward_rec(images, text_ids, text_lengths).boxes
        finally:
            for module, training in modes.items():
                module.training = training
        return box_cxcywh_to_xyxy(boxes).clamp(0, 1)

    def forward_res(self, images, text_ids, text_lengths, with_boxes: bool = False) -> RESOutput:
        """Mask logits (B, img_size, img_size): the head's cosines times
        ``config.sim_scale``; similarity logits (B, G, G); with ``with_boxes`` also the REC
        head's boxes from the same encoding (for ``res_loss(rec_weight > 0)``)."""
        res_head = self._require("res")
        rec_head = self._require("rec") if with_boxes else None
        patches, e_txt, v_hat, sim = self._project(self.encode(images, text_ids, text_lengths))
        mask_logits = res_head(patches, e_txt, self.config.img_size)
        if self.config.sim_scale != 1.0:
            mask_logits = mask_logits * self.config.sim_scale
        boxes = rec_head(patches, sim) if rec_head is not None else None
        return RESOutput(mask_logits, self._grid(sim), boxes)

    def rec_loss(self, out: RECOutput, boxes: torch.Tensor,
                 masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``loss = l1 + giou + box_mask`` (docs/method.md, "REC head"); ``masks`` (B, img, img)
        switches the similarity constraint from the rasterised box to the downsampled GT
        mask."""
        batch, device = out.boxes.shape[0], out.boxes.device
        check.check_boxes(boxes, batch, device, check_values=self._check_values)
        if masks is not None:
            check.check_masks(masks, self.config, batch, device,
                              check_values=self._check_values)
        return self._finish(rec_losses(out.boxes, out.sim_logits, boxes, masks))

    def res_loss(self, out: RESOutput, masks: torch.Tensor, focal_weight: float = FOCAL_WEIGHT,
                 dice_weight: float = DICE_WEIGHT, alpha: float = FOCAL_ALPHA,
                 boxes: torch.Tensor | None = None, rec_weight: float = 0.0
                 ) -> dict[str, torch.Tensor]:
        """``loss = seg`` = focal x20 + dice x2 of the mask logits, focal alpha 0.25
        (docs/method.md, "RES head"; a recipe may change the three). ``rec_weight > 0`` adds
        that multiple of the REC losses (:meth:`rec_loss`) of ``out.boxes`` against ``boxes``
        (B, 4): an auxiliary grounding signal that OneRef's RES does not use."""
        batch, device = out.mask_logits.shape[0], out.mask_logits.device
        check.check_masks(masks, self.config, batch, device,
                          check_values=self._check_values)
        losses = res_losses(out.mask_logits, masks, focal_weight, dice_weight, alpha)
        if rec_weight == 0.0:
            return self._finish(losses)
        if out.boxes is None or boxes is None:
            raise ValueError("res_loss with rec_weight > 0 needs out.boxes "
                             "(forward_res(..., with_boxes=True)) and the target boxes")
        check.check_boxes(boxes, batch, device, check_values=self._check_values)
        rec = rec_losses(out.boxes, out.sim_logits, boxes)
        return self._finish({**rec, **losses, "loss": losses["seg"] + rec_weight * rec["loss"]})

    # ------------------------------------------------------------------ MRefM
    def mim_loss(self, images, text_ids, text_lengths, boxes, image_mask,
                 mim_targets: torch.Tensor | None = None,
                 use_vts: bool = False) -> dict[str, torch.Tensor]:
        """Referring MIM step (image masked, text intact).

        Args:
            boxes: (B, 4) normalised cxcywh of the referred object.
            image_mask: (B, L) bool, True = masked (from :func:`oneref.ops.referring_mask`).
            mim_targets: (B, L) long visual-token ids in [0, mim_vocab), or None for the pixel
                fallback: MSE between ``mim_head.pixel`` predictions and per-patch normalised
                pixels (:func:`oneref.model.heads.pixel_targets`) at the masked patches.
            use_vts: add the visual target-relation score loss (needs the ``vts`` head).
        Returns:
            dict ``loss = mim + box_mask (+ vts)`` and each term.
        """
        mim_head = self._require("mim")
        vts_head = self._require("vts") if use_vts else None
        if image_mask is None:
            raise ValueError("image_mask is required for the MIM step (B, L) bool")
        self._check_inputs(images, text_ids, text_lengths, image_mask=image_mask)
        batch, device = images.shape[0], self._patch_weight.device
        check.check_boxes(boxes, batch, device, check_values=self._check_values)
        if mim_targets is not None:
            check.check_long("mim_targets", mim_targets, (batch, self.config.num_patches), device)
        if self._check_values:
            self._check_mim_values(image_mask, mim_targets)
        enc = self._encode(images, text_ids, text_lengths, image_mask)
        patches, e_txt, v_hat, sim = self._project(enc)
        joint = e_txt[:, None] * v_hat  # (B, L, D)
        feats = F.normalize(ops.masked_gather(joint, image_mask), dim=-1)  # (N, D)
        if mim_targets is not None:
            mim = mim_head.token_loss(feats, mim_targets[image_mask])
        else:
            targets = ops.masked_gather(pixel_targets(images, self.config.patch_size), image_mask)
            mim = mim_head.pixel_loss(feats, targets)
        box_mask = similarity_constraint(self._grid(sim), boxes)
        losses = {"mim": mim, "box_mask": box_mask}
        if vts_head is not None:
            losses["vts"] = ops.vts_loss(vts_head(joint), boxes, self.config.grid)
        losses["loss"] = sum(losses.values())
        return self._finish(losses)

    def _check_mim_values(self, image_mask, mim_targets) -> None:
        if mim_targets is None:
            if not bool(image_mask.any()):
                raise ValueError("image_mask has no masked patch; the MIM loss needs at least one")
            return
        masked = image_mask.sum()
        lo = torch.where(image_mask, mim_targets, 0).min()
        hi = torch.where(image_mask, mim_targets, 0).max()
        count, lo, hi = torch.stack([masked, lo, hi]).tolist()
        if count == 0:
            raise ValueError("image_mask has no masked patch; the MIM loss needs at least one")
        if lo < 0 or hi >= self.config.mim_vocab:
            raise ValueError(f"mim_targets at masked patches must be in [0, mim_vocab) = "
                             f"[0, {self.config.mim_vocab}), got values in [{lo}, {hi}]")

    def mlm_loss(self, images, masked_text_ids, text_lengths, boxes, mlm_labels,
                 sts_targets: torch.Tensor | None = None, drop_worst: float = 0.0,
                 label_smoothing: float = 0.1) -> dict[str, torch.Tensor]:
        """Referring MLM step (text masked, image intact).

        Args:
            masked_text_ids: (B, T) long, the masked text.
            mlm_labels: (B, T) long, original id at masked positions, -100 elsewhere.
            sts_targets: (B, T) float semantic target-relation labels (positions 1..T-2 that
                are real tokens are used), or None to skip the STS loss.
            drop_worst: fraction of the largest token losses left out (0.2 after step 12000).
        Returns:
            dict ``loss = mlm + box_mask (+ sts)`` and each term.
        """
        mlm_head = self._require("mlm")
        sts_head = self._require("sts") if sts_targets is not None else None
        if not 0.0 <= drop_worst < 1.0:
            raise ValueError(f"drop_worst must be in [0, 1), got {drop_worst}")
        self._check_inputs(images, masked_text_ids, text_lengths, text_name="masked_text_ids")
        batch, device = images.shape[0], self._patch_weight.device
        check.check_boxes(boxes, batch, device, check_values=self._check_values)
        num_text = masked_text_ids.shape[1]
        check.check_long("mlm_labels", mlm_labels, (batch, num_text), device)
        if sts_targets is not None:
            if not isinstance(sts_targets, torch.Tensor):
                raise TypeError(f"sts_targets must be a torch.Tensor, got "
                                f"{type(sts_targets).__name__}")
            check.same_device("sts_targets", sts_targets, device)
            if tuple(sts_targets.shape) != (batch, num_text) or not sts_targets.is_floating_point():
                raise ValueError(f"sts_targets must be a floating tensor of shape "
                                 f"({batch}, {num_text}), got {tuple(sts_targets.shape)} "
                                 f"{sts_targets.dtype}")
        selected = mlm_labels != -100
        if self._check_values:
            self._check_mlm_values(mlm_labels, selected)
        enc = self._encode(images, masked_text_ids, text_lengths)
        text = enc.text
        mlm = mlm_head.loss(ops.masked_gather(text, selected), mlm_labels[selected],
                            label_smoothing=label_smoothing, drop_worst=drop_worst)
        w_hat = F.normalize(self.language_head(text), dim=-1)  # (B, T, D)
        e_txt = w_hat[:, 0]
        v_hat = F.normalize(self.vision_head(enc.vision), dim=-1)  # (B, 1 + L, D)
        sim = similarity_map(e_txt, v_hat[:, 1:], self.config.sim_scale)
        losses = {"mlm": mlm, "box_mask": similarity_constraint(self._grid(sim), boxes)}
        if sts_head is not None:
            e_img = v_hat[:, 0]
            pred = sts_head(e_img[:, None] * w_hat)[..., 0]  # (B, T)
            pos = torch.arange(num_text, device=device)
            # positions 1..T-2 (not <s>, not the last slot) that hold real tokens
            valid = ((pos[None] >= 1) & (pos[None] <= num_text - 2)
                     & (pos[None] < text_lengths[:, None]))
            losses["sts"] = ops.sts_kl(pred, sts_targets.to(pred.dtype), valid)
        losses["loss"] = sum(losses.values())
        return self._finish(losses)

    def _check_mlm_values(self, mlm_labels, selected) -> None:
        vals = torch.where(selected, mlm_labels, 0)
        count, lo, hi = torch.stack([selected.sum(), vals.min(), vals.max()]).tolist()
        if count == 0:
            raise ValueError("mlm_labels has no masked position (all -100); the MLM loss needs one")
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"mlm_labels must be -100 or in [0, vocab_size) = "
                             f"[0, {self.config.vocab_size}), got values in [{lo}, {hi}]")

    def _finish(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.touch_unused_parameters and torch.is_grad_enabled():
            zero = sum(p.reshape(-1)[0] for p in self.parameters() if p.requires_grad)
            losses["loss"] = losses["loss"] + 0.0 * zero
        return losses


def _normal_init(tensor: torch.Tensor, std: float = 0.02) -> None:
    """BEiT's ``trunc_normal_(std=0.02)`` truncates at +-2 in absolute units (100 standard
    deviations), i.e. it is a plain normal; ``normal_`` draws it ~4x faster on CPU."""
    nn.init.normal_(tensor, std=std)


def _init_weights(module: nn.Module) -> None:
    """BEiT-style init: normal std 0.02 for Linear/Embedding/Conv weights, zero biases, unit
    LayerNorm/BatchNorm."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
        _normal_init(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
