"""Engine configurations (the rows of every model table) and the steps they run.

| key | engine |
|---|---|
| a | official-style: torchscale BEiT-3 + plain OneRef heads, fp32 eager |
| b | (a) + bf16 autocast + SDPA attention (GPU only: on a CPU it is the same model as (a)) |
| b+ | (b) + ``torch.compile``: what a user would pick instead of this engine |
| c | ours (``oneref.model.OneRef``), ``torch`` backend (bf16 autocast on GPU, fp32 on CPU) |
| d | ours, ``auto`` backend (the measured per-op policy, :mod:`oneref.ops.policy`) |
| d* | (d) + the Triton kernels of :data:`UNMEASURED_KERNELS`, before the policy has them (GPU) |
| e | (d) + ``torch.compile`` of the loss / forward function (one graph per step) |
| e* | (e) + the Triton kernels of (d*) |
| f | (e) + CUDA graphs (``reduce-overhead``: one captured graph per batch size; CPU: (e)) |

Every engine runs the same tasks on the same synthetic batches: ``rec`` / ``res`` fine-tune
steps (forward, loss, backward, gradient clipping to norm 1, fused AdamW step: the same
optimizer for every row, so a ratio measures the model), ``mim`` / ``mlm`` pre-training
steps, and inference (``rec_infer`` / ``res_infer``: forward under ``torch.inference_mode``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from oneref.bench.baseline import BaselineOneRef, use_sdpa
from oneref.checkpoints import load_official
from oneref.compile import compile_step
from oneref.config import ModelConfig
from oneref.model import OneRef
from oneref.ops import reference, use_backend
from oneref.ops.dispatch import unavailable_reasons

__all__ = ["ENGINES", "COMPILED", "UNMEASURED_KERNELS", "Engine", "build_engine", "make_batch",
           "train_step", "backward_step", "optimizer_step", "infer_step", "TRAIN_TASKS",
           "INFER_TASKS", "TASK_FNS", "field_of"]

log = logging.getLogger(__name__)

ENGINES = {
    "a": "official-style fp32 eager (torchscale BEiT-3 + plain heads)",
    "b": "(a) + bf16 autocast + SDPA",
    "b+": "(b) + torch.compile",
    "c": "ours, torch backend",
    "d": "ours, auto backend (kernels)",
    "d*": "(d) + the Triton LayerNorms (not yet in the policy)",
    "e": "(d) + torch.compile",
    "e*": "(e) + the Triton LayerNorms (not yet in the policy)",
    "f": "(e) + CUDA graphs",
}
COMPILED = ("b+", "e", "e*", "f")
#: Triton kernels with no measured policy row yet: engines (d*) and (e*) run them.
UNMEASURED_KERNELS = ("multiway_layer_norm", "multiway_add_layer_norm")
TRAIN_TASKS = ("rec", "res", "mim", "mlm")
GRAD_CLIP = 1.0  # every engine clips to this norm, as the trainer does by default
INFER_TASKS = ("rec_infer", "res_infer")
PAD_ID = 1


@dataclass
class Engine:
    """A built model with the precision / backend / compile settings of one row."""

    key: str
    model: torch.nn.Module
    device: torch.device
    autocast: torch.dtype | None = None
    backend: str | dict[str, str] | None = None
    compile: bool = False
    fullgraph: bool = False
    cuda_graphs: bool = False
    notes: list[str] = field(default_factory=list)
    _compiled: dict = field(default_factory=dict)
    _optimizer: torch.optim.Optimizer | None = None

    @property
    def name(self) -> str:
        return f"({self.key}) {ENGINES[self.key]}"

    def context(self):
        """Autocast + backend selection for one call."""
        stack = contextlib.ExitStack()
        if self.autocast is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
        if self.backend is not None:
            stack.enter_context(use_backend(self.backend))
        return stack

    def optimizer(self) -> torch.optim.Optimizer:
        """Fused AdamW for every engine (the trainer's optimizer)."""
        if self._optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self._optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=True)
        return self._optimizer

    def function(self, task: str) -> Callable[[dict], object]:
        """The (possibly compiled) loss or forward function of ``task`` for this engine."""
        if task not in self._compiled:
            fn = functools.partial(TASK_FNS[task], self.model)
            if self.compile:
                options = {"dynamic": False, "fullgraph": self.fullgraph}
                if self.cuda_graphs:
                    options["mode"] = "reduce-overhead"
                fn = (compile_step(fn, self.device, **options) if self.backend is not None
                      else torch.compile(fn, **options))
            self._compiled[task] = fn
        return self._compiled[task]


def _fresh_compile_cache() -> None:
    """Start a compiled engine from an empty Dynamo cache and make a full cache an error.
    Dynamo allows 8 compiled entries per code object, and every engine's step functions
    share one (a ``functools.partial`` wrapper): without this, a later engine of the same
    process would silently run eagerly under its compiled label."""
    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def _unavailable(key: str, reason: str) -> RuntimeError:
    return RuntimeError(f"engine ({key}) unavailable: {reason}")


def build_engine(key: str, config: ModelConfig, device: torch.device | str,
                 seed: int = 0) -> Engine:
    """Build the model of row ``key`` on ``device`` (fresh weights from ``seed``).

    Raises RuntimeError with the reason when the row cannot run here (missing torchscale,
    torch.compile unusable, (d*) and (e*) without Triton on CUDA tensors)."""
    if key not in ENGINES:
        raise ValueError(f"unknown engine {key!r}; choose from {sorted(ENGINES)}")
    device = torch.device(device)
    gpu = device.type == "cuda"
    torch.manual_seed(seed)
    notes = []
    if key in ("a", "b", "b+"):
        try:
            model = BaselineOneRef(config)
        except ImportError as exc:
            raise _unavailable(key, str(exc)) from exc
        if key != "a":
            if gpu:
                use_sdpa(model)
            else:
                notes.append(f"on CPU ({key}) runs the model of (a): fp32, no SDPA swap")
        autocast = torch.bfloat16 if key != "a" and gpu else None
        backend = None
    else:
        model = OneRef.from_config(config)
        # The baselines check nothing; as in the trainer, no value check syncs in the step.
        model.validate_inputs = False
        autocast = torch.bfloat16 if gpu else None
        backend = "torch" if key == "c" else "auto"
        if key in ("d*", "e*"):
            reasons = (unavailable_reasons("triton", device=device) if gpu
                       else ["its Triton kernels run on CUDA tensors"])
            if reasons:
                raise _unavailable(key, "; ".join(reasons))
            backend = dict.fromkeys(UNMEASURED_KERNELS, "triton")
        if key in ("d", "e", "f") and not gpu:
            notes.append("on CPU the auto backend resolves every op to torch")
        if key == "f" and not gpu:
            notes.append("on CPU (f) is (e): CUDA graphs need a GPU")
    model = model.to(device).train()
    if key in COMPILED:
        _fresh_compile_cache()
    return Engine(key=key, model=model, device=device, autocast=autocast, backend=backend,
                  compile=key in COMPILED, cuda_graphs=key == "f" and gpu,
                  notes=notes)


def field_of(out, name: str):
    """A field of a model output (dict for the baseline, dataclass / namedtuple for ours)."""
    return out[name] if isinstance(out, dict) else getattr(out, name)


def _rec(model, batch):
    out = model.forward_rec(batch["images"], batch["text_ids"], batch["text_lengths"])
    return model.rec_loss(out, batch["boxes"], None)["loss"]


def _res(model, batch):
    out = model.forward_res(batch["images"], batch["text_ids"], batch["text_lengths"])
    return model.res_loss(out, batch["masks"])["loss"]


def _mim(model, batch):
    return model.mim_loss(batch["images"], batch["text_ids"], batch["text_lengths"],
                          batch["boxes"], batch["image_mask"], batch["mim_targets"],
                          use_vts=False)["loss"]


def _mlm(model, batch):
    return model.mlm_loss(batch["images"], batch["masked_text_ids"], batch["text_lengths"],
                          batch["boxes"], batch["mlm_labels"], None)["loss"]


def _rec_infer(model, batch):
    return field_of(model.forward_rec(batch["images"], batch["text_ids"],
                                      batch["text_lengths"]), "boxes")


def _res_infer(model, batch):
    return field_of(model.forward_res(batch["images"], batch["text_ids"],
                                      batch["text_lengths"]), "mask_logits")


TASK_FNS = {"rec": _rec, "res": _res, "mim": _mim, "mlm": _mlm,
             "rec_infer": _rec_infer, "res_infer": _res_infer}


def _set_mode(model: torch.nn.Module, training: bool) -> None:
    """``model.train(training)`` unless it is in that mode already: the call walks every
    submodule (0.8 ms of host time for OneRef-B's 378 on a 2-core CPU, which a timed
    batch-1 step would count)."""
    if model.training != training:
        model.train(training)


def _new_step(engine: Engine) -> None:
    """Tell the CUDA graph trees a new iteration starts (the previous outputs are no longer
    read, so their memory may be reused by the next replay)."""
    if engine.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def backward_step(engine: Engine, task: str, batch: dict) -> torch.Tensor:
    """Forward + loss and backward of ``task`` into freshly unset gradients; returns the
    loss."""
    _set_mode(engine.model, True)
    _new_step(engine)
    engine.optimizer().zero_grad(set_to_none=True)
    with engine.context():
        loss = engine.function(task)(batch)
    loss.backward()
    return loss


def optimizer_step(engine: Engine) -> None:
    """Clip the gradients to :data:`GRAD_CLIP` and take one fused AdamW step."""
    torch.nn.utils.clip_grad_norm_(engine.model.parameters(), GRAD_CLIP, foreach=True)
    engine.optimizer().step()


def train_step(engine: Engine, task: str, batch: dict) -> torch.Tensor:
    """One optimisation step of ``task``: :func:`backward_step`, then
    :func:`optimizer_step`. Returns the loss (detached; with CUDA graphs valid until the
    engine's next step: clone it to keep it)."""
    loss = backward_step(engine, task, batch)
    optimizer_step(engine)
    return loss.detach()


def infer_step(engine: Engine, task: str, batch: dict, *,
               grad_mode=torch.inference_mode) -> torch.Tensor:
    """One inference forward (eval mode, under ``grad_mode``: the speed-of-light count
    passes ``torch.no_grad``, since under inference_mode a dispatch mode sees composite ops
    such as ``aten.linear`` before they decompose into the kernels that run). With CUDA
    graphs the output is valid until the engine's next step: clone it to keep it."""
    _set_mode(engine.model, False)
    _new_step(engine)
    with grad_mode(), engine.context():
        return engine.function(task)(batch)


def make_batch(config: ModelConfig, batch: int, device: torch.device | str, seed: int,
               task: str = "rec") -> dict:
    """A random batch (never zeros): normal images, ids in [4, V), text lengths in
    [T/4, T], boxes inside the canvas, random masks; MIM image masks from the referring
    masking reference; MLM labels on ~40 % of the real text tokens."""
    gen = torch.Generator().manual_seed(seed)
    size, text, grid = config.img_size, config.max_text_len, config.grid
    images = torch.randn(batch, 3, size, size, generator=gen)
    lengths = torch.randint(max(3, text // 4), text + 1, (batch,), generator=gen)
    ids = torch.randint(4, config.vocab_size, (batch, text), generator=gen)
    positions = torch.arange(text)[None]
    ids[positions >= lengths[:, None]] = PAD_ID
    ids[:, 0] = 0
    ids[torch.arange(batch), lengths - 1] = 2
    wh = 0.15 + 0.5 * torch.rand(batch, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(batch, 2, generator=gen)
    boxes = torch.cat([centre, wh], dim=1)
    out = {"images": images, "text_ids": ids, "text_lengths": lengths, "boxes": boxes}
    if task in ("res", "res_infer"):
        out["masks"] = reference.box_to_grid_mask(boxes, size)  # box-shaped masks (B, S, S)
    if task == "mim":
        noise = torch.rand(batch, 2, grid * grid, generator=gen)
        out["image_mask"] = reference.referring_mask(boxes, noise, grid)
        out["mim_targets"] = torch.randint(0, config.mim_vocab, (batch, grid * grid),
                                           generator=gen)
    if task == "mlm":
        real = (positions > 0) & (positions < lengths[:, None] - 1)
        chosen = real & (torch.rand(batch, text, generator=gen) < 0.4)
        chosen[:, 1] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        out["mlm_labels"] = labels
        # the masked positions get <unk> (3): any in-vocabulary id costs the same
        out["masked_text_ids"] = torch.where(chosen, torch.full_like(ids, 3), ids)
    return {k: v.to(device) for k, v in out.items()}


def encoder_agreement(config: ModelConfig, device: torch.device | str, seed: int = 0) -> float:
    """Max |difference| between the encoder outputs (vision and real text tokens) of the
    official-style baseline and our model after loading the baseline's weights into ours
    with :func:`oneref.checkpoints.load_official` (fp32, eval, batch 2). A small number shows
    that rows (a) and (c)-(e) compute the same function, so their timings compare."""
    torch.manual_seed(seed)
    device = torch.device(device)
    baseline = BaselineOneRef(config).to(device).eval()
    ours = OneRef.from_config(config).to(device).eval()
    load_official(ours, baseline.state_dict())
    batch = make_batch(config, 2, device, seed=seed)
    with torch.no_grad():
        vision, text = baseline.encode(batch["images"], batch["text_ids"])
        with use_backend("torch"):
            enc = ours.encode(batch["images"], batch["text_ids"], batch["text_lengths"])
    real = torch.arange(text.shape[1], device=device)[None] < batch["text_lengths"][:, None]
    return max((vision - enc.vision).abs().max().item(),
               (text - enc.text).abs()[real].max().item())
