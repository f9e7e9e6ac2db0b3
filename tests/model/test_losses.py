"""Each loss against a value worked out by hand on a small example."""

import math

import pytest
import torch
import torch.nn.functional as F

from oneref.model.heads import MLMHead, MIMHead, RECHead, pixel_targets
from oneref.model.losses import (giou_loss, l1_box_loss, mask_to_grid, rec_losses, res_losses,
                                 similarity_constraint)
from oneref.ops import reference
from tests.model.conftest import make_batch

PRED = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]])
GT = torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])


def test_l1_sum_over_coords_over_batch():
    # |0.1| + 0 + 0 + 0 and 0.6 + 0.6 -> 1.3 / 2
    assert l1_box_loss(PRED, GT).item() == pytest.approx(0.65, abs=1e-6)


def test_giou_by_hand():
    # pair 1: inter 0.02, union 0.06, hull 0.06 -> GIoU 1/3
    # pair 2: disjoint, union 0.08, hull 0.8 * 0.8 -> GIoU -(0.64 - 0.08) / 0.64 = -0.875
    expected = ((1 - 1 / 3) + (1 + 0.875)) / 2
    assert giou_loss(PRED, GT).item() == pytest.approx(expected, abs=1e-5)
    assert giou_loss(GT, GT).item() == pytest.approx(0.0, abs=1e-5)


def test_res_focal_dice_by_hand():
    # zero logits: p = 0.5, CE = log 2, (1 - p_t)^2 = 1/4; half the 16 pixels are foreground:
    # focal = mean(alpha_t) * log2 / 4 = 0.5 * log 2 / 4; dice = 1 - (2*4 + 1) / (8 + 8 + 1)
    masks = torch.zeros(1, 4, 4)
    masks[:, :2] = 1
    out = res_losses(torch.zeros(1, 4, 4), masks)
    expected = 20 * 0.5 * math.log(2) / 4 + 2 * (1 - 9 / 17)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert set(out) == {"loss", "seg"}


def test_mask_to_grid_nearest():
    masks = torch.zeros(1, 8, 8)
    masks[0, :4, 2:8] = 1  # rows 0-3 -> grid rows 0-1; cols 2-7 -> grid cols 1-3
    grid = mask_to_grid(masks, 4)
    expected = torch.zeros(1, 4, 4)
    expected[0, :2, 1:] = 1
    torch.testing.assert_close(grid, expected)


def test_rec_losses_compose_with_box_or_mask_constraint():
    sim = torch.zeros(2, 4, 4)
    out = rec_losses(PRED, sim, GT)
    # box (0.6, 0.5, 0.2, 0.2) on a 4-grid: x in [2.0, 2.8) -> col 2; y in [1.6, 2.4) -> row 2
    target = reference.box_to_grid_mask(GT, 4)
    assert target[0].sum() == 1 and target[0, 2, 2] == 1
    torch.testing.assert_close(out["box_mask"], reference.focal_dice_loss(sim, target))
    torch.testing.assert_close(out["loss"], out["l1"] + out["giou"] + out["box_mask"])
    masks = torch.zeros(2, 8, 8)
    masks[:, :4, :4] = 1
    with_masks = similarity_constraint(sim, GT, masks)
    torch.testing.assert_close(with_masks,
                               reference.focal_dice_loss(sim, mask_to_grid(masks, 4)))


def test_rec_head_pooling_by_hand():
    head = RECHead(2)
    with torch.no_grad():
        head.visu_proj.weight.copy_(torch.eye(2))
        head.visu_proj.bias.copy_(torch.tensor([1.0, -1.0]))
        for layer in head.bbox_mlp.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        head.bbox_mlp.layers[0].weight.copy_(torch.eye(2))
        head.bbox_mlp.layers[1].weight.copy_(torch.eye(2))
        head.bbox_mlp.layers[2].weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]]))
    patches = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])
    sim = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [1/4, 3/4]
    # pooled = [0.5, 3]; visu_proj -> [1.5, 2]; relu(I .) twice -> [1.5, 2];
    # last -> [1.5, 2, 3.5, 0]
    expected = torch.sigmoid(torch.tensor([[1.5, 2.0, 3.5, 0.0]]))
    torch.testing.assert_close(head(patches, sim), expected)


def _smoothed_ce(logp, target, eps=0.1):
    return -(1 - eps) * logp[target] - eps / len(logp) * sum(logp)


def test_mlm_label_smoothing_and_drop_worst_by_hand():
    head = MLMHead(2, 3)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.tensor([0.0, math.log(2), math.log(3)]))  # p = 1/6, 2/6, 3/6
    logp = [math.log(1 / 6), math.log(2 / 6), math.log(3 / 6)]
    targets = torch.tensor([0, 1, 2, 2])
    per_row = [_smoothed_ce(logp, t) for t in targets.tolist()]  # 1.7320, 1.1082, 0.7433, 0.7433
    feats = torch.randn(4, 2)
    assert head.loss(feats, targets).item() == pytest.approx(sum(per_row) / 4, rel=1e-5)
    kept = sorted(per_row)[:3]  # int(4 * (1 - 0.25)) = 3 smallest kept
    assert head.loss(feats, targets, drop_worst=0.25).item() == pytest.approx(sum(kept) / 3,
                                                                            rel=1e-5)
    # int(4 * 0.8) = 3 as well
    assert head.loss(feats, targets, drop_worst=0.2).item() == pytest.approx(sum(kept) / 3,
                                                                           rel=1e-5)
    assert head.loss(feats, targets, label_smoothing=0.0).item() == pytest.approx(
        -(logp[0] + logp[1] + 2 * logp[2]) / 4, rel=1e-5)


def test_pixel_targets_by_hand():
    images = torch.arange(4.0).reshape(1, 1, 2, 2)
    # one patch of [0, 1, 2, 3]: mean 1.5, variance 1.25
    expected = (torch.tensor([0.0, 1, 2, 3]) - 1.5) / math.sqrt(1.25 + 1e-6)
    torch.testing.assert_close(pixel_targets(images, 2), expected.view(1, 1, 4))
    rgb = torch.randn(2, 3, 4, 4)
    t = pixel_targets(rgb, 2)
    assert t.shape == (2, 4, 12)
    torch.testing.assert_close(t[1, 3], F.layer_norm(rgb[1, :, 2:, 2:].permute(1, 2, 0).reshape(-1),
                                                     (12,), eps=1e-6))


def test_mim_token_loss_is_plain_ce():
    head = MIMHead(4, 5, 12)
    feats, targets = torch.randn(6, 4), torch.randint(0, 5, (6,))
    expected = F.cross_entropy(feats @ head.proj.weight.T + head.proj.bias, targets)
    torch.testing.assert_close(head.token_loss(feats, targets), expected)


def test_mim_and_mlm_steps_against_manual_recomputation(tiny):
    """The MRefM entry points recomputed by hand from the encoder outputs."""
    tiny.eval()
    c = tiny.config
    images, ids, lengths, boxes = make_batch(c, lengths=[3, 20])
    image_mask = torch.zeros(2, c.num_patches, dtype=torch.bool)
    image_mask[0, [1, 5]] = True
    image_mask[1, [0, 7, 15]] = True
    targets = torch.randint(0, c.mim_vocab, (2, c.num_patches))
    got = tiny.mim_loss(images, ids, lengths, boxes, image_mask, targets, use_vts=True)
    enc = tiny.encode(images, ids, lengths, image_mask)
    e_txt = F.normalize(enc.text[:, 0] @ tiny.language_head.weight.T, dim=-1)
    v_hat = F.normalize(enc.vision[:, 1:] @ tiny.vision_head.weight.T, dim=-1)
    joint = e_txt[:, None] * v_hat
    feats = F.normalize(joint[image_mask], dim=-1)
    logits = tiny.mim_head.proj(feats)
    torch.testing.assert_close(got["mim"], F.cross_entropy(logits, targets[image_mask]))
    sim = (e_txt[:, None] * v_hat).sum(-1).view(2, c.grid, c.grid)
    torch.testing.assert_close(got["box_mask"], reference.box_mask_loss(sim, boxes))
    torch.testing.assert_close(got["vts"], reference.vts_loss(tiny.vts_head(joint), boxes, c.grid))

    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, [2, 5]] = 7, torch.tensor([9, 11])
    sts_targets = torch.randn(2, c.max_text_len)
    got = tiny.mlm_loss(images, ids, lengths, boxes, labels, sts_targets)
    enc = tiny.encode(images, ids, lengths)
    sel = labels != -100
    ce = F.cross_entropy(tiny.mlm_head.proj(enc.text[sel]), labels[sel], label_smoothing=0.1)
    torch.testing.assert_close(got["mlm"], ce)
    w_hat = F.normalize(enc.text @ tiny.language_head.weight.T, dim=-1)
    e_img = F.normalize(enc.vision[:, 0] @ tiny.vision_head.weight.T, dim=-1)
    pred = tiny.sts_head(e_img[:, None] * w_hat)[..., 0]
    valid = torch.zeros(2, c.max_text_len, dtype=torch.bool)
    valid[0, 1:3] = True  # length 3: positions 1, 2
    valid[1, 1:20] = True  # length 20: positions 1..19 (<= T - 2 = 22)
    torch.testing.assert_close(got["sts"], reference.sts_kl(pred, sts_targets, valid))
