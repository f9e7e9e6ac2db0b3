"""linear_cross_entropy kernel against the reference (Linear + F.cross_entropy).

Criterion: error against the fp64 reference at most 2x the error of the reference in the
same precision (plus a tiny absolute floor), for the loss and the gradients of x, weight
and bias.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import oneref.ops as ops
from oneref.kernels import cross_entropy
from oneref.ops import reference, use_backend

_CPU = [pytest.mark.interpret]
DEVICE_DTYPES = [pytest.param("cpu", torch.float32, marks=_CPU),
                 pytest.param("cpu", torch.float16, marks=_CPU),
                 pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]




def _inputs(n, d, v, bias, ignored, device, dtype):
    x = torch.randn(n, d, device=device).to(dtype)
    weight = (torch.randn(v, d, device=device) * d ** -0.5 * 2).to(dtype)
    b = (torch.randn(v, device=device) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), device=device)
    target[torch.rand(n, device=device) < ignored] = -100
    return x, weight, b, target


def _run(fn, x, weight, bias, target, cast, smoothing, reduction, **kwargs):
    leaves = [cast(t).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    loss = fn(leaves[0], leaves[1], target, leaves[2], -100, smoothing, reduction, **kwargs)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    loss.backward(grad_out.to(loss.dtype))
    return loss, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("n,d,v,bias,ignored,smoothing,reduction,chunk", [
    (21, 32, 97, True, 0.3, 0.1, "mean", 0),      # one chunk, odd sizes
    (21, 32, 97, False, 0.3, 0.0, "none", 0),
    (20, 16, 300, True, 0.2, 0.1, "mean", 8),    # several row chunks, a partial last one
    (20, 16, 300, True, 0.2, 0.1, "none", 8),
    (3, 16, 64010, True, 0.0, 0.1, "mean", 0),    # MLM vocabulary
    (3, 8, 8192, False, 0.0, 0.0, "none", 0),     # MIM vocabulary
    (1, 8, 5, True, 0.0, 0.0, "mean", 0),         # one row
])
def test_linear_cross_entropy(device, dtype, n, d, v, bias, ignored, smoothing, reduction,
                              chunk, poison_empty, assert_kernel_close):
    x, weight, b, target = _inputs(n, d, v, bias, ignored, device, dtype)
    got, got_grads = _run(cross_entropy.linear_cross_entropy, x, weight, b, target,
                          lambda t: t.clone(), smoothing, reduction, chunk_rows=chunk)
    same, same_grads = _run(reference.linear_cross_entropy, x, weight, b, target,
                            lambda t: t.clone(), smoothing, reduction)
    want, want_grads = _run(reference.linear_cross_entropy, x, weight, b, target,
                            lambda t: t.double(), smoothing, reduction)
    assert got.dtype == torch.float32 and got.shape == same.shape
    floor = 1e-6 * (1 + want.detach().abs().max().item())
    assert_kernel_close("loss", got, same, want, floor=floor)
    if reduction == "none":
        assert torch.all(got[target == -100] == 0)
    for name, g, s, w in zip(("x", "weight", "bias"), got_grads, same_grads, want_grads):
        if w is not None:
            assert g.dtype == dtype
            floor = 1e-6 * (1 + w.abs().max().item())
            assert_kernel_close(f"grad {name}", g, s, w, floor=floor)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_linear_cross_entropy_all_ignored(device, dtype):
    x, weight, b, target = _inputs(4, 8, 11, True, 1.0, device, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    mean = cross_entropy.linear_cross_entropy(*leaves[:2], target, leaves[2], label_smoothing=0.1)
    assert torch.isnan(mean) == torch.isnan(reference.linear_cross_entropy(x, weight, target, b))
    none = cross_entropy.linear_cross_entropy(*leaves[:2], target, leaves[2], reduction="none")
    assert torch.equal(none, torch.zeros(4, device=device))
    none.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


@pytest.mark.interpret
def test_linear_cross_entropy_no_grad_and_flops():
    x, weight, b, target = _inputs(5, 8, 13, True, 0.2, "cpu", torch.float32)
    with use_backend("triton"):
        got = ops.linear_cross_entropy(x, weight, target, b, label_smoothing=0.1)
    torch.testing.assert_close(got, reference.linear_cross_entropy(x, weight, target, b,
                                                                   label_smoothing=0.1))
    with FlopCounterMode(display=False) as counter:
        cross_entropy.linear_cross_entropy(x, weight, target, b)
    assert counter.get_total_flops() == 2 * 5 * 8 * 13
    x.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        cross_entropy.linear_cross_entropy(x, weight, target, b).backward()
    assert counter.get_total_flops() == 6 * 5 * 8 * 13


@pytest.mark.interpret
def test_linear_cross_entropy_opcheck():
    x, weight, b, target = _inputs(5, 8, 13, True, 0.2, "cpu", torch.float32)
    lib = torch.ops.oneref_triton
    torch.library.opcheck(lib.linear_cross_entropy_fwd.default,
                          (x, weight, target, b, -100, 0.1, True, True, 0))
    torch.library.opcheck(lib.linear_cross_entropy_bwd.default,
                          (torch.rand(5), x, weight, target, b, -100, 0.1, 0))


@pytest.mark.gpu
def test_my_ops_compile_fullgraph():
    """torch.compile sees the registered ops (no graph breaks) and matches eager."""
    from oneref.kernels import gather, losses, masking

    def step(x, mask, weight, bias, target, boxes, pred, noise):
        rows = gather.masked_gather(gather.apply_mask_token(x, mask, x[0, 0]), mask,
                                    num_rows=target.shape[0])
        loss = cross_entropy.linear_cross_entropy(rows, weight, target, bias,
                                                  label_smoothing=0.1)
        image_mask = masking.referring_mask(boxes, noise, 3)
        logits = pred[..., 0].reshape(-1, 3, 3)
        return (loss + losses.vts_loss(pred, boxes, 3) + losses.box_mask_loss(logits, boxes)
                + losses.sts_kl(pred[..., 1], pred[..., 2], ~image_mask))

    x = torch.randn(2, 9, 16, device="cuda", requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool, device="cuda")
    mask[:, 2:6] = True
    weight = torch.randn(11, 16, device="cuda", requires_grad=True)
    bias = torch.randn(11, device="cuda", requires_grad=True)
    target = torch.randint(0, 11, (8,), device="cuda")
    boxes = torch.rand(2, 4, device="cuda")
    pred = torch.randn(2, 9, 4, device="cuda", requires_grad=True)
    noise = torch.rand(2, 2, 9, device="cuda")
    args = (x, mask, weight, bias, target, boxes, pred, noise)
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    assert all(t.grad is not None for t in (x, weight, bias, pred))


@pytest.mark.interpret
def test_linear_cross_entropy_rejects_out_of_range_target():
    x, weight, b, target = _inputs(4, 8, 11, True, 0.0, "cpu", torch.float32)
    target[2] = 11
    with pytest.raises(RuntimeError, match="outside"):
        cross_entropy.linear_cross_entropy(x, weight, target, b)
