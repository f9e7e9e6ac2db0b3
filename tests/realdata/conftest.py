"""A small real-data set in the official on-disk layout (docs/data.md), written once per
session: JPEGs under the image tree, split files for unc / referit / flickr / mixup, a
refer-toolkit pair, annotation files of "your own data" (JSON lines), a toy sentencepiece
model, and tiny BEiT-3 / OneRef checkpoints in the
official key layout with pickled training arguments, saved at image size 32 so loading them
into the tiny preset (64) resizes the position table."""

import argparse
import io
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from oneref.config import get_config
from oneref.testing import official_beit3_state, official_oneref_state

PHRASES = ["the man in the red shirt on the left", "a dog lying on the couch",
           "second car from the right", "woman holding an umbrella", "the blue vase",
           "left elephant", "the small cat in the middle", "bottom right pizza slice"]
# (width, height) of the generated images: landscape and portrait, larger than the tiny
# preset's 64-pixel canvas so every transform resizes.
SIZES = [(96, 72), (72, 96), (100, 75), (80, 80)]
COCO_DIR = "other/images/mscoco/images/train2014"


@dataclass
class RealData:
    root: Path
    images: Path  # --data-root
    splits: Path  # --split-root
    refer: Path  # --refer-root
    annotations: Path  # --annotations (with --data-root images)
    spm: Path
    beit3: Path  # official BEiT-3 start point (img 32)
    oneref: Path  # official OneRef fine-tuned checkpoint (img 32, heads, optimizer, args)

    def flags(self, dataset: str = "unc") -> list[str]:
        return ["--dataset", dataset, "--data-root", str(self.images), "--split-root",
                str(self.splits), "--tokenizer", str(self.spm)]


def _write_jpeg(path: Path, size, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _coco_items(names, offset: int):
    items = []
    for k, name in enumerate(names):
        w, h = SIZES[k % len(SIZES)]
        box = [4.0 + k, 6.0, w / 2, h / 3]
        items.append((name, {"height": h, "width": w}, box, PHRASES[(k + offset) % len(PHRASES)],
                      _polygon(*box)))
    return items


def _write_splits(splits: Path, coco, referit, flickr) -> None:
    def save(dataset, split, items):
        (splits / dataset).mkdir(parents=True, exist_ok=True)
        torch.save(items, splits / dataset / f"{dataset}_{split}.pth")

    for index, split in enumerate(("train", "val", "testA", "testB")):
        save("unc", split, _coco_items(coco, index))
    for index, split in enumerate(("train", "val", "test")):
        ref = [(name, f"{k}_1.mat", [2.0, 3.0, 40.0 + k, 50.0], PHRASES[(k + index) % 8], [])
               for k, name in enumerate(referit)]
        save("referit", split, ref)
        flk = [(name, [1.0, 1.0, 30.0, 40.0 + k], PHRASES[(k + 3 + index) % 8])
               for k, name in enumerate(flickr)]
        save("flickr", split, flk)
        mix = ([(n, "referit", [2.0, 3.0, 20.0, 30.0], "the left one", []) for n in referit]
               + [(n, "flickr", [1.0, 1.0, 20.0, 20.0], "a dog", []) for n in flickr]
               + _coco_items(coco, index))
        save("mixup", split, mix)


def _write_refer(refer: Path, coco) -> None:
    folder = refer / "refcoco"
    folder.mkdir(parents=True)
    images = [{"id": k + 1, "file_name": name, "width": SIZES[k % 4][0],
               "height": SIZES[k % 4][1]} for k, name in enumerate(coco)]
    anns = [{"id": 100 + k, "image_id": k + 1, "bbox": [5.0, 5.0, 30.0, 20.0],
             "segmentation": _polygon(5.0, 5.0, 30.0, 20.0), "category_id": 1}
            for k in range(len(coco))]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    refs = [{"ref_id": k, "ann_id": 100 + k, "image_id": k + 1, "split": split,
             "sentences": [{"raw": PHRASES[k], "sent": PHRASES[k].lower(), "sent_id": k,
                            "tokens": PHRASES[k].split()}]}
            for k, split in enumerate(["train", "train", "val", "testA"])]
    with open(folder / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle)


def _write_annotations(folder: Path, coco) -> None:
    """train / val / test.jsonl over the COCO images, in every box and segmentation form the
    format has: xywh and xyxy boxes, polygons and an RLE, a stated image size, an extra key."""
    from pycocotools import mask as mask_utils

    folder.mkdir(parents=True)
    for index, split in enumerate(("train", "val", "test")):
        lines = []
        for k, name in enumerate(coco):
            w, h = SIZES[k % len(SIZES)]
            x, y, bw, bh = 4.0 + k, 6.0, w / 2, h / 3
            line = {"image": f"{COCO_DIR}/{name}", "text": PHRASES[(k + index) % len(PHRASES)],
                    "box": [x, y, bw, bh], "segmentation": _polygon(x, y, bw, bh), "id": k}
            if k == 1:
                del line["box"]
                line["box_xyxy"] = [x, y, x + bw, y + bh]
                line.update(height=h, width=w)
            if k == 2:
                pixels = np.zeros((h, w), dtype=np.uint8, order="F")
                pixels[int(y):int(y + bh), int(x):int(x + bw)] = 1
                rle = mask_utils.encode(pixels)
                line["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
            lines.append(json.dumps(line))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def _write_spm(path: Path) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(PHRASES * 4), model_writer=model,
                                   vocab_size=60, model_type="unigram", hard_vocab_limit=False,
                                   minloglevel=2)
    path.write_bytes(model.getvalue())


def _write_checkpoints(weights: Path) -> tuple[Path, Path]:
    weights.mkdir(parents=True)
    at_32 = get_config("tiny").replace(img_size=32)
    args = argparse.Namespace(model="beit3_tiny_patch16_32", imsize=32, lr=2.5e-4,
                              batch_size=64, sentencepiece_model="beit3.spm")
    beit3 = weights / "beit3_tiny_indomain_patch16_32.pth"
    torch.save({"model": official_beit3_state(at_32, seed=1), "args": args}, beit3)
    oneref = weights / "unc" / "best_checkpoint.pth"
    oneref.parent.mkdir()
    state = official_oneref_state(at_32, seed=2)
    torch.save({"model": state, "args": args, "epoch": 19, "val_accu": np.float64(0.81),
                "optimizer": {"state": {}, "param_groups": [{"lr": 3e-5, "params": [0]}]},
                "lr_scheduler": {"last_epoch": 19}}, oneref)
    _as_numpy1_pickle(oneref)
    return beit3, oneref


def _as_numpy1_pickle(path: Path) -> None:
    """Rename numpy 2's ``numpy._core`` module to numpy 1's ``numpy.core`` in the file's
    pickle, as in checkpoints written under numpy 1 (the released ones)."""
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)


@pytest.fixture(scope="session")
def realdata(tmp_path_factory) -> RealData:
    root = tmp_path_factory.mktemp("realdata")
    images = root / "image_data"
    coco = [f"COCO_train2014_{k:012d}.jpg" for k in range(1, 5)]
    referit = [f"{k}.jpg" for k in range(1, 3)]
    flickr = [f"{k}00.jpg" for k in range(1, 3)]
    for k, name in enumerate(coco):
        _write_jpeg(images / COCO_DIR / name, SIZES[k % 4], k)
    for k, name in enumerate(referit):
        _write_jpeg(images / "referit/images" / name, SIZES[k], 10 + k)
    for k, name in enumerate(flickr):
        _write_jpeg(images / "Flickr30k/flickr30k-images" / name, SIZES[k + 1], 20 + k)
    splits = root / "single_dataset"
    _write_splits(splits, coco, referit, flickr)
    _write_refer(root / "refer", coco)
    _write_annotations(root / "own", coco)
    _write_spm(root / "beit3.spm")
    beit3, oneref = _write_checkpoints(root / "weights")
    return RealData(root, images, splits, root / "refer", root / "own", root / "beit3.spm",
                    beit3, oneref)
