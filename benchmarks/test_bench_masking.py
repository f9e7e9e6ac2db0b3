"""benchmarks/README.md, G2: referring_mask (Triton) vs the eager reference (two argsorts per
row), on the MRefM shapes: B = 64 boxes, 24 x 24 grid. Run: ``pytest
benchmarks/test_bench_masking.py``."""

import pytest
import torch

from oneref.ops import draw_mask_noise, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, GRID = 64, 24


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    boxes = torch.cat([torch.rand(BATCH, 2, device="cuda", generator=gen),
                       torch.rand(BATCH, 2, device="cuda", generator=gen) * 0.8 + 0.05], 1)
    return boxes, draw_mask_noise(BATCH, GRID, generator=gen, device="cuda")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_referring_mask(benchmark, timed, inputs, impl):
    from oneref.kernels import masking

    fn = masking.referring_mask if impl == "triton" else reference.referring_mask
    boxes, noise = inputs
    assert torch.equal(masking.referring_mask(boxes, noise, GRID),
                       reference.referring_mask(boxes, noise, GRID))
    benchmark.group = "G2 referring_mask B=64 G=24"
    benchmark.extra_info["bytes"] = noise.numel() * 4 + BATCH * GRID * GRID
    timed(fn, boxes, noise, GRID, rounds=50, iterations=5)
