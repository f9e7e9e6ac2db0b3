"""C++ CPU kernels of referring_mask, masked_gather / masked_scatter and apply_mask_token
against oneref.ops.reference (bit-exact: these ops only select and copy)."""

from __future__ import annotations

import pytest
import torch

from oneref.ops import reference
from tests.csrc.csrc_helpers import make_boxes

RATIOS = [(0.35, 0.75), (0.0, 0.0), (1.0, 1.0), (0.5, 0.9), (0.2, 0.55)]


@pytest.mark.parametrize("grid", [24, 7, 1])
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("ratios", RATIOS)
def test_referring_mask_matches_reference(native_ops, grid, batch, ratios):
    boxes = make_boxes(batch, seed=grid + batch)
    noise = torch.rand(batch, 2, grid * grid, generator=torch.Generator().manual_seed(batch))
    got = native_ops.referring_mask(boxes, noise, grid, *ratios)
    expected = reference.referring_mask(boxes, noise, grid, *ratios)
    assert got.dtype == torch.bool and got.shape == (batch, grid * grid)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("noise_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_referring_mask_noise_dtypes(native_ops, noise_dtype):
    boxes = make_boxes(6, seed=3, dtype=torch.float64)
    # Distinct values in every dtype, so that the order is unique (no ties to break).
    noise = torch.stack([torch.randperm(576, generator=torch.Generator().manual_seed(s))
                         for s in range(12)]).reshape(6, 2, 576).to(noise_dtype) / 1024
    got = native_ops.referring_mask(boxes, noise, 24, 0.35, 0.75)
    assert torch.equal(got, reference.referring_mask(boxes, noise, 24))


def test_referring_mask_counts(native_ops):
    """Inside the grown box exactly floor(Lb * 0.25) cells are kept."""
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3]])
    noise = torch.rand(1, 2, 576, generator=torch.Generator().manual_seed(0))
    masked = native_ops.referring_mask(boxes, noise, 24, 0.35, 0.75).reshape(24, 24)
    x1, y1, x2, y2 = reference.grown_box_region(boxes, 24)[0].tolist()
    inside = masked[y1:y2, x1:x2]
    assert int((~inside).sum()) == (x2 - x1) * (y2 - y1) // 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
@pytest.mark.parametrize("shape", [(2, 641, 64), (1, 5, 3), (3, 577, 768)])
def test_masked_gather_scatter_match_reference(native_ops, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 100).to(dtype)
    mask = torch.rand(shape[:2], generator=gen) < 0.4
    rows = native_ops.masked_gather(x, mask, int(mask.sum()))
    assert torch.equal(rows, reference.masked_gather(x, mask))
    assert torch.equal(native_ops.masked_scatter(rows, mask), reference.masked_scatter(rows, mask))


def test_masked_gather_empty_and_full(native_ops):
    x = torch.randn(2, 9, 4)
    none = torch.zeros(2, 9, dtype=torch.bool)
    assert native_ops.masked_gather(x, none, 0).shape == (0, 4)
    assert torch.equal(native_ops.masked_scatter(x.new_zeros(0, 4), none), torch.zeros_like(x))
    full = ~none
    assert torch.equal(native_ops.masked_gather(x, full, 18), x.reshape(18, 4))


def test_masked_gather_scatter_gradients(native_ops):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 8, generator=gen, requires_grad=True)
    mask = torch.rand(2, 33, generator=gen) < 0.5
    weight = torch.randn(int(mask.sum()), 8, generator=gen)
    (native_ops.masked_gather(x, mask, int(mask.sum())) * weight).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (reference.masked_gather(x_ref, mask) * weight).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)

    rows = torch.randn(int(mask.sum()), 8, generator=gen, requires_grad=True)
    out_weight = torch.randn(2, 33, 8, generator=gen)
    (native_ops.masked_scatter(rows, mask) * out_weight).sum().backward()
    assert torch.equal(rows.grad, out_weight[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_mask_token_forward_backward(native_ops, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 577, 24, generator=gen).to(dtype).requires_grad_()
    token = torch.randn(24, generator=gen).to(dtype).requires_grad_()
    mask = torch.rand(3, 577, generator=gen) < 0.3
    out = native_ops.apply_mask_token(x, mask, token)
    x_ref, token_ref = x.detach().clone().requires_grad_(), token.detach().clone().requires_grad_()
    expected = reference.apply_mask_token(x_ref, mask, token_ref)
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    torch.testing.assert_close(token.grad, token_ref.grad, rtol=1e-2, atol=1e-2)
