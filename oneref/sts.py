"""Semantic target-relation score (STS) labels from a trained teacher (``oneref sts-labels``).

Per text token t of an expression (docs/method.md, "STS labels")::

    label_t = lambda_reg * sigmoid(e_reg . w_t) + lambda_img * sigmoid(e_img . w_t)

``w_t`` is the teacher's normalised text embedding of token t (its language head on the
joint encoding of the whole image and the expression), ``e_img`` its normalised image
embedding (the vision head on the image's CLS token) and ``e_reg`` the same for the box
region cropped from the model input and resized to the model's image size, encoded with the
same expression. Every position of the tokenised expression (``<s>`` .. ``</s>``) gets a
label; the STS loss reads positions 1..T-2.

Where the labels go:

* split files: a copy of ``{dataset}_{split}.pth`` whose tuples carry the labels (a list of
  floats, one per token) as their 6th element, in the split-root layout
  ``OUT/{dataset}/{dataset}_{split}.pth`` (train with ``--split-root OUT``);
* RefShapes: a safetensors side file holding a (N, T) float32 tensor for scenes 0..N-1 of
  the train split and, in its metadata, what the scenes and tokens depend on (train with
  ``--sts-labels FILE``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from oneref.io import atomic_write, existing_file, load_pth

__all__ = ["sts_scores", "region_crops", "teacher_labels", "write_refshapes_labels",
           "load_refshapes_labels", "write_split_labels"]


def _scene_settings(dataset) -> dict:
    """What RefShapes scenes and their tokens depend on: the side file records it."""
    return {"split": dataset.split, "seed": dataset.seed, "img_size": dataset.img_size,
            "max_text_len": dataset.max_text_len}


def sts_scores(e_reg: torch.Tensor, e_img: torch.Tensor, w: torch.Tensor, lambda_reg: float,
               lambda_img: float) -> torch.Tensor:
    """(B, D) region and image embeddings, (B, T, D) token embeddings -> (B, T) labels."""
    reg = torch.sigmoid(torch.einsum("bd,btd->bt", e_reg.float(), w.float()))
    img = torch.sigmoid(torch.einsum("bd,btd->bt", e_img.float(), w.float()))
    return lambda_reg * reg + lambda_img * img


def region_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The box region of each image resized (bilinear) to the image size.

    images: (B, C, S, S); boxes: (B, 4) normalised cx, cy, w, h. A region is at least one
    pixel each way and clipped to the image.
    """
    size = images.shape[-1]
    corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    pixels = (corners * size).round().long().clamp(0, size).tolist()
    crops = []
    for image, (x1, y1, x2, y2) in zip(images, pixels):
        x1, y1 = min(x1, size - 1), min(y1, size - 1)
        region = image[:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
        crops.append(F.interpolate(region[None], size=(size, size), mode="bilinear",
                                   align_corners=False)[0])
    return torch.stack(crops)


@torch.no_grad()
def teacher_labels(teacher, loader, lambda_reg: float, lambda_img: float,
                   device: torch.device, progress: bool = True,
                   autocast=contextlib.nullcontext) -> list[list[float]]:
    """Per sample of ``loader`` (dataset order), the labels of its ``text_length`` tokens.
    ``autocast``: a context manager factory for the teacher's forwards (the scores are
    taken in fp32 outside it)."""
    from tqdm.auto import tqdm

    teacher.eval()
    labels: list[list[float]] = []
    for batch in tqdm(loader, desc="sts labels", unit="batch", disable=not progress):
        images = batch["images"].to(device)
        ids, lengths = batch["text_ids"].to(device), batch["text_lengths"].to(device)
        crops = region_crops(images, batch["boxes"].to(device))
        with autocast():
            e_img, w = teacher.relation_embeddings(images, ids, lengths)
            e_reg, _ = teacher.relation_embeddings(crops, ids, lengths)
        scores = sts_scores(e_reg, e_img, w, lambda_reg, lambda_img).cpu()
        labels += [row[:n].tolist() for row, n in zip(scores, batch["text_lengths"].tolist())]
    return labels


def write_refshapes_labels(path: str | Path, labels: list[list[float]], dataset,
                           meta: dict) -> Path:
    """Save the labels of RefShapes ``dataset``'s first ``len(labels)`` scenes (padded with 0
    to ``max_text_len``) with the metadata the scenes depend on, atomically."""
    table = torch.zeros(len(labels), dataset.max_text_len)
    for row, values in zip(table, labels):
        row[:len(values)] = torch.tensor(values)
    info = {**_scene_settings(dataset), **meta}
    metadata = {key: json.dumps(value) for key, value in info.items()}
    return atomic_write(path, lambda tmp: save_file({"sts_labels": table}, tmp,
                                                     metadata=metadata))


def load_refshapes_labels(path: str | Path, dataset) -> torch.Tensor:
    """The (len(dataset), T) labels of a side file, checked against RefShapes ``dataset``."""
    path = existing_file(path, "STS labels file",
                         hint=f"make it with oneref sts-labels --teacher RUN --out {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
            table = handle.get_tensor("sts_labels")
    except Exception as err:  # noqa: BLE001 - any parse failure names the file
        raise ValueError(f"cannot read STS labels file {str(path)!r}: {err}") from None
    wanted = _scene_settings(dataset)
    wrong = [f"{k} {meta.get(k)!r} (dataset: {v!r})" for k, v in wanted.items()
             if meta.get(k) != v]
    if wrong:
        raise ValueError(f"STS labels file {str(path)!r} was made for other scenes: "
                         f"{', '.join(wrong)}")
    if table.dim() != 2 or table.shape[1] != dataset.max_text_len:
        raise ValueError(f"STS labels file {str(path)!r} holds a {tuple(table.shape)} table, "
                         f"expected (scenes, {dataset.max_text_len})")
    if table.shape[0] < len(dataset):
        raise ValueError(f"STS labels file {str(path)!r} labels {table.shape[0]} scenes, the "
                         f"{dataset.split} split has {len(dataset)}: label them all "
                         f"(oneref sts-labels --size {len(dataset)}) or train on fewer "
                         f"(--set data.train_size={table.shape[0]})")
    return table[:len(dataset)].float()


def write_split_labels(split_file: str | Path, out_root: str | Path, dataset: str,
                       labels: list[list[float]], trust: bool = False) -> Path:
    """A copy of ``split_file`` whose tuples carry ``labels`` as their 6th element, written
    to ``out_root/{dataset}/{file name}`` atomically. Records must be 5- or 6-tuples."""
    split_file = Path(split_file)
    items = load_pth(split_file, trust=trust, what="split file", hint="--trust-data")
    if len(items) != len(labels):
        raise ValueError(f"{split_file}: {len(items)} records but {len(labels)} label rows")
    out = []
    for index, (item, values) in enumerate(zip(items, labels)):
        if not isinstance(item, (list, tuple)) or len(item) not in (5, 6):
            raise ValueError(f"{split_file.name}[{index}]: STS labels go into the 6th element "
                             f"of 5- or 6-field tuples, this record has "
                             f"{len(item) if isinstance(item, (list, tuple)) else 'no'} fields")
        out.append((*item[:5], [float(v) for v in values]))
    target = Path(out_root) / dataset / split_file.name
    if target.resolve() == split_file.resolve():
        raise ValueError(f"--out would overwrite the input split file {split_file}; name "
                         f"another folder")
    return atomic_write(target, lambda tmp: torch.save(out, tmp))

