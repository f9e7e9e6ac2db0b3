"""Bad inputs to the public entry points raise errors that name the argument."""

import pytest
import torch

from oneref.model.validation import check_boxes
from tests.model.conftest import make_batch


@pytest.fixture
def batch(tiny):
    return make_batch(tiny.config)


def test_wrong_image_size_and_channels(tiny, batch):
    images, ids, lengths, _ = batch
    with pytest.raises(ValueError,
                       match=r"images must have shape \(B, 3, 64, 64\).*\(2, 3, 32, 32\)"):
        tiny.encode(images[:, :, :32, :32], ids, lengths)
    with pytest.raises(ValueError, match="images must have shape"):
        tiny.encode(images[:, :1], ids, lengths)
    with pytest.raises(ValueError, match="images must have shape"):
        tiny.encode(images[0], ids, lengths)


def test_image_dtype_and_device(tiny, batch):
    images, ids, lengths, _ = batch
    with pytest.raises(TypeError, match="images must be a floating-point"):
        tiny.encode(images.long(), ids, lengths)
    with pytest.raises(TypeError, match="images has dtype torch.float64"):
        tiny.encode(images.double(), ids, lengths)
    with pytest.raises(ValueError, match="images is on meta"):
        tiny.encode(images.to("meta"), ids, lengths)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        tiny.encode(images.numpy(), ids, lengths)


def test_text_too_long_or_empty(tiny, batch):
    images, ids, lengths, _ = batch
    long_ids = torch.ones(2, tiny.config.max_text_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="text_ids has 25 tokens, more than max_text_len = 24"):
        tiny.encode(images, long_ids, lengths)
    with pytest.raises(ValueError, match="text_ids is empty"):
        tiny.encode(images, ids[:, :0], lengths)
    with pytest.raises(ValueError, match=r"text_lengths must be in \[1, T\] = \[1, 24\].*empty"):
        tiny.encode(images, ids, torch.tensor([0, 5]))


def test_text_lengths_and_ids_out_of_range(tiny, batch):
    images, ids, lengths, _ = batch
    with pytest.raises(ValueError, match=r"text_lengths must be in \[1, T\].*\[3, 25\]"):
        tiny.encode(images, ids, torch.tensor([3, 25]))
    with pytest.raises(ValueError, match=r"text_lengths must have shape \(2,\)"):
        tiny.encode(images, ids, lengths[:1])
    with pytest.raises(TypeError, match="text_lengths must be an integer"):
        tiny.encode(images, ids, lengths.float())
    bad = ids.clone()
    bad[0, 0] = tiny.config.vocab_size
    with pytest.raises(ValueError, match=r"text_ids must be in \[0, vocab_size\)"):
        tiny.encode(images, bad, lengths)
    with pytest.raises(TypeError, match="text_ids must be an integer"):
        tiny.encode(images, ids.float(), lengths)
    with pytest.raises(ValueError, match=r"text_ids must have shape \(2, T\)"):
        tiny.encode(images, ids[:1], lengths)


def test_masks_boxes_labels(tiny, batch):
    images, ids, lengths, boxes = batch
    c = tiny.config
    with pytest.raises(TypeError, match="image_mask must be a bool"):
        tiny.encode(images, ids, lengths, torch.zeros(2, c.num_patches))
    with pytest.raises(ValueError, match=r"image_mask must have shape \(2, 16\)"):
        tiny.encode(images, ids, lengths, torch.zeros(2, 15, dtype=torch.bool))
    out = tiny.forward_rec(images, ids, lengths)
    with pytest.raises(ValueError, match=r"boxes must have shape \(2, 4\)"):
        tiny.rec_loss(out, boxes[:, :2])
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 64, 64\)"):
        tiny.rec_loss(out, boxes, torch.zeros(2, 32, 32))
    no_mask = torch.zeros(2, c.num_patches, dtype=torch.bool)
    with pytest.raises(ValueError, match="image_mask has no masked patch"):
        tiny.mim_loss(images, ids, lengths, boxes, no_mask)
    mask = no_mask.clone()
    mask[:, 0] = True
    targets = torch.full((2, c.num_patches), c.mim_vocab)
    with pytest.raises(ValueError,
                       match=r"mim_targets at masked patches must be in \[0, mim_vocab\)"):
        tiny.mim_loss(images, ids, lengths, boxes, mask, targets)
    with pytest.raises(ValueError, match="mlm_labels has no masked position"):
        tiny.mlm_loss(images, ids, lengths, boxes, torch.full_like(ids, -100))
    with pytest.raises(ValueError, match="drop_worst must be in"):
        tiny.mlm_loss(images, ids, lengths, boxes, ids, drop_worst=1.0)
    with pytest.raises(ValueError, match="task must be one of"):
        tiny(images, ids, lengths, task="vqa")


def test_box_and_mask_values_are_checked_unless_switched_off(tiny, batch):
    images, ids, lengths, boxes = batch
    out = tiny.forward_rec(images, ids, lengths)
    pixels = boxes * 64
    with pytest.raises(ValueError, match=r"boxes must be normalised \(cx, cy, w, h\) boxes inside "
                                         r"the image.*edges in \[.*pixel or x1, y1, x2, y2"):
        tiny.rec_loss(out, pixels)
    with pytest.raises(ValueError, match="a smallest side of -"):
        tiny.rec_loss(out, torch.tensor([[0.5, 0.5, -0.2, 0.2]] * 2))
    masks = torch.zeros(2, 64, 64)
    masks[:, 10:20, 10:20] = 255
    with pytest.raises(ValueError, match=r"masks must hold values in \[0, 1\].*\[0, 255\]"):
        tiny.rec_loss(out, boxes, masks)
    res = tiny.forward_res(images, ids, lengths)
    with pytest.raises(ValueError, match="masks must hold values in"):
        tiny.res_loss(res, masks)
    tiny.rec_loss(out, boxes, masks / 255)  # in range
    edge = torch.tensor([[0.5117, 0.5, 0.9805, 0.4004]])  # x2 = 1 rounded in bf16: 1.002
    check_boxes(edge.bfloat16(), 1, edge.device, check_values=True)
    check_boxes(torch.tensor([[0.5, 0.5, 1.008, 0.5]]), 1, edge.device, check_values=True)
    with pytest.raises(ValueError, match="edges in"):  # past a few pixels of rounding
        check_boxes(torch.tensor([[0.5, 0.5, 1.03, 0.5]]), 1, edge.device, check_values=True)
    tiny.validate_inputs = False  # a tuned loop whose data is checked before the step
    try:
        assert torch.isfinite(tiny.rec_loss(out, pixels)["loss"])
    finally:
        tiny.validate_inputs = True


def test_predict_boxes_runs_in_eval_mode_and_restores_the_mode(tiny, batch, tmp_path):
    images, ids, lengths, _ = batch
    model = type(tiny)(tiny.config.replace(drop_path=0.5)).train()  # drop path on
    model.rec_head.eval()  # a submodule a user keeps in eval mode stays there
    first = model.predict_boxes(images, ids, lengths)
    assert model.training and model.encoder.training and not model.rec_head.training
    torch.testing.assert_close(model.predict_boxes(images, ids, lengths), first, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "saved")
    assert not type(tiny).from_pretrained(tmp_path / "saved").training
