"""Per-sample results of an evaluation (``oneref eval --predictions``): every sample's IoU and
predicted box as JSON lines, and the lowest-IoU samples drawn, target beside prediction.

A row's ``iou`` is the metric's, on the padded canvas the model sees (REC: the predicted
box's IoU with the target box; RES: the masks'); for image files ``box_xyxy`` is the
prediction in the image's pixels, clipped to the image, so its IoU with ``target_xyxy`` can
differ where a prediction reaches into the padding. RES rows give the box around the
predicted mask (none for an empty mask).

Each rank records its shard: all rows (a few numbers each) and its own ``worst`` samples
with their predicted masks (RES), so memory stays bounded by the split's size in rows and by
``worst`` in masks. :meth:`SampleRecorder.gather` joins them on every rank.
"""

from __future__ import annotations

import heapq
import json
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from oneref.data.refer import ReferringDataset, image_size
from oneref.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oneref.eval.metrics import mask_intersection_union, mask_ious, rec_hits
from oneref.eval.predict import canvas_to_pixels, mask_boxes
from oneref.io import atomic_write
from oneref.train.distributed import several_ranks

__all__ = ["SampleRecorder", "WORST", "SAMPLE_FILES", "sample_paths"]

#: Samples drawn per split.
WORST = 16
#: The files :meth:`SampleRecorder.write` writes per split (``{}``: the split's name).
SAMPLE_FILES = ("predictions_{}.jsonl", "worst_{}.png")
#: Smallest side of a drawn sample (small presets' canvases are scaled up to it).
_TILE = 256
_TARGET, _PREDICTED = (40, 200, 60), (230, 30, 30)


class SampleRecorder:
    """Collects per-sample IoUs and predictions of one split (pass it to
    :func:`oneref.eval.evaluate.evaluate`), then writes them."""

    def __init__(self, task: str, worst: int = WORST):
        self.task = task
        self.worst = worst
        self.rows: list[dict] = []
        self._worst: list[tuple[float, int, np.ndarray | None]] = []  # heap of (-iou, -index)

    def update(self, out, batch: dict) -> None:
        """Add one batch's model output (``forward_rec`` / ``forward_res``)."""
        if self.task == "rec":
            boxes, masks = out.boxes.float(), None
            ious = rec_hits(boxes, batch["boxes"].float())[1]
        else:
            masks = out.mask_logits > 0
            ious = mask_ious(*mask_intersection_union(masks, batch["masks"] > 0.5))
            boxes = mask_boxes(masks)
        ious, boxes = ious.tolist(), boxes.cpu().tolist()
        for k, index in enumerate(batch["indices"].tolist()):
            self.rows.append({"index": index, "iou": ious[k], "box_cxcywh": boxes[k]})
            key = (-ious[k], -index)
            if len(self._worst) == self.worst and key <= self._worst[0][:2]:
                continue  # not below the IoUs kept (ties go to the earlier index)
            # Only a kept sample's mask leaves the device.
            entry = (*key, None if masks is None else masks[k].cpu().numpy())
            if len(self._worst) < self.worst:
                heapq.heappush(self._worst, entry)
            else:
                heapq.heapreplace(self._worst, entry)

    def gather(self) -> None:
        """Join every rank's rows and worst samples (a collective under a process group)."""
        if not several_ranks():
            return
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.rows, self._worst))
        self.rows = [row for rows, _ in parts for row in rows]
        entries = [entry for _, worst in parts for entry in worst]
        self._worst = heapq.nlargest(self.worst, entries, key=lambda e: e[:2])

    def worst_samples(self) -> list[tuple[int, float, np.ndarray | None]]:
        """(index, IoU, predicted canvas mask or None), lowest IoU first."""
        ordered = sorted(self._worst, key=lambda e: e[:2], reverse=True)
        return [(-index, -neg_iou, mask) for neg_iou, index, mask in ordered]

    def write(self, dataset, split: str, out_dir: str | Path) -> list[Path]:
        """``predictions_{split}.jsonl`` (one row per sample, in dataset order) and
        ``worst_{split}.png`` in ``out_dir``, each written atomically."""
        jsonl, png = sample_paths(out_dir, split)
        sizes: dict[str, tuple[int, int]] = {}  # image file -> (width, height)
        lines = [json.dumps(self._row(dataset, row, sizes)) for row in
                 sorted(self.rows, key=lambda r: r["index"])]
        atomic_write(jsonl, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        picture = draw_worst(dataset, self.worst_samples(), {r["index"]: r for r in self.rows},
                             self.task)
        atomic_write(png, lambda tmp: picture.save(tmp, format="PNG"))
        return [jsonl, png]

    def _row(self, dataset, row: dict, sizes: dict) -> dict:
        """A row with the expression, and for image files where the record is, its image,
        both boxes in the image's pixels (x1, y1, x2, y2) and what else the file said of the
        sample (``meta``)."""
        index, iou = row["index"], row["iou"]
        out = {"index": index, "text": _text(dataset, index), "iou": iou}
        if self.task == "rec":
            out["hit"] = iou >= 0.5
        out["box_cxcywh"] = [round(v, 5) for v in row["box_cxcywh"]]
        if isinstance(dataset, ReferringDataset):
            record = dataset.records[index]
            path = dataset.image_path(record)
            if path not in sizes:
                sizes[path] = image_size(path)
            width, height = sizes[path]
            # The file and line (or index) of the record, and its image as the file names it:
            # keys to join the rows back on; ``image`` is the file that was read.
            out["where"], out["image_file"], out["image"] = record.where, record.image_file, path
            empty = self.task == "res" and not any(row["box_cxcywh"])
            out["box_xyxy"] = None if empty else [round(v, 2) for v in canvas_to_pixels(
                row["box_cxcywh"], width, height, dataset.img_size)]
            out["target_xyxy"] = [round(v, 2) for v in record.box]
            if record.meta:  # an annotation line's own keys, refer-toolkit ids
                out["meta"] = record.meta
        return out


def sample_paths(out_dir: str | Path, split: str) -> list[Path]:
    """The per-sample files of ``split`` in ``out_dir`` (:data:`SAMPLE_FILES`)."""
    return [Path(out_dir) / name.format(split) for name in SAMPLE_FILES]


def _text(dataset, index: int) -> str:
    if isinstance(dataset, ReferringDataset):
        return dataset.records[index].phrase
    return dataset.scene(index).text  # RefShapes


def _canvas(sample: dict) -> Image.Image:
    """The model's input image of a sample, back in RGB bytes."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((sample["image"].float() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


def _corners(cxcywh, size: int) -> list[float]:
    cx, cy, w, h = (float(v) for v in cxcywh)
    return [(cx - w / 2) * size, (cy - h / 2) * size, (cx + w / 2) * size, (cy + h / 2) * size]


def _tile(dataset, index: int, iou: float, mask: np.ndarray | None, row: dict,
          task: str) -> Image.Image:
    """One sample on its canvas: the target in green, the prediction in red (RES: the
    predicted mask tinted, the target mask outlined by its box), the IoU and the text."""
    sample = dataset[index]
    canvas = _canvas(sample).convert("RGBA")
    size = canvas.width
    if mask is not None:
        overlay = np.zeros((size, size, 4), np.uint8)
        overlay[mask] = (*_PREDICTED, 110)
        canvas = Image.alpha_composite(canvas, Image.fromarray(overlay, "RGBA"))
    scale = max(1, -(-_TILE // size))
    canvas = canvas.convert("RGB").resize((size * scale, size * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    width = max(2, scale)
    target = sample["mask"] > 0.5 if task == "res" else None
    target_box = (mask_boxes(target[None])[0] if target is not None and target.any()
                  else sample["box"])
    draw.rectangle(_corners(target_box, size * scale), outline=_TARGET, width=width)
    if any(row["box_cxcywh"]):
        draw.rectangle(_corners(row["box_cxcywh"], size * scale), outline=_PREDICTED,
                       width=width)
    caption = textwrap.wrap(f"#{index} IoU {iou:.2f}: {_text(dataset, index)}",
                            width=max(20, canvas.width // 7))[:3]
    framed = Image.new("RGB", (canvas.width, canvas.height + 12 * len(caption) + 6), "white")
    framed.paste(canvas, (0, 0))
    text = ImageDraw.Draw(framed)
    for line, words in enumerate(caption):
        text.text((3, canvas.height + 3 + 12 * line), words, fill=(0, 0, 0))
    return framed


def draw_worst(dataset, worst, rows: dict[int, dict], task: str,
               columns: int = 4) -> Image.Image:
    """The ``worst`` samples (index, IoU, predicted mask) in a grid, lowest IoU first."""
    tiles = [_tile(dataset, index, iou, mask, rows[index], task) for index, iou, mask in worst]
    if not tiles:
        return Image.new("RGB", (1, 1), "white")
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    columns = min(columns, len(tiles))
    grid = Image.new("RGB", (columns * tile_w, -(-len(tiles) // columns) * tile_h), "white")
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % columns) * tile_w, (k // columns) * tile_h))
    return grid
