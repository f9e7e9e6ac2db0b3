"""One conformance test per (op, backend) of the registry: the backend's implementation
against the reference on a fresh case (outputs and input gradients, fp32), skipped with the
backend's reasons where it cannot run here. Plus: the registry is the source of
``oneref.ops.__all__`` and of the extension's op list, and ``auto`` follows the policy."""

import json
from pathlib import Path

import pytest
import torch

import oneref.ops as ops
from oneref.ops import dispatch, policy
from oneref.ops.cases import CASES
from oneref.ops.registry import OPS, not_supported_reasons

PAIRS = [(op, backend) for op, spec in OPS.items() for backend in spec.impls]
CPU = torch.device("cpu")


def _float_leaves(args):
    return [a.clone().requires_grad_(True)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _run(fn, args, grad_of):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if not outs[0].is_floating_point():
        return outs, []
    gen = torch.Generator().manual_seed(1)
    sum(((out.float() * torch.randn(out.shape, generator=gen)).sum() for out in outs)
        ).backward()
    return tuple(out.detach() for out in outs), [a.grad for a in grad_of]


@pytest.mark.parametrize("op,backend", PAIRS, ids=[f"{o}-{b}" for o, b in PAIRS])
def test_backend_matches_reference(op, backend):
    reasons = dispatch.unavailable_reasons(backend, op, CPU)
    if reasons:
        pytest.skip("; ".join(reasons))
    case = CASES[op]
    args = case.inputs(seed=3, device=CPU, dtype=torch.float32)
    ours_args, ref_args = ((_float_leaves(args), _float_leaves(args)) if case.trains
                           else (args, args))
    grads_ours = [a for a in ours_args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads_ref = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
    out, grads = _run(OPS[op].impls[backend].load(), ours_args, grads_ours)
    expected, expected_grads = _run(OPS[op].reference, ref_args, grads_ref)
    rtol, atol = case.tolerance(torch.float32)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    # Boxes and targets are labels: kernels give them no gradient. The first input always
    # gets one.
    assert not grads or grads[0] is not None
    for got, want in zip(grads, expected_grads):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_public_ops_are_the_registry():
    dispatched = [name for name in ops.__all__ if name in OPS]
    assert dispatched == list(OPS)
    for name in OPS:
        assert callable(getattr(ops, name))


def test_extension_registers_the_cuda_ops_of_the_registry():
    if dispatch.unavailable_reasons("cuda", device=CPU):
        pytest.skip("the extension is not built")
    table = sorted(op for op, spec in OPS.items() if "cuda" in spec.impls)
    for op in table:
        assert hasattr(torch.ops.oneref, op), op


def test_not_supported_reasons_name_the_limit():
    assert not_supported_reasons("multiway_attention", "triton", "cuda", torch.float16, 64) == []
    assert "head dim 80" in not_supported_reasons("multiway_attention", "triton", "cuda",
                                                  torch.float16, 80)[0]
    assert "float64" in not_supported_reasons("masked_gather", "triton", "cuda",
                                              torch.float64)[0]
    assert not_supported_reasons("sts_kl", "cuda", "cuda") == ["cuda backend does not implement "
                                                               "sts_kl"]


def test_auto_follows_the_policy_and_falls_back_to_torch(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch, "unavailable_reasons", lambda backend, op=None, device=None: [])
    assert dispatch.choices("box_mask_loss", cuda, training=True)[0][0] == "cuda"
    assert dispatch.choices("multiway_attention", cuda, training=False)[0][0] == "triton"
    assert dispatch.choices("multiway_attention", cuda, training=True) == [
        ("torch", policy.choice("multiway_attention", "sm90", True)[1])]
    for training in (True, False):  # the packed form runs the same kernels: the same row
        assert dispatch.choices("packed_multiway_attention", cuda, training) == \
            dispatch.choices("multiway_attention", cuda, training)
    assert dispatch.choices("multiway_linear", cuda, training=True)[0] == (
        "torch", "not measured on sm90: the torch composite")
    assert dispatch.choices("box_mask_loss", cuda.__class__("cpu"), True)[0][0] == "torch"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert dispatch.choices("box_mask_loss", cuda, training=True)[0][0] == "torch"  # sm80


def test_policy_is_built_from_kernel_rows():
    env = {"device_type": "cuda", "capability": "9.0", "device_name": "H",
           "date_utc": "2026-01-02"}
    rows = [{"op": "vts_loss", "impl": "ours[cuda]", "shape": "fwd+bwd", "speedup": 3.0},
            {"op": "vts_loss", "impl": "ours[triton]", "shape": "fwd+bwd", "speedup": 1.5},
            {"op": "masked_gather", "impl": "ours[triton]", "shape": "x", "speedup": 1.2},
            {"op": "masked_gather", "impl": "ours[triton]", "shape": "y", "speedup": 0.9},
            {"op": "multiway_attention", "impl": "ours[auto]", "pass": "fwd", "speedup": 9.0}]
    table = policy.build_policy([{"environment": env, "kernel_rows": rows}])["sm90"]["ops"]
    assert table["vts_loss"]["train"]["backend"] == "cuda"
    assert "infer" not in table["vts_loss"]  # measured with a backward only
    assert table["masked_gather"]["infer"]["backend"] == "torch"  # slower in one case
    assert "multiway_attention" not in table  # ours[auto] is not a backend


def test_packed_attention_follows_its_own_row_once_measured(monkeypatch):
    """Until G1 measures the packed form it takes multiway_attention's choice; a row of its
    own then wins."""
    table = {"sm90": {"ops": {
        "multiway_attention": {"train": {"backend": "torch", "why": "unpacked"},
                               "infer": {"backend": "triton", "why": "unpacked"}},
        "packed_multiway_attention": {"train": {"backend": "triton", "why": "packed"}}}}}
    monkeypatch.setattr(policy, "_policy_cache", table)
    assert policy.choice("packed_multiway_attention", "sm90", True) == ("triton", "packed")
    assert policy.choice("packed_multiway_attention", "sm90", False) == ("triton", "unpacked")
    assert policy.choice("multiway_attention", "sm90", True) == ("torch", "unpacked")


def test_committed_policy_matches_the_committed_results():
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    files = sorted(results.glob("*/results.json")) + sorted(results.glob("*/*/results.json"))
    built = policy.build_policy([json.loads(f.read_text()) for f in files])
    assert built == policy.load_policy()


def test_every_op_has_a_case_at_both_sizes():
    """The shared cases (tests, micro-benchmarks, oneref bench): one per registry op; the
    benchmark size has OneRef-B's shapes and its batch follows the scale; bytes are counted."""
    assert set(CASES) == set(OPS)
    for op, case in CASES.items():
        small = case.inputs(0, CPU, torch.float32)
        again = case.inputs(0, CPU, torch.float32)
        for a, b in zip(small, again):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), op  # drawn from the seed alone
        assert case.bytes(small) > 0
    q = CASES["multiway_attention"].inputs(0, CPU, torch.float32, scale=0.5)[0]
    assert q.shape == (2, 641, 12, 64)
    x, mask = CASES["masked_gather"].inputs(0, CPU, torch.float16, scale=0.25)
    assert x.shape == (2, 576, 768) and x.dtype == torch.float16
    selected = int(mask.sum())
    assert CASES["masked_gather"].bytes((x, mask)) == 2 * 1152 + (3 * selected + 1152) * 1536
    args = CASES["multiway_add_layer_norm"].inputs(0, CPU, torch.bfloat16, 2)
    x, branch, dtype = args[0], args[1], args[-1]
    assert x.dtype == branch.dtype == dtype == torch.bfloat16  # the default residual_dtype
    assert not x.is_contiguous() and x.transpose(0, 1).is_contiguous()  # sequence-major
    # x, h twice, dh, dx, the branch, y and dy: eight bf16 passes (the branch's gradient is
    # dx itself without a drop-path scale); with one, or an fp32 stream, it is written too
    assert CASES["multiway_add_layer_norm"].bytes(args) == 2 * 641 * 768 * 16
    scaled = (*args[:-2], torch.ones(2), dtype)
    assert CASES["multiway_add_layer_norm"].bytes(scaled) == 2 * 641 * 768 * 18
    fp32_stream = (x.float(), *args[1:])
    assert CASES["multiway_add_layer_norm"].bytes(fp32_stream) == 2 * 641 * 768 * (20 + 8)
    assert not CASES["referring_mask"].trains
