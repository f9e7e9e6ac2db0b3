"""referring_mask kernel against the reference: the masks must match bit for bit."""

import math

import pytest
import torch

from oneref.kernels import masking
from oneref.ops import draw_mask_noise, reference, use_backend
import oneref.ops as ops

CASES = [pytest.param("cpu", marks=pytest.mark.interpret),
         pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty returns buffers full of garbage (True for bool, NaN for floats)."""
    real_empty = torch.empty

    def empty(*size, **kwargs):
        out = real_empty(*size, **kwargs)
        return out.fill_(True if out.dtype == torch.bool else
                         float("nan") if out.is_floating_point() else 77)

    monkeypatch.setattr(torch, "empty", empty)


def _boxes(batch, device, edge=False):
    cxcy = torch.rand(batch, 2, device=device)
    wh = torch.rand(batch, 2, device=device) * 0.8 + 0.01
    boxes = torch.cat([cxcy, wh], 1)
    if edge:  # boxes touching or crossing the borders, a full-image box, a degenerate one
        boxes[0] = torch.tensor([0.5, 0.5, 1.0, 1.0])
        boxes[1 % batch] = torch.tensor([0.02, 0.98, 0.3, 0.3])
        boxes[2 % batch] = torch.tensor([0.4, 0.6, 0.0, 0.0])
        boxes[3 % batch] = torch.tensor([0.999, 0.001, 0.001, 0.001])
    return boxes


@pytest.mark.parametrize("device", CASES)
@pytest.mark.parametrize("batch,grid,outside,inside,edge", [
    (3, 24, 0.35, 0.75, False),   # the real grid: 576 patches
    (1, 24, 0.20, 0.55, True),    # batch 1
    (5, 7, 0.35, 0.75, True),     # edges, degenerate and tiny boxes
    (4, 9, 0.0, 1.0, True),       # nothing masked outside, all masked inside
    (4, 9, 1.0, 0.0, False),      # all masked outside, nothing masked inside
    (2, 13, 0.5, 0.9, False),
])
def test_referring_mask_matches_reference(device, batch, grid, outside, inside, edge, poisoned):
    boxes = _boxes(batch, device, edge)
    noise = draw_mask_noise(batch, grid, device=device)
    got = masking.referring_mask(boxes, noise, grid, outside, inside)
    want = reference.referring_mask(boxes, noise, grid, outside, inside)
    assert got.dtype == torch.bool and got.shape == (batch, grid * grid)
    mismatch = (got != want).nonzero().tolist()
    assert not mismatch, f"{len(mismatch)} mismatching patches, first {mismatch[:5]}"
    # Exact counts per region, as docs/method.md, "MRefM pre-training" states.
    x1, y1, x2, y2 = reference.grown_box_region(boxes, grid).unbind(-1)
    for b in range(batch):
        area = int((x2[b] - x1[b]) * (y2[b] - y1[b]))
        inside_mask = torch.zeros(grid, grid, dtype=torch.bool, device=device)
        inside_mask[y1[b]:y2[b], x1[b]:x2[b]] = True
        kept_inside = int((~got[b] & inside_mask.flatten()).sum())
        assert kept_inside == math.floor(area * (1.0 - inside))


@pytest.mark.interpret
def test_referring_mask_gpu_tiling_and_ties():
    """The GPU's 64 x 64 compare tiles (several i and j blocks), and tied noise values
    broken by patch index like a stable sort."""
    batch, grid = 3, 11
    boxes = _boxes(batch, "cpu", edge=True)
    noise = (draw_mask_noise(batch, grid) * 8).floor() / 8  # many ties
    got = torch.full((batch, grid * grid), True)
    keep_table = torch.floor(torch.arange(grid * grid + 1, dtype=torch.float64) * 0.25)
    masking._referring_mask_kernel[(batch, 2)](
        boxes, noise, keep_table.to(torch.int32), got, math.floor(grid * grid * 0.65),
        GRID=grid, L=grid * grid, BLOCK_I=64, BLOCK_J=64)
    # Ties ordered by index: the same order as a tiny index-proportional offset in float64.
    untied = noise.double() + torch.arange(grid * grid, dtype=torch.float64) * 1e-9
    want = reference.referring_mask(boxes, untied, grid)
    assert torch.equal(got, want)
    assert torch.equal(masking.referring_mask(boxes, noise, grid), want)


@pytest.mark.interpret
def test_referring_mask_dispatch_and_opcheck():
    boxes = _boxes(2, "cpu")
    noise = draw_mask_noise(2, 6, generator=torch.Generator().manual_seed(3))
    with use_backend("triton"):
        got = ops.referring_mask(boxes, noise, 6)
    assert torch.equal(got, reference.referring_mask(boxes, noise, 6))
    torch.library.opcheck(torch.ops.oneref_triton.referring_mask.default,
                          (boxes, noise, 6, 0.35, 0.75))
