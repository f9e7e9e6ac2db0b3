"""The loader row: JPEG files and records, per-worker rates, workers needed, its place in
``oneref bench`` (JSON, summary table, --merge)."""

import json
import math

import pytest
from PIL import Image

from oneref.bench.loader import COCO_SIZES, TARGETS, iter_loader_rows, write_images
from oneref.bench.main import main
from oneref.bench.report import loader_markdown

ROW_KEYS = {"row", "transform", "samples_per_s_per_worker", "runs", "spread", "ms_per_sample",
            "stage_ms", "workers_needed_for", "targets"}


@pytest.fixture(scope="module")
def rows():
    return list(iter_loader_rows(num_images=4, img_size=64, warmup=1, passes=2))


def test_images_are_coco_sized_jpegs_with_box_and_polygon_inside(tmp_path):
    records = write_images(tmp_path, num_images=4)
    for index, record in enumerate(records):
        with Image.open(tmp_path / record.image_file) as image:
            assert image.format == "JPEG"
            assert image.size == COCO_SIZES[index % len(COCO_SIZES)]
            width, height = image.size
        x1, y1, x2, y2 = record.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        (polygon,) = record.polygons
        assert all(x1 - 1e-6 <= x <= x2 + 1e-6 for x in polygon[0::2])
        assert all(y1 - 1e-6 <= y <= y2 + 1e-6 for y in polygon[1::2])
    with pytest.raises(ValueError, match="num_images"):
        write_images(tmp_path, num_images=0)


def test_rows_have_finite_rates_and_consistent_worker_counts(rows):
    assert [r["transform"] for r in rows] == ["train", "test"]
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["row"] == "loader" and r["img_size"] == 64 and r["num_images"] == 4
        rate = r["samples_per_s_per_worker"]
        assert math.isfinite(rate) and rate > 0
        assert len(r["runs"]) == 2 and all(v > 0 for v in r["runs"])
        assert r["spread"] == pytest.approx((max(r["runs"]) - min(r["runs"])) / rate)
        assert r["ms_per_sample"] == pytest.approx(1e3 / rate)
        assert set(r["stage_ms"]) == {"decode", "mask", "transform", "tokenise"}
        assert all(ms > 0 for ms in r["stage_ms"].values())
        assert set(r["workers_needed_for"]) == set(TARGETS)
        for name, workers in r["workers_needed_for"].items():
            target = TARGETS[name]["samples_per_s"]
            assert workers * rate >= target > (workers - 1) * rate


def test_loader_markdown_has_one_line_per_transform(rows):
    table = loader_markdown(rows)
    assert "samples/s per worker" in table
    assert "| train (S=64) |" in table and "| test (S=64) |" in table
    assert "benchmarks/results/h100-2026-11-27" in table


def test_bench_loader_row_writes_json_and_summary_and_merges(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["--device", "cpu", "--rows", "loader", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["rows"] == ["loader"] and not data["model_rows"] and not data["kernel_rows"]
    assert [r["transform"] for r in data["loader_rows"]] == ["train", "test"]
    assert all(r["num_images"] == 8 and len(r["runs"]) == 1 for r in data["loader_rows"])
    assert "samples/s per worker" in (out / "summary.md").read_text()
    assert "samples/s per worker" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["--merge", str(out / "results.json"), "--out", str(merged)]) == 0
    assert len(json.loads((merged / "results.json").read_text())["loader_rows"]) == 2
    assert "samples/s per worker" in (merged / "summary.md").read_text()
