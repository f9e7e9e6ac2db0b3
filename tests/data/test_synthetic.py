"""RefShapes: determinism, disjoint splits, unique referents, box/mask/word alignment and the
colour-guess baseline."""

import collections

import numpy as np
import pytest
import torch

from oneref.data import collate
from oneref.data.grammar import resolve
from oneref.data.synthetic import (RefShapes, colour_guess_accuracy, refshapes_tokenizer,
                                   _MARGIN)
from oneref.data.transforms import TrainTransform

KEYS = {"image", "text_ids", "text_length", "box", "mask", "has_mask", "word_positions",
        "expression", "index"}


@pytest.fixture(scope="module")
def test_split():
    return RefShapes("test", size=300)


def test_sample_contract(test_split):
    s = test_split[5]
    assert set(s) == KEYS
    assert s["image"].shape == (3, 128, 128) and s["image"].dtype == torch.float32
    assert s["text_ids"].shape == (24,) and s["text_ids"].dtype == torch.long
    assert s["text_length"].dtype == torch.long and s["text_length"].dim() == 0
    assert s["box"].shape == (4,) and s["mask"].shape == (128, 128)
    assert s["has_mask"] is True and s["word_positions"].shape == (2,)
    assert s["index"] == 5 and s["expression"] == test_split.scene(5).text
    batch = collate([test_split[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 128, 128)
    assert batch["indices"].tolist() == [0, 1, 2] and batch["has_mask"].all()
    assert batch["word_positions"].shape == (3, 2) and len(batch["expressions"]) == 3


def test_deterministic_and_disjoint():
    a, b = RefShapes("train", size=50, seed=3), RefShapes("train", size=50, seed=3)
    for i in (0, 17, 49):
        sa, sb = a[i], b[i]
        assert np.array_equal(sa["image"].numpy(), sb["image"].numpy())
        assert sa["expression"] == sb["expression"]
        assert np.array_equal(sa["box"].numpy(), sb["box"].numpy())
    # order of access does not matter
    c = RefShapes("train", size=50, seed=3)
    assert c.scene(49) == a.scene(49)
    scenes = {split: [RefShapes(split, size=50, seed=3).scene(i).shapes for i in range(50)]
              for split in ("train", "val", "test")}
    assert not set(scenes["train"]) & set(scenes["val"])
    assert not set(scenes["train"]) & set(scenes["test"])
    assert RefShapes("train", size=5, seed=4).scene(0) != a.scene(0)


def test_unique_referent_and_alignment(test_split):
    tok = refshapes_tokenizer()
    counts = collections.Counter()
    for i in range(len(test_split)):
        scene = test_split.scene(i)
        assert 3 <= len(scene.shapes) <= 6
        assert resolve(scene.expression, list(scene.shapes), _MARGIN * 128) == [scene.target]
        counts[scene.category] += 1
        if i % 10:
            continue
        s = test_split[i]
        mask = s["mask"].numpy()
        ys, xs = np.nonzero(mask)
        cx, cy, w, h = (s["box"] * 128).tolist()
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == pytest.approx(
            [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], abs=1e-3)
        words = scene.text.split()
        ids = s["text_ids"].tolist()
        subj, obj = s["word_positions"].tolist()
        assert ids[subj] == tok.encode(words[scene.expression.subject_word])[1]
        assert ids[subj] - 1 == tok.sp.piece_to_id("\u2581" + words[subj - 1])
        if scene.category == "relation":
            assert obj > subj and ids[obj] == tok.encode(words[obj - 1])[1]
        else:
            assert obj == -1
    assert min(counts.values()) > 0.2 * len(test_split)


def test_colour_guess_baseline_is_low(test_split):
    acc = colour_guess_accuracy(test_split, seed=0)
    expected = colour_guess_accuracy(test_split, expected=True)
    assert 0.15 < expected < 0.5
    assert abs(acc - expected) < 0.1


def test_flip_transform_keeps_words_consistent():
    ds = RefShapes("val", size=40, transform=TrainTransform(128, crop_prob=0.0,
                                                            long_sides=(128,), jitter_prob=0.0,
                                                            flip_prob=1.0))
    plain = RefShapes("val", size=40)
    flipped = 0
    for i in range(40):
        text = plain.scene(i).text
        s = ds[i]
        if "left" in text or "right" in text:
            assert s["expression"] != text
            flipped += 1
        # numpy: tiny torch ops are slow on a loaded 2-core machine (thread pool waits)
        np.testing.assert_allclose(s["image"].numpy(), plain[i]["image"].numpy()[..., ::-1],
                                   atol=1e-6)
        cx = s["box"][0].item()
        assert cx == pytest.approx(1 - plain[i]["box"][0].item(), abs=1e-6)
    assert flipped > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        RefShapes("dev")
    with pytest.raises(ValueError, match="mix"):
        RefShapes("train", size=4, mix={"colour": 1.0})
    with pytest.raises(IndexError):
        RefShapes("train", size=4)[4]
