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
     "'height' and 'width' must both be positive whole numbers, got 48 and None"),
    ({"image": "a.png", "box": [50, 1, 20, 2], "text": "x", "height": 48, "width": 64},
     "is outside the 64x48 image"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x", "segmentation": [[1, 2, 3]]},
     "polygon 0 has 3 coordinates"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x", "segmentation": [1, 1, 9, 1, 9, 9]},
     "got one flat list of numbers (wrap it in a list)"),
    ({"image": "a.png", "box": [50, 1, 20, 2], "text": "x", "height": 48, "width": 64},
     "is outside the 64x48 image by 6 px (up to 1 px is clipped)"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x", "segmentation": {"counts": "ab"}},
     "RLE segmentation needs 'counts' and 'size'"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x",
      "segmentation": {"counts": "ab", "size": [48.5, 64]}}, "RLE size [48.5, 64] is not"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x",
      "segmentation": {"counts": [4, 4], "size": [True, True]}}, "RLE size [True, True] is"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x",
      "segmentation": {"counts": [100, 50], "size": [48, 64]}},
     "RLE run lengths add up to 150 pixels, not the 48 x 64 = 3072 of its size"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x",
      "segmentation": {"counts": [1.5, 3070.5], "size": [48, 64]}},
     "RLE counts must be non-negative whole run lengths"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "text": "x",
      "segmentation": {"counts": "garbage!!", "size": [48, 64]}},
     "RLE counts string has 'r', not a compressed RLE character"),
    ({"image": "a.png", "box": ["1", "1", "2", "2"], "text": "x"}, "is not 4 numbers"),
    ({"image": "a.png", "box": [0.1, 0.1, 0.3, 0.3], "text": "x"},
     "box [0.1, 0.1, 0.3, 0.3] is under one pixel wide or tall; boxes are in the image's "
     "pixels, not normalised to [0, 1]"),
    ({"image": "a.png", "box": [1, 1, 2, 2], "txt": "x"},
     "has no 'text' (the referring expression); keys not read: 'txt'"),
    ({"img": "a.png", "box": [1, 1, 2, 2], "text": "x"}, "got None; keys not read: 'img'"),
])
def test_a_malformed_line_is_named_with_its_file_and_number(tmp_path, line, problem):
    good = {"image": "room/a.png", "box": [1, 1, 2, 2], "text": "x"}
    path = _write(tmp_path / "val.jsonl", good, line)
    with pytest.raises(ValueError) as err:
        load_annotations(path)
    assert str(err.value).startswith(f"{path}: line 2: ") and problem in str(err.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode on numpy 2
def test_byte_order_mark_windows_line_ends_and_list_counts(tmp_path):
    """A file as Windows editors write it reads as any other; an uncompressed RLE (run
    lengths, starting with a run of 0) gives the compressed form's mask; whole-number
    floats are sizes."""
    compressed = _rle(48, 64)
    flat = mask_utils.decode({"size": [48, 64], "counts": compressed["counts"].encode()}
                             ).flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    lengths = ([0] if flat[0] else []) + np.diff(bounds).tolist()
    line = {"image": "room/a.png", "box": [10, 8, 20, 20], "text": "the cube", "height": 48.0,
            "width": 64, "segmentation": {"size": [48, 64], "counts": lengths}}
    path = tmp_path / "val.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(line).encode() + b"\r\n\r\n"
                     + json.dumps(line).encode() + b"\r\n")
    records = load_annotations(path)
    assert len(records) == 2 and records[0].size == (48, 64)
    decoded = mask_utils.decode(mask_utils.frPyObjects(records[0].rle, 48, 64))
    assert np.array_equal(decoded.flatten(order="F"), flat)


def test_an_rle_size_of_whole_floats_is_read_as_integers(tmp_path):
    rle = {**_rle(48, 64), "size": [48.0, 64.0]}
    path = _write(tmp_path / "val.jsonl", {"image": "room/a.png", "box": [10, 8, 20, 20],
                                           "text": "x", "segmentation": rle})
    (record,) = load_annotations(path)
    assert record.rle["size"] == [48, 64] and all(type(v) is int for v in record.rle["size"])


def test_eval_of_a_folder_without_evaluation_splits_says_what_it_holds(tmp_path, images):
    from oneref.eval.splits import default_splits
    from oneref.train.config import DataConfig

    ann = tmp_path / "ann"
    ann.mkdir()
    data = DataConfig(dataset="mine", annotations=str(ann), root=str(images))
    with pytest.raises(ValueError, match=r"holds no \{split\}.jsonl files: name the split"):
        default_splits(data)
    _write(ann / "train.jsonl", {"image": "room/a.png", "box": [1, 1, 2, 2], "text": "x"})
    with pytest.raises(ValueError, match="holds only train: name the split to evaluate"):
        default_splits(data)


def test_repeated_lines_are_counted_in_a_warning(tmp_path, caplog):
    line = {"image": "room/a.png", "box": [1, 1, 2, 2], "text": "x"}
    path = _write(tmp_path / "val.jsonl", line, {**line, "text": "y"}, line, line)
    with caplog.at_level(logging.WARNING):
        assert len(load_annotations(path)) == 4
    assert "2 line(s) repeat an earlier line's image, box and text" in caplog.text
    assert "first: line 3 repeats line 1" in caplog.text


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
    (ann / "._train.jsonl").write_bytes(b"\x00\x05\x16\x07")  # macOS's resource fork
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
    _write(ann / "test.jsonl", line, {**line, "segmentation": _rle(40, 64)})
    source = layout.resolve("mine", "test", str(images), annotations=str(ann))
    with pytest.raises(ValueError, match=r"test.jsonl:2: RLE segmentation of size \[40, 64\] "
                                         r"\(height, width\), but .*a.png is 64x48"):
        layout.build_split(source, refshapes_tokenizer(), 64, 16, train=False, use_masks=True)


def test_expressions_longer_than_the_model_reads_are_counted(tmp_path, images, caplog):
    ann = tmp_path / "ann"
    ann.mkdir()
    line = {"image": "room/a.png", "box": [10, 8, 20, 20], "text": "red cube"}
    _write(ann / "val.jsonl", line, {**line, "text": " ".join(["red"] * 14)},
           {**line, "text": " ".join(["red"] * 15)})  # 14 + <s> + </s> = 16 ids fit
    source = layout.resolve("mine", "val", str(images), annotations=str(ann))
    with caplog.at_level(logging.WARNING, logger="oneref.data.layout"):
        layout.build_split(source, refshapes_tokenizer(), 64, 16, train=False, use_masks=False)
    assert ("val.jsonl: 1 of 3 expressions are longer than the model's 16 tokens "
            "(max_text_len, <s> and </s> included)") in caplog.text


def test_sts_labels_go_into_a_copy(tmp_path):
    """Line for line, whatever the file's line ends, byte-order mark or characters (JSON
    strings may hold U+2028, a line separator to Python's str.splitlines)."""
    first = {"image": "a.png", "box": [1, 1, 2, 2], "text": "x\u2028\u00e9", "id": 7}
    second = {"image": "b.png", "box": [1, 1, 2, 2], "text": "y"}
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(first, ensure_ascii=False).encode()
                     + b"\r\n\r\n" + json.dumps(second).encode() + b"\r\n")
    out = write_sts_annotations(path, tmp_path / "labelled", [[0.25, 0.5], [0.75]])
    assert [r.extra for r in load_annotations(out)] == [[0.25, 0.5], [0.75]]
    assert [json.loads(line) for line in out.read_bytes().split(b"\n") if line] == [
        {**first, "sts": [0.25, 0.5]}, {**second, "sts": [0.75]}]
    relabelled = write_sts_annotations(out, tmp_path / "again", [[0.5, 0.5], [0.5]])
    assert [r.extra for r in load_annotations(relabelled)] == [[0.5, 0.5], [0.5]]
    with pytest.raises(ValueError, match="2 records but 1 label rows"):
        write_sts_annotations(path, tmp_path / "labelled", [[0.5]])
    with pytest.raises(ValueError, match="--out would overwrite the input annotation file"):
        write_sts_annotations(path, tmp_path, [[0.5], [0.5]])
