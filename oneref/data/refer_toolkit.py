"""The refer-toolkit layout: ``{root}/{refcoco,refcoco+,refcocog}/instances.json`` (COCO) and
``refs(unc|google|umd).p`` pickles (docs/data.md).

Each ref has ``ref_id, ann_id, image_id, split, sentences[{raw, sent, sent_id, tokens}]``;
every sentence becomes one :class:`RefRecord` with the annotation's box (COCO xywh) and its
segmentation (polygons or RLE, decoded later with pycocotools).
"""

from __future__ import annotations

import json
import logging
import os

from oneref.data.records import (ErrorPolicy, RefRecord, check_box_inside, check_phrase,
                                 check_segmentation, parse_box)
from oneref.io import load_pickle

__all__ = ["DEFAULT_SPLIT_BY", "load_refer"]

log = logging.getLogger(__name__)

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"instances file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read instances file {path!r}: {err}") from err
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"instances file {path!r} has no '{key}' list")
    return data


def _read_refs(path: str, trust: bool) -> list:
    refs = load_pickle(path, trust=trust, what="refs file")
    if not isinstance(refs, list):
        raise ValueError(f"refs file {path!r} holds a {type(refs).__name__}, expected a list")
    return refs


def load_refer(root: str | os.PathLike, dataset: str = "refcoco", split: str = "val",
               split_by: str | None = None, on_error: str = "raise",
               sentence_key: str = "sent", trust: bool = False) -> list[RefRecord]:
    """Records of one split (``"train"``, ``"val"``, ``"testA"``, ...) of a refer-toolkit
    dataset; ``split_by`` defaults to unc (refcoco, refcoco+) / umd (refcocog).
    ``sentence_key`` picks "sent" (normalised) or "raw". The refs pickle is read as plain
    data (``trust=True`` unpickles anything: :func:`oneref.io.load_pickle`)."""
    root = os.fspath(root)
    if split_by is None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise ValueError(f"unknown dataset {dataset!r}: pass split_by (unc, google, umd)")
        split_by = DEFAULT_SPLIT_BY[dataset]
    folder = os.path.join(root, dataset)
    refs_path = os.path.join(folder, f"refs({split_by}).p")
    instances = _read_json(os.path.join(folder, "instances.json"))
    refs = _read_refs(refs_path, trust)
    images = {img.get("id"): img for img in instances["images"] if isinstance(img, dict)}
    anns = {ann.get("id"): ann for ann in instances["annotations"] if isinstance(ann, dict)}
    policy = ErrorPolicy(on_error, refs_path)
    records = []
    found_split = False
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict):
            policy.fail(f"ref {index}", f"is a {type(ref).__name__}, expected a dict")
            continue
        if ref.get("split") != split:
            continue
        found_split = True
        where = f"ref {index} (ref_id {ref.get('ref_id')})"
        try:
            records.extend(_ref_records(ref, images, anns, sentence_key,
                                        f"{os.path.basename(refs_path)}[{index}]"))
        except ValueError as err:
            policy.fail(where, str(err))
    policy.report()
    if not found_split:
        splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        raise ValueError(f"{refs_path}: no ref has split {split!r}; splits present: {splits}")
    log.info("%s: %d expressions in split %s", refs_path, len(records), split)
    return records


def _ref_records(ref: dict, images: dict, anns: dict, sentence_key: str,
                 where: str) -> list[RefRecord]:
    for key in ("ann_id", "image_id", "sentences"):
        if key not in ref:
            raise ValueError(f"missing key '{key}'")
    ann = anns.get(ref["ann_id"])
    if ann is None:
        raise ValueError(f"ann_id {ref['ann_id']} is not in instances.json")
    image = images.get(ref["image_id"])
    if image is None:
        raise ValueError(f"image_id {ref['image_id']} is not in instances.json")
    try:
        width, height, file_name = int(image["width"]), int(image["height"]), image["file_name"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"image {ref['image_id']} needs file_name, width and height") from None
    box = check_box_inside(parse_box(ann.get("bbox"), "xywh"), width, height)
    polygons, rle = check_segmentation(ann.get("segmentation"))
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise ValueError("no sentences")
    out = []
    for k, sent in enumerate(sentences):
        if not isinstance(sent, dict) or sentence_key not in sent:
            raise ValueError(f"sentence {k} has no '{sentence_key}'")
        try:
            phrase = check_phrase(sent[sentence_key])
        except ValueError as err:
            raise ValueError(f"sentence {k} (sent_id {sent.get('sent_id')}): {err}") from None
        out.append(RefRecord(file_name, box, phrase, source="coco", polygons=polygons,
                             rle=rle, size=(height, width), where=f"{where} sentence {k}",
                             meta={"ref_id": ref.get("ref_id"), "sent_id": sent.get("sent_id"),
                                   "ann_id": ref["ann_id"], "image_id": ref["image_id"]}))
    return out
