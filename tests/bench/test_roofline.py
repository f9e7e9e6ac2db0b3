"""The speed-of-light report: op counting, batch extrapolation, the roofline prediction and
``oneref bench --cost`` end to end on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oneref.bench.main import main as bench_main
from oneref.bench.report import environment
from oneref.bench.roofline import (CARDS, LAUNCH_GAP_US, OpCounter, _at, against_prediction,
                                   against_prediction_markdown, card_of, count_step, op_class,
                                   predict, roofline_markdown)
from oneref.cli import main
from oneref.kernels.geometry import norm_backward_programs, norm_rows_per_program


def test_counter_records_flops_bytes_and_launches():
    a, b, bias = torch.randn(8, 16), torch.randn(16, 4), torch.randn(4)
    counter = OpCounter()
    with counter:
        y = torch.addmm(bias, a, b)
        y.t().contiguous()  # a view (free) and a copy (one launch)
        y.add_(1.0)  # in place: read and written
        torch.promote_types(y.dtype, torch.bfloat16)  # dispatched, but no kernel
    mm = counter.ops["aten.addmm"]
    assert mm["calls"] == 1 and mm["flops"] == 2 * 8 * 16 * 4
    assert mm["read"] == 4 * (4 + 8 * 16 + 16 * 4) and mm["written"] == 4 * 8 * 4
    assert "aten.t" not in counter.ops and counter.ops["aten.clone"]["calls"] == 1
    assert "aten.promote_types" not in counter.ops
    assert counter.ops["aten.add_"]["written"] == 4 * 8 * 4
    assert counter.ops["aten.add_"]["read"] == 4 * 8 * 4  # in place: read, then written


def test_counter_destinations_and_broadcasts():
    a, out = torch.randn(8, 16), torch.empty(8, 16)
    counter = OpCounter()
    with counter:
        torch.add(a, 1.0, out=out)  # out= is written, not read
        out.copy_(a)  # the destination of a copy is not read
        torch.randn(1, 16).expand(8, 16) + a  # a broadcast row is read once
    add = counter.ops["aten.add"]
    assert add["read"] == 4 * (128 + 16 + 128) and add["written"] == 4 * 2 * 128
    assert counter.ops["aten.copy_"] == {"calls": 1, "flops": 0.0, "read": 512.0,
                                         "written": 512.0}


def test_layer_norm_backward_counts_cudas_two_kernels():
    """CUDA computes a LayerNorm's input gradient and its parameter gradients in two
    kernels, each reading the output gradient and the input; the input's alone in one."""
    x, weight, bias = torch.randn(6, 8), torch.randn(8), torch.randn(8)
    y, mean, rstd = torch.native_layer_norm(x, (8,), weight, bias, 1e-5)
    grad, one_pass = torch.randn(6, 8), 4 * (2 * 48 + 8 + 8 + 6 + 6)
    for mask, calls, read in (([True, True, True], 2, one_pass + 4 * 2 * 48),
                              ([True, False, False], 1, one_pass),
                              ([False, True, True], 1, one_pass)):
        counter = OpCounter()
        with counter:
            torch.ops.aten.native_layer_norm_backward(grad, x, (8,), mean, rstd, weight,
                                                      bias, mask)
        record = counter.ops["aten.native_layer_norm_backward"]
        assert (record["calls"], record["read"]) == (calls, read), mask


def test_triton_layer_norm_backward_counts_its_partial_sums():
    """The Triton LayerNorm backward: its kernel, which also writes one fp32 (4, D) partial
    per program (one per 512 rows of 8 on a GPU, at most two per SM), then their sum."""
    import oneref.kernels.layer_norm  # noqa: F401 - registers the ops

    x, weight = torch.randn(2, 513, 8), torch.randn(8)
    _, y, mean, rstd = torch.ops.oneref_triton.multiway_norm(
        x, None, None, 3, weight, weight, weight, weight, 1e-5, False, torch.float32)
    dy = torch.randn_like(y)
    counter = OpCounter()
    with counter:
        dx, _, grads = torch.ops.oneref_triton.multiway_norm_backward(
            dy, None, x, None, mean, rstd, weight, weight, 3, False, None)
    rows = 2 * 513
    parts = 3 * 4 * 8 * 4
    args = 4 * (2 * rows * 8 + 2 * rows + 2 * 8)
    assert counter.ops["oneref_triton.multiway_norm_backward"] == {
        "calls": 2, "flops": 0.0, "read": args + parts,
        "written": 4 * rows * 8 + 4 * 4 * 8 + parts}
    assert grads.shape == (4, 8) and dx.shape == x.shape
    # OneRef-B at batch 64: two programs per SM; a few rows: one per chunk of rows
    assert norm_backward_programs(64 * 641, norm_rows_per_program(768), 264) == 264
    assert norm_rows_per_program(3072) == 1 and norm_rows_per_program(641) == 4
    assert norm_backward_programs(10, 1, 264) == 10


def test_extrapolation_and_prediction():
    two = {"aten.mm": {"calls": 2, "flops": 2e12, "read": 1.5e9, "written": 1e9}}
    three = {"aten.mm": {"calls": 3, "flops": 3e12, "read": 2e9, "written": 1e9}}
    at = _at(two, three, 5, batches=(2, 3))["aten.mm"]
    assert at == {"calls": 3, "flops": 5e12, "read": 3e9, "written": 1e9}
    out = predict({"aten.mm": at}, "H100")
    seconds = max(5e12 / (CARDS["H100"]["tflops"] * 1e12), 4e9 / (CARDS["H100"]["gbps"] * 1e9))
    assert out["step_ms"] == pytest.approx(1e3 * seconds + 3 * LAUNCH_GAP_US * 1e-3)
    assert out["mfu"] == pytest.approx(5e12 / (out["step_ms"] * 1e-3 * 787e12))
    assert [op_class(n) for n in ("aten.mm", "aten.convolution_backward",
                                  "aten._scaled_dot_product_flash_attention_for_cpu",
                                  "aten._fused_adamw_", "aten.native_layer_norm",
                                  "aten._foreach_norm", "aten._foreach_copy_")] == [
        "gemm", "gemm", "attention", "optimizer", "memory", "optimizer", "memory"]


def test_count_step_grows_with_the_batch():
    one, two = count_step("c", "tiny", 1), count_step("c", "tiny", 2)
    assert one["ops"]["aten.mm"]["flops"] < two["ops"]["aten.mm"]["flops"]
    assert one["ops"]["aten._fused_adamw_"]["calls"] == 1  # the optimizer step is counted
    assert 0 < one["saved_bytes"] < two["saved_bytes"]


def test_inference_forward_is_counted_as_its_kernels():
    """The inference pass: the forward alone (no backward, no optimizer, nothing saved), its
    composites counted as the kernels they decompose into, linear in the batch."""
    one, two = (count_step("d", "tiny", b, pass_="infer") for b in (1, 2))
    train = count_step("d", "tiny", 2)
    assert "aten.addmm" in two["ops"] and "aten.linear" not in two["ops"]
    assert not any("backward" in name or "adam" in name for name in two["ops"])
    assert one["saved_bytes"] == two["saved_bytes"] == 0
    flops = lambda c: sum(op["flops"] for op in c["ops"].values())  # noqa: E731
    assert flops(one) < flops(two) and 2.5 < flops(train) / flops(two) < 3.5
    with pytest.raises(ValueError, match="pass_ must be one of"):
        count_step("d", "tiny", 2, pass_="eval")


def test_bench_cost_writes_the_report(tmp_path, capsys):
    assert main(["bench", "--cost", "--presets", "tiny", "--engines", "b,d", "--batch", "8",
                 "--infer-batch", "16", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "roofline.json").read_text())["rows"]
    assert [(r["pass"], r["engine"], r["card"], r["batch"]) for r in rows] == [
        (p, e, c, b) for p, b in (("train", 8), ("infer", 16)) for e in "bd"
        for c in ("H100", "H200")]
    assert all(r["step_ms"] > 0 and 0 < r["mfu"] < 1 and r["top_ops"] for r in rows)
    table = (tmp_path / "roofline.md").read_text()
    assert table == roofline_markdown(rows) + "\n" and "| tiny, 8 | (d) | H200 |" in table
    assert "one REC training step" in table and "one REC inference forward" in table
    train_head, infer_head = (line for line in table.splitlines()
                              if line.startswith("| preset, batch"))
    assert "optimizer ms | step ms" in train_head and train_head.endswith("saved MB/sample |")
    assert "optimizer" not in infer_head and "memory ms | forward ms" in infer_head
    assert infer_head.endswith("| launches |") and "saved" not in infer_head
    (b_infer,) = [r for r in rows if r["pass"] == "infer" and r["card"] == "H100"
                  and r["engine"] == "b"]
    (d_infer,) = [r for r in rows if r["pass"] == "infer" and r["card"] == "H100"
                  and r["engine"] == "d"]
    speedup = b_infer["step_ms"] / d_infer["step_ms"]
    assert "| tiny, 16 | (d) | H100 |" in table and f" | {speedup:.2f}x | " in table
    assert main(["bench", "--cost", "--presets", "tiny", "--engines", "c", "--batch", "8",
                 "--infer-batch", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "roofline.json").read_text())["rows"]
    assert {r["pass"] for r in rows} == {"train"} and "| - |" in roofline_markdown(rows)
    assert main(["bench", "--cost", "--engines", "f", "--presets", "tiny",
                 "--out", str(tmp_path)]) == 2
    assert "predicts engines a, b, b+, c, d, d*, e, e*" in capsys.readouterr().err


def test_unmeasured_kernels_count_as_their_launches():
    """``d*``: each fused LayerNorm call is one launch of the Triton forward and two of its
    backward (the kernel, then the sum of its fp32 partials, written and read once), and
    the step moves fewer bytes in fewer launches than (d)."""
    plain, fused = count_step("d", "tiny", 2), count_step("d*", "tiny", 2)
    ops = fused["ops"]
    depth = 2  # tiny: 2 blocks x (norm1, sub-LN, norm2, FFN sub-LN) + the final norm
    calls = 4 * depth + 1
    assert ops["oneref_triton.multiway_norm"]["calls"] == calls
    assert ops["oneref_triton.multiway_norm_backward"]["calls"] == 2 * calls
    assert not any("native_layer_norm" in name for name in ops)
    total = lambda counts, key: sum(c[key] for c in counts.values())  # noqa: E731
    assert total(ops, "calls") < total(plain["ops"], "calls")
    moved = lambda counts: total(counts, "read") + total(counts, "written")  # noqa: E731
    assert moved(ops) < moved(plain["ops"])


def test_bf16_matmuls_are_computed_in_fp32_and_counted_as_bf16():
    a, b, bias = (torch.randn(*s).bfloat16() for s in ((8, 16), (16, 4), (4,)))
    out = torch.empty(8, 4, dtype=torch.bfloat16)
    counter = OpCounter()
    with counter:
        y = torch.mm(a, b)
        torch.addmm(bias, a, b, out=out)  # out= is written back
    want = (a.float() @ b.float()).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    torch.testing.assert_close(out, (bias.float() + a.float() @ b.float()).bfloat16())
    assert counter.ops["aten.mm"]["read"] == 2 * (8 * 16 + 16 * 4)  # bf16 bytes
    assert counter.ops["aten.addmm"]["written"] == 2 * 8 * 4


def _predicted(engine, card, step_ms):
    return {"preset": "base", "batch": 64, "engine": engine, "card": card, "step_ms": step_ms,
            "mfu": 0.3}


def _measured(engine, step_s, busy_ms=None, batch=64, infer_s=None):
    row = {"preset": "base", "engine": engine, "rec_train_batch": batch,
           "rec_train_step_s": {"median_s": step_s}, "row": "G4"}
    if infer_s is not None:  # a G5 row: inference at batch 256
        row |= {"rec_infer_large_batch": 256, "rec_infer_large_s": {"median_s": infer_s}}
    if busy_ms is not None:
        row["rec_train_profile"] = {"busy_ms": busy_ms, "wall_ms": 1e3 * step_s, "top": []}
    return row


def test_measured_steps_beside_their_predictions():
    predicted = [_predicted("c", "H100", 100.0), _predicted("d", "H100", 90.0),
                 _predicted("d", "H200", 70.0)]
    measured = [_measured("c", 0.120, busy_ms=110.0), _measured("d", 0.180),
                _measured("e", 0.050), _measured("c", 0.300, batch=128)]
    rows = against_prediction(measured, predicted, "NVIDIA H100 80GB HBM3")
    # (e) and batch 128 have no prediction; the H200 row is another card's
    assert [(r["engine"], r["predicted_ms"]) for r in rows] == [("c", 100.0), ("d", 90.0)]
    assert rows[0]["ratio"] == pytest.approx(1.2) and rows[0]["busy_ms"] == 110.0
    assert rows[1]["ratio"] == pytest.approx(2.0) and rows[1]["busy_ms"] is None
    table = "\n".join(against_prediction_markdown(rows, "cost.json"))
    assert "| train | base, 64 | (c) | 120.0 | 110.0 | 100.0 (30.0%) | 1.20x |" in table
    assert "| train | base, 64 | (d) | 180.0 | - | 90.0 (30.0%) | 2.00x **gap** |" in table
    assert "cost.json, H100" in table
    assert card_of("NVIDIA H200") == "H200" and card_of("AMD EPYC 7B13") is None
    assert card_of("NVIDIA H100 PCIe") is None and card_of("NVIDIA GH200 480GB") is None
    assert against_prediction(measured, predicted, "AMD EPYC 7B13") == []
    assert against_prediction_markdown([], "cost.json") == []


def test_measured_inference_beside_its_prediction():
    """G5's batch-256 forward against the inference pass's prediction at that batch; the
    training prediction of a file without passes is matched as training."""
    old_format = _predicted("d", "H100", 90.0)
    infer = _predicted("d", "H100", 40.0) | {"pass": "infer", "batch": 256}
    measured = [_measured("d", 0.090, infer_s=0.060)]
    rows = against_prediction(measured, [old_format, infer], "NVIDIA H100 80GB HBM3")
    assert [(r["pass"], r["predicted_ms"], r["ratio"]) for r in rows] == [
        ("train", 90.0, pytest.approx(1.0)), ("infer", 40.0, pytest.approx(1.5))]
    assert rows[1]["busy_ms"] is None
    table = "\n".join(against_prediction_markdown(rows, "cost.json"))
    assert "| infer | base, 256 | (d) | 60.0 | - | 40.0 (30.0%) | 1.50x **gap** |" in table


def test_bench_merge_sets_the_committed_prediction_beside_the_measurement(tmp_path):
    """``--merge --predicted`` (what the GPU check runs) with the committed cost report."""
    committed = sorted(Path(__file__).parents[2].glob("benchmarks/results/cost-*/roofline.json"))
    predicted = json.loads(committed[-1].read_text())["rows"]
    step_ms = next(r["step_ms"] for r in predicted if r["engine"] == "d" and r["card"] == "H100"
                   and r.get("pass", "train") == "train")
    env = environment(torch.device("cpu")) | {"device_name": "NVIDIA H100 80GB HBM3"}
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"environment": env, "rows": ["G4"],
                                "model_rows": [_measured("d", 2e-3 * step_ms)]}))
    out = tmp_path / "merged"
    assert bench_main(["--merge", str(part), "--predicted", str(committed[-1]),
                       "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert f"| base, 64 | (d) | {2 * step_ms:.1f} | - | {step_ms:.1f}" in summary
    assert "2.00x **gap**" in summary
    merged = json.loads((out / "results.json").read_text())
    assert merged["against_prediction"][0]["ratio"] == pytest.approx(2.0)


def test_parts_collected_by_the_gpu_check_merge_later(tmp_path):
    """``benchmarks/collect_parts.py`` (run by the GPU check after each part) gathers the
    readable parts into one list, naming one it cannot read; ``--merge`` takes that list."""
    env = environment(torch.device("cpu")) | {"device_name": "NVIDIA H100 80GB HBM3"}
    paths = [tmp_path / f"{engine}.json" for engine in ("c", "d")] + [tmp_path / "cut.json"]
    for path, engine in zip(paths, "cd"):
        path.write_text(json.dumps({"environment": env, "rows": ["G4"],
                                    "model_rows": [_measured(engine, 0.1)]}))
    paths[2].write_text('{"environment": ')  # a part killed as it wrote
    parts = tmp_path / "parts.json"
    script = Path(__file__).parents[2] / "benchmarks" / "collect_parts.py"
    done = subprocess.run([sys.executable, str(script), str(parts), *map(str, paths)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and f"{paths[2]}: not read" in done.stderr
    assert len(json.loads(parts.read_text())) == 2
    assert bench_main(["--merge", str(parts), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [r["engine"] for r in merged["model_rows"]] == ["c", "d"]
    assert [p["path"] for p in merged["parts"]] == [f"{parts}[0]", f"{parts}[1]"]


def test_bench_rejects_a_predicted_file_that_is_not_a_cost_report(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"rows": ["G4"]}))
    assert main(["bench", "--merge", str(bad), "--predicted", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--predicted {bad}" in err and "roofline.json" in err
    assert not (tmp_path / "o").exists()
    assert main(["bench", "--cost", "--predicted", str(bad)]) == 2
    assert "not with --cost" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--engines", "c,z"], "--engines: unknown ['z']; choose from a, b, b+, c, d, d*, e, e*, f"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--merge", "{tmp}"], "--merge {tmp}: cannot read it (IsADirectoryError"),
    (["--merge", "{tmp}/notes.txt"], "--merge {tmp}/notes.txt: cannot read it (JSONDecodeError"),
    (["--merge", "{roofline}"], "--merge {roofline}: not a results.json of an 'oneref bench' "
                                "timing run (--cost writes roofline.json: give that to "
                                "--predicted)"),
], ids=["engine", "repeats", "warmup", "folder", "not-json", "roofline"])
def test_bench_settings_and_merge_files_are_checked_first(tmp_path, capsys, flags, message):
    (tmp_path / "notes.txt").write_text("not json")
    roofline = sorted(Path(__file__).parents[2].glob("benchmarks/results/cost-*/roofline.json"))
    fill = {"tmp": tmp_path, "roofline": roofline[-1]}
    out = tmp_path / "out"
    assert main(["bench", *(f.format(**fill) for f in flags), "--out", str(out)]) == 2
    assert f"oneref bench: error: {message.format(**fill)}" in capsys.readouterr().err
    assert not out.exists()  # no empty folder left behind
