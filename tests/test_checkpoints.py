"""Checkpoint round trips: our safetensors format, official BEiT-3 / OneRef layouts."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oneref import OneRef
from oneref.checkpoints import load_official
from oneref.conversion import resize_vision_positions
from oneref.testing import official_beit3_state as official_state



def _outputs(model, seed=0):
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, c.img_size, c.img_size, generator=gen)
    ids = torch.randint(3, c.vocab_size, (2, c.max_text_len), generator=gen)
    with torch.no_grad():
        return model.eval().forward_rec(images, ids, torch.tensor([5, c.max_text_len]))


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = OneRef.from_config("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["embed_dim"] == 64
    loaded = OneRef.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.heads == model.heads
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(_outputs(model).boxes, _outputs(loaded).boxes, rtol=0, atol=0)
    subset = OneRef.from_config("tiny", heads=("rec",))
    subset.save_pretrained(tmp_path / "rec_only")  # overwrite-safe second write too
    subset.save_pretrained(tmp_path / "rec_only")
    assert OneRef.from_pretrained(tmp_path / "rec_only").heads == ("rec",)
    assert sorted(os.listdir(tmp_path / "rec_only")) == ["config.json", "model.safetensors"]


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        OneRef.from_pretrained(tmp_path)
    model = OneRef.from_config("tiny")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["embed_dim"] = 32
    config["num_heads"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch.*\(1, 1, 64\).*\(1, 1, 32\)"):
        OneRef.from_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(ValueError, match=f"cannot read '{weights}' \\(damaged or not a "):
        OneRef.from_pretrained(tmp_path)


@pytest.mark.parametrize("prefix", ["beit3.", ""], ids=["prefixed", "bare"])
def test_official_beit3_checkpoint(tmp_path, prefix):
    model = OneRef.from_config("tiny")
    state = official_state(model.config, prefix=prefix)
    path = tmp_path / "beit3.pth"
    torch.save({"model": state}, path)
    report = load_official(model, path)
    assert report.unexpected_keys == [] and report.resized_keys == []
    # heads are not in a BEiT-3 checkpoint
    assert report.missing_keys and all(not k.startswith(("embed.", "encoder."))
                                       for k in report.missing_keys)
    assert "rec_head.visu_proj.weight" in report.missing_keys
    sd = model.state_dict()
    p = prefix + "encoder.layers.1.self_attn."
    torch.testing.assert_close(sd["encoder.blocks.1.attn.qkv.B.weight"],
                               torch.cat([state[p + f"{n}_proj.B.weight"] for n in "qkv"]))
    torch.testing.assert_close(sd["encoder.blocks.1.attn.qkv.A.bias"],
                               torch.cat([state[p + f"{n}_proj.A.bias"] for n in "qkv"]))
    torch.testing.assert_close(sd["encoder.blocks.0.norm2.A.weight"],
                               state[prefix + "encoder.layers.0.final_layer_norm.A.weight"])
    torch.testing.assert_close(sd["encoder.blocks.0.mlp.sub_norm.B.bias"],
                               state[prefix + "encoder.layers.0.ffn.B.ffn_layernorm.bias"])
    torch.testing.assert_close(sd["embed.text_pos.weight"],
                               state[prefix + "encoder.embed_positions.B.weight"])


def test_position_interpolation_224_to_384_style(tmp_path):
    """A checkpoint trained at a 2x2 grid loaded into a 4x4 grid model (like 14x14 -> 24x24)."""
    model = OneRef.from_config("tiny")  # 64 px / 16 -> 4 x 4
    small = model.config.replace(img_size=32)  # 2 x 2
    state = official_state(small, prefix="beit3.")
    table = state["beit3.encoder.embed_positions.A.weight"]
    assert table.shape == (3 + 4, 64)
    report = load_official(model, state)
    assert report.resized_keys == ["embed.vision_pos.weight"]
    got = model.embed.vision_pos.weight.detach()
    assert got.shape == (3 + 16, 64)
    torch.testing.assert_close(got[:3], table[:3], rtol=0, atol=0)  # offset rows + CLS kept
    grid = table[3:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got[3:], expected.permute(0, 2, 3, 1).reshape(16, 64))
    # a constant grid stays constant under bicubic resizing
    const = torch.cat([torch.zeros(3, 2), torch.full((196, 2), 0.5)])
    torch.testing.assert_close(resize_vision_positions(const, 576)[3:], torch.full((576, 2), 0.5))


def test_official_oneref_checkpoint_heads_and_unexpected_keys():
    model = OneRef.from_config("tiny")
    d = model.config.embed_dim
    state = official_state(model.config)
    gen = torch.Generator().manual_seed(5)
    heads = {
        "vision_head.weight": (d, d), "language_head.weight": (d, d),
        "visu_proj.weight": (d, d), "visu_proj.bias": (d,),
        "bbox_embed.layers.2.weight": (4, d), "bbox_embed.layers.2.bias": (4,),
        "seg_conv2.weight": (d, d, 2, 2), "bn3.running_var": (d,),
        "mim_head.weight": (model.config.mim_vocab, d), "mlm_sts_head.layers.2.weight": (1, d),
        "logit_scale": (), "text_proj.weight": (d, d),
    }
    state.update({k: torch.randn(s, generator=gen) for k, s in heads.items()})
    state["beit3.encoder.layers.0.self_attn.q_proj.A.weight"] = state.pop(
        "beit3.encoder.layers.0.self_attn.q_proj.A.weight")  # order does not matter
    report = load_official(model, {"model": state})
    assert sorted(report.unexpected_keys) == ["logit_scale", "text_proj.weight"]
    sd = model.state_dict()
    pairs = {"rec_head.bbox_mlp.layers.2.weight": "bbox_embed.layers.2.weight",
             "rec_head.visu_proj.bias": "visu_proj.bias",
             "res_head.conv2.weight": "seg_conv2.weight",
             "res_head.bn3.running_var": "bn3.running_var",
             "mim_head.proj.weight": "mim_head.weight",
             "sts_head.layers.2.weight": "mlm_sts_head.layers.2.weight",
             "vision_head.weight": "vision_head.weight"}
    for ours, theirs in pairs.items():
        torch.testing.assert_close(sd[ours], state[theirs], rtol=0, atol=0)
        assert ours not in report.missing_keys
    assert "mlm_head.proj.weight" in report.missing_keys


def test_official_checkpoint_errors(tmp_path):
    model = OneRef.from_config("tiny")
    state = official_state(model.config)
    bad = dict(state)
    bad["beit3.encoder.embed_positions.B.weight"] = torch.zeros(99, 64)
    with pytest.raises(ValueError, match=r"beit3.encoder.embed_positions.B.weight.*\(99, 64\).*"
                                         r"embed.text_pos.weight.*\(64, 64\)"):
        load_official(model, bad)
    partial = dict(state)
    del partial["beit3.encoder.layers.0.self_attn.k_proj.A.weight"]
    report = load_official(model, partial)
    assert "encoder.blocks.0.attn.qkv.A.weight" in report.missing_keys
    assert "beit3.encoder.layers.0.self_attn.q_proj.A.weight" in report.unexpected_keys
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official(model, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not tensors"):
        load_official(model, {"model": {"text_embed.weight": [1, 2]}})


def test_files_that_are_not_official_checkpoints_are_refused_by_name(tmp_path):
    model = OneRef.from_config("tiny")
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"ours/model.safetensors: none of its \d+ tensors "
                                         r"\(.*\) is a BEiT-3 / OneRef encoder weight.*"
                                         r"OneRef.from_pretrained"):
        load_official(model, tmp_path / "ours" / "model.safetensors")
    with pytest.raises(ValueError, match=r"the dict: none of its 1 tensors \(foo\)"):
        load_official(model, {"model": {"foo": torch.zeros(3)}})
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    with pytest.raises(FileNotFoundError, match=r"run' is a run folder: its model is .*run/model"):
        OneRef.from_pretrained(run)


CALLS = []


def _record(value):
    CALLS.append(value)


class _RunsCode:
    """Unpickling this calls a function: what a hostile checkpoint does."""

    def __reduce__(self):
        return (_record, ("ran",))


def test_official_files_load_safely(tmp_path):
    """Training arguments and numpy scalars load without unpickling code; anything else is
    refused unless trusted; legacy and torn files give errors naming the file."""
    model = OneRef.from_config("tiny")
    state = official_state(model.config)
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4, imsize=384),
                "val_accu": np.float64(0.8), "epoch": 3}, tmp_path / "official.pth")
    assert load_official(model, tmp_path / "official.pth").unexpected_keys == []
    torch.save({"model": state, "args": _RunsCode()}, tmp_path / "hostile.pth")
    with pytest.raises(ValueError, match=r"hostile.pth.*pickles .*_record.*--trust-checkpoint"):
        load_official(model, tmp_path / "hostile.pth")
    assert CALLS == []
    load_official(model, tmp_path / "hostile.pth", allow_pickle=True)
    assert CALLS == ["ran"]
    torch.save({"model": state}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert load_official(model, tmp_path / "legacy.pth") == load_official(
        model, tmp_path / "official.pth")  # not memory-mappable: read whole
    data = (tmp_path / "official.pth").read_bytes()
    (tmp_path / "torn.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="torn.pth.*truncated"):
        load_official(model, tmp_path / "torn.pth")


def test_load_pth_memory_maps(tmp_path, monkeypatch):
    from oneref import io

    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "a.pth")
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or real_load(*a, **k))
    io.load_pth(tmp_path / "a.pth")
    assert seen[0]["mmap"] is True and seen[0]["weights_only"] is True


def test_infer_model_config_from_shapes():
    from oneref.conversion import infer_model_config, renamed_tensors
    from oneref.config import get_config

    tiny = get_config("tiny")
    converted = renamed_tensors(official_state(tiny.replace(img_size=32)))
    assert infer_model_config(converted) == tiny  # the preset with this width and depth
    assert infer_model_config(converted, "tiny") == tiny
    with pytest.raises(ValueError,
                       match=r"does not fit preset 'base': embed_dim 64 \(preset 768\)"):
        infer_model_config(converted, "base")
    odd = renamed_tensors(official_state(tiny.replace(depth=3)))
    with pytest.raises(ValueError, match="depth 3.*no preset.*--model"):
        infer_model_config(odd)


def test_full_size_official_base_224_maps_onto_base_384_on_meta():
    """Every name and shape of torchscale's BEiT-3 base at 224 fits our base at 384
    (meta tensors: nothing allocated). The 14 x 14 position grid is resized to 24 x 24."""
    beit3 = pytest.importorskip("torchscale.model.BEiT3")
    import warnings
    from torchscale.architecture.config import EncoderConfig
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        reference = beit3.BEiT3(EncoderConfig(vocab_size=64010, multiway=True, img_size=224,
                                              patch_size=16, no_output_layer=True))
        model = OneRef.from_config("base", heads=("rec",))
    state = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    assert state["beit3.encoder.embed_positions.A.weight"].shape == (199, 768)
    report = load_official(model, {"model": state})
    assert report.resized_keys == ["embed.vision_pos.weight"]
    assert report.unexpected_keys == []
    assert report.missing_keys == sorted(["language_head.weight", "vision_head.weight"] +
                                         [n for n, _ in model.rec_head.named_parameters(
                                             prefix="rec_head")])


def test_atomic_writes_leave_no_temp_and_respect_the_umask(tmp_path):
    from oneref import io

    old = os.umask(0o022)
    try:
        path = io.write_json(tmp_path / "sub" / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": 1}
    assert (path.stat().st_mode & 0o777) == 0o644  # as open() would make it, not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
    with pytest.raises(RuntimeError):
        io.atomic_write(path, lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert json.loads(path.read_text()) == {"a": 1}  # the previous file is intact
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
