"""Our encoder against torchscale 0.3.0's BEiT3 on the same weights (fp32).

torchscale is the independent implementation of the BEiT-3 multiway transformer; its state
dict is saved in the official checkpoint layout ({"model": ...}) and loaded through
oneref.checkpoints, so the test also covers the renaming rules and the QKV packing.
"""

import warnings

import pytest
import torch

from oneref import OneRef
from oneref.checkpoints import load_official
from oneref.config import ModelConfig

torchscale_beit3 = pytest.importorskip("torchscale.model.BEiT3")
from torchscale.architecture.config import EncoderConfig  # noqa: E402

CONFIG = ModelConfig(name="parity", img_size=64, patch_size=16, embed_dim=64, depth=2,
                     num_heads=2, ffn_dim=128, vocab_size=100, max_text_len=64,
                     text_positions=128, drop_path=0.0, mim_vocab=16)


def _torchscale_model(config: ModelConfig):
    args = EncoderConfig(vocab_size=config.vocab_size, multiway=True,
                         encoder_embed_dim=config.embed_dim,
                         encoder_attention_heads=config.num_heads,
                         encoder_ffn_embed_dim=config.ffn_dim, encoder_layers=config.depth,
                         img_size=config.img_size, patch_size=config.patch_size,
                         max_source_positions=config.text_positions, no_output_layer=True,
                         drop_path_rate=0.0, layernorm_eps=config.ln_eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchscale_beit3.BEiT3(args)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everything, LayerNorm weights around 1
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name or "ffn_layernorm" in name or "inner_attn_ln" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = _torchscale_model(CONFIG)
    path = tmp_path_factory.mktemp("ckpt") / "beit3_parity.pth"
    torch.save({"model": {f"beit3.{k}": v for k, v in reference.state_dict().items()}}, path)
    ours = OneRef(CONFIG, heads=()).eval()
    report = load_official(ours, path)
    return reference, ours, report


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_checkpoint_covers_the_encoder(pair):
    _, ours, report = pair
    assert report.unexpected_keys == []
    # everything of the backbone came from the checkpoint; only the output projections remain
    assert report.missing_keys == ["language_head.weight", "vision_head.weight"]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mim"])
def test_encoder_matches_torchscale(pair, masked):
    reference, ours, _ = pair
    gen = torch.Generator().manual_seed(2)
    batch, num_text = 3, CONFIG.max_text_len
    images = torch.randn(batch, 3, CONFIG.img_size, CONFIG.img_size, generator=gen)
    lengths = torch.tensor([1, 17, 64])
    ids = torch.randint(3, CONFIG.vocab_size, (batch, num_text), generator=gen)
    ids[torch.arange(num_text)[None] >= lengths[:, None]] = 1
    image_mask = (torch.rand(batch, CONFIG.num_patches, generator=gen) < 0.4) if masked else None
    padding = torch.arange(num_text)[None] >= lengths[:, None]
    with torch.no_grad():
        out = ours.encode(images, ids, lengths, image_mask=image_mask)
        ref = reference(textual_tokens=ids, visual_tokens=images, text_padding_position=padding,
                        vision_masked_position=image_mask)["encoder_out"]
    nv = CONFIG.num_vision
    errors = {
        "vision": _rel_err(out.vision, ref[:, :nv]),
        **{f"text_len{n}": _rel_err(out.text[i], ref[i, nv:]) for i, n in enumerate([1, 17, 64])},
    }
    print(f"parity ({'mim' if masked else 'plain'}): " +
          ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    for name, err in errors.items():
        assert err <= 1e-5, f"{name}: relative error {err:.3e}"


def test_short_text_tensor_matches_torchscale(pair):
    """T shorter than max_text_len (no padding at all): one sample of 17 tokens."""
    reference, ours, _ = pair
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(1, 3, CONFIG.img_size, CONFIG.img_size, generator=gen)
    ids = torch.randint(3, CONFIG.vocab_size, (1, 17), generator=gen)
    with torch.no_grad():
        out = ours.encode(images, ids, torch.tensor([17]))
        ref = reference(textual_tokens=ids, visual_tokens=images,
                        text_padding_position=torch.zeros(1, 17, dtype=torch.bool))["encoder_out"]
    joint = torch.cat([out.vision, out.text], dim=1)
    assert _rel_err(joint, ref) <= 1e-5
