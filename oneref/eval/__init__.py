"""Evaluation: REC Acc@0.5 and RES mIoU / oIoU / Prec@X (docs/method.md, "Metrics"),
rank-reduced."""

from oneref.eval.metrics import (
    PREC_THRESHOLDS,
    RECAccumulator,
    RESAccumulator,
    box_iou,
    cxcywh_to_xyxy,
    mask_intersection_union,
    rec_hits,
)

__all__ = [
    "PREC_THRESHOLDS",
    "RECAccumulator",
    "RESAccumulator",
    "box_iou",
    "cxcywh_to_xyxy",
    "mask_intersection_union",
    "rec_hits",
]
