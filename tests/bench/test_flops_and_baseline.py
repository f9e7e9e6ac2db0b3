"""FLOP counting against the analytic formula, and the official-style baseline's numbers
against the reference ops."""

import pytest
import torch

from oneref.bench.baseline import BaselineOneRef, use_sdpa
from oneref.bench.engines import make_batch
from oneref.bench.flops import analytic_encoder_flops, count_flops, encoder_layer_flops
from oneref.config import get_config
from oneref.ops import reference


def _encoder_flops(model, config):
    batch = make_batch(config, 1, "cpu", seed=0)
    model.eval()
    return count_flops(lambda: model.encode(batch["images"], batch["text_ids"]))


def test_layer_formula_is_24sd2_plus_4s2d_for_ffn_4d():
    s, d = 641, 768
    assert encoder_layer_flops(s, d, 4 * d) == 24 * s * d * d + 4 * s * s * d
    # OneRef-B per layer per sample (docs/perf.md): 9.07 GFLOP linear + 1.26 GFLOP attention
    assert encoder_layer_flops(s, d, 4 * d) / 1e9 == pytest.approx(9.07 + 1.26, abs=0.02)


@pytest.mark.parametrize("ffn", [None, "4d"])
def test_counted_tiny_encoder_flops_match_formula(ffn):
    config = get_config("tiny")
    if ffn == "4d":
        config = config.replace(ffn_dim=4 * config.embed_dim)
    counted = _encoder_flops(BaselineOneRef(config), config)
    analytic = analytic_encoder_flops(config)
    per_layer = encoder_layer_flops(config.seq_len, config.embed_dim, config.ffn_dim)
    layers_counted = counted["flops"] - analytic["patch_embed"]
    assert layers_counted / config.depth == pytest.approx(per_layer, rel=0.03)
    assert counted["gmacs"] == pytest.approx(counted["gflops"] / 2)


def test_our_model_counts_the_same_encoder_flops():
    model_mod = pytest.importorskip("oneref.model")
    config = get_config("tiny")
    model = model_mod.OneRef.from_config(config)
    batch = make_batch(config, 1, "cpu", seed=0)
    model.eval()
    counted = count_flops(lambda: model.encode(batch["images"], batch["text_ids"],
                                               batch["text_lengths"]))
    want = analytic_encoder_flops(config)["total"]
    assert counted["flops"] == pytest.approx(want, rel=0.03)


def test_baseline_box_mask_loss_matches_reference():
    config = get_config("tiny")
    model = BaselineOneRef(config)
    batch = make_batch(config, 4, "cpu", seed=1)
    out = model.forward_rec(batch["images"], batch["text_ids"])
    losses = model.rec_loss(out, batch["boxes"])
    want = reference.box_mask_loss(out["sim_logits"], batch["boxes"])
    assert losses["box_mask"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["boxes"].shape == (4, 4)
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()


def test_baseline_res_loss_matches_reference_focal_dice():
    config = get_config("tiny")
    model = BaselineOneRef(config)
    batch = make_batch(config, 2, "cpu", seed=2, task="res")
    out = model.forward_res(batch["images"], batch["text_ids"])
    assert out["mask_logits"].shape == (2, config.img_size, config.img_size)
    got = model.res_loss(out, batch["masks"])["loss"]
    want = reference.focal_dice_loss(out["mask_logits"], batch["masks"])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_sdpa_baseline_matches_eager_baseline():
    config = get_config("tiny")
    eager = BaselineOneRef(config).eval()
    sdpa = use_sdpa(BaselineOneRef(config)).eval()
    sdpa.load_state_dict(eager.state_dict())
    batch = make_batch(config, 3, "cpu", seed=3)
    a = eager.forward_rec(batch["images"], batch["text_ids"])["sim_logits"]
    b = sdpa.forward_rec(batch["images"], batch["text_ids"])["sim_logits"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert a.abs().max() > 0.01  # not a degenerate all-zero map


def test_our_encoder_matches_torchscale_baseline_with_the_same_weights():
    pytest.importorskip("oneref.model")
    pytest.importorskip("oneref.checkpoints")
    from oneref.bench.engines import encoder_agreement
    assert encoder_agreement(get_config("tiny"), "cpu") < 1e-4


def test_baseline_with_drop_path_traces_as_one_graph():
    """torchscale's numpy drop-path rates broke the compiled (b+) graph in every layer."""
    config = get_config("tiny", drop_path=0.1)
    model = use_sdpa(BaselineOneRef(config)).train()
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert len(rates) == config.depth and all(type(r) is float for r in rates)
    batch = make_batch(config, 2, "cpu", seed=0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(
        lambda: model.forward_rec(batch["images"], batch["text_ids"])["sim_logits"].sum())()
    assert explained.graph_count == 1 and explained.graph_break_count == 0
