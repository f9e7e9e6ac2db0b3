"""masked_gather / masked_scatter / apply_mask_token kernels against the reference.

All three are copies, so the results (values and gradients) must be exact except the
token gradient, a sum over masked rows, checked against the fp64 sum.
"""

import pytest
import torch

import oneref.ops as ops
from oneref.kernels import gather
from oneref.ops import reference, use_backend

_CPU = [pytest.mark.interpret]
DEVICE_DTYPES = [pytest.param("cpu", torch.float32, marks=_CPU),
                 pytest.param("cpu", torch.float16, marks=_CPU),
                 pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]
SHAPES = [  # (B, L, D, masked fraction)
    (2, 641, 64, 0.4),     # the joint sequence length
    (1, 576, 96, 0.75),    # batch 1, the patch grid
    (3, 7, 1100, 0.5),     # D above one column block, odd sizes
    (2, 9, 5, 1.0),        # everything masked
    (2, 9, 5, 0.0),        # nothing masked
]


def _inputs(batch, length, dim, frac, device, dtype):
    x = torch.randn(batch, length, dim, device=device).to(dtype)
    mask = torch.rand(batch, length, device=device) < frac
    return x, mask


def _check_with_adjoint(op, ref, ref_adjoint, inp, mask):
    """op(inp, mask) equals ref(inp, mask) and its gradient for a random output gradient g
    equals ref_adjoint(g, mask) (gather and scatter are each other's adjoint); returns g."""
    leaf = inp.clone().requires_grad_()
    out = op(leaf, mask)
    assert torch.equal(out, ref(inp, mask))
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(leaf.grad, ref_adjoint(grad, mask))
    return grad


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("batch,length,dim,frac", SHAPES)
def test_masked_gather_scatter(device, dtype, batch, length, dim, frac, poison_empty):
    x, mask = _inputs(batch, length, dim, frac, device, dtype)
    grad_rows = _check_with_adjoint(gather.masked_gather, reference.masked_gather,
                                    reference.masked_scatter, x, mask)
    _check_with_adjoint(gather.masked_scatter, reference.masked_scatter,
                        reference.masked_gather, grad_rows, mask)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_masked_gather_given_count_and_strided_input(device, dtype):
    x, mask = _inputs(2, 33, 24, 0.5, device, dtype)
    wide = torch.randn(2, 33, 48, device=device).to(dtype)
    view = wide[..., ::2]  # non-unit column stride
    count = int(mask.sum())
    assert torch.equal(gather.masked_gather(view, mask, num_rows=count), view[mask])
    assert torch.equal(gather.masked_gather(x, mask, num_rows=count), x[mask])
    # A too small count drops rows and never writes out of bounds.
    assert gather.masked_gather(x, mask, num_rows=max(count - 3, 0)).shape[0] == max(count - 3, 0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("batch,length,dim,frac", SHAPES)
def test_apply_mask_token(device, dtype, batch, length, dim, frac, poison_empty):
    x, mask = _inputs(batch, length, dim, frac, device, dtype)
    token = torch.randn(dim, device=device).to(dtype)
    x_k, token_k = x.clone().requires_grad_(), token.clone().requires_grad_()
    out = gather.apply_mask_token(x_k, mask, token_k)
    assert torch.equal(out, reference.apply_mask_token(x, mask, token))
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x_k.grad, grad.masked_fill(mask[..., None], 0))
    oracle = grad.double()[mask].sum(0)
    x_t, token_t = x.clone().requires_grad_(), token.clone().requires_grad_()
    reference.apply_mask_token(x_t, mask, token_t).backward(grad)
    err = (token_k.grad.double() - oracle).abs().max()
    err_torch = (token_t.grad.double() - oracle).abs().max()
    assert err <= 2 * err_torch + 1e-6 * (1 + oracle.abs().max()), (err, err_torch)


@pytest.mark.interpret
def test_gather_dispatch_and_opcheck():
    x, mask = _inputs(2, 6, 8, 0.5, "cpu", torch.float32)
    token = torch.randn(8)
    with use_backend("triton"):
        assert torch.equal(ops.masked_gather(x, mask), x[mask])
        assert torch.equal(ops.masked_scatter(x[mask], mask),
                           reference.masked_scatter(x[mask], mask))
        assert torch.equal(ops.apply_mask_token(x, mask, token),
                           reference.apply_mask_token(x, mask, token))
    x.requires_grad_()
    rows = x.detach()[mask].requires_grad_()
    token.requires_grad_()
    torch.library.opcheck(torch.ops.oneref_triton.masked_gather.default, (x, mask, None))
    torch.library.opcheck(torch.ops.oneref_triton.masked_scatter.default, (rows, mask))
    torch.library.opcheck(torch.ops.oneref_triton.apply_mask_token.default, (x, mask, token))
