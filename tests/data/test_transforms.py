"""docs/method.md, "Fine-tuning recipe" pipelines keep image, box and mask aligned; flips swap
left/right."""

import numpy as np
import pytest
from PIL import Image

from oneref.data.transforms import (Example, TestTransform, TrainTransform, box_to_mask,
                                    has_spatial_word, swap_left_right)


def _example(rng, width, height, text="the dog on the grass"):
    """An image with one filled ellipse; the mask is the ellipse, the box its extent."""
    x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    x2 = int(rng.integers(x1 + 20, width + 1))
    y2 = int(rng.integers(y1 + 20, height + 1))
    yy, xx = np.mgrid[:height, :width]
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    mask = ((((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2) <= 1).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[mask > 0] = (250, 10, 10)
    return Example(Image.fromarray(pixels), box, mask, text)


def _check_aligned(out, size):
    mask = out.mask.numpy()
    ys, xs = np.nonzero(mask)
    cx, cy, w, h = (out.box.numpy() * size).tolist()
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == pytest.approx(
        [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], abs=1.01)
    image = out.image.numpy()
    assert image.shape == (3, size, size)
    # the object stays red under jitter and resizing (R high, G low after normalisation)
    red = image[0][mask > 0].mean() - image[1][mask > 0].mean()
    assert red > 0.8


@pytest.mark.parametrize("width,height", [(200, 120), (90, 160), (128, 128)])
def test_test_pipeline_aligned_and_centred(width, height):
    rng = np.random.default_rng(width)
    out = TestTransform(96)(_example(rng, width, height))
    _check_aligned(out, 96)
    image = out.image.numpy()
    scale = 96 / max(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    ox, oy = (96 - new_w) // 2, (96 - new_h) // 2
    assert np.all(image[:, :oy] == 0) and np.all(image[:, :, :ox] == 0)
    assert np.all(image[:, oy + new_h:] == 0) and np.all(image[:, :, ox + new_w:] == 0)
    assert out.has_mask


def test_train_pipeline_aligned_over_draws():
    rng = np.random.default_rng(0)
    transform = TrainTransform(96, flip_prob=0.5)
    sizes = set()
    for k in range(40):
        ex = _example(rng, int(rng.integers(60, 220)), int(rng.integers(60, 220)))
        out = transform(ex, rng)
        _check_aligned(out, 96)
        sizes.add(round(float(out.box[2]) * 96))
    assert len(sizes) > 5  # the random resize varies the object size


def test_train_without_mask_rasterises_box():
    rng = np.random.default_rng(1)
    ex = _example(rng, 150, 100)
    ex.mask = None
    out = TrainTransform(64)(ex, rng)
    assert not out.has_mask
    ys, xs = np.nonzero(out.mask.numpy())
    cx, cy, w, h = (out.box.numpy() * 64).tolist()
    assert xs.min() == pytest.approx(cx - w / 2, abs=1) and ys.max() + 1 == pytest.approx(
        cy + h / 2, abs=1)


def test_flip_swaps_words_and_moves_box():
    rng = np.random.default_rng(2)
    ex = _example(rng, 120, 80, text="the leftmost man left of the right car")
    plain = TestTransform(120)(ex)
    out = TrainTransform(120, crop_prob=0.0, long_sides=(120,), jitter_prob=0.0, flip_prob=1.0,
                         random_pad=False)(ex, rng)
    assert out.text == "the rightmost man right of the left car"
    assert float(out.box[0]) == pytest.approx(1 - float(plain.box[0]), abs=1e-6)
    np.testing.assert_array_equal(out.mask.numpy(), plain.mask.numpy()[:, ::-1])
    assert swap_left_right("left right leftover") == "right left rightover"


def test_spatial_phrases_never_crop():
    assert has_spatial_word("Man on the LEFT") and has_spatial_word("topmost cup")
    assert not has_spatial_word("a red cup")
    rng = np.random.default_rng(3)
    transform = TrainTransform(64, crop_prob=1.0, jitter_prob=0.0, random_pad=False)
    ex = _example(rng, 128, 64, text="cup on the left")
    for _ in range(5):
        out = transform(ex, rng)
        # no crop: the whole 2:1 image is resized, so the content keeps its aspect ratio
        content_rows = np.nonzero(np.abs(out.image.numpy()).sum(axis=(0, 2)))[0]
        content_cols = np.nonzero(np.abs(out.image.numpy()).sum(axis=(0, 1)))[0]
        assert len(content_cols) == pytest.approx(2 * len(content_rows), abs=1)


def test_box_to_mask_and_bad_args():
    mask = box_to_mask([2.2, 3.0, 5.6, 8], 10)
    assert mask.sum() == 4 * 5 and mask[3, 2] == 1 and mask[8, 2] == 0
    with pytest.raises(ValueError, match="flip_prob"):
        TrainTransform(64, flip_prob=2)
    with pytest.raises(ValueError, match="long_sides"):
        TrainTransform(64, long_sides=(128,))
