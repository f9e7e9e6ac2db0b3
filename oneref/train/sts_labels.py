"""``oneref sts-labels``: STS labels of a dataset split from a trained teacher
(:mod:`oneref.sts` has the formula and the file formats)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from oneref.data.annotations import write_sts_annotations
from oneref.eval.evaluate import autocast_context, check_amp
from oneref.sources import ModelSource
from oneref.sts import teacher_labels, write_refshapes_labels, write_split_labels
from oneref.train.config import DataConfig
from oneref.train.data import (build_dataset, check_sizes, eval_loader, load_tokenizer,
                               recorded_data, recorded_paths, split_source)

__all__ = ["make_sts_labels"]

log = logging.getLogger(__name__)


def make_sts_labels(teacher: str | Path, out: str | Path, data: DataConfig | None = None,
                    split: str = "train", lambda_reg: float = 0.5, lambda_img: float = 0.5,
                    device: torch.device = torch.device("cpu"), trust: bool = False,
                    progress: bool = True, data_changes: dict | None = None,
                    size: int | None = None, batch_size: int | None = None,
                    amp: str = "auto") -> Path:
    """Label every sample of ``split`` with ``teacher`` (a run folder, ``save_pretrained``
    folder or checkpoint file) and write the labels: for RefShapes the side file ``out``,
    for a real split file a labelled copy under the split root ``out``, for an annotation
    file a labelled copy in the folder ``out``. Returns the path.

    ``data`` names the samples; by default the teacher run's recorded data with
    ``data_changes`` (flag values), ``size`` (RefShapes train scenes) and ``batch_size``.
    ``amp``: the teacher's forwards under bf16 autocast on CUDA (auto), bf16 or fp32; the
    scores are taken in fp32.
    """
    check_amp(amp)
    if lambda_reg < 0 or lambda_img < 0 or lambda_reg + lambda_img <= 0:
        raise ValueError(f"--lambda-reg and --lambda-img must be >= 0 with a positive sum, got "
                         f"{lambda_reg} and {lambda_img}")
    source = ModelSource(teacher, trust=trust)
    if data is None:
        data = recorded_data(source.train_config, data_changes or {})
    fields = {"on_error": "raise"}  # one label row per record, in order
    if size is not None:
        fields["train_size"] = size
    if batch_size is not None:
        fields["eval_batch_size"] = batch_size
    data = dataclasses.replace(data, **fields)
    data.validate()
    check_sizes(data, "--size" if size is not None else "")
    with recorded_paths(source.train_config, data_changes or {}):
        if data.real:
            files = split_source(data, split)
            if not (files.split_file or files.annotation_file):
                raise ValueError("STS labels are written into split files (6th tuple element) "
                                 "or annotation files ('sts'); the refer-toolkit layout has "
                                 "neither: pass --split-root or --annotations")
        tokenizer = load_tokenizer(data, source.config) if data.real else None
        dataset = build_dataset(data, source.config, split, "rec", tokenizer)
    model = source.build().to(device)
    labels = teacher_labels(model, eval_loader(dataset, data, device, 0, 1), lambda_reg,
                            lambda_img, device, progress,
                            autocast=lambda: autocast_context(device, amp))
    if data.real and files.annotation_file:
        path = write_sts_annotations(files.annotation_file, out, labels)
    elif data.real:
        path = write_split_labels(files.split_file, out, data.dataset, labels, trust=data.trust)
    else:
        path = write_refshapes_labels(out, labels, dataset, {
            "teacher": str(Path(teacher).absolute()), "lambda_reg": lambda_reg,
            "lambda_img": lambda_img})
    log.info("STS labels of %d samples written to %s", len(labels), path)
    return path
