"""Argument checks shared by the public ops: errors name the argument and what is wrong."""

from __future__ import annotations

from typing import Sequence

import torch

from oneref.ops.cast import cast_floating

__all__ = ["check_tensor", "check_shape", "check_bool_mask", "check_boxes", "check_row_split",
           "autocast_inputs"]


def check_tensor(name: str, value, *, ndim: int | None = None, floating: bool = False,
                 integer: bool = False, device: torch.device | None = None) -> None:
    """Raise TypeError/ValueError unless ``value`` is a tensor with the given properties."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}")


def check_shape(name: str, value, shape: Sequence[int], like: torch.Tensor | None = None) -> None:
    """Raise unless ``value`` has exactly ``shape`` (and the dtype/device of ``like``)."""
    check_tensor(name, value)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if like is not None:
        if value.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {value.dtype}, expected {like.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device}, expected {like.device}")


def check_bool_mask(name: str, value, shape: Sequence[int], device: torch.device) -> None:
    check_tensor(name, value, device=device)
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")


def check_boxes(name: str, boxes, batch: int | None = None,
                device: torch.device | None = None) -> None:
    """Boxes are (B, 4) floating-point normalised cx, cy, w, h."""
    check_tensor(name, boxes, ndim=2, floating=True, device=device)
    if boxes.shape[1] != 4 or (batch is not None and boxes.shape[0] != batch):
        expected = f"({batch if batch is not None else 'B'}, 4)"
        raise ValueError(f"{name} must have shape {expected} (cx, cy, w, h), "
                         f"got {tuple(boxes.shape)}")


def check_row_split(num_vision: int, seq: int) -> None:
    """Raise unless the vision expert's row count ``num_vision`` is in [0, ``seq``]."""
    if not 0 <= num_vision <= seq:
        raise ValueError(f"num_vision must be in [0, S] = [0, {seq}], got {num_vision}")


def autocast_inputs(*tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    The fused matmul ops are custom ops that autocast does not see; casting here gives every
    backend the operands ``F.linear`` would get (fp32 master weights, bf16 compute), in one
    cast per source dtype (:func:`oneref.ops.cast.cast_floating`).
    """
    first = tensors[0]
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    return cast_floating(tensors, torch.get_autocast_dtype(first.device.type))
