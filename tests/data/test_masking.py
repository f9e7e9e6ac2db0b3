"""Referring MLM masking rule and referring-aware image masking (docs/method.md, "MRefM
pre-training")."""

import pytest
import torch

from oneref.data.masking import mask_count, mask_image, mask_text
from oneref.ops import reference

MASK_ID, VOCAB = 29, 30


def _ids(length, total=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(total, dtype=torch.long)
    ids[0], ids[length - 1] = 0, 2
    ids[1:length - 1] = torch.randint(4, MASK_ID, (length - 2,), generator=g)
    return ids


@pytest.mark.parametrize("length,expected", [(2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2),
                                             (10, 4), (12, 4), (24, 9)])
def test_mask_count_formula(length, expected):
    assert mask_count(length) == expected == max(1, min(round((length - 1) * 0.4), length - 1))


def test_counts_labels_and_range():
    g = torch.Generator().manual_seed(0)
    for length in range(2, 25):
        ids = _ids(length)
        masked, labels = mask_text(ids, length, torch.tensor([-1, -1]), MASK_ID, VOCAB, g)
        chosen = labels.ne(-100)
        assert chosen.sum().item() == mask_count(length)
        assert not chosen[0] and not chosen[length:].any()  # never <s>, never padding
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(masked[~chosen], ids[~chosen])


def test_subject_object_priority():
    g = torch.Generator().manual_seed(1)
    ids = _ids(11)
    for _ in range(20):
        _, labels = mask_text(ids, 11, torch.tensor([4, 9]), MASK_ID, VOCAB, g)
        assert labels[4] != -100 and labels[9] != -100  # n_mask = 4 >= 2
    _, labels = mask_text(_ids(4), 4, torch.tensor([2, 1]), MASK_ID, VOCAB, g)
    assert labels.ne(-100).nonzero().flatten().tolist() == [2]  # n_mask = 1: subject only
    # out-of-range positions are ignored, not trusted
    _, labels = mask_text(_ids(5), 5, torch.tensor([7, 0]), MASK_ID, VOCAB, g)
    assert labels.ne(-100).sum() == 2 and labels[0] == -100


def test_80_10_10_split_and_uniform_positions():
    g = torch.Generator().manual_seed(2)
    batch, length = 4000, 12
    ids = _ids(length).repeat(batch, 1)
    lengths = torch.full((batch,), length)
    positions = torch.full((batch, 2), -1)
    masked, labels = mask_text(ids, lengths, positions, MASK_ID, VOCAB, g)
    chosen = labels.ne(-100)
    assert chosen.sum().item() == batch * 4
    out = masked[chosen]
    orig = ids[chosen]
    frac_mask = (out == MASK_ID).float().mean().item()
    frac_random = ((out != MASK_ID) & (out != orig)).float().mean().item()
    assert frac_mask == pytest.approx(0.8, abs=0.015)
    # random ids in [3, V-1] sometimes equal the original: 10% * (1 - 1/27) differ
    assert frac_random == pytest.approx(0.1 * (1 - 1 / 27), abs=0.01)
    replaced = out[(out != MASK_ID) & (out != orig)]
    assert replaced.min() >= 3 and replaced.max() <= VOCAB - 1
    per_position = chosen.float().mean(0)[1:length]
    assert torch.allclose(per_position, torch.full_like(per_position, 4 / 11), atol=0.03)


def test_seeded_and_batched_matches_single():
    ids = torch.stack([_ids(9, seed=1), _ids(6, seed=2)])
    lengths = torch.tensor([9, 6])
    pos = torch.tensor([[3, 7], [2, -1]])
    a = mask_text(ids, lengths, pos, MASK_ID, VOCAB, torch.Generator().manual_seed(5))
    b = mask_text(ids, lengths, pos, MASK_ID, VOCAB, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = torch.Generator().manual_seed(5)
    first = mask_text(ids[0], 9, pos[0], MASK_ID, VOCAB, g)
    assert torch.equal(first[1], a[1][0])
    with pytest.raises(ValueError, match="length"):
        mask_text(ids[0], 30, pos[0], MASK_ID, VOCAB, g)
    with pytest.raises(ValueError, match="word_positions"):
        mask_text(ids, lengths, pos[:1], MASK_ID, VOCAB, g)


def test_mask_image_ratios_and_reference():
    boxes = torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.2, 0.3, 0.1, 0.2]])
    grid = 8
    mask = mask_image(boxes, grid, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 64) and mask.dtype == torch.bool
    noise = torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, reference.referring_mask(boxes, noise, grid))
    region = reference.grown_box_region(boxes, grid)[0].tolist()  # x1, y1, x2, y2
    x1, y1, x2, y2 = region
    inside = torch.zeros(grid, grid, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    area = int(inside.sum())
    assert mask[0][inside.flatten()].sum().item() == area - int(area * 0.25)
    assert mask[0][~inside.flatten()].float().mean().item() < 0.6
