"""The benchmark suite's pieces on the tiny preset with 1-2 repeats: measured rows, ratios
from the measured numbers, JSON fields, PNG files, the CLI entry point."""

import argparse
import json
import time

import pytest
import torch
from torch._dynamo.utils import counters

from oneref.bench.cost import CostSettings, add_ratios, run_cost_table
from oneref.bench.engines import build_engine, infer_step, make_batch, train_step
from oneref.bench.kernels import attention_rows, lce_rows
import oneref.bench.main as bench_main
from oneref.bench.main import add_arguments, main, plan_cost_rows
from oneref.bench.report import (cost_markdown, environment, plot_attention, plot_throughput,
                                 profile_markdown)
from oneref.bench.timing import measure, profile_ops
from oneref import ops
from oneref.config import get_config
from oneref.ops import dispatch

CPU = torch.device("cpu")


def _tiny_settings(**changes):
    base = dict(presets=("tiny",), engines=("a",), train_tasks=("rec",),
                infer_tasks=("rec_infer",), train_batch={"tiny": 2}, infer_batch={"tiny": 4},
                sweep_batch={"tiny": (1, 2)}, split_samples=4, warmup=1, repeats=1,
                input_sets=2)
    base.update(changes)
    return CostSettings(**base)


def test_measure_reports_median_and_spread_of_two_runs():
    m = measure(lambda ms: time.sleep(ms / 1e3), [1.0, 2.0], CPU, warmup=1, repeats=3)
    assert len(m["runs_s"]) == 2
    assert 0.001 <= m.median < 0.5
    assert m["spread"] == pytest.approx((max(m["runs_s"]) - min(m["runs_s"])) / m.median)


def test_cost_row_of_baseline_has_measured_figures():
    rows = run_cost_table(_tiny_settings(), CPU, peak_tflops=0.05)
    (row,) = rows
    assert "skipped" not in row, row.get("skipped")
    step = row["rec_train_step_s"]
    assert row["rec_train_sps"] == pytest.approx(2 / step["median_s"])
    assert row["rec_infer_large_sps"] == pytest.approx(4 / row["rec_infer_large_s"]["median_s"])
    assert row["gflops_rec"] > 0 and row["gmacs_rec"] == pytest.approx(row["gflops_rec"] / 2)
    assert row["rec_train_mfu"] == pytest.approx(
        row["gflops_rec_train"] * row["rec_train_sps"] / 1e3 / 0.05)
    assert row["total_m"] == pytest.approx(row["backbone_m"] + row["head_m"])
    assert row["split_time_extrapolated"] is True and row["split_samples_measured"] == 4
    assert row["split_time_s"] == pytest.approx(row["split_measured_s"] * 5657 / 4)
    assert set(row["infer_sweep"]) == {1, 2}


def test_steps_switch_the_mode_only_when_it_changes(monkeypatch):
    """Module.train walks every submodule: a timed step pays for it only when the mode
    changes, and each step still runs in its own mode."""
    config = get_config("tiny")
    engine = build_engine("c", config, CPU)
    calls, train = [], torch.nn.Module.train

    def counted(module, mode=True):
        calls.append(mode)
        return train(module, mode)

    monkeypatch.setattr(type(engine.model), "train", counted)
    rec = make_batch(config, 2, CPU, seed=0, task="rec")
    infer = make_batch(config, 2, CPU, seed=0, task="rec_infer")
    for _ in range(2):
        train_step(engine, "rec", rec)
    assert calls == [] and engine.model.training
    for _ in range(2):
        infer_step(engine, "rec_infer", infer)
    assert calls == [False] and not engine.model.training
    assert not any(m.training for m in engine.model.modules())
    train_step(engine, "rec", rec)
    assert calls == [False, True] and engine.model.training


def test_unmeasured_kernel_engine_is_a_skipped_row_on_the_cpu():
    """(d*) runs Triton kernels on CUDA tensors: on a CPU its row says so and measures
    nothing; on a GPU it is the G4 row beside (d)."""
    (row,) = run_cost_table(_tiny_settings(engines=("d*",)), CPU, peak_tflops=0.05)
    assert "engine (d*) unavailable: its Triton kernels run on CUDA tensors" in row["skipped"]
    assert "rec_train_step_s" not in row
    plan = plan_cost_rows("G4", True, add_arguments(argparse.ArgumentParser()).parse_args([]))
    assert plan.engines.index("d*") == plan.engines.index("d") + 1


@pytest.mark.gpu
def test_unmeasured_kernel_engine_runs_the_triton_layer_norms_gpu(monkeypatch):
    """(d*) resolves the two LayerNorm ops to their Triton kernels and the other ops as
    (d) does; its training loss is finite and close to (d)'s on the same weights."""
    calls = []
    real = dispatch.resolve

    def resolve(op, device, backend=None, *args):
        calls.append((op, dispatch.current_backend(op) if backend is None else backend))
        return real(op, device, backend, *args)

    monkeypatch.setattr(dispatch, "resolve", resolve)
    monkeypatch.setattr(ops, "resolve", resolve)
    config = get_config("tiny")
    batch = make_batch(config, 4, "cuda", seed=0)
    losses = {key: train_step(build_engine(key, config, "cuda", seed=0), "rec", batch)
              .float().item()
              for key in ("d", "d*")}
    assert losses["d*"] == pytest.approx(losses["d"], rel=2e-2)
    assert ("multiway_add_layer_norm", "triton") in calls
    assert ("multiway_layer_norm", "triton") in calls
    assert ("multiway_linear", "auto") in calls


def test_profile_ops_ranks_ops_by_self_time():
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    prof = profile_ops(lambda: (a @ b).add_(1.0), CPU, calls=3, top=5)
    assert prof["top"][0]["op"] == "aten::mm" and prof["top"][0]["calls"] == 1
    assert all(o["ms"] >= 0 for o in prof["top"])
    assert 0 < sum(o["share"] for o in prof["top"]) <= 1 + 1e-9
    assert prof["busy_ms"] > 0 and prof["wall_ms"] > 0


def test_profiled_row_has_its_step_profile_table():
    (row,) = run_cost_table(_tiny_settings(infer_tasks=(), sweep_batch={}, split_samples=0,
                                           count_flops=False, profile=True), CPU, 0.05)
    prof = row["rec_train_profile"]
    assert prof["top"] and {"op", "calls", "ms", "share"} <= set(prof["top"][0])
    text = "\n".join(profile_markdown([row]))
    assert "tiny (a) rec training step: op self time" in text
    assert prof["top"][0]["op"][:70] in text


def test_rows_measured_before_an_interruption_are_kept(tmp_path, monkeypatch):
    def one_row_then_stop(settings, device, peak):
        yield {"preset": "tiny", "engine": "a", "rec_train_sps": 10.0}
        raise KeyboardInterrupt  # what a time box's signal does mid-row

    monkeypatch.setattr(bench_main, "iter_cost_rows", one_row_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--rows", "C1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["engine"] for r in data["model_rows"]] == ["a"]
    assert data["model_rows"][0]["row"] == "C1"


def test_ratios_are_computed_from_measured_numbers():
    rows = [{"preset": "tiny", "engine": "a", "rec_train_sps": 10.0, "split_sps": 4.0},
            {"preset": "tiny", "engine": "b", "rec_train_sps": 20.0},
            {"preset": "tiny", "engine": "d", "rec_train_sps": 30.0, "split_sps": 2.0},
            {"preset": "small", "engine": "a", "rec_train_sps": 1.0}]
    add_ratios(rows)
    assert rows[2]["rec_train_sps_vs_a"] == pytest.approx(3.0)
    assert rows[2]["rec_train_sps_vs_b"] == pytest.approx(1.5)
    assert rows[2]["split_sps_vs_a"] == pytest.approx(0.5)
    assert "rec_train_sps_vs_b" not in rows[3]  # no (b) row for that preset
    table = cost_markdown(rows)
    assert "3.00xa" in table and "1.50xb" in table


def test_two_pass_rows_combine_both_passes():
    rows = run_cost_table(_tiny_settings(passes=2, infer_tasks=(), sweep_batch={},
                                         split_samples=0, count_flops=False), CPU,
                          peak_tflops=0.05)
    (row,) = rows
    assert row["passes"] == 2 and len(row["rec_train_step_s"]["runs_s"]) == 2
    assert row["rec_train_step_s"]["min_s"] <= min(row["rec_train_step_s"]["runs_s"])
    assert "gflops_rec" not in row
    assert row["rec_train_sps"] == pytest.approx(2 / row["rec_train_step_s"]["median_s"])


def test_cpu_kernel_rows_are_checked_and_timed():
    rows = attention_rows(CPU, batches=(1,), text_lens=(4, 8), heads=2, head_dim=16,
                          num_vision=5, peak_tflops=1.0, passes=("fwd",))
    timed = [r for r in rows if "ms" in r]
    assert {r["impl"] for r in timed} >= {"ours[torch]", "sdpa[math]"}
    packed = [r for r in timed if r["op"] == "packed_multiway_attention"]
    assert [r["impl"] for r in packed] == ["ours[torch]"] * 2 and all("vs" in r for r in packed)
    for r in timed:
        seq = 5 + r["text_len"]
        flops = 4.0 * 1 * 2 * seq * seq * 16
        assert r["tflops"] == pytest.approx(flops / r["ms"] / 1e9)
        assert r["max_err"] < 1e-4
    assert sum(r.get("best_sdpa", False) for r in timed) == 2  # one per text length
    lce = lce_rows(CPU, cases=[("MLM", 8, 16, 32, 0.1)])
    eager = next(r for r in lce if r["impl"] == "eager")
    assert eager["speedup"] == 1.0 and eager["ms"] > 0


def test_environment_and_plots(tmp_path):
    env = environment(CPU)
    for key in ("date_utc", "device_name", "torch", "triton", "xformers", "driver", "cpu_count"):
        assert key in env
    rows = [{"preset": "tiny", "engine": "a", "infer_sweep": {1: 10.0, 4: 30.0}}]
    png = plot_throughput(rows, tmp_path / "t.png", "x")
    assert png.read_bytes()[:4] == b"\x89PNG"
    att = [{"op": "multiway_attention", "impl": "x", "pass": "fwd", "batch": 1,
            "text_len": t, "tflops": t / 10} for t in (8, 16)]
    assert plot_attention(att, tmp_path / "a.png", "y").read_bytes()[:4] == b"\x89PNG"
    packed = [dict(row, op="packed_multiway_attention") for row in att]  # the encoder's form
    assert plot_attention(packed, tmp_path / "p.png", "y").read_bytes()[:4] == b"\x89PNG"
    assert plot_attention([dict(att[0], op="linear_cross_entropy")], tmp_path / "n.png",
                          "y") is None


@pytest.mark.slow
def test_cli_writes_json_png_and_table(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["--device", "cpu", "--rows", "C1", "--quick", "--engines", "a",
                 "--split-samples", "4", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    for key in ("environment", "ceilings", "model_rows", "c1", "convention"):
        assert key in data
    assert data["environment"]["device_type"] == "cpu"
    assert data["ceilings"]["matmul"]["tflops"] > 0
    row = data["model_rows"][0]
    assert row["dtype"] == "float32" and row["rec_train_sps"] > 0
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| preset |" in printed and "results:" in printed.splitlines()[-1]


def test_cli_rejects_unknown_rows(tmp_path):
    with pytest.raises(ValueError, match="--rows"):
        main(["--device", "cpu", "--rows", "G9", "--out", str(tmp_path)])


def test_cuda_graph_engine_and_sweep_batches(monkeypatch):
    """(f) is (e) with CUDA graphs: compiled, and on a CPU without graphs (noted in its
    row); each compiled engine starts from an empty Dynamo cache; --sweep-batches sets the
    G5 sweep, 0 turns it off."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(True))
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)
    assert not build_engine("c", get_config("tiny"), CPU).compile and not resets
    engine = build_engine("f", get_config("tiny"), CPU)
    assert engine.compile and not engine.cuda_graphs and resets == [True]
    assert torch._dynamo.config.fail_on_recompile_limit_hit
    assert any("CUDA graphs need a GPU" in note for note in engine.notes)
    parser = add_arguments(argparse.ArgumentParser())
    plan = plan_cost_rows("G5", True, parser.parse_args(["--sweep-batches", "1,256"]))
    assert "f" in plan.engines and plan.sweep_batch == {"base": (1, 256)}
    assert plan_cost_rows("G5", True, parser.parse_args(["--sweep-batches", "0"])
                          ).sweep_batch == {"base": ()}
    for bad in ("1,x", "1,0,16"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--sweep-batches", bad])


@pytest.mark.gpu
def test_cuda_graph_engine_matches_the_compiled_engine_gpu():
    """(f) replays captured graphs: inference outputs and training losses equal (e)'s on the
    same weights and batches, call after call."""
    config = get_config("tiny")
    engines = {key: build_engine(key, config, "cuda", seed=0) for key in ("e", "f")}
    assert engines["f"].cuda_graphs
    skips = counters["inductor"]["cudagraph_skips"]
    batches = [make_batch(config, 4, "cuda", seed=s) for s in range(3)]
    for batch in batches * 2:  # warm-up, capture, then replays
        boxes = {k: infer_step(e, "rec_infer", batch).float().clone() for k, e in engines.items()}
        torch.testing.assert_close(boxes["f"], boxes["e"], rtol=2e-2, atol=2e-2)
    for batch in batches:
        losses = {k: train_step(e, "rec", batch).float().item() for k, e in engines.items()}
        assert losses["f"] == pytest.approx(losses["e"], rel=2e-2)
    assert counters["inductor"]["cudagraph_skips"] == skips  # every graph was captured
