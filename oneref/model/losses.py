"""Losses of OneRef (docs/method.md) that are not a single fused op.

REC: ``L1`` on normalised (cx, cy, w, h) summed over coordinates / B, plus ``(1 - GIoU) / B``
summed over the batch, plus the box-mask constraint on the similarity map
(:func:`oneref.ops.box_mask_loss`, or :func:`oneref.ops.focal_dice_loss` against the GT
segmentation mask downsampled to the patch grid when masks are given). RES: focal x20 +
dice x2 on the full-resolution mask logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oneref import ops
from oneref.ops.reference import DICE_WEIGHT, FOCAL_ALPHA, FOCAL_WEIGHT

__all__ = ["box_cxcywh_to_xyxy", "generalized_box_iou", "l1_box_loss", "giou_loss",
           "mask_to_grid", "similarity_constraint", "rec_losses", "res_losses"]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x1, y1, x2, y2."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise GIoU of matching xyxy boxes: (B, 4), (B, 4) -> (B,)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0)
    hull_area = hull.prod(-1)
    return iou - (hull_area - union) / (hull_area + eps)


def l1_box_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of |pred - target| over the 4 coordinates and the batch, divided by B."""
    return (pred.float() - target.float()).abs().sum() / pred.shape[0]


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of (1 - GIoU), divided by B. Boxes are cxcywh."""
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred.float()), box_cxcywh_to_xyxy(target.float()))
    return (1.0 - giou).sum() / pred.shape[0]


def mask_to_grid(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Full-resolution {0, 1} masks (B, H, W) -> (B, G, G) float, nearest sampling > 0.5."""
    small = F.interpolate(masks[:, None].float(), size=(grid, grid), mode="nearest")[:, 0]
    return (small > 0.5).float()


def similarity_constraint(sim_logits: torch.Tensor, boxes: torch.Tensor,
                          masks: torch.Tensor | None = None) -> torch.Tensor:
    """Box-mask constraint on (B, G, G) similarity logits: against the rasterised box, or
    against ``masks`` (B, H, W) downsampled to the grid when given."""
    if masks is None:
        return ops.box_mask_loss(sim_logits, boxes)
    return ops.focal_dice_loss(sim_logits, mask_to_grid(masks, sim_logits.shape[-1]))


def rec_losses(pred_boxes: torch.Tensor, sim_logits: torch.Tensor, boxes: torch.Tensor,
               masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """REC losses: dict with ``loss`` = ``l1 + giou + box_mask`` and each term."""
    l1 = l1_box_loss(pred_boxes, boxes)
    giou = giou_loss(pred_boxes, boxes)
    box_mask = similarity_constraint(sim_logits, boxes, masks)
    return {"loss": l1 + giou + box_mask, "l1": l1, "giou": giou, "box_mask": box_mask}


def res_losses(mask_logits: torch.Tensor, masks: torch.Tensor,
               focal_weight: float = FOCAL_WEIGHT, dice_weight: float = DICE_WEIGHT,
               alpha: float = FOCAL_ALPHA) -> dict[str, torch.Tensor]:
    """RES loss: focal x20 + dice x2 (focal alpha 0.25: OneRef's weights) of (B, H, W)
    logits against {0, 1} masks (B, H, W)."""
    seg = ops.focal_dice_loss(mask_logits, masks.to(mask_logits.dtype), focal_weight,
                              dice_weight, alpha)
    return {"loss": seg, "seg": seg}
