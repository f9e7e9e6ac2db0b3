"""The eval table in the paper's layout, the published numbers beside it, default splits."""

import pytest
import torch

from oneref.eval.published import published
from oneref.eval.splits import default_splits, eval_table
from oneref.train.config import DataConfig
from oneref.train.data import loader_workers


def _rec_row(split, acc):
    return {"split": split, "acc@0.5": acc, "miou_box": 0.5, "n": 5657, "samples_per_s": 812.4}


def test_rec_table_puts_the_paper_beside_each_split():
    rows = [_rec_row("val", 0.8812), _rec_row("testA", 0.9), _rec_row("testB", 0.85)]
    table = eval_table(rows, "rec", DataConfig(dataset="unc"), "base").splitlines()
    assert table[0] == ("| split | samples | Acc@0.5 % | paper OneRef-B % (single / mixed) | "
                        "samples/s |")
    assert table[2] == "| val | 5,657 | 88.12 | 88.75 / 91.89 | 812.4 |"
    assert table[4] == "| testB | 5,657 | 85.00 | 85.34 / 88.58 | 812.4 |"
    large = eval_table(rows[:1], "rec", DataConfig(dataset="refcoco", refer_root="/r"), "large")
    assert "| val | 5,657 | 88.12 | 92.87 / 93.21 |" in large  # refcoco by unc = unc
    other = eval_table(rows[:1], "rec", DataConfig(dataset="referit"), "base")
    assert "paper" not in other  # nothing published for ReferIt: no column


def test_res_table_columns():
    rows = [{"split": split, "miou": 0.7, "oiou": 0.75, "n": 10, "samples_per_s": 3.0,
             **{f"prec@{t}": 0.5 for t in (0.5, 0.6, 0.7, 0.8, 0.9)}} for split in ("val", "testA")]
    table = eval_table(rows, "res", DataConfig(dataset="unc"), "base").splitlines()
    assert table[0] == ("| split | samples | mIoU % | oIoU % | Prec@0.5 % | Prec@0.6 % | "
                        "Prec@0.7 % | Prec@0.8 % | Prec@0.9 % | paper OneRef-B mIoU % | "
                        "paper OneRef-B oIoU % | samples/s |")
    # mIoU is published for val only; oIoU for every split
    assert table[2].endswith("| 77.57 / 79.83 | 77.55 / 81.06 | 3.0 |")
    assert table[3] == ("| testA | 10 | 70.00 | 75.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 "
                        "| - | 80.96 / 83.05 | 3.0 |")


def test_published_lookup():
    assert published("acc@0.5", "unc", "base", "testA") == "90.95 / 94.31"
    assert published("miou", "unc", "large", "val") == "80.09 / 81.26"
    assert published("acc@0.5", "unc", "tiny", "val") == "-"
    assert published("acc@0.5", "gref", "base", "val") == "-"


@pytest.mark.parametrize("data,splits", [
    (DataConfig(), ("val", "test")),
    (DataConfig(dataset="unc"), ("val", "testA", "testB")),
    (DataConfig(dataset="gref"), ("val",)),
    (DataConfig(dataset="gref_umd"), ("val", "test")),
    (DataConfig(dataset="refcocog", refer_root="/r"), ("val", "test")),
    (DataConfig(dataset="refcocog", refer_root="/r", split_by="google"), ("val",)),
])
def test_default_splits(data, splits):
    assert default_splits(data) == splits


def test_default_splits_unknown_scheme_asks_for_split():
    with pytest.raises(ValueError, match="--split"):
        default_splits(DataConfig(dataset="refcoco", refer_root="/r", split_by="google"))


def test_loader_workers(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert loader_workers(DataConfig(), cpu) == 0  # workers would take the step's cores
    assert loader_workers(DataConfig(), cuda) == 15  # one core left for the main process
    assert loader_workers(DataConfig(), cuda, local_world_size=8) == 1
    assert loader_workers(DataConfig(num_workers=3), cuda) == 3
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(num_workers=-2).validate()
