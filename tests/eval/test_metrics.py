"""Metrics against hand-computed cases and pycocotools."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from oneref.eval import RECAccumulator, RESAccumulator, box_iou, mask_intersection_union, rec_hits


def test_box_iou_hand_computed():
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3]])
    gt = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]])
    iou = box_iou(pred, gt)
    # 0.0625 / (0.25 + 0.25 - 0.0625) = 1/7
    assert iou.tolist() == pytest.approx([1 / 7, 1.0, 0.0])


def test_rec_hits_converts_and_clamps():
    # GT (cx,cy,w,h) = (0.5,0.5,0.4,0.4) -> [0.3,0.7]^2, area 0.16.
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]] * 3)
    pred = torch.tensor([
        [0.5, 0.5, 0.4, 0.4],    # identical -> 1.0
        [0.6, 0.5, 0.4, 0.4],    # shift 0.1 in x: I = 0.3*0.4 = 0.12, U = 0.2 -> 0.6
        [0.5, 0.5, 0.4, 0.8],    # h 0.8: I 0.16, U 0.32 -> 0.5 exactly (a hit)
    ])
    hits, ious = rec_hits(pred, gt)
    assert ious.tolist() == pytest.approx([1.0, 0.6, 0.5])
    assert hits.tolist() == [True, True, True]
    # Clamping: a box reaching outside the canvas is cut at 0 before the IoU.
    gt2 = torch.tensor([[0.1, 0.1, 0.2, 0.2]])     # [0, 0.2]^2, area 0.04
    pred2 = torch.tensor([[0.0, 0.0, 0.4, 0.4]])   # [-0.2, 0.2]^2 -> clamped [0, 0.2]^2
    hits2, ious2 = rec_hits(pred2, gt2)
    assert ious2.item() == pytest.approx(1.0) and hits2.item()
    hits3, ious3 = rec_hits(torch.tensor([[0.65, 0.5, 0.4, 0.4]]), gt[:1])
    assert ious3.item() == pytest.approx(0.1 / 0.22) and not hits3.item()


def test_rec_accumulator_sums_over_batches():
    acc = RECAccumulator()
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]] * 2)
    acc.update(torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.9, 0.9, 0.1, 0.1]]), gt)
    acc.update(torch.tensor([[0.6, 0.5, 0.4, 0.4]]), gt[:1])
    out = acc.compute()
    assert out["n"] == 3
    assert out["acc@0.5"] == pytest.approx(2 / 3)
    assert out["miou_box"] == pytest.approx((1.0 + 0.0 + 0.6) / 3)


def test_rec_bad_input():
    with pytest.raises(ValueError, match="pred_boxes"):
        rec_hits(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="gt_boxes"):
        rec_hits(torch.zeros(3, 4), [[0, 0, 1, 1]])


def test_res_accumulator_hand_computed():
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True          # 4 px
    gt[0, :2, :] = True             # 8 px -> I 4, U 8, IoU 0.5
    pred[1, :, :] = True            # 16 px
    gt[1, 0, 0] = True              # 1 px  -> I 1, U 16, IoU 1/16
    acc = RESAccumulator()
    acc.update(pred, gt.float())
    out = acc.compute()
    assert out["miou"] == pytest.approx((0.5 + 1 / 16) / 2)
    assert out["oiou"] == pytest.approx(5 / 24)   # global sums, not a mean of ratios
    assert out["prec@0.5"] == pytest.approx(0.5)
    assert out["prec@0.6"] == 0.0 and out["prec@0.9"] == 0.0
    assert out["n"] == 2


def test_mask_iou_matches_pycocotools():
    gen = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(6):
        h, w = 37, 53
        p = np.zeros((h, w), np.uint8)
        g = np.zeros((h, w), np.uint8)
        y, x = gen.integers(0, 20, 2)
        p[y:y + gen.integers(5, 17), x:x + gen.integers(5, 30)] = 1
        y, x = gen.integers(0, 20, 2)
        g[y:y + gen.integers(5, 17), x:x + gen.integers(5, 30)] = 1
        p |= (gen.random((h, w)) > 0.9).astype(np.uint8)
        preds.append(p)
        gts.append(g)
    inter, union = mask_intersection_union(torch.from_numpy(np.stack(preds)),
                                           torch.from_numpy(np.stack(gts)))
    ours = (inter / union).numpy()
    for i, (p, g) in enumerate(zip(preds, gts)):
        rp = mask_utils.encode(np.asfortranarray(p))
        rg = mask_utils.encode(np.asfortranarray(g))
        ref = mask_utils.iou([rp], [rg], [0])[0, 0]
        assert ours[i] == pytest.approx(ref, abs=1e-12)
    acc = RESAccumulator()
    acc.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(gts)))
    assert acc.compute()["miou"] == pytest.approx(float(ours.mean()))


def test_res_bad_input():
    with pytest.raises(ValueError, match="pred and gt"):
        mask_intersection_union(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
