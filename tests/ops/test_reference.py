"""The reference ops against hand-computed values: the oracle itself must be right."""

import math

import pytest
import torch
import torch.nn.functional as F

from oneref.ops import reference as ref


def test_key_padding_mask_marks_trailing_text_padding():
    valid = ref.key_padding_mask(torch.tensor([1, 3]), num_vision=2, seq_len=6)
    assert valid.tolist() == [[True, True, True, False, False, False],
                              [True, True, True, True, True, False]]


@pytest.mark.parametrize("text_len", [1, 5, 8])
def test_attention_ignores_padded_keys(text_len):
    batch, vision, text, heads, dim = 2, 7, 8, 3, 16
    q, k, v = (torch.randn(batch, vision + text, heads, dim, dtype=torch.float64)
               for _ in range(3))
    lengths = torch.full((batch,), text_len)
    out = ref.multiway_attention(q, k, v, lengths, vision)
    keep = vision + text_len
    # Equal to plain attention over the valid keys only.
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k[:, :keep].transpose(1, 2), v[:, :keep].transpose(1, 2)
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    # Changing padded keys/values changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[:, keep:] = 1e3
    v2[:, keep:] = -1e3
    torch.testing.assert_close(ref.multiway_attention(q, k2, v2, lengths, vision), out)


def test_multiway_linear_uses_each_expert_on_its_rows():
    x = torch.randn(2, 5, 4)
    wa, wb = torch.randn(3, 4), torch.randn(3, 4)
    ba, bb = torch.randn(3), torch.randn(3)
    y = ref.multiway_linear(x, 2, wa, ba, wb, bb, activation="gelu")
    torch.testing.assert_close(y[:, :2], F.gelu(x[:, :2] @ wa.T + ba))
    torch.testing.assert_close(y[:, 2:], F.gelu(x[:, 2:] @ wb.T + bb))


def test_grown_box_region_truncates_grows_and_clips():
    boxes = torch.tensor([[0.5, 0.5, 0.25, 0.5],     # x 0.375..0.625, y 0.25..0.75 on 24 cells
                          [0.02, 0.98, 0.04, 0.04]])  # touches the bottom-left corner
    region = ref.grown_box_region(boxes, 24)
    assert region.tolist() == [[8, 5, 16, 19], [0, 22, 1, 24]]


def test_referring_mask_counts_inside_and_outside():
    grid, batch = 24, 3
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.2, 0.3, 0.1, 0.5], [0.9, 0.9, 0.2, 0.2]])
    noise = torch.rand(batch, 2, grid * grid, generator=torch.Generator().manual_seed(1))
    masked = ref.referring_mask(boxes, noise, grid)
    x1, y1, x2, y2 = ref.grown_box_region(boxes, grid).unbind(-1)
    cells = torch.arange(grid * grid)
    col, row = cells % grid, cells // grid
    for b in range(batch):
        inside = (col >= x1[b]) & (col < x2[b]) & (row >= y1[b]) & (row < y2[b])
        area = int(inside.sum())
        assert int(masked[b][inside].sum()) == area - math.floor(area * 0.25)
        # Outside the box the global draw stands: masked iff not among the 374 smallest.
        global_rank = noise[b, 0].argsort().argsort()
        assert torch.equal(masked[b][~inside], (global_rank >= 374)[~inside])


@pytest.mark.parametrize("outside, inside, expected", [(0.0, 0.0, 0), (1.0, 1.0, 576)])
def test_referring_mask_extremes(outside, inside, expected):
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3]])
    masked = ref.referring_mask(boxes, torch.rand(1, 2, 576), 24, outside, inside)
    assert int(masked.sum()) == expected


def test_mask_token_gather_scatter_round_trip():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, False, False, True, False], [False, False, True, False, False]])
    token = torch.full((3,), 7.0)
    filled = ref.apply_mask_token(x, mask, token)
    assert torch.equal(filled[mask], token.expand(3, 3))
    assert torch.equal(filled[~mask], x[~mask])
    rows = ref.masked_gather(x, mask)
    assert torch.equal(rows, torch.stack([x[0, 0], x[0, 3], x[1, 2]]))
    back = ref.masked_scatter(rows, mask)
    assert torch.equal(back[mask], rows) and not back[~mask].any()


def test_vts_targets_hand_values():
    # Box centred at cell (12, 6) in patch units, 6 x 0.5 patches -> h clamped to 1.
    boxes = torch.tensor([[0.5, 0.25, 0.25, 0.5 / 24]])
    target = ref.vts_targets(boxes, 24)
    cell = 3 * 24 + 2  # row 3, column 2
    expected = torch.tensor([(2 - 12) / 24, (3 - 6) / 24, 1 / 6, 1.0])
    torch.testing.assert_close(target[0, cell], expected)
    assert ref.vts_loss(target, boxes, 24).item() == 0.0
    assert ref.vts_loss(target + 0.5, boxes, 24).item() == pytest.approx(2.0)


def test_box_to_grid_mask_samples_cell_corners():
    # x from 0.25 to 0.75 on a 4-cell grid -> columns 1 and 2 (1 <= c < 3).
    grid = ref.box_to_grid_mask(torch.tensor([[0.5, 0.375, 0.5, 0.25]]), 4)
    expected = torch.zeros(4, 4)
    expected[1, 1:3] = 1  # y from 0.25 to 0.5 -> row 1 only
    assert torch.equal(grid[0], expected)


def test_focal_and_dice_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 0.5 and 0.75
    target = torch.tensor([[1.0, 0.0]])
    # Focal: pixel 1: 0.25 * ln2 * 0.5^2; pixel 2: 0.75 * ln4 * 0.75^2; mean of the two.
    focal = (0.25 * math.log(2) * 0.25 + 0.75 * math.log(4) * 0.5625) / 2
    assert ref.sigmoid_focal_loss(logits, target).item() == pytest.approx(focal, rel=1e-6)
    dice = 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)
    assert ref.dice_loss(logits, target).item() == pytest.approx(dice, rel=1e-6)
    total = ref.focal_dice_loss(logits, target)
    assert total.item() == pytest.approx(20 * focal + 2 * dice, rel=1e-6)
    # alpha 0.6: the positive pixel weighs 0.6, the negative 0.4.
    focal_06 = (0.6 * math.log(2) * 0.25 + 0.4 * math.log(4) * 0.5625) / 2
    total = ref.focal_dice_loss(logits, target, 5.0, 1.0, alpha=0.6)
    assert total.item() == pytest.approx(5 * focal_06 + dice, rel=1e-6)


def test_box_mask_loss_is_focal_dice_on_the_rasterised_box():
    logits = torch.randn(2, 6, 6)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.6], [0.2, 0.8, 0.3, 0.3]])
    expected = ref.focal_dice_loss(logits, ref.box_to_grid_mask(boxes, 6))
    torch.testing.assert_close(ref.box_mask_loss(logits, boxes), expected)


def test_linear_cross_entropy_smoothing_and_ignore():
    x, weight = torch.randn(4, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    target = torch.tensor([1, -100, 6, 0])
    losses = ref.linear_cross_entropy(x, weight, target, label_smoothing=0.1, reduction="none")
    logp = (x @ weight.T).log_softmax(-1)
    for row in (0, 2, 3):
        expected = -(0.9 * logp[row, target[row]] + 0.1 * logp[row].mean())
        assert losses[row].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses[1].item() == 0.0
    mean = ref.linear_cross_entropy(x, weight, target, label_smoothing=0.1)
    assert mean.item() == pytest.approx(losses[[0, 2, 3]].mean().item(), rel=1e-6)


def test_sts_kl_matches_kl_div_on_valid_positions():
    pred, target = torch.randn(2, 6), torch.randn(2, 6)
    valid = torch.tensor([[False, True, True, True, False, False], [False] * 6])
    loss = ref.sts_kl(pred, target, valid)
    cols = valid[0]
    first = F.kl_div(pred[0, cols].log_softmax(-1), target[0, cols].softmax(-1), reduction="sum")
    assert loss.item() == pytest.approx(first.item() / 2, rel=1e-5)
