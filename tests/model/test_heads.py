"""Shapes and dtypes of every entry point and head on the tiny preset."""

import copy

import pytest
import torch
import torch.nn.functional as F

from oneref import OneRef
from oneref.model import EncoderOutput, RECOutput, RESOutput
from oneref.model.heads import RESHead, upsample_2x
from tests.model.conftest import make_batch


def test_encode_shapes(tiny):
    c = tiny.config
    images, ids, lengths, _ = make_batch(c)
    out = tiny.encode(images, ids, lengths)
    assert isinstance(out, EncoderOutput)
    assert out.vision.shape == (2, c.num_vision, c.embed_dim)
    assert out.text.shape == (2, c.max_text_len, c.embed_dim)
    assert out.vision.dtype == out.text.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tiny.parameters())


def test_rec_res_outputs(tiny):
    c = tiny.config
    images, ids, lengths, _ = make_batch(c)
    rec = tiny.forward_rec(images, ids, lengths)
    assert isinstance(rec, RECOutput)
    assert rec.boxes.shape == (2, 4) and rec.boxes.dtype == torch.float32
    assert ((rec.boxes > 0) & (rec.boxes < 1)).all()
    assert rec.sim_logits.shape == (2, c.grid, c.grid)
    assert rec.sim_logits.abs().max() <= 1.0 + 1e-5  # cosine similarities
    res = tiny.forward_res(images, ids, lengths)
    assert isinstance(res, RESOutput)
    assert res.mask_logits.shape == (2, c.img_size, c.img_size)
    assert res.mask_logits.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(res.sim_logits, rec.sim_logits)
    # the DDP-friendly dispatcher gives the same thing
    torch.testing.assert_close(tiny(images, ids, lengths, task="rec").boxes, rec.boxes)
    xyxy = tiny.predict_boxes(images, ids, lengths)
    assert xyxy.shape == (2, 4) and (xyxy[:, 2:] >= xyxy[:, :2]).all()


def test_loss_dicts(tiny):
    c = tiny.config
    images, ids, lengths, boxes = make_batch(c)
    rec = tiny.forward_rec(images, ids, lengths)
    masks = torch.zeros(2, c.img_size, c.img_size)
    masks[:, 8:40, 16:48] = 1
    for out in (tiny.rec_loss(rec, boxes), tiny.rec_loss(rec, boxes, masks)):
        assert set(out) == {"loss", "l1", "giou", "box_mask"}
        assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
        torch.testing.assert_close(out["loss"], out["l1"] + out["giou"] + out["box_mask"])
    res = tiny.res_loss(tiny.forward_res(images, ids, lengths), masks)
    assert set(res) == {"loss", "seg"} and res["loss"].dim() == 0 and res["loss"] > 0
    with_boxes = tiny.forward_res(images, ids, lengths, with_boxes=True)
    torch.testing.assert_close(with_boxes.boxes, rec.boxes)
    aux = tiny.res_loss(with_boxes, masks, boxes=boxes, rec_weight=2.0)
    assert set(aux) == {"loss", "seg", "l1", "giou", "box_mask"}
    torch.testing.assert_close(aux["loss"], aux["seg"] + 2.0 * (
        aux["l1"] + aux["giou"] + aux["box_mask"]))
    with pytest.raises(ValueError, match="rec_weight > 0 needs out.boxes"):
        tiny.res_loss(tiny.forward_res(images, ids, lengths), masks, boxes=boxes, rec_weight=1.0)
    image_mask = torch.zeros(2, c.num_patches, dtype=torch.bool)
    image_mask[:, ::3] = True
    targets = torch.randint(0, c.mim_vocab, (2, c.num_patches))
    mim = tiny.mim_loss(images, ids, lengths, boxes, image_mask, targets, use_vts=True)
    assert set(mim) == {"loss", "mim", "vts", "box_mask"}
    torch.testing.assert_close(mim["loss"], mim["mim"] + mim["vts"] + mim["box_mask"])
    pix = tiny.mim_loss(images, ids, lengths, boxes, image_mask)
    assert set(pix) == {"loss", "mim", "box_mask"}
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    mlm = tiny.mlm_loss(images, ids, lengths, boxes, labels, torch.randn(2, c.max_text_len))
    assert set(mlm) == {"loss", "mlm", "sts", "box_mask"}
    torch.testing.assert_close(mlm["loss"], mlm["mlm"] + mlm["sts"] + mlm["box_mask"])


def test_head_sizes_at_base():
    with torch.device("meta"):
        model = OneRef.from_config("base")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.rec_head) == 1_774_852  # docs/method.md: ~1.77M
    assert model.res_head.conv1.weight.shape == (768, 768, 2, 2)
    assert model.mim_head.proj.weight.shape == (8192, 768)
    assert model.mlm_head.proj.weight.shape == (64010, 768)
    assert [l.out_features for l in model.vts_head.layers] == [768, 768, 4]
    assert [l.out_features for l in model.sts_head.layers] == [768, 768, 1]
    assert model.embed.vision_pos.weight.shape == (579, 768)
    assert model.embed.text_pos.weight.shape == (1024, 768)
    assert model.encoder.blocks[0].attn.qkv.A.weight.shape == (3 * 768, 768)
    rates = [b.drop_path.p for b in model.encoder.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and len(rates) == 12


def test_heads_subset_and_missing_head():
    model = OneRef.from_config("tiny", heads=("rec",))
    assert model.res_head is None and model.mim_head is None
    images, ids, lengths, _ = make_batch(model.config)
    with pytest.raises(ValueError, match="'res' head"):
        model.forward_res(images, ids, lengths)
    assert OneRef.from_config("tiny", heads="rec").heads == ("rec",)
    with pytest.raises(ValueError, match="unknown heads"):
        OneRef.from_config("tiny", heads=("rec", "box"))


def test_grad_checkpointing_changes_nothing(tiny):
    images, ids, lengths, boxes = make_batch(tiny.config)
    tiny.train()
    grads = []
    for flag in (False, True):
        tiny.zero_grad()
        tiny.set_grad_checkpointing(flag)
        loss = tiny.rec_loss(tiny.forward_rec(images, ids, lengths), boxes)["loss"]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_rec_step_close_to_fp32(tiny):
    images, ids, lengths, boxes = make_batch(tiny.config)
    tiny.eval()
    with torch.no_grad():
        ref = tiny.rec_loss(tiny.forward_rec(images, ids, lengths), boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny.forward_rec(images, ids, lengths)
            low = tiny.rec_loss(out, boxes)
    assert out.boxes.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in low.values())
    torch.testing.assert_close(low["loss"], ref["loss"], rtol=0.05, atol=0.05)


def test_sim_scale_multiplies_the_similarity_map():
    torch.manual_seed(0)
    plain_model = OneRef.from_config("tiny", heads=("rec",)).eval()
    scaled = OneRef(plain_model.config.replace(sim_scale=4.0), heads=("rec",)).eval()
    scaled.load_state_dict(plain_model.state_dict())
    images, ids, lengths, _ = make_batch(plain_model.config)
    with torch.no_grad():
        plain = plain_model.forward_rec(images, ids, lengths)
        sharp = scaled.forward_rec(images, ids, lengths)
    torch.testing.assert_close(sharp.sim_logits, 4.0 * plain.sim_logits)
    # The pooling softmax sees the scaled map too, so the boxes differ.
    assert not torch.allclose(sharp.boxes, plain.boxes)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_sim_scale_must_be_positive(scale):
    with pytest.raises(ValueError, match="sim_scale"):
        OneRef.from_config("tiny", sim_scale=scale)


def test_res_mask_logits_are_scaled_like_the_similarity_map():
    """``sim_scale`` multiplies the RES mask logits too (the small preset's x10)."""
    plain = OneRef.from_config("tiny").eval()
    scaled = OneRef.from_config("tiny", sim_scale=10.0).eval()
    scaled.load_state_dict(plain.state_dict())
    images, ids, lengths, _ = make_batch(plain.config)
    with torch.no_grad():
        want = plain.forward_res(images, ids, lengths).mask_logits * 10.0
        got = scaled.forward_res(images, ids, lengths).mask_logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("upsamples", [1, 2, 3])
def test_res_head_upsamplings_against_a_written_out_head(upsamples):
    """``res_upsamples`` transposed convolutions (ReLU after all but the last), then the
    per-pixel cosine with e_txt and the bilinear resize, recomputed with F.* calls."""
    torch.manual_seed(upsamples)
    dim, grid, size = 8, 3, 40
    head = RESHead(dim, upsamples).train()
    assert sorted(n for n, _ in head.named_children()) == sorted(
        [f"conv{i}" for i in range(1, upsamples + 1)] + [f"bn{i}" for i in range(1, upsamples + 1)])
    patches = torch.randn(2, grid * grid, dim)
    e_txt = F.normalize(torch.randn(2, dim), dim=-1)
    x = patches.transpose(1, 2).reshape(2, dim, grid, grid)
    for i in range(1, upsamples + 1):
        conv, bn = getattr(head, f"conv{i}"), getattr(head, f"bn{i}")
        x = F.conv_transpose2d(x, conv.weight, stride=2)
        x = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        x = F.relu(x) if i < upsamples else x
    assert x.shape[-1] == grid * 2 ** upsamples
    expected = F.interpolate((F.normalize(x, dim=1) * e_txt[:, :, None, None]).sum(1)[:, None],
                             size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(head(patches, e_txt, size), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 7, 7, 16), (3, 1, 1, 4)])
def test_upsample_2x_is_the_transposed_convolution(shape):
    """The GEMM + pixel shuffle equals F.conv_transpose2d (kernel 2, stride 2), also for a
    channels-last view of a channels-first tensor (non-contiguous) and non-square maps;
    gradients too."""
    torch.manual_seed(sum(shape))
    batch, height, width, chans = shape
    x = torch.randn(batch, chans, height, width).permute(0, 2, 3, 1).requires_grad_()
    weight = torch.randn(chans, 6, 2, 2, requires_grad=True)
    got = upsample_2x(x, weight)
    want = F.conv_transpose2d(x.permute(0, 3, 1, 2), weight, stride=2).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, weight), grad),
                               torch.autograd.grad(want, (x, weight), grad),
                               rtol=1e-5, atol=1e-5)


def _modules_forward(head: RESHead, patches, e_txt, size: int):
    """The head as its modules would run it channels-first: conv -> BN -> ReLU ... ->
    F.normalize -> dot with e_txt -> bilinear resize."""
    batch, num, dim = patches.shape
    grid = int(num ** 0.5)
    x = patches.transpose(1, 2).reshape(batch, dim, grid, grid)
    for i in range(1, head.upsamples + 1):
        x = getattr(head, f"bn{i}")(getattr(head, f"conv{i}")(x))
        x = F.relu(x) if i < head.upsamples else x
    x = F.normalize(x, dim=1)
    return F.interpolate(torch.einsum("bchw,bc->bhw", x, e_txt.to(x.dtype))[:, None],
                         size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _trained_statistics(head: RESHead) -> RESHead:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return head


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_res_head_gradients_and_statistics_match_the_modules_own_forward(training):
    """The channels-last head computes what conv -> BN -> ReLU -> F.normalize -> dot would,
    with batch statistics (train) or running ones (eval): same logits, input and parameter
    gradients, and BatchNorm running statistics."""
    torch.manual_seed(0)
    head = _trained_statistics(RESHead(16, 2)).train(training)
    twin = copy.deepcopy(head)
    patches = torch.randn(3, 25, 16, requires_grad=True)
    e_txt = F.normalize(torch.randn(3, 16), dim=-1).requires_grad_()
    got = head(patches, e_txt, 45)
    want = _modules_forward(twin, patches, e_txt, 45)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    inputs = [patches, e_txt]
    got_grads = torch.autograd.grad(got, inputs + list(head.parameters()), grad)
    want_grads = torch.autograd.grad(want, inputs + list(twin.parameters()), grad)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(head.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_res_head_under_bf16_autocast_matches_the_modules_own_forward():
    """Under CPU bf16 autocast the GEMM formulation rounds where the convolutions did: the
    logits agree to bf16 precision and come out in bf16."""
    torch.manual_seed(1)
    head = _trained_statistics(RESHead(32, 3)).train()
    twin = copy.deepcopy(head)
    patches = torch.randn(2, 16, 32)
    e_txt = F.normalize(torch.randn(2, 32), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(patches, e_txt, 50)
        want = _modules_forward(twin, patches, e_txt, 50)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_res_upsamples_is_checked():
    with pytest.raises(ValueError, match="res_upsamples must be 1, 2 or 3"):
        OneRef.from_config("tiny", res_upsamples=4)
    assert OneRef.from_config("small").res_head.upsamples == 2
    assert OneRef.from_config("tiny").res_head.upsamples == 3
