"""One graph per step: the four training steps (REC, RES, also with the RefShapes recipe's
loss, referring MIM with visual-token targets and VTS, referring MLM with STS) compile with
``fullgraph=True`` through inductor and match eager in loss and every gradient; the
inference forwards trace whole too."""

import contextlib

import pytest
import torch

from oneref import OneRef, ops
from oneref.compile import compile_step
from oneref.train.config import PretrainConfig, ResLossConfig
from oneref.train.steps import TaskModule, prepare_mim, prepare_mlm

# (task, mode, RES loss); the last is the RES step with the RefShapes recipe's loss (focal
# alpha 0.75, the REC losses added).
RECIPE_RES_LOSS = ResLossConfig(focal_alpha=0.75, rec_weight=1.0)
STEPS = [("rec", "", None), ("res", "", None), ("pretrain", "mim", None),
         ("pretrain", "mlm", None), ("res", "", RECIPE_RES_LOSS)]
STEP_IDS = ["rec", "res", "mim", "mlm", "res+rec"]


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = OneRef.from_config("tiny")
    c = model.config
    gen = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(2, 3, c.img_size, c.img_size, generator=gen),
             "text_ids": torch.randint(4, 200, (2, c.max_text_len), generator=gen),
             "text_lengths": torch.tensor([5, c.max_text_len]),
             "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.2, 0.5]]),
             "masks": (torch.rand(2, c.img_size, c.img_size, generator=gen) > 0.5).float(),
             "word_positions": torch.tensor([[1, 2], [2, -1]]),
             "sts_targets": torch.rand(2, c.max_text_len, generator=gen)}
    prepare_mim(batch, c.grid, gen, PretrainConfig(), None)
    batch["mim_targets"] = torch.randint(0, c.mim_vocab, (2, c.num_patches), generator=gen)
    prepare_mlm(batch, gen, PretrainConfig(), 1000, c.vocab_size)
    ops.prepare("cpu")  # dispatch resolved before any trace, whichever test runs first
    return model.eval(), batch  # eval: no drop path, so both runs draw nothing


def _loss_and_grads(module, model, batch, mode):
    model.zero_grad(set_to_none=True)
    losses = module(batch, mode) if mode else module(batch)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses["loss"].detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("task,mode,res_loss", STEPS, ids=STEP_IDS)
def test_training_step_is_one_graph_and_matches_eager(model_and_batch, task, mode, res_loss):
    model, batch = model_and_batch
    step = TaskModule(model, task, PretrainConfig(vts=True, sts=True), res_loss=res_loss)
    loss, grads = _loss_and_grads(step, model, batch, mode)
    compiled = compile_step(step, "cpu", fullgraph=True)  # a graph break would raise
    compiled_loss, compiled_grads = _loss_and_grads(compiled, model, batch, mode)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("entry", ["forward_rec", "forward_res"])
def test_inference_forward_is_one_graph(model_and_batch, entry):
    model, batch = model_and_batch
    forward = getattr(model, entry)
    args = (batch["images"], batch["text_ids"], batch["text_lengths"])
    with torch.no_grad():
        explained = torch._dynamo.explain(forward)(*args)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        compiled = compile_step(forward, "cpu", fullgraph=True, backend="eager")
        for got, want in zip(compiled(*args), forward(*args)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("where", ["use_backend", "environment"])
def test_per_op_backend_setting_traces_whole(model_and_batch, monkeypatch, where):
    """Dispatch under a per-op setting (a ``use_backend`` mapping, as bench engine (d*)
    runs, or ``ONEREF_BACKEND`` items) is still a lookup that Dynamo folds."""
    model, batch = model_and_batch
    args = (batch["images"], batch["text_ids"], batch["text_lengths"])
    block = contextlib.nullcontext()
    if where == "environment":
        monkeypatch.setenv("ONEREF_BACKEND", "auto,multiway_layer_norm=torch")
    else:
        block = ops.use_backend({"multiway_layer_norm": "torch"})
    with torch.no_grad(), block:
        ops.prepare("cpu")
        explained = torch._dynamo.explain(model.forward_rec)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@pytest.mark.gpu
@pytest.mark.parametrize("task,mode,res_loss", STEPS, ids=STEP_IDS)
def test_training_step_is_one_graph_on_the_gpu(model_and_batch, task, mode, res_loss):
    """The same on CUDA tensors under bf16 autocast, with the policy's backends (the GPU
    machines run another torch than CI): one graph, and every gradient within bf16 rounding
    of eager's (relative to its norm), which a gradient routed to the wrong place fails."""
    model, batch = model_and_batch
    device = torch.device("cuda")
    model = model.to(device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    step = TaskModule(model, task, PretrainConfig(vts=True, sts=True), res_loss=res_loss)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, grads = _loss_and_grads(step, model, batch, mode)
            compiled = compile_step(step, device, fullgraph=True)
            compiled_loss, compiled_grads = _loss_and_grads(compiled, model, batch, mode)
        assert torch.isfinite(compiled_loss)
        torch.testing.assert_close(compiled_loss, loss, rtol=2e-2, atol=1e-3)
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            error = ((compiled_grads[name] - grad).float().norm()
                     / grad.float().norm().clamp_min(1e-6))
            assert error < 0.1, f"{name}: compiled gradient off by {error:.3f} of its norm"
    finally:
        model.to("cpu")
