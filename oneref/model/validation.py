"""Argument checks of the public :class:`~oneref.model.OneRef` entry points.

Each raises ``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape, range or device)
naming the argument and what was expected. Value-range checks (token ids, text lengths, box
edges, mask values) each read their tensors with one host synchronisation; they can be
switched off with ``model.validate_inputs = False`` in a tuned training loop.
"""

from __future__ import annotations

import torch

from oneref.config import ModelConfig

__all__ = ["check_images", "check_text", "check_image_mask", "check_boxes", "check_masks",
           "same_device", "check_long"]


def _is_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def same_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the model is on {device}")


def check_images(images, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """images: (B, in_chans, img_size, img_size) floating, on the model's device; its dtype
    must be the model's unless autocast is on."""
    _is_tensor("images", images)
    expected = (config.in_chans, config.img_size, config.img_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}) for the "
                         f"{config.name!r} config, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (normalised), got {images.dtype}")
    same_device("images", images, device)
    if images.dtype != dtype and not torch.is_autocast_enabled(device.type):
        raise TypeError(f"images has dtype {images.dtype} but the model parameters are {dtype} "
                        f"(cast the images or run under torch.autocast)")


def check_text(text_ids, text_lengths, config: ModelConfig, batch: int, device: torch.device,
               check_values: bool = True, name: str = "text_ids") -> None:
    """text_ids: (B, T) integer, 1 <= T <= max_text_len, ids in [0, vocab_size);
    text_lengths: (B,) integer in [1, T] (real tokens incl. <s> and </s>; padding at the end)."""
    _is_tensor(name, text_ids)
    _is_tensor("text_lengths", text_lengths)
    if text_ids.dim() != 2 or text_ids.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch}, T), got {tuple(text_ids.shape)}")
    if text_ids.dtype.is_floating_point or text_ids.dtype in (torch.bool, torch.complex64,
                                                              torch.complex128):
        raise TypeError(f"{name} must be an integer (long) tensor, got {text_ids.dtype}")
    num_text = text_ids.shape[1]
    if num_text == 0:
        raise ValueError(f"{name} is empty (T = 0); every sample needs at least one token")
    if num_text > config.max_text_len:
        raise ValueError(f"{name} has {num_text} tokens, more than max_text_len = "
                         f"{config.max_text_len} (text position table has "
                         f"{config.text_positions} rows, offset 2)")
    if tuple(text_lengths.shape) != (batch,):
        raise ValueError(f"text_lengths must have shape ({batch},), got "
                         f"{tuple(text_lengths.shape)}")
    if text_lengths.dtype.is_floating_point or text_lengths.dtype == torch.bool:
        raise TypeError(f"text_lengths must be an integer tensor, got {text_lengths.dtype}")
    same_device(name, text_ids, device)
    same_device("text_lengths", text_lengths, device)
    if not check_values:
        return
    stats = torch.stack([text_ids.min(), text_ids.max(), text_lengths.min().to(text_ids.dtype),
                         text_lengths.max().to(text_ids.dtype)]).tolist()
    id_min, id_max, len_min, len_max = stats
    if id_min < 0 or id_max >= config.vocab_size:
        raise ValueError(f"{name} must be in [0, vocab_size) = [0, {config.vocab_size}), got "
                         f"values in [{id_min}, {id_max}]")
    if len_min < 1 or len_max > num_text:
        raise ValueError(f"text_lengths must be in [1, T] = [1, {num_text}] (empty text is not "
                         f"allowed), got values in [{len_min}, {len_max}]")


def check_image_mask(image_mask, config: ModelConfig, batch: int, device: torch.device,
                     name: str = "image_mask") -> None:
    """image_mask: (B, L) bool, True = masked patch."""
    _is_tensor(name, image_mask)
    if image_mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = masked), got {image_mask.dtype}")
    if tuple(image_mask.shape) != (batch, config.num_patches):
        raise ValueError(f"{name} must have shape ({batch}, {config.num_patches}), got "
                         f"{tuple(image_mask.shape)}")
    same_device(name, image_mask, device)


#: How far a box edge may lie outside [0, 1] (rounding of boxes normalised without
#: clipping: a few pixels at any image size); a bf16 box's own rounding is allowed as well.
_BOX_SLACK = 0.01
#: How far a mask value may lie outside [0, 1].
_MASK_SLACK = 1e-3


def check_boxes(boxes, batch: int, device: torch.device, name: str = "boxes",
                check_values: bool = False) -> None:
    """boxes: (B, 4) floating normalised cx, cy, w, h; with ``check_values`` (one host
    sync), each box has w, h >= 0 and lies inside [0, 1] (its edges cx -+ w / 2, cy -+ h / 2)."""
    _is_tensor(name, boxes)
    if tuple(boxes.shape) != (batch, 4):
        raise ValueError(f"{name} must have shape ({batch}, 4) (cx, cy, w, h), got "
                         f"{tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {boxes.dtype}")
    same_device(name, boxes, device)
    if not check_values:
        return
    slack = max(_BOX_SLACK, torch.finfo(boxes.dtype).eps)
    centre, size = boxes.detach().float().split(2, dim=1)
    edges = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    lowest, highest, smallest = torch.stack([edges.min(), edges.max(), size.min()]).tolist()
    if not (lowest >= -slack and highest <= 1 + slack and smallest >= 0):
        raise ValueError(f"{name} must be normalised (cx, cy, w, h) boxes inside the image: "
                         f"w, h >= 0 and edges in [0, 1], got edges in [{lowest:.4g}, "
                         f"{highest:.4g}] and a smallest side of {smallest:.4g} (pixel or "
                         f"x1, y1, x2, y2 boxes?)")


def check_masks(masks, config: ModelConfig, batch: int, device: torch.device,
                name: str = "masks", check_values: bool = False) -> None:
    """masks: (B, img_size, img_size) {0, 1} float (or bool); with ``check_values`` (one
    host sync), float values lie in [0, 1]."""
    _is_tensor(name, masks)
    expected = (batch, config.img_size, config.img_size)
    if tuple(masks.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(masks.shape)}")
    if not (masks.is_floating_point() or masks.dtype == torch.bool):
        raise TypeError(f"{name} must be a float or bool tensor, got {masks.dtype}")
    same_device(name, masks, device)
    if not check_values or masks.dtype == torch.bool:
        return
    lowest, highest = torch.stack([masks.min(), masks.max()]).float().tolist()
    if not (lowest >= -_MASK_SLACK and highest <= 1 + _MASK_SLACK):
        raise ValueError(f"{name} must hold values in [0, 1] (1 = the referred object), got "
                         f"values in [{lowest:.4g}, {highest:.4g}] (0/255 masks?)")


def check_long(name: str, value, shape: tuple, device: torch.device) -> None:
    """An integer tensor of exactly ``shape`` on ``device``."""
    _is_tensor(name, value)
    if value.dtype.is_floating_point or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer (long) tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    same_device(name, value, device)
