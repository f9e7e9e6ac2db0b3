"""Parameter counts at base/large, built on the meta device (nothing allocated)."""

import warnings

import pytest
import torch

from oneref import OneRef

BASE_ENCODER = 221_279_232  # docs/method.md, "Encoder": encoder incl. embeddings, both experts
LARGE_ENCODER = 673_091_584


def _count(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("preset,expected", [("base", BASE_ENCODER), ("large", LARGE_ENCODER)])
def test_encoder_parameter_count(preset, expected):
    with torch.device("meta"):
        model = OneRef.from_config(preset)
    assert _count(model.backbone_parameters()) == expected
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_base_count_matches_torchscale_beit3_at_384():
    beit3 = pytest.importorskip("torchscale.model.BEiT3")
    from torchscale.architecture.config import EncoderConfig
    args = EncoderConfig(vocab_size=64010, multiway=True, img_size=384, patch_size=16,
                         no_output_layer=True)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        reference = beit3.BEiT3(args)
    assert _count(reference.parameters()) == BASE_ENCODER
