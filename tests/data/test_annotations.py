"""The JSON Lines reader of your own data (oneref.data.annotations) and the dataset and
split layout built on it, on small files the tests write."""

import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from oneref.data import collate, layout
from oneref.data.annotations import annotation_splits, load_annotations, write_sts_annotations
from oneref.data.refer import ReferringDataset
from oneref.data.synthetic import refshapes_tokenizer

SQUARE = [[10.0, 8.0, 30.0, 8.0, 30.0, 28.0, 10.0, 28.0]]  # x 10..30, y 8..28


def _write(path, *items):
    path.write_text("\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n")
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images" / "room"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    return tmp_path / "images"


def _rle(height, width):
    pixels = np.zeros((height, width), np.uint8, order="F")
    pixels[8:28, 10:30] = 1
    rle = mask_utils.encode(pixels)
    return {"size": [height, width], "counts": rle["counts"].decode()}


def test_every_key_of_a_line(tmp_path):
    path = _write(tmp_path / "train.jsonl",
                  {"image": "room/a.png", "box": [10, 8, 20, 20], "text": " a red cube ",
                   "segmentation": SQUARE, "height": 48, "width": 64, "sts": [0.5] * 5},
                  "",
                  {"image": "room/a.png", "box_xyxy": [10, 8, 30, 28], "text": "the cube",
                   "segmentation": _rle(48, 64), "note": "kept"})
    first, second = load_annotations(path)
    assert first.box == second.box == (10.0, 8.0, 30.0, 28.0)
    assert first.phrase == "a red cube" and first.size == (48, 64) and first.source == "own"
    assert first.polygons == SQUARE and first.rle is None and first.extra == [0.5] * 5
    assert second.rle["size"] == [48, 64] and second.polygons is None
    assert second.meta == {"note": "kept"} and second.where == "train.jsonl:3"


@pytest.mark.parametrize("line,problem", [
    ('["room/a.png"]', "is a JSON list, expected an object"),
    ("{not json", "Expecting property name"),
    ({"box": [1, 1, 2, 2], "text": "x"}, "'image' must be a non-empty file name"),
    ({"image": "a.png", "text": "x"}, "needs exactly one of 'box' (x, y, width, height)"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "box_xyxy": [1, 1, 3, 3], "text": "x"},
     "(x1, y1, x2, y2), not both"),
    ({"image": "a.png", "bbox": [1, 1, 2, 2], "text": "x"}, "; keys not read: 'bbox'"),
    ({"image": "a.png", "box": [1, 1, 2], "text": "x"}, "box [1, 1, 2] is not 4 numbers"),
    ({"image": "a.png", "box_xyxy": [5, 5, 2, 9], "text": "x"}, "(xyxy) has no area"),
    ({"image": "a.png", "box": [1, 1, 2, 2]}, "has no 'text' (the referring expression)"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": " "}, "empty expression"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x", "height": 48},
     "'height' and 'width' must both be positive integers, got 48 and None"),
    ({"image": "a.png", "box": [50, 1, 20, 2], "text": "x", "height": 48, "width": 64},
     "is outside the 64x48 image"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x", "segmentation": [[1, 2, 3]]},
     "polygon 0 has 3 coordinates"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x", "segmentation": {"counts": "ab"}},
     "RLE segmentation needs 'counts' and 'size'"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x",
      "segmentation": {"counts": "ab", "size": [48.5, 64]}}, "RLE size [48.5, 64] is not"),
])
def test_a_malformed_line_is_named_with_its_file_and_number(tmp_path, line, problem):
    good = {"image": "room/a.png", "box": [1, 1, 2, 2], "text": "x"}
    path = _write(tmp_path / "val.jsonl", good, line)
    with pytest.raises(ValueError) as err:
        load_annotations(path)
    assert str(err.value).startswith(f"{path}: line 2: ") and problem in str(err.value)


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_bytes(b'{"image": "a.png", "box": [1, 1, 2, 2], "text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"val.jsonl: line 1: 'utf-8' codec can't decode"):
        load_annotations(path)


def test_skip_counts_and_unread_keys_are_warned_once(tmp_path, caplog):
    good = {"image": "room/a.png", "box": [1, 1, 2, 2], "text": "x", "segmentaton": SQUARE}
    path = _write(tmp_path / "train.jsonl", good, "{", good, {"image": "b.png"})
    with caplog.at_level(logging.WARNING):
        records = load_annotations(path, on_error="skip")
    assert len(records) == 2
    assert "skipped 2 malformed record(s); first: line 2: " in caplog.text
    assert ("keys that are not read (kept with the records): 'segmentaton' (2 of 2 records)"
            in caplog.text)


def test_a_file_that_cannot_be_read(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read annotation file .*gone.jsonl"):
        load_annotations(tmp_path / "gone.jsonl")


def test_splits_resolve_to_their_files(tmp_path, images):
    ann = tmp_path / "ann"
    ann.mkdir()
    for split in ("train", "val", "testB"):
        _write(ann / f"{split}.jsonl", {"image": "room/a.png", "box": [1, 1, 2, 2], "text": "x"})
    (ann / "notes.txt").write_text("not a split")
    assert annotation_splits(ann) == ("testB", "train", "val")
    info = layout.dataset_info("mine", annotations=str(ann))
    assert info.eval_splits == ("testB", "val") and info.masks and info.sources == ("own",)
    source = layout.resolve("mine", "val", str(images), annotations=str(ann))
    assert source.annotation_file == str(ann / "val.jsonl") and source.name == str(
        ann / "val.jsonl")
    assert source.image_dirs == {"own": str(images)}
    with pytest.raises(ValueError, match=r"no split file test.jsonl \(the splits there: "
                                         r"testB, train, val\)"):
        layout.resolve("mine", "test", str(images), annotations=str(ann))
    with pytest.raises(ValueError, match="exactly one of --split-root"):
        layout.resolve("mine", "val", str(images), split_root=str(ann), annotations=str(ann))


def test_samples_from_polygons_rle_and_boxes(tmp_path, images):
    """Both segmentation forms give the same mask; a box without one stands in rasterised;
    an RLE of another size than its image is refused naming the line."""
    ann = tmp_path / "ann"
    ann.mkdir()
    line = {"image": "room/a.png", "box": [10, 8, 20, 20], "text": "red cube"}
    _write(ann / "val.jsonl", {**line, "segmentation": SQUARE},
           {**line, "segmentation": _rle(48, 64)}, line)
    source = layout.resolve("mine", "val", str(images), annotations=str(ann))
    dataset = layout.build_split(source, refshapes_tokenizer(), 64, 16, train=False,
                                 use_masks=True)
    batch = collate([dataset[k] for k in range(3)])
    assert batch["has_mask"].tolist() == [True, True, False]
    assert batch["masks"][0].sum() > 0 and (batch["masks"][0] == batch["masks"][1]).all()
    _write(ann / "test.jsonl", {**line, "segmentation": _rle(40, 64)})
    source = layout.resolve("mine", "test", str(images), annotations=str(ann))
    with pytest.raises(ValueError, match=r"test.jsonl:1: RLE segmentation of size \[40, 64\] "
                                         r"\(height, width\), but .*a.png is 64x48"):
        ReferringDataset(source.records(), source.image_dirs, refshapes_tokenizer(),
                         img_size=64, max_text_len=16, use_masks=True)


def test_sts_labels_go_into_a_copy(tmp_path):
    path = _write(tmp_path / "train.jsonl", {"image": "a.png", "box": [1, 1, 2, 2], "text": "x",
                                             "id": 7}, "",
                  {"image": "b.png", "box": [1, 1, 2, 2], "text": "y"})
    out = write_sts_annotations(path, tmp_path / "labelled", [[0.25, 0.5], [0.75]])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"image": "a.png", "box": [1, 1, 2, 2], "text": "x", "id": 7,
                      "sts": [0.25, 0.5]},
                     {"image": "b.png", "box": [1, 1, 2, 2], "text": "y", "sts": [0.75]}]
    assert [r.extra for r in load_annotations(out)] == [[0.25, 0.5], [0.75]]
    with pytest.raises(ValueError, match="2 records but 1 label rows"):
        write_sts_annotations(path, tmp_path / "labelled", [[0.5]])
    with pytest.raises(ValueError, match="--out would overwrite the input annotation file"):
        write_sts_annotations(path, tmp_path, [[0.5], [0.5]])
