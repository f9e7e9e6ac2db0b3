"""The ``loader`` row: samples/s of the real-data input pipeline in one process.

JPEG files of COCO sizes (smooth random gradients plus noise, quality 90) are written to a
temporary folder and read back through :class:`ReferringDataset`: PIL decode, COCO polygon
decode (pycocotools), the train or test transform and tokenisation. ``dataset[i]`` runs in
this process with one torch thread, as in a DataLoader worker, so the rate is per worker.
``workers_needed_for`` is how many such workers keep up with each consumer rate in
:data:`TARGETS`.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from oneref.bench.timing import time_calls
from oneref.data.collate import make_sample
from oneref.data.records import RefRecord
from oneref.data.refer import ReferringDataset, decode_segmentation
from oneref.data.synthetic import refshapes_tokenizer
from oneref.data.transforms import Example, TestTransform, TrainTransform

__all__ = ["TARGETS", "COCO_SIZES", "write_images", "iter_loader_rows"]

log = logging.getLogger(__name__)

# Consumer rates (samples/s) the loader must feed. The G5 batch-256 inference rate is not in
# those results (the G5 part ran out of its time box), so the training step is the only one.
TARGETS = {
    "G4 train (c) H100": {
        "samples_per_s": 283.0,
        "source": "benchmarks/results/h100-2026-11-27/README.md: G4, OneRef-B REC training "
                  "step, engine (c), batch 64, one H100, 2026-11-27",
    },
}
# (width, height) of common COCO train2014 images.
COCO_SIZES = ((640, 480), (480, 640), (640, 427))
PHRASES = ("man in a red shirt holding a racket", "left elephant", "woman with an umbrella",
           "second car from the right", "dog lying on the couch", "blue vase behind the flowers")
CPU = torch.device("cpu")


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour gradients (a bicubic upscale of a coarse random grid) plus pixel noise;
    the noise makes a 640x480 quality-90 file about 160 KB, near the mean file of COCO
    train2014 (13.5 GB / 82,783 images), so the JPEG decode cost is that of a photo."""
    coarse = Image.fromarray(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = base + rng.normal(0.0, 24.0, size=base.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _ellipse_polygon(box, rng: np.random.Generator, points: int = 16) -> list[float]:
    """A flat COCO polygon [x, y, ...]: a jittered ellipse inscribed in box x1y1x2y2."""
    x1, y1, x2, y2 = box
    angles = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
    radius = rng.uniform(0.8, 1.0, size=points)
    xs = (x1 + x2) / 2 + radius * (x2 - x1) / 2 * np.cos(angles)
    ys = (y1 + y2) / 2 + radius * (y2 - y1) / 2 * np.sin(angles)
    return np.stack([xs, ys], axis=1).ravel().tolist()


def write_images(folder: Path, num_images: int, seed: int = 0) -> list[RefRecord]:
    """``num_images`` JPEG files in ``folder`` (sizes cycling through :data:`COCO_SIZES`),
    each with one record: a box inside the image, its polygon and a phrase."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_images):
        width, height = COCO_SIZES[index % len(COCO_SIZES)]
        name = f"{index:04d}.jpg"
        _photo_like(rng, width, height).save(folder / name, quality=90)
        box_w, box_h = rng.uniform(0.2, 0.7) * width, rng.uniform(0.2, 0.7) * height
        x1, y1 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
        box = (x1, y1, x1 + box_w, y1 + box_h)
        records.append(RefRecord(name, box, PHRASES[index % len(PHRASES)],
                                 polygons=[_ellipse_polygon(box, rng)], size=(height, width),
                                 where=f"loader[{index}]"))
    return records


def _stage_ms(dataset: ReferringDataset) -> dict:
    """Mean ms per sample of each stage of ``dataset[i]``, timed piece by piece in one pass
    over the records (the calls of ``ReferringDataset.__getitem__``, other random draws)."""
    totals = dict.fromkeys(("decode", "mask", "transform", "tokenise"), 0.0)
    for index, record in enumerate(dataset.records):
        start = time.perf_counter()
        with Image.open(dataset.image_path(record)) as handle:
            image = handle.convert("RGB")
        decoded = time.perf_counter()
        mask = decode_segmentation(record, image.height, image.width)
        masked = time.perf_counter()
        example = Example(image, np.asarray(record.box, dtype=np.float64), mask, record.phrase)
        out = dataset.transform(example, np.random.default_rng([dataset.seed, index]))
        transformed = time.perf_counter()
        make_sample(out, dataset.tokenizer, dataset.max_text_len, (-1, -1), index)
        done = time.perf_counter()
        for stage, seconds in zip(totals, (decoded - start, masked - decoded,
                                           transformed - masked, done - transformed)):
            totals[stage] += seconds
    return {stage: 1e3 * seconds / len(dataset) for stage, seconds in totals.items()}


def _loader_row(dataset: ReferringDataset, transform_name: str, warmup: int, passes: int,
                targets: dict) -> dict:
    """Samples/s of ``dataset[i]`` over ``passes`` full passes (a new epoch each, so new
    augmentation draws), their median and spread, the stage split and the workers needed."""
    indices = list(range(len(dataset)))
    rates = []
    for epoch in range(passes):
        dataset.set_epoch(epoch)
        times = time_calls(dataset.__getitem__, indices, CPU, warmup, len(indices))
        rates.append(len(indices) / sum(times))
    rate = statistics.median(rates)
    return {
        "row": "loader", "transform": transform_name, "img_size": dataset.img_size,
        "max_text_len": dataset.max_text_len, "num_images": len(dataset),
        "samples_per_s_per_worker": rate, "runs": rates,
        "spread": (max(rates) - min(rates)) / rate, "ms_per_sample": 1e3 / rate,
        "stage_ms": _stage_ms(dataset),
        "workers_needed_for": {name: math.ceil(t["samples_per_s"] / rate)
                               for name, t in targets.items()},
        "targets": targets,
    }


def iter_loader_rows(num_images: int = 64, img_size: int = 384, max_text_len: int = 64,
                     warmup: int = 4, passes: int = 2, seed: int = 0,
                     targets: dict = TARGETS) -> Iterator[dict]:
    """One row per transform (train, then test), measured with one torch thread (as in a
    DataLoader worker) on ``num_images`` fresh JPEG files."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="oneref-loader-") as folder:
        records = write_images(Path(folder), num_images, seed)
        mean_jpeg_kb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 1024 / num_images
        for name, transform in (("train", TrainTransform(img_size)),
                                ("test", TestTransform(img_size))):
            dataset = ReferringDataset(records, folder, refshapes_tokenizer(), img_size=img_size,
                                       max_text_len=max_text_len, transform=transform,
                                       parse_words=False, check_images=True, seed=seed,
                                       name="loader")
            torch.set_num_threads(1)
            try:
                row = _loader_row(dataset, name, warmup, passes, targets)
            finally:
                torch.set_num_threads(threads)
            row["mean_jpeg_kb"] = mean_jpeg_kb
            log.info("loader %s: %.1f samples/s per worker", name,
                     row["samples_per_s_per_worker"])
            yield row
