"""Initial-weight schemes for training from scratch."""

import math

import pytest
import torch

from oneref import OneRef
from oneref.model.embeddings import POSITION_OFFSET
from oneref.train.init import initialise, sincos_1d, sincos_2d


def test_sincos_1d_matches_the_transformer_formula():
    codes = sincos_1d(torch.tensor([0, 3, 7]), 8)
    for row, pos in enumerate((0, 3, 7)):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert codes[row, i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert codes[row, 4 + i].item() == pytest.approx(math.cos(angle), abs=1e-12)


def test_sincos_2d_codes_rows_then_columns():
    grid, dim = 5, 16
    codes = sincos_2d(grid, dim)
    assert codes.shape == (grid * grid, dim)
    patch = 2 * grid + 3  # row 2, column 3 (row-major)
    torch.testing.assert_close(codes[patch, :8], sincos_1d(torch.tensor([2]), 8)[0])
    torch.testing.assert_close(codes[patch, 8:], sincos_1d(torch.tensor([3]), 8)[0])
    assert len({tuple(r) for r in codes.tolist()}) == grid * grid  # every patch distinct


@pytest.mark.parametrize("dim", [6, 10])
def test_sincos_2d_rejects_widths_not_divisible_by_4(dim):
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(3, dim)


def test_scratch_init_sets_position_codes_and_keeps_the_rest():
    torch.manual_seed(0)
    model = OneRef.from_config("tiny", heads=("rec",))
    before = model.embed.vision_pos.weight.detach().clone()
    text_before = model.embed.text_pos.weight.detach().clone()
    initialise(model, "scratch")
    table = model.embed.vision_pos.weight.detach()
    cfg = model.config
    first = POSITION_OFFSET + 1
    torch.testing.assert_close(table[first:first + cfg.num_patches],
                               sincos_2d(cfg.grid, cfg.embed_dim).float())
    torch.testing.assert_close(table[:first], before[:first])  # offset rows + CLS untouched
    text_table = model.embed.text_pos.weight.detach()
    rows = cfg.text_positions - POSITION_OFFSET
    torch.testing.assert_close(text_table[POSITION_OFFSET:],
                               sincos_1d(torch.arange(rows), cfg.embed_dim).float())
    torch.testing.assert_close(text_table[:POSITION_OFFSET], text_before[:POSITION_OFFSET])
    assert model.embed.text_embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.embed.vision_pos.weight.requires_grad


def test_unknown_init_scheme_is_named():
    with pytest.raises(ValueError, match="'xavier'"):
        initialise(OneRef.from_config("tiny", heads=("rec",)), "xavier")
