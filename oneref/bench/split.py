"""End-to-end test time of a RefCOCO-testA-sized split (5,657 expressions), data loading
included.

The split is synthetic and held in memory: a pool of distinct random RGB images (already
decoded, COCO-like 4:3 aspect, larger than the model input) is cycled through, each sample
goes through the real test transform (:class:`oneref.data.transforms.TestTransform`: resize
long side, normalise, centre-pad) in a real ``DataLoader``, text ids are pre-tokenised. JPEG
decoding and tokenisation are therefore *not* in the figure (stated in the JSON). When fewer
than 5,657 samples are measured the time is extrapolated linearly and labelled so.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from oneref.bench.engines import infer_step, make_batch
from oneref.bench.timing import sync
from oneref.config import ModelConfig
from oneref.data.transforms import Example, TestTransform

__all__ = ["SPLIT_SIZE", "SyntheticSplit", "split_test_time"]

log = logging.getLogger(__name__)
SPLIT_SIZE = 5657


class SyntheticSplit(Dataset):
    """``size`` test samples over ``pool`` distinct in-memory images.

    Items: dict image (3, S, S) float, text_ids (T,) long, text_length () long, box (4,)."""

    def __init__(self, config: ModelConfig, size: int, pool: int = 16, seed: int = 0):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        rng = np.random.default_rng(seed)
        width, height = (config.img_size * 5) // 3, (config.img_size * 5) // 4
        self.images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                       for _ in range(pool)]
        self.boxes = [np.array([0.2 * width, 0.25 * height, 0.6 * width, 0.8 * height])
                      for _ in range(pool)]
        text = config.max_text_len
        lengths = rng.integers(max(3, text // 4), text + 1, size)
        ids = rng.integers(4, config.vocab_size, (size, text))
        ids[np.arange(text)[None] >= lengths[:, None]] = 1
        ids[:, 0] = 0
        self.ids = torch.from_numpy(ids).long()
        self.lengths = torch.from_numpy(lengths).long()
        self.transform = TestTransform(config.img_size)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        k = index % len(self.images)
        out = self.transform(Example(self.images[k], self.boxes[k], None, ""))
        return {"image": out.image, "text_ids": self.ids[index],
                "text_length": self.lengths[index], "box": out.box}


def split_test_time(engine, config: ModelConfig, samples: int, batch: int,
                    workers: int = 0) -> dict:
    """Run inference (REC boxes back on the host) over a synthetic split of ``samples``;
    returns the measured time and the time for 5,657 samples (extrapolated when
    ``samples < 5657``)."""
    device = engine.device
    loader = DataLoader(SyntheticSplit(config, samples), batch_size=batch, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)

    def run(limit: int | None = None) -> int:
        done = 0
        for i, item in enumerate(loader):
            if limit is not None and i >= limit:
                break
            inputs = {"images": item["image"].to(device, non_blocking=True),
                      "text_ids": item["text_ids"].to(device, non_blocking=True),
                      "text_lengths": item["text_length"].to(device, non_blocking=True)}
            boxes = infer_step(engine, "rec_infer", inputs).float().cpu()
            if not torch.isfinite(boxes).all():
                raise RuntimeError(f"({engine.key}) non-finite boxes on the test split")
            done += boxes.shape[0]
        return done

    run(limit=1)  # warm-up: the loader's start-up
    # every batch shape of the split (the last one may be short), twice: a compiled engine
    # compiles on the first call and captures its CUDA graph on the second
    for size in {min(batch, samples), samples % batch} - {0}:
        shape = make_batch(config, size, device, seed=0, task="rec_infer")
        for _ in range(2):
            infer_step(engine, "rec_infer", shape)
    sync(device)
    start = time.perf_counter()
    done = run()
    sync(device)
    seconds = time.perf_counter() - start
    extrapolated = done < SPLIT_SIZE
    return {
        "split_samples_measured": done,
        "split_measured_s": seconds,
        "split_time_s": seconds * SPLIT_SIZE / done,
        "split_time_extrapolated": extrapolated,
        "split_sps": done / seconds,
        "split_workers": workers,
        "split_note": ("synthetic in-memory split, decoded images, real DataLoader + test "
                       "transform; no JPEG decode / tokenisation"
                       + (f"; measured on {done} samples, extrapolated to {SPLIT_SIZE}"
                          if extrapolated else "")),
    }
