"""The README's Python blocks run as written: the first on RefShapes alone, the second on
the generated official files under the names it uses (the tiny preset for ``base``)."""

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_the_two_python_blocks():
    blocks = _python_blocks()
    assert len(blocks) == 2
    assert 'OneRef.from_config("base")' in blocks[1]


def test_the_first_block_trains_resumes_and_predicts(in_tmp, capsys):
    names = {}
    exec(compile(_python_blocks()[0], "README.md (Python block 1)", "exec"), names)
    assert any("colour guess:" in line for line in capsys.readouterr().out.splitlines())
    assert names["boxes"].shape == (names["batch"]["images"].shape[0], 4)
    # the second train() continued the first run: the run's clock covers both budgets
    assert names["metrics"]["elapsed_s"] >= 25 and "acc@0.5" in names["metrics"]["test"]
    x1, y1, x2, y2 = names["prediction"].box_xyxy
    assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 96
    assert names["text_ids"].shape == (1, names["predictor"].model.config.max_text_len)
    assert (in_tmp / "runs" / "py_rec" / "model" / "model.safetensors").is_file()


def test_the_second_block_loads_the_official_files(in_tmp, realdata, capsys):
    shutil.copy(realdata.beit3, in_tmp / "beit3_base_patch16_224.pth")
    shutil.copy(realdata.oneref, in_tmp / "best_checkpoint.pth")
    shutil.copy(realdata.spm, in_tmp / "beit3.spm")
    block = _python_blocks()[1].replace('from_config("base")', 'from_config("tiny")')
    exec(compile(block, "README.md (Python block 2)", "exec"), {})
    assert "resized: 1 (embed" in capsys.readouterr().out
    assert (in_tmp / "my_model" / "model.safetensors").is_file()
