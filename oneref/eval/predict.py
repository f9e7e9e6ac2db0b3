"""Single-image inference: load a trained model, ground one expression, draw the result.

``load_predictor(path)`` accepts a run folder (``<run>/model`` + ``<run>/train_config.json``)
or a model folder written by ``OneRef.save_pretrained``. The tokenizer is RefShapes' own
vocabulary unless the run's config names a sentencepiece model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

__all__ = ["Predictor", "load_predictor", "load_image", "Prediction"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """box_xyxy: (4,) pixels in the input image; box_cxcywh: (4,) normalised on the padded
    canvas; mask: (H, W) bool in input-image pixels (RES only)."""

    box_xyxy: tuple[float, float, float, float]
    box_cxcywh: tuple[float, float, float, float]
    mask: np.ndarray | None = None


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; ValueError naming the file when missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"image file {path} is not a readable image ({exc})") from exc


def _find_model_dir(path: Path) -> tuple[Path, dict]:
    """(model folder, training config dict or {}) for a run or model folder."""
    if not path.exists():
        raise ValueError(f"checkpoint folder {path} does not exist (train a model first with "
                         f"`oneref train`, or pass --checkpoint)")
    if (path / "model" / "config.json").is_file():
        model_dir, run_dir = path / "model", path
    elif (path / "config.json").is_file():
        model_dir, run_dir = path, path.parent
    else:
        raise ValueError(f"checkpoint folder {path} holds neither model/config.json nor "
                         f"config.json (a run folder or a save_pretrained folder is expected)")
    train_cfg = {}
    if (run_dir / "train_config.json").is_file():
        train_cfg = json.loads((run_dir / "train_config.json").read_text())
    return model_dir, train_cfg


class Predictor:
    """A model, its tokenizer and the test transform, ready for :meth:`predict`."""

    def __init__(self, model, tokenizer, task: str = "rec", device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.task = task
        self.device = torch.device(device)

    @torch.no_grad()
    def predict(self, image: Image.Image, text: str) -> Prediction:
        """Ground ``text`` in ``image`` (PIL RGB of any size)."""
        from oneref.data.transforms import Example, TestTransform

        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty expression")
        size = self.model.config.img_size
        width, height = image.size
        dummy_box = np.array([0.0, 0.0, float(width), float(height)])
        out = TestTransform(size)(Example(image, dummy_box, None, text.strip()))
        ids, length = self.tokenizer.encode_padded(out.text, self.model.config.max_text_len)
        images = out.image[None].to(self.device)
        ids = ids[None].to(self.device)
        lengths = torch.tensor([length], device=self.device)
        # Canvas -> input pixels: the test transform scales the long side to `size` and
        # centres the image on the canvas.
        scale = size / max(width, height)
        off_x = (size - round(width * scale)) // 2
        off_y = (size - round(height * scale)) // 2
        mask = None
        if self.task == "res":
            res = self.model.forward_res(images, ids, lengths)
            canvas = (res.mask_logits[0] > 0).float().cpu().numpy()
            ys, xs = np.nonzero(canvas)
            box = (np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64) / size
                   if xs.size else np.zeros(4))
            cxcywh = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0],
                      box[3] - box[1]]
            sub = canvas[off_y:off_y + round(height * scale), off_x:off_x + round(width * scale)]
            mask = np.asarray(Image.fromarray((sub * 255).astype(np.uint8)).resize(
                (width, height), Image.NEAREST)) > 127
        else:
            cxcywh = self.model.forward_rec(images, ids, lengths).boxes[0].float().cpu().tolist()
        cx, cy, w, h = cxcywh
        corners = np.clip(np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), 0, 1) * size
        corners = (corners - np.array([off_x, off_y, off_x, off_y])) / scale
        corners = np.clip(corners, 0, [width, height, width, height])
        return Prediction(tuple(float(v) for v in corners), tuple(float(v) for v in cxcywh), mask)


def load_predictor(path: str | Path, device: str | torch.device = "cpu",
                   task: str | None = None) -> Predictor:
    """Predictor from a run folder or a ``save_pretrained`` folder."""
    from oneref.model import OneRef

    model_dir, train_cfg = _find_model_dir(Path(path))
    model = OneRef.from_pretrained(model_dir)
    data_cfg = train_cfg.get("data", {})
    if data_cfg.get("tokenizer"):
        from oneref.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(data_cfg["tokenizer"])
    else:
        from oneref.data.synthetic import refshapes_tokenizer

        tokenizer = refshapes_tokenizer()
    task = task or train_cfg.get("task", "rec")
    if task not in ("rec", "res"):
        task = "rec"
    return Predictor(model, tokenizer, task, device)


def draw_prediction(image: Image.Image, pred: Prediction, text: str = "") -> Image.Image:
    """Copy of ``image`` with the mask (translucent) and the box drawn, the text on top."""
    canvas = image.convert("RGBA")
    if pred.mask is not None and pred.mask.any():
        overlay = np.zeros((*pred.mask.shape, 4), np.uint8)
        overlay[pred.mask] = (255, 40, 40, 110)
        canvas = Image.alpha_composite(canvas, Image.fromarray(overlay, "RGBA"))
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(image.size) / 128))
    draw.rectangle(pred.box_xyxy, outline=(255, 0, 0, 255), width=width)
    if text:
        draw.text((3, 2), text, fill=(0, 0, 0, 255))
    return canvas.convert("RGB")


__all__.append("draw_prediction")
