"""Inference on user images: load a model, ground expressions, draw the results.

``load_predictor(path)`` accepts a run folder, a ``save_pretrained`` folder or an official
``.pth`` (:class:`oneref.sources.ModelSource`). The tokenizer is the one given (a
sentencepiece model, or ``"refshapes"``), else the run's (its sentencepiece model, or
RefShapes' own vocabulary for a RefShapes run). :meth:`Predictor.inputs` turns PIL images
and expressions into the model's input tensors.
:func:`predict_file` runs a JSON-lines file of ``{"image": path, "text": str}`` pairs in
batches and writes ``predictions.jsonl`` and one drawn PNG per line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm.auto import tqdm

from oneref.data.synthetic import refshapes_tokenizer
from oneref.data.tokenizer import (REFSHAPES_TOKENIZER, Tokenizer, open_tokenizer,
                                   recorded_tokenizer, same_tokenizer)
from oneref.data.transforms import Example, TestTransform
from oneref.eval.evaluate import autocast_context, check_amp
from oneref.io import existing_file, make_folder
from oneref.sources import ModelSource
from oneref.train.distributed import resolve_device

__all__ = ["Predictor", "Prediction", "load_predictor", "load_image", "draw_prediction",
           "predict_file", "canvas_to_pixels", "mask_boxes"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """box_xyxy: (4,) pixels in the input image; box_cxcywh: (4,) normalised on the padded
    canvas; score: the highest patch probability sigmoid(M_sim) (how strongly some patch
    matches the expression); mask: (H, W) bool in input-image pixels (RES only)."""

    box_xyxy: tuple[float, float, float, float]
    box_cxcywh: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        """A RES prediction whose mask covers no pixel: it has no box."""
        return self.mask is not None and not self.mask.any()

    def to_json(self) -> dict:
        """The box (None for an empty RES mask), score and mask area (RES)."""
        out = {"box_xyxy": None if self.empty else [round(v, 2) for v in self.box_xyxy],
               "score": round(self.score, 4)}
        if self.mask is not None:
            out["mask_area"] = int(self.mask.sum())
        return out


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; ValueError naming the file when missing or not an image."""
    path = existing_file(path, "image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"image file {path} is not a readable image ({exc})") from exc


def _check_task(task) -> None:
    if task not in ("rec", "res"):
        raise ValueError(f"task must be rec or res, got {task!r}")


def _as_rgb(image, k: int) -> Image.Image:
    """A PIL image of any mode as RGB (what the model was trained on); TypeError naming
    image ``k`` for anything else."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {k} must be a PIL image, got {type(image).__name__} (open a "
                        f"file with oneref.eval.predict.load_image, convert an HxWx3 uint8 "
                        f"array with PIL.Image.fromarray)")
    return image if image.mode == "RGB" else image.convert("RGB")


class Predictor:
    """A model, its tokenizer and the test transform, ready for :meth:`predict`."""

    def __init__(self, model, tokenizer, task: str = "rec", device: str | torch.device = "cpu",
                 amp: str = "auto"):
        _check_task(task)
        self.amp = check_amp(amp)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.task = task
        self.transform = TestTransform(model.config.img_size)
        #: The LoadReport when the model came from an official .pth (see load_predictor).
        self.report = None

    def predict(self, image: Image.Image, text: str) -> Prediction:
        """Ground ``text`` in ``image`` (a PIL image of any size and mode)."""
        return self.predict_batch([image], [text])[0]

    def inputs(self, images: list[Image.Image], texts: list[str]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's inputs for PIL images and expressions, on this predictor's device:
        ``images`` (B, 3, S, S) through the test transform (long side scaled to S, centred,
        normalised), ``text_ids`` (B, max_text_len) and ``text_lengths`` (B,)."""
        if len(images) != len(texts) or not images:
            raise ValueError(f"need as many texts as images (at least one), got {len(images)} "
                             f"images and {len(texts)} texts")
        for k, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {k} must be a non-empty expression, got {text!r}")
        max_len = self.model.config.max_text_len
        canvases, ids, lengths = [], [], []
        for k, (image, text) in enumerate(zip(images, texts)):
            image = _as_rgb(image, k)
            whole = np.array([0.0, 0.0, float(image.width), float(image.height)])
            out = self.transform(Example(image, whole, None, text.strip()))
            token_ids, length = self.tokenizer.encode_padded(out.text, max_len)
            if (token_ids == self.tokenizer.unk_id).any():
                self._warn_unknown(out.text)
            if self.tokenizer.longer_than([out.text], max_len):
                log.warning("%r is longer than the model's %d tokens (max_text_len): it reads "
                            "%r", out.text, max_len,
                            self.tokenizer.decode(token_ids[:length]))
            canvases.append(out.image)
            ids.append(token_ids)
            lengths.append(length)
        return (torch.stack(canvases).to(self.device), torch.stack(ids).to(self.device),
                torch.tensor(lengths, device=self.device))

    def _warn_unknown(self, text: str) -> None:
        """Name the words of ``text`` that the tokenizer reads as ``<unk>``."""
        unknown = [word for word in text.split()
                   if self.tokenizer.unk_id in self.tokenizer.encode(word)]
        log.warning("%r: %s not in the tokenizer's vocabulary (read as <unk>)", text,
                    ", ".join(repr(word) for word in unknown) or "a part")

    @torch.no_grad()
    def predict_batch(self, images: list[Image.Image], texts: list[str]) -> list[Prediction]:
        """One forward for a list of (image, expression) pairs."""
        batch = self.inputs(images, texts)
        forward = self.model.forward_res if self.task == "res" else self.model.forward_rec
        with autocast_context(self.device, self.amp):
            out = forward(*batch)
        if self.task == "res":
            masks = out.mask_logits > 0
            boxes, masks = mask_boxes(masks).tolist(), masks.cpu().numpy()
        else:
            boxes, masks = out.boxes.float().cpu().tolist(), None
        scores = torch.sigmoid(out.sim_logits.float().flatten(1)).amax(1).tolist()
        return [self._to_image(image, boxes[k], scores[k], None if masks is None else masks[k])
                for k, image in enumerate(images)]

    def _to_image(self, image: Image.Image, cxcywh: list[float], score: float,
                  canvas_mask: np.ndarray | None) -> Prediction:
        """The prediction in the input image's pixels."""
        size = self.model.config.img_size
        width, height = image.size
        mask = None
        if canvas_mask is not None:
            (off_x, off_y), (inner_w, inner_h) = _placement(width, height, size)
            inner = canvas_mask[off_y:off_y + inner_h, off_x:off_x + inner_w]
            mask = np.asarray(Image.fromarray(inner.astype(np.uint8) * 255).resize(
                (width, height), Image.NEAREST)) > 127
        return Prediction(canvas_to_pixels(cxcywh, width, height, size),
                          tuple(float(v) for v in cxcywh), float(score), mask)


def _placement(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where the test transform puts a ``width`` x ``height`` image on the ``size`` canvas:
    the long side scaled to ``size``, centred. ((offset x, y), (width, height) on it)."""
    scale = size / max(width, height)
    inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
    return ((size - inner_w) // 2, (size - inner_h) // 2), (inner_w, inner_h)


def canvas_to_pixels(cxcywh, width: int, height: int, size: int
                     ) -> tuple[float, float, float, float]:
    """A box normalised on the test transform's ``size`` canvas (cx, cy, w, h) -> x1, y1,
    x2, y2 in the pixels of the ``width`` x ``height`` image, clipped to it."""
    (off_x, off_y), (inner_w, inner_h) = _placement(width, height, size)
    scale = np.array([inner_w / width, inner_h / height] * 2)  # each side rounds on its own
    cx, cy, w, h = (float(v) for v in cxcywh)
    corners = np.clip(np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), 0, 1) * size
    corners = (corners - np.array([off_x, off_y, off_x, off_y])) / scale
    corners = np.clip(corners, 0, [width, height, width, height])
    return tuple(float(v) for v in corners)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool canvas masks -> (B, 4) float: the box around each mask's pixels,
    normalised cx, cy, w, h (zeros for an empty mask)."""
    size = masks.shape[-1]
    positions = torch.arange(size, device=masks.device)

    def span(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, S) -> first, end
        return (torch.where(hit, positions, size).amin(1),
                torch.where(hit, positions, -1).amax(1) + 1)

    columns = masks.any(1)
    (x1, x2), (y1, y2) = span(columns), span(masks.any(2))
    boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1).float() / size
    return torch.where(columns.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def _tokenizer(source: ModelSource, path: str | None) -> Tokenizer:
    """The tokenizer ``path`` names (warned when the run recorded another), else the run's."""
    recorded = recorded_tokenizer(source.train_config.get("data", {}))
    if path and recorded and not same_tokenizer(path, recorded):
        log.warning("%s was trained with tokenizer %s; --tokenizer %s reads text into other "
                    "ids", source.path, recorded, path)
    path = path or recorded
    if path == REFSHAPES_TOKENIZER:
        return refshapes_tokenizer()
    if path:
        return open_tokenizer(path)
    raise ValueError(f"{source.path}: no tokenizer is recorded with this model; pass "
                     f"--tokenizer (tokenizer= in Python): the sentencepiece model it was "
                     f"trained with (e.g. beit3.spm), or {REFSHAPES_TOKENIZER!r} for a model "
                     f"trained on RefShapes")


def load_predictor(path: str | Path, device: str | torch.device = "cpu",
                   task: str | None = None, tokenizer: str | None = None,
                   preset: str | None = None, trust: bool = False,
                   amp: str = "auto") -> Predictor:
    """Predictor from a run folder, a ``save_pretrained`` folder or an official ``.pth``.

    ``task``: rec or res (default: the run's); ``tokenizer``: a sentencepiece model, or
    ``"refshapes"`` (default: the one the run recorded); ``device``: auto, cpu, cuda or a
    torch.device; ``amp``: auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32."""
    if task is not None:
        _check_task(task)
    check_amp(amp)
    device = resolve_device(device)
    source = ModelSource(path, preset=preset, trust=trust)
    task = source.task_for(task)
    tok = _tokenizer(source, tokenizer).check_fits(source.config.vocab_size)
    predictor = Predictor(source.build(), tok, task, device, amp)
    predictor.report = source.report
    return predictor


def draw_prediction(image: Image.Image, pred: Prediction, text: str = "") -> Image.Image:
    """Copy of ``image`` with the mask (translucent) and the box drawn, the text on top."""
    canvas = image.convert("RGBA")
    if pred.mask is not None and not pred.empty:
        overlay = np.zeros((*pred.mask.shape, 4), np.uint8)
        overlay[pred.mask] = (255, 40, 40, 110)
        canvas = Image.alpha_composite(canvas, Image.fromarray(overlay, "RGBA"))
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(image.size) / 128))
    if not pred.empty:
        draw.rectangle(pred.box_xyxy, outline=(255, 0, 0, 255), width=width)
    if text:
        draw.text((3, 2), text, fill=(0, 0, 0, 255))
    return canvas.convert("RGB")


def _read_pairs(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, {"image", "text"} or the problem) for every non-blank line."""
    existing_file(path, "--input")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            pairs.append((number, f"not JSON ({err.msg})"))
            continue
        if (not isinstance(item, dict) or not isinstance(item.get("image"), str)
                or not isinstance(item.get("text"), str)):
            pairs.append((number, 'expected {"image": path, "text": str}'))
        elif not item["text"].strip():
            pairs.append((number, "empty expression"))
        else:
            pairs.append((number, item))
    return pairs


def predict_file(predictor: Predictor, input_path: str | Path, out_dir: str | Path,
                 batch_size: int = 16, on_error: str = "skip", progress: bool = True) -> dict:
    """Predict every line of a JSON-lines file; write ``predictions.jsonl`` (one object per
    good line: line, the line's own keys (image, text, an id...), box in input pixels or
    None for an empty RES mask, score, mask_area for RES; appended batch by batch) and
    ``<line>_<image stem>.png`` drawings into ``out_dir``.

    A bad line (not JSON, missing keys, empty text) or a bad image is logged with its line
    number and skipped, or raises ValueError with ``on_error="raise"`` (a bad line before any
    output is written). Image paths are
    relative to the input file's folder unless absolute. Returns counts and the output path.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be raise or skip, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    input_path, out_dir = Path(input_path), Path(out_dir)
    pairs = _read_pairs(input_path)
    bad = next(((number, item) for number, item in pairs if isinstance(item, str)), None)
    if on_error == "raise" and bad is not None:  # before any output is written
        raise ValueError(f"{input_path}:{bad[0]}: {bad[1]}")
    make_folder(out_dir, "--out-dir")
    out_path = out_dir / "predictions.jsonl"
    skipped: list[str] = []
    written = 0

    def fail(number: int, problem: str) -> None:
        message = f"{input_path}:{number}: {problem}"
        if on_error == "raise":
            raise ValueError(message)
        log.warning("skipped %s", message)
        skipped.append(message)
        bar.update(1)

    batch: list[tuple[int, dict, Image.Image]] = []

    def flush(handle) -> None:
        nonlocal written
        preds = predictor.predict_batch([b[2] for b in batch], [b[1]["text"] for b in batch])
        for (number, item, image), pred in zip(batch, preds):
            handle.write(json.dumps({"line": number, **item, **pred.to_json()}) + "\n")
            name = f"{number:06d}_{Path(item['image']).stem}.png"
            draw_prediction(image, pred, item["text"]).save(out_dir / name, format="PNG")
        handle.flush()
        written += len(batch)
        bar.update(len(batch))
        batch.clear()

    with tqdm(total=len(pairs), desc="predict", unit="pair", disable=not progress) as bar, \
            out_path.open("w", encoding="utf-8") as handle:
        for number, item in pairs:
            if isinstance(item, str):
                fail(number, item)
                continue
            image_path = Path(item["image"])
            if not image_path.is_absolute():
                image_path = input_path.parent / image_path
            try:
                image = load_image(image_path)
            except ValueError as err:
                fail(number, str(err))
                continue
            batch.append((number, item, image))
            if len(batch) == batch_size:
                flush(handle)
        if batch:
            flush(handle)
    return {"predicted": written, "skipped": len(skipped), "predictions": str(out_path),
            "problems": skipped}
