"""``evaluate`` on a tiny model: padding forwards for sharded models change no metric."""

import pytest
import torch

from oneref import OneRef
from oneref.data import collate
from oneref.data.synthetic import RefShapes
from oneref.eval.evaluate import evaluate


class CountingModel(torch.nn.Module):
    """Wraps a OneRef and counts ``forward_rec`` calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward_rec(self, *args):
        self.calls += 1
        return self.model.forward_rec(*args)


@pytest.fixture(scope="module")
def batches():
    data = RefShapes("val", size=6, img_size=64, max_text_len=24)
    return [collate([data[i] for i in range(3)]), collate([data[i] for i in range(3, 6)])]


def test_min_batches_repeats_forwards_without_counting_them(batches):
    torch.manual_seed(0)
    model = CountingModel(OneRef.from_config("tiny", heads=("rec",)))
    plain = evaluate(model, batches, "rec", torch.device("cpu"))
    assert model.calls == 2
    model.calls = 0
    padded = evaluate(model, batches, "rec", torch.device("cpu"), min_batches=5)
    assert model.calls == 5
    assert padded == plain and plain["n"] == 6


def test_min_batches_on_an_empty_shard_is_an_error():
    model = CountingModel(OneRef.from_config("tiny", heads=("rec",)))
    with pytest.raises(ValueError, match="shard is empty"):
        evaluate(model, [], "rec", torch.device("cpu"), min_batches=1)
