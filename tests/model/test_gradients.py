"""Each training step sends gradients to exactly the parameters it should train."""

import pytest
import torch

from oneref import OneRef
from tests.model.conftest import make_batch

BACKBONE = ("embed.", "encoder.")


def _with_grad(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _names(model, *prefixes, exclude=()):
    return {n for n, _ in model.named_parameters()
            if n.startswith(prefixes) and not n.startswith(exclude)}


def _step(model, name):
    c = model.config
    images, ids, lengths, boxes = make_batch(c)
    masks = torch.zeros(2, c.img_size, c.img_size)
    masks[:, 16:48, 8:40] = 1
    image_mask = torch.zeros(2, c.num_patches, dtype=torch.bool)
    image_mask[:, 1::2] = True
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    if name == "rec":
        return model.rec_loss(model.forward_rec(images, ids, lengths), boxes)
    if name == "res":
        return model.res_loss(model.forward_res(images, ids, lengths), masks)
    if name == "res_rec_weight":
        out = model.forward_res(images, ids, lengths, with_boxes=True)
        return model.res_loss(out, masks, boxes=boxes, rec_weight=1.0)
    if name == "mim_tokens_vts":
        targets = torch.randint(0, c.mim_vocab, (2, c.num_patches))
        return model.mim_loss(images, ids, lengths, boxes, image_mask, targets, use_vts=True)
    if name == "mim_pixels":
        return model.mim_loss(images, ids, lengths, boxes, image_mask)
    if name == "mlm_sts":
        return model.mlm_loss(images, ids, lengths, boxes, labels,
                              torch.randn(2, c.max_text_len), drop_worst=0.2)
    raise AssertionError(name)


EXPECTED = {
    # step: (trained prefixes besides the backbone, whether mask_token trains)
    "rec": (("vision_head", "language_head", "rec_head."), False),
    "res": (("language_head", "res_head."), False),
    "res_rec_weight": (("vision_head", "language_head", "res_head.", "rec_head."), False),
    "mim_tokens_vts": (("vision_head", "language_head", "mim_head.proj.", "vts_head."), True),
    "mim_pixels": (("vision_head", "language_head", "mim_head.pixel."), True),
    "mlm_sts": (("vision_head", "language_head", "mlm_head.", "sts_head."), False),
}


@pytest.mark.parametrize("step", sorted(EXPECTED))
def test_gradients_reach_exactly_the_used_parameters(step):
    model = OneRef.from_config("tiny", drop_path=0.0).train()
    _step(model, step)["loss"].backward()
    heads, mask_token = EXPECTED[step]
    expected = _names(model, *BACKBONE, *heads)
    if not mask_token:
        expected.discard("embed.mask_token")
    assert _with_grad(model) == expected


def test_touch_unused_parameters_gives_every_parameter_a_gradient():
    model = OneRef.from_config("tiny", drop_path=0.0).train()
    model.touch_unused_parameters = True
    reference = OneRef.from_config("tiny", drop_path=0.0).train()
    reference.load_state_dict(model.state_dict())
    _step(model, "rec")["loss"].backward()
    _step(reference, "rec")["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        expected = q.grad if q.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(p.grad, expected, msg=name)


def test_frozen_backbone_stage():
    model = OneRef.from_config("tiny", drop_path=0.0).train()
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    _step(model, "rec")["loss"].backward()
    assert _with_grad(model) == _names(model, "vision_head", "language_head", "rec_head.")
    n_backbone = sum(1 for _ in model.backbone_parameters())
    n_heads = sum(1 for _ in model.head_parameters())
    assert n_backbone + n_heads == len(list(model.parameters()))
