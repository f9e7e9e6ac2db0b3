"""VQ-KD tokenizer: official checkpoint layout, codes vs a hand computation, errors.

The checkpoints here are written key by key in the layout of the official BEiT v2 file
(``vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth``: ``{"model": ...}`` with
``encoder.*``, ``encode_task_layer.*``, ``quantize.*`` and decoder entries), not from the
module's own ``state_dict()``, so the tests also pin the key names.
"""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from oneref.model import vqkd as vqkd_module
from oneref.model.vqkd import VQKDTokenizer

DIM, DEPTH, HEADS, PATCH, GRID = 64, 2, 2, 16, 4  # stored position grid 4x4 -> 64x64 images
CODES, CODE_DIM = 96, 8
EPS = 1e-6


def official_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors under the official VQ-KD key names (small shapes), decoder included."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    hidden = 4 * DIM
    sd = {
        "encoder.cls_token": rnd(1, 1, DIM),
        "encoder.pos_embed": rnd(1, 1 + GRID * GRID, DIM),
        "encoder.patch_embed.proj.weight": rnd(DIM, 3, PATCH, PATCH, scale=0.05),
        "encoder.patch_embed.proj.bias": rnd(DIM),
        "encoder.fc_norm.weight": 1 + rnd(DIM),
        "encoder.fc_norm.bias": rnd(DIM),
        "encode_task_layer.0.weight": rnd(DIM, DIM),
        "encode_task_layer.0.bias": rnd(DIM),
        "encode_task_layer.2.weight": rnd(CODE_DIM, DIM),
        "encode_task_layer.2.bias": rnd(CODE_DIM),
        "quantize.embedding.weight": F.normalize(torch.randn(CODES, CODE_DIM, generator=g), dim=-1),
    }
    for i in range(DEPTH):
        p = f"encoder.blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + rnd(DIM), p + "norm1.bias": rnd(DIM),
            p + "attn.qkv.weight": rnd(3 * DIM, DIM), p + "attn.q_bias": rnd(DIM),
            p + "attn.v_bias": rnd(DIM),
            p + "attn.proj.weight": rnd(DIM, DIM), p + "attn.proj.bias": rnd(DIM),
            p + "norm2.weight": 1 + rnd(DIM), p + "norm2.bias": rnd(DIM),
            p + "mlp.fc1.weight": rnd(hidden, DIM), p + "mlp.fc1.bias": rnd(hidden),
            p + "mlp.fc2.weight": rnd(DIM, hidden), p + "mlp.fc2.bias": rnd(DIM),
        })
    return sd


def with_unused_entries(sd: dict) -> dict:
    """Adds decoder, decode-task-layer and EMA statistics entries the tokenizer ignores."""
    sd = dict(sd)
    sd.update({
        "decoder.cls_token": torch.zeros(1, 1, DIM),
        "decoder.patch_embed.proj.weight": torch.zeros(DIM, CODE_DIM, 1, 1),
        "decoder.blocks.0.attn.qkv.weight": torch.zeros(3 * DIM, DIM),
        "decode_task_layer.2.weight": torch.zeros(512, DIM),
        "quantize.cluster_size": torch.ones(CODES),
        "quantize.embedding.cluster_size": torch.ones(CODES),
        "quantize.embedding.embed_avg": torch.zeros(CODES, CODE_DIM),
        "quantize.embedding.initted": torch.tensor([1.0]),
    })
    return sd


def save(tmp_path, sd, name="vqkd.pth", **extra):
    path = tmp_path / name
    torch.save({"model": sd, **extra}, path)
    return path


# ---------------------------------------------------------------- hand computation
def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def official_positions(pos, grid_side):
    """The official interpolate_pos_encoding: bicubic with scale (grid + 0.1) / G."""
    if grid_side == GRID:
        return pos
    table = pos[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    scale = (grid_side + 0.1) / math.sqrt(GRID * GRID)
    table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic")
    table = table.permute(0, 2, 3, 1).reshape(1, -1, DIM)
    return torch.cat((pos[:, :1], table), dim=1)


def expected_codes(sd, images01):
    """Codes written out step by step from the official modules' definitions."""
    x = images01 * 255.0 / 127.5 - 1.0  # VQKD.pre_process, process_type "default"
    b, _, h, w = x.shape
    gh, gw = h // PATCH, w // PATCH
    patches = x.reshape(b, 3, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, gh * gw, 3 * PATCH * PATCH)
    t = patches @ sd["encoder.patch_embed.proj.weight"].reshape(DIM, -1).t()
    t = t + sd["encoder.patch_embed.proj.bias"]
    t = torch.cat((sd["encoder.cls_token"].expand(b, 1, DIM), t), dim=1)
    t = t + official_positions(sd["encoder.pos_embed"], gh)
    hd = DIM // HEADS
    for i in range(DEPTH):
        p = f"encoder.blocks.{i}."
        y = layer_norm(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        bias = torch.cat((sd[p + "attn.q_bias"], torch.zeros(DIM), sd[p + "attn.v_bias"]))
        qkv = (y @ sd[p + "attn.qkv.weight"].t() + bias).reshape(b, -1, 3, HEADS, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * hd ** -0.5) @ k.transpose(-2, -1), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, DIM)
        t = t + y @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        y = layer_norm(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        y = y @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        t = t + y @ sd[p + "mlp.fc2.weight"].t() + sd[p + "mlp.fc2.bias"]
    f = layer_norm(t[:, 1:], sd["encoder.fc_norm.weight"], sd["encoder.fc_norm.bias"])
    z = torch.tanh(f @ sd["encode_task_layer.0.weight"].t() + sd["encode_task_layer.0.bias"])
    z = z @ sd["encode_task_layer.2.weight"].t() + sd["encode_task_layer.2.bias"]
    z = z / z.norm(dim=-1, keepdim=True)
    e = sd["quantize.embedding.weight"]
    # NormEMAVectorQuantizer: argmin of the squared distance to the codebook rows
    dist = (z ** 2).sum(-1, keepdim=True) + (e ** 2).sum(-1) - 2 * z @ e.t()
    return dist.argmin(-1), z


def load_tiny(tmp_path, image_size, sd=None, **kwargs):
    sd = official_state() if sd is None else sd
    path = save(tmp_path, with_unused_entries(sd))
    return VQKDTokenizer.from_checkpoint(path, image_size=image_size, num_heads=HEADS, **kwargs), sd


def assert_codes_match(codes, expected, z, codebook):
    """Equal ids, or (only at a float near-tie) codes scoring within 1e-5 of the best."""
    mismatch = codes != expected
    if mismatch.any():
        score = z @ codebook.t()
        best = score.gather(-1, expected[..., None])[..., 0]
        got = score.gather(-1, codes[..., None])[..., 0]
        gap = (best - got)[mismatch].abs().max().item()
        assert gap < 1e-5, f"{int(mismatch.sum())} codes differ, score gap up to {gap}"
    assert mismatch.float().mean().item() < 0.02


# ---------------------------------------------------------------- tests
def test_codes_match_hand_computation_on_native_grid(tmp_path):
    model, sd = load_tiny(tmp_path, image_size=GRID * PATCH)
    images = torch.rand(3, 3, GRID * PATCH, GRID * PATCH)
    codes = model(images)
    expected, z = expected_codes(sd, images)
    assert codes.dtype == torch.long and codes.shape == (3, GRID * GRID)
    assert int(codes.min()) >= 0 and int(codes.max()) < CODES
    assert codes.unique().numel() > 5  # the weights spread tokens over many codes
    assert_codes_match(codes, expected, z, sd["quantize.embedding.weight"])
    # the quantiser inputs themselves agree, not only the argmax
    feats = F.normalize(model.encode_features(images), dim=-1)
    torch.testing.assert_close(feats, z, rtol=1e-4, atol=1e-5)


def test_non_native_size_interpolates_positions(tmp_path):
    side = 6  # 96x96 input on a 4x4 stored table, as 384 on the official 14x14 one
    model, sd = load_tiny(tmp_path, image_size=side * PATCH)
    assert model.grid() == side
    table = model.encoder.position_table(side, side)
    assert table.shape == (1, 1 + side * side, DIM)
    torch.testing.assert_close(table[:, :1], sd["encoder.pos_embed"][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(table, official_positions(sd["encoder.pos_embed"], side))
    # the official (grid + 0.1) scale factor is not the same as resizing to a target size
    plain = F.interpolate(sd["encoder.pos_embed"][:, 1:].reshape(1, GRID, GRID, DIM)
                          .permute(0, 3, 1, 2), size=(side, side), mode="bicubic")
    assert (plain.permute(0, 2, 3, 1).reshape(1, -1, DIM) - table[:, 1:]).abs().max() > 1e-4
    images = torch.rand(2, 3, side * PATCH, side * PATCH)
    codes = model(images)
    assert codes.shape == (2, side * side) and codes.dtype == torch.long
    expected, z = expected_codes(sd, images)
    assert_codes_match(codes, expected, z, sd["quantize.embedding.weight"])


def test_frozen_eval_and_no_grad(tmp_path):
    model, _ = load_tiny(tmp_path, image_size=GRID * PATCH)
    params = list(model.parameters())
    assert len(params) == 4 + 13 * DEPTH + 2 + 4 + 1
    assert not any(p.requires_grad for p in params)
    assert not model.training
    model.train()  # a parent module switching to training must not unfreeze the target
    assert not model.training and not any(m.training for m in model.modules())
    images = torch.rand(1, 3, GRID * PATCH, GRID * PATCH, requires_grad=True)
    with torch.enable_grad():
        codes = model(images)
    assert codes.grad_fn is None and not codes.requires_grad


def test_state_dict_uses_official_names(tmp_path):
    model, sd = load_tiny(tmp_path, image_size=GRID * PATCH)
    own = model.state_dict()
    assert set(own) == set(sd)
    for key, value in sd.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


def test_base_shape_matches_official_vit_b16():
    with torch.device("meta"):
        model = VQKDTokenizer()  # ViT-B/16 at 224, 8192 x 32 codebook
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.pos_embed"] == (1, 197, 768)
    assert shapes["encoder.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["encoder.blocks.11.mlp.fc1.weight"] == (3072, 768)
    assert shapes["encode_task_layer.2.weight"] == (32, 768)
    assert shapes["quantize.embedding.weight"] == (8192, 32)
    assert "encoder.blocks.12.norm1.weight" not in shapes
    # encoder 85,789,440 + task layer 615,200 + codebook 262,144
    assert sum(v.numel() for v in model.parameters()) == 86_666_784


def test_preprocess_maps_unit_interval_to_minus_one_one():
    model = VQKDTokenizer(image_size=32, dim=32, depth=1, num_heads=2, codebook_size=8, code_dim=4)
    x = torch.tensor([0.0, 0.25, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(x).flatten(), torch.tensor([-1.0, -0.5, 1.0]))
    norm = VQKDTokenizer(image_size=32, dim=32, depth=1, num_heads=2, codebook_size=8,
                         code_dim=4, process_type="imagenet_norm")
    want = torch.tensor([(0 - 0.485) / 0.229, (0.25 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    torch.testing.assert_close(norm.preprocess(x).flatten(), want)


def test_chunked_matching_equals_single_pass(tmp_path, monkeypatch):
    model, _ = load_tiny(tmp_path, image_size=GRID * PATCH)
    images = torch.rand(2, 3, GRID * PATCH, GRID * PATCH)
    whole = model(images)
    monkeypatch.setattr(vqkd_module, "_MATCH_CHUNK", 5)
    assert torch.equal(model(images), whole)


def test_checkpoint_with_training_args_loads(tmp_path):
    sd = official_state()
    path = save(tmp_path, with_unused_entries(sd), args=argparse.Namespace(lr=1e-4), epoch=99)
    model = VQKDTokenizer.from_checkpoint(path, image_size=GRID * PATCH, num_heads=HEADS)
    torch.testing.assert_close(model.quantize.embedding.weight, sd["quantize.embedding.weight"])


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda sd: sd.pop("encoder.blocks.1.attn.v_bias"), "encoder.blocks.1.attn.v_bias"),
        (lambda sd: sd.pop("encoder.fc_norm.weight"), "encoder.fc_norm.weight"),
        (lambda sd: sd.update({"encoder.blocks.0.mlp.fc2.bias": torch.zeros(DIM + 1)}),
         "encoder.blocks.0.mlp.fc2.bias"),
        (lambda sd: sd.update({"encode_task_layer.2.weight": torch.zeros(CODE_DIM + 1, DIM)}),
         "encode_task_layer.2.weight"),
        (lambda sd: sd.update({"encoder.blocks.0.gamma_1": torch.ones(DIM)}),
         "encoder.blocks.0.gamma_1"),
        (lambda sd: sd.update({"encoder.pos_embed": torch.zeros(1, 18, DIM)}),
         "encoder.pos_embed"),
    ],
    ids=["missing-bias", "missing-fc-norm", "bad-shape", "task-layer-vs-codebook",
         "unexpected-layer-scale", "non-square-positions"],
)
def test_bad_checkpoint_names_the_key(tmp_path, change, key):
    sd = official_state()
    change(sd)
    path = save(tmp_path, with_unused_entries(sd))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        VQKDTokenizer.from_checkpoint(path, image_size=GRID * PATCH, num_heads=HEADS)


def test_unexpected_key_tolerated_when_not_strict(tmp_path, caplog):
    sd = official_state()
    sd["encoder.head.weight"] = torch.zeros(10, DIM)
    path = save(tmp_path, sd)
    with caplog.at_level(logging.WARNING, logger="oneref.model.vqkd"):
        model = VQKDTokenizer.from_checkpoint(
            path, image_size=GRID * PATCH, num_heads=HEADS, strict=False
        )
    assert "encoder.head.weight" in caplog.text
    torch.testing.assert_close(model.encoder.cls_token, sd["encoder.cls_token"])


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VQKDTokenizer.from_checkpoint(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        VQKDTokenizer.from_checkpoint(garbage)
    other = tmp_path / "other.pth"
    torch.save({"weights": {"a": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match="no 'model' entry"):
        VQKDTokenizer.from_checkpoint(other)


def test_bad_images(tmp_path):
    model, _ = load_tiny(tmp_path, image_size=GRID * PATCH)
    side = GRID * PATCH
    with pytest.raises(ValueError, match=r"images01 must have shape \(B, 3, 64, 64\)"):
        model(torch.rand(1, 3, side + PATCH, side + PATCH))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(torch.randn(1, 3, side, side) * 2)  # ImageNet-normalised by mistake
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 3, side, side, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VQKDTokenizer(image_size=70, dim=32, depth=1, num_heads=2, codebook_size=8, code_dim=4)
