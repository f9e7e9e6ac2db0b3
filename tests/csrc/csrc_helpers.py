"""Input builders and comparisons shared by the tests of oneref._C."""

from __future__ import annotations

import torch

# Boxes that stress the rasterisation: corners on cell edges, at the border of the image,
# partly outside it, tiny (smaller than a cell), the whole image.
EDGE_BOXES = [
    [0.25, 0.25, 0.25, 0.25],  # corners exactly on grid lines (x1 * 24 = 3, x2 * 24 = 9)
    [0.02, 0.03, 0.04, 0.06],  # top-left corner
    [0.98, 0.97, 0.04, 0.06],  # bottom-right corner
    [0.0, 1.0, 0.3, 0.3],      # centred on a corner: half outside
    [0.4, 0.6, 0.001, 0.002],  # tiny, inside one cell
    [0.5, 0.5, 1.0, 1.0],      # the whole image
    [0.5, 0.5, 0.0, 0.0],      # degenerate
]


def make_boxes(batch: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(batch, 4) cx, cy, w, h: the edge cases first, then uniform random boxes."""
    gen = torch.Generator().manual_seed(seed)
    wh = torch.rand(batch, 2, generator=gen) * 0.9 + 0.02
    cxy = wh / 2 + torch.rand(batch, 2, generator=gen) * (1 - wh)
    boxes = torch.cat([cxy, wh], dim=1).double()
    fixed = torch.tensor(EDGE_BOXES, dtype=torch.float64)[:batch]
    boxes[: fixed.shape[0]] = fixed
    return boxes.to(dtype=dtype, device=device)


def assert_close(actual, expected, atol, rtol, what=""):
    """allclose that reports the max / mean difference and the number of mismatches."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{diff.numel()} mismatches, "
                           f"max diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}, "
                           f"first at {bad.nonzero()[0].tolist()}")
