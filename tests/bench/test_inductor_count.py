"""Kernel counts of compiled graphs (the speed-of-light report of engines (b+) and (e)):
extern and fused kernels of a small function against hand counts, and a compiled tiny
training step against its eager twin."""

import pytest
import torch

from oneref.bench.inductor_count import KernelRecorder
from oneref.bench.roofline import count_step, op_class

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def test_extern_and_fused_kernels_against_hand_counts():
    x, w = torch.randn(64, 32), torch.randn(32, 16)
    recorder = KernelRecorder()
    with recorder:
        out = _compiled(lambda x, w: ((x * 2 + 1) @ w).relu().sum())(x, w)
    torch.testing.assert_close(out, ((x * 2 + 1) @ w).relu().sum())
    ops = recorder.ops
    assert ops["aten.mm"] == {"calls": 1, "flops": 2 * 64 * 32 * 16,
                              "read": 4 * (64 * 32 + 32 * 16), "written": 4 * 64 * 16}
    fused = {name: c for name, c in ops.items() if name.startswith("inductor.")}
    assert all(op_class(name) == "memory" for name in fused)
    # x * 2 + 1 reads x and writes the GEMM's input; relu + sum reads its output
    assert sum(c["calls"] for c in fused.values()) == 2
    assert sum(c["read"] for c in fused.values()) == 4 * (64 * 32 + 64 * 16)
    assert sum(c["written"] for c in fused.values()) == 4 * (64 * 32 + 1)
    assert any("add" in name and "mul" in name for name in fused)
    assert recorder.saved_bytes == 0  # an inference graph saves nothing


def test_saved_bytes_of_a_forward_graph():
    x = torch.randn(128, 8, requires_grad=True)
    recorder = KernelRecorder()
    with recorder:
        loss = _compiled(lambda x: (x.sin() * x).sum())(x)
        loss.backward()
    torch.testing.assert_close(x.grad, x.detach().cos() * x.detach() + x.detach().sin())
    # the backward needs x (for sin, cos and the product): one fp32 (128, 8) tensor
    assert recorder.saved_bytes == 4 * 128 * 8


def test_recording_survives_the_compile_config_copy():
    """torch.compile deep-copies inductor's config (the pass with it) when it is called;
    kernels compiled later still reach this recorder."""
    recorder = KernelRecorder()
    with recorder:
        fn = _compiled(lambda x: x.exp() + 1)
        fn(torch.randn(16))
    assert sum(c["calls"] for c in recorder.ops.values()) == 1


def test_compiled_step_against_its_eager_twin():
    """Engine (e) runs the matmuls of (d) in fewer launches moving fewer bytes, and its
    eager optimizer step is counted once."""
    eager, compiled = count_step("d", "tiny", 2), count_step("e", "tiny", 2)
    gemm_flops = lambda counts: sum(c["flops"] for n, c in counts.items()  # noqa: E731
                                    if op_class(n) == "gemm")
    # inductor may compute a tiny matmul (a batch-2 head layer) in a fused kernel
    assert gemm_flops(compiled["ops"]) == pytest.approx(gemm_flops(eager["ops"]), rel=1e-2)
    total = lambda counts, key: sum(c[key] for c in counts.values())  # noqa: E731
    assert total(compiled["ops"], "calls") < total(eager["ops"], "calls")
    moved = lambda counts: total(counts, "read") + total(counts, "written")  # noqa: E731
    assert moved(compiled["ops"]) < moved(eager["ops"])
    assert compiled["ops"]["aten._fused_adamw_"]["calls"] == 1
    assert any(name.startswith("inductor.") for name in compiled["ops"])
    assert 0 < compiled["saved_bytes"]


def test_compiled_inference_forward_against_its_eager_twin():
    """The inference pass of (e): one forward graph, its matmuls those of (d)'s forward, in
    fewer launches; no optimizer, nothing saved."""
    eager, compiled = (count_step(key, "tiny", 2, pass_="infer") for key in ("d", "e"))
    gemm_flops = lambda counts: sum(c["flops"] for n, c in counts.items()  # noqa: E731
                                    if op_class(n) == "gemm")
    assert gemm_flops(compiled["ops"]) == pytest.approx(gemm_flops(eager["ops"]), rel=1e-2)
    total = lambda counts, key: sum(c[key] for c in counts.values())  # noqa: E731
    assert total(compiled["ops"], "calls") < total(eager["ops"], "calls")
    assert any(name.startswith("inductor.") for name in compiled["ops"])
    assert not any("adam" in name for name in compiled["ops"])
    assert compiled["saved_bytes"] == 0


def test_compiled_step_calls_the_triton_layer_norms_as_extern_kernels():
    """``e*``: inductor calls each fused LayerNorm (forward and backward) as one custom op,
    counted as its launches (two for the backward, as eager), and generates no LayerNorm
    of its own."""
    ops = count_step("e*", "tiny", 2)["ops"]
    depth = 2  # tiny: 2 blocks x (norm1, sub-LN, norm2, FFN sub-LN) + the final norm
    assert ops["oneref_triton.multiway_norm"]["calls"] == 4 * depth + 1
    assert ops["oneref_triton.multiway_norm_backward"]["calls"] == 2 * (4 * depth + 1)
    assert not any("native_layer_norm" in name for name in ops)
