"""Backend selection and argument checks of the public ops."""

import pytest
import torch

import oneref.ops as ops
from oneref.ops import dispatch, reference


def _attention_inputs(batch=2, seq=9, heads=2, dim=8):
    q, k, v = (torch.randn(batch, seq, heads, dim) for _ in range(3))
    return q, k, v, torch.tensor([1, 3][:batch])


def test_auto_on_cpu_runs_the_reference():
    q, k, v, lengths = _attention_inputs()
    out = ops.multiway_attention(q, k, v, lengths, 6)
    torch.testing.assert_close(out, reference.multiway_attention(q, k, v, lengths, 6))


def test_backend_choice_order(monkeypatch):
    monkeypatch.delenv("ONEREF_BACKEND", raising=False)
    assert ops.current_backend() == "auto"
    monkeypatch.setenv("ONEREF_BACKEND", "torch")
    assert ops.current_backend() == "torch"
    with ops.use_backend("triton"):
        assert ops.current_backend() == "triton"
        with ops.use_backend("auto"):
            assert ops.current_backend() == "auto"
    assert ops.current_backend() == "torch"


def test_per_op_backends_layer_over_the_outer_setting(monkeypatch):
    monkeypatch.delenv("ONEREF_BACKEND", raising=False)
    norm, linear = "multiway_layer_norm", "multiway_linear"
    with ops.use_backend({norm: "triton"}):
        assert ops.current_backend(norm) == "triton"
        assert ops.current_backend(linear) == ops.current_backend() == "auto"
        with ops.use_backend("torch"):  # a backend for every op wins inside its block
            assert ops.current_backend(norm) == ops.current_backend(linear) == "torch"
            with ops.use_backend({linear: "cuda"}):
                assert ops.current_backend(linear) == "cuda"
                assert ops.current_backend(norm) == "torch"
    assert ops.current_backend(norm) == "auto"


def test_per_op_backends_from_the_environment(monkeypatch):
    monkeypatch.setenv("ONEREF_BACKEND", " torch , multiway_layer_norm = triton ,")
    assert ops.current_backend("multiway_layer_norm") == "triton"
    assert ops.current_backend("multiway_linear") == ops.current_backend() == "torch"
    with ops.use_backend({"multiway_linear": "cuda"}):
        assert ops.current_backend("multiway_linear") == "cuda"
        assert ops.current_backend("multiway_layer_norm") == "triton"
    monkeypatch.setenv("ONEREF_BACKEND", "multiway_attention=torch")
    assert ops.current_backend("multiway_attention") == "torch"
    assert ops.current_backend("multiway_linear") == "auto"
    for empty in ("", " , "):  # an exported but empty setting is the default
        monkeypatch.setenv("ONEREF_BACKEND", empty)
        assert ops.current_backend("multiway_linear") == "auto"


def test_an_environment_list_is_parsed_once(monkeypatch):
    """Every op call looks its backend up: a comma list is parsed at its first lookup only."""
    parse, calls = dispatch._parse_environment, []
    monkeypatch.setattr(dispatch, "_parse_environment",
                        lambda value: calls.append(value) or parse(value))
    monkeypatch.setattr(dispatch, "_environment_settings", {})
    monkeypatch.setenv("ONEREF_BACKEND", "torch,multiway_linear=auto")
    for _ in range(3):
        assert ops.current_backend("multiway_linear") == "auto"
        assert ops.current_backend("multiway_attention") == "torch"
    assert calls == ["torch,multiway_linear=auto"]


@pytest.mark.parametrize("value, message", [
    ("torch,cuda", "names 2 backends for every op"),
    ("multiway_norm=triton", "ONEREF_BACKEND: unknown op.*'multiway_norm'"),
    ("multiway_linear=fast", r"ONEREF_BACKEND\['multiway_linear'\]: unknown backend 'fast'"),
    ("gpu,multiway_linear=torch", "ONEREF_BACKEND: unknown backend 'gpu'"),
    ("=triton", "ONEREF_BACKEND item '=triton': write op=backend"),
    ("auto,multiway_linear=", "ONEREF_BACKEND item 'multiway_linear=': write op=backend"),
    ("multiway_linear", "'multiway_linear' is an op: write multiway_linear=backend"),
    ("multiway_linear=torch,multiway_linear=cuda", "sets 'multiway_linear' twice"),
])
def test_environment_setting_errors_name_the_item(monkeypatch, value, message):
    monkeypatch.setenv("ONEREF_BACKEND", value)
    with pytest.raises(ValueError, match=message):
        ops.current_backend("multiway_linear")


def _triton_cannot_run(monkeypatch):
    """Resolve afresh, with the triton backend unable to run anything."""
    monkeypatch.delenv("ONEREF_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_candidates", {})
    real = dispatch.unavailable_reasons
    monkeypatch.setattr(dispatch, "unavailable_reasons",
                        lambda backend, op=None, device=None: ["no kernels here"]
                        if backend == "triton" else real(backend, op, device))


def test_per_op_backend_is_what_resolves(monkeypatch):
    """The op named in the mapping resolves to its backend (here one that cannot run, so it
    raises, naming where the setting came from); the others go on under the outer setting;
    the same op under another mapping is resolved apart."""
    _triton_cannot_run(monkeypatch)
    q, k, v, lengths = _attention_inputs()
    x, weight = torch.randn(2, 5, 4), torch.randn(3, 4)
    with ops.use_backend({"multiway_attention": "torch"}):
        ops.multiway_attention(q, k, v, lengths, 6)
    with ops.use_backend({"multiway_attention": "triton"}):
        with pytest.raises(ops.BackendUnavailableError,
                           match=r"multiway_attention: backend 'triton' \(use_backend\) cannot"):
            ops.multiway_attention(q, k, v, lengths, 6)
        out = ops.multiway_linear(x, 2, weight, None, weight, None)
    torch.testing.assert_close(out, x @ weight.T)
    monkeypatch.setenv("ONEREF_BACKEND", "multiway_attention=triton")
    with pytest.raises(ops.BackendUnavailableError,
                       match=r"\(ONEREF_BACKEND='multiway_attention=triton'\) cannot run here"):
        ops.prepare("cpu")


def test_per_op_backend_names_unknown_ops_and_backends():
    with pytest.raises(ValueError, match="unknown op.*'multiway_norm'; ops: multiway_attention"):
        with ops.use_backend({"multiway_norm": "triton"}):
            pass
    with pytest.raises(ValueError, match=r"use_backend\['multiway_linear'\]: unknown backend "
                                         "'fast'"):
        with ops.use_backend({"multiway_linear": "fast"}):
            pass
    with pytest.raises(TypeError, match=r"use_backend: expected a backend name or \{op: "
                                        r"backend\}, got NoneType"):
        with ops.use_backend(None):
            pass


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="choose one of"):
        with ops.use_backend("fast"):
            pass
    monkeypatch.setenv("ONEREF_BACKEND", "gpu")
    with pytest.raises(ValueError, match="ONEREF_BACKEND"):
        ops.current_backend()


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    _triton_cannot_run(monkeypatch)
    q, k, v, lengths = _attention_inputs()
    with pytest.raises(ops.BackendUnavailableError,
                       match=r"backend 'triton' \(backend=\) cannot run here: no kernels here"):
        ops.multiway_attention(q, k, v, lengths, 6, backend="triton")


def test_backend_status_reports_every_backend():
    status = ops.backend_status("cpu")
    assert set(status) == set(ops.BACKENDS)
    assert status["torch"] == []
    for name in ("cuda", "triton"):
        assert all(isinstance(reason, str) and reason for reason in status[name])


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda q, k, v, n: (q[..., :4], k, v, n), ValueError, "k must have shape"),
        (lambda q, k, v, n: (q, k.double(), v, n), TypeError, "k has dtype"),
        (lambda q, k, v, n: (q, k, v, n.float()), TypeError, "text_lengths must be an integer"),
        (lambda q, k, v, n: (q, k, v, n[:1]), ValueError, "text_lengths must have shape"),
        (lambda q, k, v, n: (q[0], k, v, n), ValueError, "q must have 4 dims"),
    ],
)
def test_attention_argument_errors(change, error, message):
    with pytest.raises(error, match=message):
        ops.multiway_attention(*change(*_attention_inputs()), 6)


@pytest.mark.parametrize("op", ["multiway_attention", "packed_multiway_attention"])
@pytest.mark.parametrize("mask, error, message", [
    (torch.ones(2, 8, dtype=torch.bool), ValueError, r"key_mask must have shape \(2, 9\)"),
    (torch.ones(2, 9), TypeError, "key_mask must be a bool tensor"),
    ([[True] * 9] * 2, TypeError, "key_mask"),
])
def test_key_mask_errors_name_it(op, mask, error, message):
    q, k, v, lengths = _attention_inputs()
    args = (q, k, v) if op == "multiway_attention" else (torch.stack([q, k, v], dim=2),)
    with pytest.raises(error, match=message):
        getattr(ops, op)(*args, lengths, 6, key_mask=mask)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda qkv, n: (qkv[:, :, :2], n), ValueError, r"qkv must be \(B, S, 3, H, Dh\)"),
        (lambda qkv, n: (qkv[0], n), ValueError, "qkv must have 5 dims"),
        (lambda qkv, n: (qkv.long(), n), TypeError, "qkv"),
        (lambda qkv, n: (qkv, n[:1]), ValueError, "text_lengths must have shape"),
    ],
)
def test_packed_attention_argument_errors(change, error, message):
    q, k, v, lengths = _attention_inputs()
    with pytest.raises(error, match=message):
        ops.packed_multiway_attention(*change(torch.stack([q, k, v], dim=2), lengths), 6)


def test_other_argument_errors():
    boxes = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 2, 16\)"):
        ops.referring_mask(boxes, torch.rand(2, 2, 15), 4)
    with pytest.raises(ValueError, match="outside_ratio must be in"):
        ops.referring_mask(boxes, torch.rand(2, 2, 16), 4, outside_ratio=1.5)
    with pytest.raises(ValueError, match=r"boxes must have shape \(2, 4\)"):
        ops.vts_loss(torch.rand(2, 16, 4), torch.rand(3, 4), 4)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        ops.masked_gather(torch.rand(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="activation must be"):
        ops.multiway_linear(torch.rand(1, 3, 4), 1, torch.rand(2, 4), None, torch.rand(2, 4),
                            None, activation="relu")
    with pytest.raises(ValueError, match=r"bias_b must have shape \(4,\)"):
        ops.multiway_layer_norm(torch.rand(1, 3, 4), 1, None, None, None, torch.rand(3))
    with pytest.raises(ValueError, match="num_vision must be in"):
        ops.multiway_layer_norm(torch.rand(1, 3, 4), 4, None, None, None, None)
    with pytest.raises(ValueError, match="reduction must be"):
        ops.linear_cross_entropy(torch.rand(2, 4), torch.rand(5, 4), torch.tensor([0, 1]),
                                 reduction="sum")
    with pytest.raises(ValueError, match=r"logits must be \(B, G, G\)"):
        ops.box_mask_loss(torch.rand(2, 3, 4), boxes)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        ops.focal_dice_loss(torch.rand(2, 5), torch.ones(2, 5), alpha=1.5)
    with pytest.raises(TypeError, match=r"target must be an int64 \(long\) tensor, got "
                                        r"torch.int32"):
        ops.linear_cross_entropy(torch.rand(2, 4), torch.rand(5, 4),
                                 torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype.*'bf16'"):
        ops.multiway_layer_norm(torch.rand(1, 3, 4), 1, None, None, None, None,
                                out_dtype="bf16")


def test_mask_noise_is_reproducible_from_a_generator():
    first = ops.draw_mask_noise(2, 4, torch.Generator().manual_seed(5))
    second = ops.draw_mask_noise(2, 4, torch.Generator().manual_seed(5))
    assert first.shape == (2, 2, 16) and torch.equal(first, second)


def test_matmul_ops_follow_autocast():
    x = torch.randn(1, 3, 4)
    wa, wb = torch.randn(2, 4), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.multiway_linear(x, 1, wa, None, wb, None)
        loss = ops.linear_cross_entropy(x[0], wa, torch.tensor([0, 1, 1]), reduction="none")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.multiway_linear(x, 1, wa, None, wb, None),
                               rtol=2e-2, atol=2e-2)
    assert loss.shape == (3,)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = ops.multiway_layer_norm(y, 1, torch.ones(2), None, torch.ones(2), None)
        kept = ops.multiway_layer_norm(y, 1, torch.ones(2), None, torch.ones(2), None,
                                       out_dtype=torch.float32)
    # fp32 statistics, the result in the dtype the next GEMM reads (or as asked)
    assert normed.dtype == torch.bfloat16 and kept.dtype == torch.float32
    torch.testing.assert_close(normed, kept.bfloat16(), rtol=0, atol=0)
    with pytest.raises(TypeError, match="weight_a has dtype"):
        ops.multiway_linear(x.half(), 1, wa, None, wb, None)


def test_explicit_backend_refuses_inputs_it_does_not_support():
    q, k, v, lengths = _attention_inputs(dim=8)
    if dispatch.unavailable_reasons("triton", "multiway_attention", "cpu"):
        pytest.skip("triton cannot run here")
    with pytest.raises(RuntimeError, match="cannot take these inputs: head dim 8"):
        ops.multiway_attention(q, k, v, lengths, 6, backend="triton")
