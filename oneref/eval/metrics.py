"""Referring metrics of docs/method.md, "Metrics": REC Acc@0.5, RES mIoU / oIoU / Prec@X.

Per-sample functions are pure tensor maths; the accumulators keep running *sums* (never
means) so that a distributed evaluation reduces exactly: ``oIoU = sum I / sum U`` over the
whole split on every rank, not a mean of per-rank ratios. With no initialised process group
the accumulators work in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from oneref.train.distributed import several_ranks

__all__ = [
    "cxcywh_to_xyxy",
    "box_iou",
    "rec_hits",
    "mask_intersection_union",
    "mask_ious",
    "RECAccumulator",
    "RESAccumulator",
    "PREC_THRESHOLDS",
]

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x1, y1, x2, y2 (same units)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_iou(pred_xyxy: torch.Tensor, gt_xyxy: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two (B, 4) x1y1x2y2 box sets -> (B,) float64.

    A degenerate union (both boxes of zero area) gives IoU 0.
    """
    pred, gt = pred_xyxy.double(), gt_xyxy.double()
    ix1 = torch.maximum(pred[:, 0], gt[:, 0])
    iy1 = torch.maximum(pred[:, 1], gt[:, 1])
    ix2 = torch.minimum(pred[:, 2], gt[:, 2])
    iy2 = torch.minimum(pred[:, 3], gt[:, 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_g = (gt[:, 2] - gt[:, 0]).clamp(min=0) * (gt[:, 3] - gt[:, 1]).clamp(min=0)
    union = area_p + area_g - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def _check_boxes(name: str, boxes) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be (B, 4) cx, cy, w, h, got shape {tuple(boxes.shape)}")


def rec_hits(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, threshold: float = 0.5):
    """REC hits and IoUs.

    Args:
        pred_boxes, gt_boxes: (B, 4) normalised cx, cy, w, h. Both are converted to x1y1x2y2
            and clamped to [0, 1] (the padded canvas) before the IoU.
        threshold: hit when IoU >= threshold.

    Returns:
        (hits (B,) bool, ious (B,) float64).
    """
    _check_boxes("pred_boxes", pred_boxes)
    _check_boxes("gt_boxes", gt_boxes)
    if pred_boxes.shape != gt_boxes.shape:
        raise ValueError(f"pred_boxes {tuple(pred_boxes.shape)} and gt_boxes "
                         f"{tuple(gt_boxes.shape)} must have the same shape")
    pred = cxcywh_to_xyxy(pred_boxes.detach().double()).clamp(0.0, 1.0)
    gt = cxcywh_to_xyxy(gt_boxes.detach().double().to(pred.device)).clamp(0.0, 1.0)
    ious = box_iou(pred, gt)
    return ious >= threshold, ious


def mask_intersection_union(pred: torch.Tensor, gt: torch.Tensor):
    """Per-sample pixel intersection and union of binary masks.

    Args:
        pred, gt: (B, H, W) bool or {0, 1} tensors on the same canvas (for RES the padded
            ``img_size`` canvas; ``pred`` is ``mask_logits > 0``).

    Returns:
        (intersection (B,) float64, union (B,) float64).
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(gt, torch.Tensor):
        raise TypeError("pred and gt must be torch.Tensors")
    if pred.dim() != 3 or pred.shape != gt.shape:
        raise ValueError(f"pred and gt must both be (B, H, W); got {tuple(pred.shape)} and "
                         f"{tuple(gt.shape)}")
    p = pred.detach().bool().flatten(1)
    g = gt.detach().to(p.device).bool().flatten(1)
    inter = (p & g).sum(1).double()
    union = (p | g).sum(1).double()
    return inter, union


def mask_ious(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-sample mask IoU from :func:`mask_intersection_union`; an empty prediction of an
    empty target is a perfect match (1)."""
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over all ranks when a process group is initialised."""
    if several_ranks():
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        values = values.to(device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


class RECAccumulator:
    """Running REC Acc@0.5 (and mean IoU) over batches; :meth:`compute` reduces over ranks.

    Sums kept: hits, samples, IoU. ``compute()`` returns ``{"acc@0.5", "miou_box", "n"}``.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64)  # hits, n, sum IoU

    def update(self, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> None:
        """Add a batch: pred_boxes, gt_boxes (B, 4) normalised cx, cy, w, h."""
        hits, ious = rec_hits(pred_boxes, gt_boxes, self.threshold)
        self._sums += torch.tensor([float(hits.sum()), float(hits.numel()), float(ious.sum())],
                                   dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        hits, n, iou = _all_reduce_sum(self._sums.clone()).tolist()
        denom = max(n, 1.0)
        return {f"acc@{self.threshold:g}": hits / denom, "miou_box": iou / denom, "n": int(n)}


class RESAccumulator:
    """Running RES metrics; :meth:`compute` reduces over ranks.

    Sums kept: per-sample IoU (for mIoU), total intersection and union (for oIoU), samples,
    and the count of samples with IoU >= t for every t in ``thresholds`` (Prec@t).
    ``compute()`` returns ``{"miou", "oiou", "prec@0.5", ..., "prec@0.9", "n"}``.
    """

    def __init__(self, thresholds=PREC_THRESHOLDS) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        # sum IoU, sum I, sum U, n, then one counter per threshold
        self._sums = torch.zeros(4 + len(self.thresholds), dtype=torch.float64)

    def update(self, pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> None:
        """Add a batch: pred_masks, gt_masks (B, H, W) binary (bool or {0, 1})."""
        inter, union = mask_intersection_union(pred_masks, gt_masks)
        ious = mask_ious(inter, union)
        counts = [float((ious >= t).sum()) for t in self.thresholds]
        self._sums += torch.tensor([float(ious.sum()), float(inter.sum()), float(union.sum()),
                                    float(ious.numel()), *counts], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        sums = _all_reduce_sum(self._sums.clone()).tolist()
        iou_sum, inter, union, n = sums[:4]
        denom = max(n, 1.0)
        out = {"miou": iou_sum / denom, "oiou": inter / union if union > 0 else 0.0}
        for t, count in zip(self.thresholds, sums[4:]):
            out[f"prec@{t:g}"] = count / denom
        out["n"] = int(n)
        return out
