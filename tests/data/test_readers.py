"""Readers of real referring data on small files written in the real formats."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from oneref.data import collate
from oneref.data.refer import ReferringDataset
from oneref.data.refer_toolkit import load_refer
from oneref.data.splitfiles import load_split_file, parse_split_name
from oneref.data.synthetic import refshapes_tokenizer

S = 64
POLY = [[10.0, 8.0, 30.0, 8.0, 30.0, 28.0, 10.0, 28.0]]  # square x 10..30, y 8..28


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refdata")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        root / "images" / "a.png")
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
        root / "images" / "b.jpg")
    (root / "images" / "broken.jpg").write_bytes(b"not an image at all")
    mask = np.zeros((48, 64), np.uint8)
    mask[5:15, 40:60] = 255
    (root / "masks").mkdir()
    Image.fromarray(mask).save(root / "masks" / "m1.png")
    return root


def _save(path, items):
    torch.save(items, path)
    return path


@pytest.fixture()
def tok():
    return refshapes_tokenizer()


def test_coco_family_5_tuples(root, tok):
    info = {"height": 48, "width": 64}
    path = _save(root / "unc_val.pth", [
        ("a.png", info, [10, 8, 20, 20], "the red square", POLY),
        ("a.png", info, [40, 5, 20, 10], "the blue circle", []),
    ])
    records = load_split_file(path)
    assert records[0].box == (10, 8, 30, 28) and records[0].polygons == POLY
    assert records[0].size == (48, 64) and records[1].polygons is None
    ds = ReferringDataset(records, root / "images", tok, img_size=S, max_text_len=12,
                          parse_words=False)
    s0, s1 = ds[0], ds[1]
    scale, oy = S / 64, (S - 48) // 2
    expect = torch.tensor([20 * scale, 18 * scale + oy, 20 * scale, 20 * scale]) / S
    assert torch.allclose(s0["box"], expect, atol=1e-5)
    assert s0["has_mask"] and not s1["has_mask"]
    ys, xs = np.nonzero(s0["mask"].numpy())
    assert (xs.min(), xs.max() + 1, ys.min() - oy, ys.max() + 1 - oy) == (10, 30, 8, 28)
    assert s0["text_length"].item() == 5 and s0["word_positions"].tolist() == [-1, -1]
    batch = collate([s0, s1])
    assert batch["has_mask"].tolist() == [True, False] and batch["masks"].shape == (2, S, S)
    last = ds[-1]  # Python indexing: the last sample, with its non-negative index
    assert last["index"] == 1 and torch.equal(last["image"], s1["image"])
    with pytest.raises(IndexError, match="out of range"):
        ds[2]


def test_a_recorded_image_size_other_than_the_file_s_is_warned(root, tok, caplog):
    path = _save(root / "unc_testB.pth", [
        ("a.png", {"height": 48, "width": 64}, [10, 8, 20, 20], "the red square", []),
        ("b.jpg", {"height": 120, "width": 160}, [10, 8, 20, 20], "the square", []),
        ("b.jpg", {"height": 120, "width": 160}, [40, 5, 20, 10], "the circle", []),
    ])
    with caplog.at_level(logging.WARNING, logger="oneref.data.refer"):
        ds = ReferringDataset(load_split_file(path), root / "images", tok, img_size=S,
                              parse_words=False)
    assert len(ds) == 3
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "2 record(s) give an image size other than their file's" in (
        warned[0])
    assert "unc_testB.pth[1]: recorded 160x120" in warned[0] and "b.jpg is 80x60" in warned[0]


def test_transvg_referit_flickr_layouts(root, tok):
    referit = load_split_file(_save(root / "referit_test.pth", [
        ("a.png", "m1.png", [40, 5, 60, 15], "the circle", ["attr"]),
    ]))
    assert referit[0].box == (40, 5, 60, 15) and referit[0].mask_file == "m1.png"
    assert referit[0].source == "referit"
    ds = ReferringDataset(referit, root / "images", tok, img_size=S, mask_root=root / "masks",
                          parse_words=False)
    s = ds[0]
    assert s["has_mask"]
    ys, xs = np.nonzero(s["mask"].numpy())
    assert (xs.min(), xs.max() + 1) == (40, 60)
    flickr = load_split_file(_save(root / "flickr_val.pth", [("b.jpg", [1, 2, 50, 40], "a dog")]))
    assert flickr[0].box == (1, 2, 50, 40) and flickr[0].source == "flickr"
    gref = load_split_file(_save(root / "gref_umd_val.pth", [
        ("b.jpg", "7.png", [1, 2, 10, 10], "x", []),
    ]))
    assert gref[0].box == (1, 2, 11, 12)
    assert parse_split_name("/x/gref_umd_testB.pth") == ("gref_umd", "testB")


def test_mixup_and_sts_layouts(root, tok):
    items = [
        ("a.png", "referit", [10, 8, 20, 20], "left thing", []),
        ("b.jpg", "flickr", [5, 5, 10, 10], "a dog", []),
        ("a.png", {"height": 48, "width": 64}, [10, 8, 20, 20], "the square", POLY,
         [0.1, 0.9]),
    ]
    records = load_split_file(_save(root / "mixup_train.pth", items))
    assert [r.source for r in records] == ["referit", "flickr", "coco"]
    assert records[1].box == (5, 5, 15, 15) and records[2].extra == [0.1, 0.9]
    roots = {"referit": root / "images", "flickr": root / "images", "coco": root / "images"}
    ds = ReferringDataset(records, roots, tok, img_size=S, parse_words=False)
    assert len(ds) == 3 and ds[2]["has_mask"]
    with pytest.raises(ValueError, match="no image root for source 'flickr'"):
        ReferringDataset(records, {"referit": root / "images"}, tok, img_size=S)


@pytest.mark.parametrize("item,problem", [
    (("a.png", [1, 2, 3, 4]), "length 2"),
    (("a.png", {"height": 48, "width": 64}, [1, 2, 3], "x", []), "not 4 numbers"),
    (("a.png", {"height": 48, "width": 64}, [1, float("nan"), 3, 4], "x", []), "non-finite"),
    (("a.png", {"height": 48, "width": 64}, [1, 2, 3, 4], "   ", []), "empty expression"),
    (("a.png", {"height": 48, "width": 64}, [50, 2, 30, 4], "x", []), "outside the 64x48"),
    (("a.png", {"height": 48, "width": 64}, [5, 2, 0, 4], "x", []), "no area"),
    (("a.png", {"height": 48, "width": 64}, [5, 2, 3, 4], "x", [[1, 2, 3]]), "polygon 0"),
    (("a.png", {"width": 64}, [5, 2, 3, 4], "x", []), "'height'"),
    ((None, "referit", [5, 2, 3, 4], "x", []), "image file name"),
])
def test_malformed_records_name_file_index_problem(root, item, problem):
    path = _save(root / "unc_testA.pth", [("a.png", {"height": 48, "width": 64},
                                          [1, 1, 5, 5], "ok", []), item])
    with pytest.raises(ValueError) as info:
        load_split_file(path)
    message = str(info.value)
    assert "unc_testA.pth" in message and "record 1" in message and problem in message


def test_skip_and_count(root, caplog):
    path = _save(root / "unc_train.pth", [
        ("a.png", {"height": 48, "width": 64}, [1, 1, 5, 5], "ok", []),
        ("a.png", {"height": 48, "width": 64}, [1, 1, 5], "bad", []),
        ("a.png", {"height": 48, "width": 64}, [1, 1, 5, 5], "", []),
        "garbage",
    ])
    with caplog.at_level(logging.WARNING):
        records = load_split_file(path, on_error="skip")
    assert len(records) == 1
    assert "skipped 3 malformed record(s)" in caplog.text


def test_image_errors(root, tok):
    records = load_split_file(_save(root / "flickr_test.pth", [
        ("a.png", [1, 2, 20, 20], "fine"),
        ("missing.png", [1, 2, 20, 20], "gone"),
        ("broken.jpg", [1, 2, 20, 20], "broken"),
        ("a.png", [1, 2, 200, 20], "too wide"),
    ]))
    with pytest.raises(ValueError, match=r"flickr_test.pth\[1\].*missing.png.*does not exist"):
        ReferringDataset(records, root / "images", tok, img_size=S)
    ds = ReferringDataset(records, root / "images", tok, img_size=S, on_error="skip")
    assert len(ds) == 1
    lazy = ReferringDataset(records, root / "images", tok, img_size=S, check_images=False)
    with pytest.raises(ValueError, match="broken.jpg"):
        lazy[2]
    with pytest.raises(ValueError, match=r"outside the 64x48 image"):
        lazy[3]


def _refer_layout(root):
    folder = root / "refer" / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    rle_mask = np.zeros((48, 64), np.uint8, order="F")
    rle_mask[20:40, 30:50] = 1
    compressed = mask_utils.encode(rle_mask)
    compressed["counts"] = compressed["counts"].decode("ascii")
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = rle_mask.flatten(order="F")
    runs, current, count = [], 0, 0
    for v in flat:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = v, 1
    runs.append(count)
    instances = {
        "images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}],
        "annotations": [
            {"id": 11, "image_id": 1, "bbox": [10, 8, 20, 20], "segmentation": POLY},
            {"id": 12, "image_id": 1, "bbox": [30, 20, 20, 20], "segmentation": compressed},
            {"id": 13, "image_id": 1, "bbox": [30, 20, 20, 20],
             "segmentation": {"size": [48, 64], "counts": runs}},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))

    def ref(ref_id, ann_id, split, *sents):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 1, "split": split,
                "category_id": 1,
                "sentences": [{"raw": s.upper(), "sent": s, "sent_id": 100 * ref_id + k,
                               "tokens": s.split()} for k, s in enumerate(sents)]}

    refs = [ref(1, 11, "val", "the square", "left square"), ref(2, 12, "val", "the blob"),
            ref(3, 13, "val", "blob again"), ref(4, 11, "testA", "square")]
    with open(folder / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle)
    return root / "refer", refs, folder


def test_refer_toolkit_polygons_and_rle(root, tok):
    refer_root, _, _ = _refer_layout(root)
    records = load_refer(refer_root, "refcoco", "val")
    assert [r.phrase for r in records] == ["the square", "left square", "the blob", "blob again"]
    assert records[0].box == (10, 8, 30, 28)
    assert records[1].meta["sent_id"] == 101
    assert len(load_refer(refer_root, "refcoco", "testA")) == 1
    ds = ReferringDataset.from_refer(refer_root, "refcoco", "val", root / "images", tok,
                                     img_size=64, parse_words=False)
    oy = (64 - 48) // 2
    for k, (x1, y1, x2, y2) in enumerate([(10, 8, 30, 28), (10, 8, 30, 28), (30, 20, 50, 40),
                                          (30, 20, 50, 40)]):
        s = ds[k]
        ys, xs = np.nonzero(s["mask"].numpy())
        assert s["has_mask"]
        assert (xs.min(), ys.min() - oy, xs.max() + 1, ys.max() + 1 - oy) == (x1, y1, x2, y2)
        assert s["mask"].sum().item() == (x2 - x1) * (y2 - y1)
    with pytest.raises(ValueError, match="splits present"):
        load_refer(refer_root, "refcoco", "testB")


def test_refer_toolkit_malformed(root):
    refer_root, refs, folder = _refer_layout(root)
    bad = [dict(refs[0]), dict(refs[1]), dict(refs[2])]
    bad[1]["ann_id"] = 999
    bad[2]["sentences"] = [{"sent": "  ", "sent_id": 7}]
    with open(folder / "refs(unc).p", "wb") as handle:
        pickle.dump(bad, handle)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: ref 1 \(ref_id 2\): ann_id 999"):
        load_refer(refer_root, "refcoco", "val")
    records = load_refer(refer_root, "refcoco", "val", on_error="skip")
    assert len(records) == 2
    bad = [dict(refs[0])]
    bad[0]["sentences"] = [{"sent": "", "sent_id": 7}]
    with open(folder / "refs(unc).p", "wb") as handle:
        pickle.dump(bad, handle)
    with pytest.raises(ValueError, match=r"ref 0 .*sent_id 7.*empty expression"):
        load_refer(refer_root, "refcoco", "val")
