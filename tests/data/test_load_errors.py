"""Records that pass the build-time checks but fail later: truncated images (raise, or skip
and stand in with the next record) and segmentations that cover no pixel of their image."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from oneref.data import collate
from oneref.data.records import RecordError
from oneref.data.refer import ReferringDataset
from oneref.data.synthetic import refshapes_tokenizer

S = 64
INFO = {"height": 48, "width": 64}
INSIDE = [[10.0, 8.0, 30.0, 8.0, 30.0, 28.0, 10.0, 28.0]]
OUTSIDE = [[200.0, 200.0, 300.0, 200.0, 300.0, 300.0, 200.0, 300.0]]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("good.jpg", "cut.jpg"):
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    cut = folder / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[:-20])  # header intact, pixel data cut short
    return folder


@pytest.fixture(scope="module")
def tok():
    return refshapes_tokenizer()


def _dataset(tmp_path, images, tok, files, on_error, **kwargs):
    path = tmp_path / "unc_train.pth"
    torch.save([(name, INFO, [1, 1, 20, 20], f"thing {k}", []) for k, name in enumerate(files)],
               path)
    return path, ReferringDataset.from_split_file(path, images, tok, img_size=S,
                                                  parse_words=False, on_error=on_error,
                                                  **kwargs)


def test_truncated_image_passes_the_build_and_raises_naming_split_record_and_file(
        tmp_path, images, tok):
    path, ds = _dataset(tmp_path, images, tok, ["good.jpg", "cut.jpg"], "raise")
    assert len(ds) == 2 and ds[0]["index"] == 0
    with pytest.raises(RecordError) as info:
        ds[1]
    message = str(info.value)
    assert message.startswith(f"{path}: unc_train.pth[1]: ")
    assert str(images / "cut.jpg") in message and "truncated or corrupt" in message


def test_truncated_image_is_skipped_and_warned_once(tmp_path, images, tok, caplog):
    _, ds = _dataset(tmp_path, images, tok, ["good.jpg", "cut.jpg", "cut.jpg", "good.jpg"],
                     "skip")
    with caplog.at_level(logging.WARNING, logger="oneref.data.refer"):
        indices = [ds[k]["index"] for k in range(len(ds))]
        again = ds[1]["index"]
    assert indices == [0, 3, 3, 3] and again == 3
    assert sorted(ds.unloadable) == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if "cut.jpg" in r.getMessage()]
    assert len(warnings) == 1 and "unc_train.pth[1]" in warnings[0]
    assert "skipped with on_error=skip" in warnings[0]


def test_an_evaluation_set_does_not_stand_in_for_a_record_it_cannot_load(tmp_path, images,
                                                                          tok):
    _, ds = _dataset(tmp_path, images, tok, ["good.jpg", "cut.jpg"], "skip", stand_in=False)
    with pytest.raises(RecordError, match=r"cut.jpg.*truncated.*an evaluation set does not "
                                          r"skip at load time"):
        ds[1]


def test_skip_wraps_around_and_is_the_same_in_loader_workers(tmp_path, images, tok):
    _, ds = _dataset(tmp_path, images, tok, ["good.jpg", "cut.jpg"], "skip")
    assert ds[1]["index"] == 0  # the last record wraps to the first
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["indices"].tolist() == [0, 0] and batch["images"].shape == (2, 3, S, S)


def test_skip_raises_when_no_record_loads(tmp_path, images, tok):
    _, ds = _dataset(tmp_path, images, tok, ["cut.jpg", "cut.jpg"], "skip")
    with pytest.raises(RecordError, match=r"none of the 2 records loads; first: .*"
                                          r"unc_train.pth\[0\].*cut.jpg.*truncated"):
        ds[1]


def _kept_and_dropped(tmp_path, images, tok, caplog, kept, dropped):
    """unc_val.pth of two records with the box x, y, w, h = 10, 8, 20, 20 and the polygons
    ``kept`` / ``dropped``, built with warnings captured; returns (its path, the dataset)."""
    path = tmp_path / "unc_val.pth"
    torch.save([("good.jpg", INFO, [10, 8, 20, 20], "kept", kept),
                ("good.jpg", INFO, [10, 8, 20, 20], "dropped", dropped)], path)
    with caplog.at_level(logging.WARNING, logger="oneref.data.refer"):
        ds = ReferringDataset.from_split_file(path, images, tok, img_size=S, parse_words=False)
    return path, ds


def test_polygons_outside_the_image_warn_and_the_box_stands_in(tmp_path, images, tok,
                                                               caplog):
    path, ds = _kept_and_dropped(tmp_path, images, tok, caplog, INSIDE, OUTSIDE)
    assert ("1 record(s) have an empty segmentation mask; their rasterised box stands in; "
            "first: unc_val.pth[1]: its polygons lie outside the 64x48 image") in caplog.text
    inside, outside = ds[0], ds[1]
    assert inside["has_mask"] and not outside["has_mask"]
    assert torch.equal(outside["mask"], inside["mask"])  # the box is the square polygon
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="oneref.data.refer"):
        ReferringDataset.from_split_file(path, images, tok, img_size=S, use_masks=False)
    assert "empty segmentation" not in caplog.text


def test_a_segmentation_apart_from_its_box_warns_and_the_box_stands_in(tmp_path, images, tok,
                                                                       caplog):
    """Polygons inside the image but apart from the record's box (x, y, w, h in the file):
    box and mask name different objects, so the mask is dropped (one overlapping the box is
    kept)."""
    overlapping = [[19.0, 19.0, 40.0, 19.0, 40.0, 40.0, 19.0, 40.0]]
    apart = [[40.0, 30.0, 60.0, 30.0, 60.0, 46.0, 40.0, 46.0]]
    _, ds = _kept_and_dropped(tmp_path, images, tok, caplog, overlapping, apart)
    assert ("1 record(s) have a segmentation apart from their box (the two name different "
            "objects); their rasterised box stands in; first: unc_val.pth[1]: its "
            "segmentation (extent x1y1x2y2 [40.0, 30.0, 60.0, 46.0]) does not overlap its box "
            "[10.0, 8.0, 30.0, 28.0]") in caplog.text
    assert "empty segmentation" not in caplog.text
    assert ds[0]["has_mask"] and not ds[1]["has_mask"]
    box_mask = ds[1]["mask"]
    assert box_mask.sum() > 0 and not torch.equal(box_mask, ds[0]["mask"])
