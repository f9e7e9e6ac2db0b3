"""Every op of the registry on every backend that declares it (``oneref.ops.registry.OPS``),
on the shared benchmark case (``oneref.ops.cases``: OneRef-B shapes, batch x ``SCALE``),
bf16 on a GPU. A row is checked against the reference before it is timed; it times forward
+ backward where the case trains (gradients for the arguments the case names), and
``extra_info`` holds what one call reads and writes (``bytes``, ``gbps`` = bytes / mean time)
and, for the compute-bound ops, its ``flops``. On a CPU the rows run the same code at the test size
(the backends with CPU kernels), so the benchmark itself is exercised without a GPU."""

import pytest
import torch

import oneref.ops as ops
from oneref.ops import dispatch
from oneref.ops.cases import CASES
from oneref.ops.registry import OPS

#: Batch multiplier of each op's benchmark case (the MLM-head and RES-mask losses at x1:
#: 1,600 masked tokens, 64 masks of 384 x 384).
SCALE = {"linear_cross_entropy": 1, "focal_dice_loss": 1}
PAIRS = [(op, backend) for op, spec in OPS.items() for backend in spec.impls]


def _call(fn, args, trains: bool):
    out = fn(*args)
    if trains:
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [torch.ones_like(o) for o in outs if o.requires_grad])
    return out


@pytest.mark.parametrize("op,backend", PAIRS, ids=[f"{o}-{b}" for o, b in PAIRS])
def test_bench_op(benchmark, timed, rotate, device, op, backend):
    reasons = dispatch.unavailable_reasons(backend, op, device)
    if reasons or (device.type == "cpu" and backend == "triton"):
        pytest.skip("; ".join(reasons) or "the Triton interpreter is no benchmark")
    case = CASES[op]
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    scale = SCALE.get(op, 8) if gpu else None
    inputs = [case.training_inputs(seed, device, dtype, scale) for seed in (0, 1)]
    fn = lambda *args: getattr(ops, op)(*args, backend=backend)  # noqa: E731
    rtol, atol = case.tolerance(dtype)
    with torch.no_grad():
        got, want = fn(*inputs[0]), OPS[op].reference(*inputs[0])
    for g, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol * 10)
    next_inputs = rotate(inputs)
    benchmark.group = f"{op} {'fwd+bwd' if case.trains else 'fwd'} {str(dtype)[6:]}"
    benchmark.extra_info["bytes"] = case.bytes(inputs[0])
    if case.flops is not None:
        benchmark.extra_info["flops"] = case.flops(inputs[0])
    result = timed(lambda: _call(fn, next_inputs(), case.trains), rounds=10 if gpu else 3,
                   iterations=3 if gpu else 1)
    assert result is not None
    benchmark.extra_info["gbps"] = case.bytes(inputs[0]) / benchmark.stats.stats.mean / 1e9
