"""The training loop: REC / RES fine-tuning and MRefM pre-training, staged, resumable.

Order of set-up (logged): process group -> threads -> op backends resolved (a setting that
cannot run here fails now) -> data paths and start weights checked -> datasets -> seed ->
model -> task module (device) -> features (grad checkpointing, FSDP sharding:
:mod:`oneref.train.features`) -> optimizer -> resume -> per stage: freeze, then the
features' DDP wrap and torch.compile. Each step: the batch checked on the host, lr from
the plan, batch to device (MRefM: draw masks, tokenizer targets), autocast forward,
backward, clip, a finite check, AdamW; every ``log_interval`` steps the loss parts are
averaged over ranks and written to CSV / TensorBoard / the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch

from oneref import ops
from oneref.checkpoints import CONFIG_NAME, WEIGHTS_NAME
from oneref.config import ModelConfig, get_config
from oneref.data.records import own_message
from oneref.data.synthetic import colour_guess_accuracy, colour_guess_masks
from oneref.data.tokenizer import recorded_tokenizer, same_tokenizer
from oneref.eval.evaluate import autocast_context, evaluate, move_batch
from oneref.eval.samples import SAMPLE_FILES
from oneref.io import make_folder, write_json
from oneref.model import OneRef
from oneref.model.validation import check_boxes, check_text
from oneref.sources import ModelSource
from oneref.train import checkpoint as ckpt
from oneref.train.config import TrainConfig
from oneref.train.data import (build_dataset, check_data, eval_loader, load_tokenizer,
                               train_loader)
from oneref.train.distributed import (all_reduce_max, all_reduce_mean,
                                      average_batch_norm_stats, broadcast_object,
                                      full_state, gather_objects, gathered, gradient_sync_off,
                                      init_distributed, load_full_state, main_writes,
                                      seed_everything, unwrap)
from oneref.train.features import apply_features
from oneref.train.init import initialise
from oneref.train.interrupt import StopRequest, TrainingInterrupted
from oneref.train.logger import RunLogger, plot_curve
from oneref.train.optim import StagePlan, build_optimizer, set_lr
from oneref.train.runtime import auto_threads
from oneref.train.steps import MRefMBatches, TaskModule

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)


class Trainer:
    """Build everything a run needs from a :class:`TrainConfig`; :meth:`fit` trains."""

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        self.config = config
        self.info = init_distributed(config.device, config.dist.backend)
        self.device = self.info.device
        self.main = self.info.rank == 0
        if self.device.type == "cpu":
            threads = config.threads if config.threads > 0 else auto_threads()
            torch.set_num_threads(max(1, threads // self.info.world_size))
            log.info("CPU threads: %d", torch.get_num_threads())
        # The op backends (ONEREF_BACKEND) and data paths and start weights are checked
        # before any data is read or model built.
        ops.prepare(self.device)
        data = config.data
        splits = [data.train_split]
        if config.task != "pretrain":
            splits += [data.eval_split] + ([data.test_split] if config.final_test else [])
        check_data(data, splits)
        self.run_dir = Path(config.output_dir)
        _check_run_folder(self.run_dir, config)
        # A resume reads its checkpoint alone: the start weights are not read again.
        resume_from = (self._latest_checkpoint(config.checkpoint.resume)
                       if config.checkpoint.resume else None)
        self.source = (ModelSource(config.checkpoint.init_from, preset=config.model,
                                   trust=config.checkpoint.trust, quiet=not self.main,
                                   overrides=config.model_overrides)
                       if config.checkpoint.init_from and resume_from is None else None)
        model_config = self._model_config(resume_from[1] if resume_from else None)
        self._check_start_tokenizer()
        t0 = time.perf_counter()
        self.text_tokenizer = load_tokenizer(data, model_config) if data.real else None
        self.train_set = self._dataset(model_config, data.train_split, train=True)
        needs_eval = config.task != "pretrain"
        self.eval_set = self._dataset(model_config, data.eval_split) if needs_eval else None
        self.data_seconds = time.perf_counter() - t0
        log.info("datasets ready in %.1f s (train %d samples)", self.data_seconds,
                 len(self.train_set))
        # Same initial weights on every rank (DDP also broadcasts), then per-rank streams.
        seed_everything(config.seed)
        self.model = self._build_model(model_config)
        self.model.validate_inputs = False  # each batch is checked on the host (_train_step)
        seed_everything(config.seed + self.info.rank)

        self.task_module = TaskModule(self.model, config.task, config.pretrain,
                                      res_loss=config.res_loss,
                                      seg_mask=data.seg_mask).to(self.device)
        self.features = apply_features(self.task_module, config, self.info)
        self.fsdp = self.features.fsdp
        self.optimizer = build_optimizer(self.model, config.optim)
        self.plan = StagePlan(config.stages, len(self.train_set), self.info.world_size,
                              config.schedule)
        self.mrefm = self._mrefm_batches() if config.task == "pretrain" else None
        self.step = 0
        self.skipped_steps = 0
        self.elapsed_before = 0.0
        #: The best validation score so far with checkpoint.keep_best: step, split, metric,
        #: value (its weights are in RUN/best).
        self.best: dict | None = None
        self._validated: tuple[int, dict] | None = None  # (step, metrics) of the last one
        self.resumed_from: Path | None = None
        if resume_from is not None:
            self._resume(*resume_from)
        def start():  # once every check has passed: a failed start leaves no run folder
            _start_run_folder(self.run_dir, fresh=not config.checkpoint.resume,
                              overwrite=config.overwrite)
            write_json(self.run_dir / "train_config.json", config.to_dict())
        main_writes(start)
        self.wrapped: torch.nn.Module | None = None
        self._stage_index = -1
        self._fit_started = False

    # ------------------------------------------------------------------ construction
    def _dataset(self, model_config, split: str, train: bool = False):
        pretrain = self.config.pretrain
        sts = train and self.config.task == "pretrain" and pretrain.sts
        return build_dataset(self.config.data, model_config, split, self.config.task,
                             self.text_tokenizer, train=train, sts=sts,
                             sts_labels=pretrain.sts_labels if sts else "")

    def _build_model(self, model_config):
        if self.source is None:
            if self.main and self.config.data.real and not self.config.checkpoint.resume:
                frozen = any(stage.freeze_backbone for stage in self.config.stages)
                log.warning("training on %s from randomly initialised weights (init=%s)%s: the "
                            "recipes start from pre-trained ones (--init-from "
                            "beit3_base_indomain_patch16_224.pth, or a OneRef / MRefM "
                            "checkpoint)", self.config.data.dataset, self.config.init,
                            ", with the backbone frozen in a stage" if frozen else "")
            model = OneRef(model_config)
            initialise(model, self.config.init)
            return model
        model = self.source.build()
        log.info("initial weights from %s", self.source.path)
        return model

    def _check_start_tokenizer(self) -> None:
        """Warn when the start weights' run read its text with another tokenizer than this
        run does: their text embeddings belong to other pieces."""
        if self.source is None or not self.main:
            return
        recorded = recorded_tokenizer(self.source.train_config.get("data", {}))
        now = recorded_tokenizer(self.config.to_dict()["data"])
        if recorded and now and not same_tokenizer(recorded, now):
            log.warning("--init-from %s was trained with tokenizer %s and this run reads text "
                        "with %s: the text embeddings start from other pieces' vectors",
                        self.source.path, recorded, now)

    @property
    def load_report(self):
        """The :class:`~oneref.checkpoints.LoadReport` of an official ``init_from`` file."""
        return self.source.report if self.source else None

    def _mrefm_batches(self) -> MRefMBatches:
        model = self.model.config
        tokenizer = getattr(self.train_set, "tokenizer", None)
        return MRefMBatches(model, self.config.pretrain,
                            getattr(tokenizer, "mask_id", model.vocab_size - 1),
                            seed=self.config.seed + 1000 + self.info.rank, device=self.device)

    def _apply_stage(self, index: int) -> None:
        """Freeze / unfreeze the backbone for stage ``index`` and re-wrap for DDP (which
        records the trainable parameters when built; FSDP was sharded once)."""
        stage = self.plan.spans[index].stage
        for p in self.model.backbone_parameters():
            p.requires_grad_(not stage.freeze_backbone)
        self.wrapped = self.features.wrap(self.task_module)
        self._stage_index = index
        log.info("stage %d (%s): %d steps, lr %.3g, batch %d/rank x %d accumulated, "
                 "backbone %s", index, stage.name, self.plan.spans[index].steps, stage.lr,
                 stage.batch_size, stage.grad_accum,
                 "frozen" if stage.freeze_backbone else "trained")

    # ------------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, elapsed: float) -> dict:
        """Everything a resume needs (a collective: call it on every rank)."""
        average_batch_norm_stats(self.task_module)
        model_state, optim_state = full_state(self.model, self.optimizer)
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "elapsed_s": elapsed,
            "scheduler": {"step": self.step, "lr": self.plan.lr_at(max(self.step - 1, 0))},
            "step": self.step,
            "epoch": epoch,
            "rng": gather_objects(ckpt.rng_state()),  # each rank's, in rank order
            "skipped_steps": self.skipped_steps,
            "sampler": {"seed": self.config.seed, "position": list(self.plan.locate(
                min(self.step, self.plan.total_steps - 1))[1:])},
            "config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "world_size": self.info.world_size,
            "best": self.best,
        }
        if self.mrefm is not None:
            state["mask_generator"] = gather_objects(self.mrefm.generator.get_state())
        return state

    def save(self, epoch: int, elapsed: float = 0.0) -> None:
        """Write a checkpoint of the current step; ``elapsed`` training seconds so far (a
        resumed run spends only the rest of ``time_budget_s``)."""
        state = self._state(epoch, elapsed)
        main_writes(lambda: ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, state,
                                                 self.config.checkpoint.keep_last))

    def _latest_checkpoint(self, where: str) -> tuple[Path, dict]:
        """The checkpoint ``--resume`` names (``auto``: the run folder's newest)."""
        target = self.run_dir if where in ckpt.NEWEST else Path(where)
        return ckpt.load_latest(target, trust=self.config.checkpoint.trust)

    def _model_config(self, resumed: dict | None) -> ModelConfig:
        """The model's config: the start weights' (with ``model_overrides`` of the fields
        that leave their shapes); for a run resumed from ``resumed`` (its checkpoint) that
        began from such weights, the one the checkpoint recorded; else the preset's with
        ``model_overrides``."""
        if self.source is not None:
            return self.source.config
        recorded = resumed.get("model_config") if resumed else None
        if recorded and self.config.checkpoint.init_from:
            return ModelConfig.from_dict(recorded)
        return get_config(self.config.model, **self.config.model_overrides)

    def _resume(self, path: Path, state: dict) -> None:
        self._check_global_batches(path, state)
        self._check_resumed_model(path, state.get("model_config", {}))
        task = state.get("config", {}).get("task", self.config.task)
        if task != self.config.task:
            raise ValueError(f"checkpoint {path} was written by a {task} run; it cannot be "
                             f"resumed as {self.config.task} (start a new run from its "
                             f"weights: --init-from {path} -o ANOTHER_FOLDER)")
        done, budget = int(state["step"]), self.config.time_budget_s
        spent, total = float(state.get("elapsed_s", 0)), self.plan.total_steps
        why = (f"step {done} of {total}" if done == total
               else f"step {done}, past the {total} steps of this plan" if done > total
               else f"step {done}, its {budget:g} s time budget used ({spent:.0f} s trained)"
               if 0 < budget <= spent else "")
        if why and _finished_at(self.run_dir, done):  # else only its end is left to run
            raise ValueError(f"the run of {path} has already finished ({why}): evaluate it "
                             f"with oneref eval --checkpoint {self.run_dir}, or continue it "
                             "with more --steps, --epochs or --time-budget (the budget counts "
                             "the whole run)")
        if why and done != total and self.main:  # this plan is over before it starts
            log.warning("%s is at %s: nothing is left to train, the run only writes its final "
                        "outputs", path, why)
        changes = [c for c in self.config.changes_from(state.get("config", {}))
                   if not c.startswith(("checkpoint.resume", "overwrite", "output_dir"))]
        if changes:  # e.g. a recipe default that changed since the run started
            log.warning("resuming %s with settings other than its run's (the new ones apply "
                        "from here): %s", path, "; ".join(changes))
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.best = state.get("best")
        self._adopt_best()
        self._restore_streams(state)
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.step)

    def _check_global_batches(self, path: Path, state: dict) -> None:
        """A checkpoint resumes on another number of ranks only where every stage keeps its
        global batch (batch x grad_accum x ranks): each step then takes the same samples."""
        before, now = state.get("world_size", 1), self.info.world_size
        if before == now:
            return
        recorded = TrainConfig.from_record(state["config"]).stages if "config" in state else []
        if ([s.samples_per_step * before for s in recorded]
                == [s.samples_per_step * now for s in self.config.stages]):
            log.info("resuming %s, written by %d ranks, on %d: the same global batches",
                     path, before, now)
            return
        hint = ""
        pairs = list(zip(recorded, self.config.stages))
        if len(recorded) == len(self.config.stages) and all(
                old.samples_per_step * before % (new.batch_size * now) == 0 for old, new in pairs):
            accum = [old.samples_per_step * before // (new.batch_size * now)
                     for old, new in pairs]
            hint = ", or keep its global batches with " + (
                f"--grad-accum {accum[0]}" if len(set(accum)) == 1 else
                " ".join(f"--set stages.{i}.grad_accum={n}" for i, n in enumerate(accum)))
        raise ValueError(f"checkpoint {path} was written by {before} ranks and this run has "
                         f"{now} with other global batches: resume on {before} ranks{hint}")

    def _restore_streams(self, state: dict) -> None:
        """Each rank's random streams (the global RNGs, MRefM's masks) as the checkpoint's
        rank of the same number left them. A rank it does not hold (another number of
        ranks; a checkpoint that kept rank 0's only) keeps the streams it started with, its
        own."""
        def mine(saved):
            saved = saved if isinstance(saved, list) else [saved]
            return saved[self.info.rank] if self.info.rank < len(saved) else None

        if (rng := mine(state["rng"])) is not None:
            ckpt.set_rng_state(rng)
        if self.mrefm is not None and (masks := mine(state["mask_generator"])) is not None:
            self.mrefm.generator.set_state(masks)

    def _check_resumed_model(self, path: Path, recorded: dict) -> None:
        """The model this run builds has the shape the checkpoint recorded (a preset may
        have changed since it was written); fields the record lacks take their defaults."""
        if not recorded:
            return
        recorded = {**ModelConfig().to_dict(), **recorded}
        changed = [(k, recorded[k], v) for k, v in self.model.config.to_dict().items()
                   if k != "name" and recorded[k] != v]
        if changed:
            was = ", ".join(f"{k}={old!r}" for k, old, _ in changed)
            now = ", ".join(f"{k}={new!r}" for k, _, new in changed)
            fix = " ".join(f"--set model_overrides.{k}={json.dumps(old)}" for k, old, _ in changed)
            raise ValueError(f"checkpoint {path} was written by a model with {was}, but this "
                             f"run builds {now}; resume with {fix}")

    # ------------------------------------------------------------------ loop
    def _batches(self):
        """Yield ``(span, epoch, batches)`` from ``self.step`` to the end of the plan, the
        stage's ``grad_accum`` loader batches per step; a fresh iterator starts each epoch
        (or the resumed position inside it)."""
        loader = sampler = iterator = None
        loader_stage, key = -1, None
        while self.step < self.plan.total_steps:
            span, epoch, index = self.plan.locate(self.step)
            if key != (span.index, epoch):
                if span.index != loader_stage:
                    loader, sampler = train_loader(
                        self.train_set, span.stage.batch_size, self.config.data, self.device,
                        self.info.rank, self.info.world_size,
                        seed=self.config.seed + 7919 * span.index,
                        accumulate=span.stage.grad_accum)
                    loader_stage = span.index
                sampler.set_epoch(epoch, start_batch=index)
                loader.generator.manual_seed(self.config.seed + 104729 * span.index + epoch)
                iterator = iter(loader)
                key = (span.index, epoch)
            yield span, epoch, [next(iterator) for _ in range(span.stage.grad_accum)]

    def _train_step(self, batches: list[dict]) -> dict[str, torch.Tensor] | None:
        """One optimizer step over ``batches`` (one, or the micro-batches of an accumulated
        step: each loss scaled by 1 / their number, the gradients summed, synchronised
        across ranks in the last backward only). Returns the losses averaged over them, or
        None for a skipped non-finite step."""
        cfg = self.config
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with contextlib.nullcontext() if sync else gradient_sync_off(self.wrapped):
                losses = self._backward(batch, scale=1 / len(batches))
            for name, value in losses.items():
                totals[name] = totals.get(name, 0) + value.detach().float() / len(batches)
        params = [p for p in self.model.parameters() if p.grad is not None]
        # The norm with clipping, else measured alone (non-finite gradients must be seen).
        norm = (torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                if cfg.optim.grad_clip > 0 else
                torch.nn.utils.get_total_norm([p.grad for p in params]))
        # Under FSDP the norm is a DTensor (reduced over shards): take its value.
        totals["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor")
                               else norm).detach().float()
        finite = self._finite(totals)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals if finite else None

    def _backward(self, batch: dict, scale: float) -> dict[str, torch.Tensor]:
        """Forward and backward of one (micro-)batch, the loss scaled by ``scale``; returns
        its unscaled losses."""
        # Value checks on the host copy of the batch: no device sync inside the step (the
        # model's own checks are off, see __init__).
        check_text(batch["text_ids"], batch["text_lengths"], self.model.config,
                   len(batch["text_ids"]), batch["text_ids"].device)
        try:
            check_boxes(batch["boxes"], len(batch["boxes"]), batch["boxes"].device,
                        check_values=True)
        except ValueError as err:
            raise ValueError(f"{err} (training samples {batch['indices'].tolist()})") from None
        batch = move_batch(batch, self.device)
        mode, drop_worst = self.mrefm.prepare(batch, self.step) if self.mrefm else ("", 0.0)
        with autocast_context(self.device, self.config.amp):
            losses = self.wrapped(batch, mode, drop_worst) if mode else self.wrapped(batch)
        (losses["loss"] * scale if scale != 1 else losses["loss"]).backward()
        return losses

    def _finite(self, losses: dict[str, torch.Tensor]) -> bool:
        """Whether the loss and gradient norm are finite on every rank (one host sync per
        step: a non-finite step must never reach the weights). Otherwise raise naming the
        step and every loss part, or with ``on_nan="skip"`` count the step, within the
        limit. A skipped step consumes its batch and its learning rate (the schedule and the
        data order do not move back) but makes no AdamW update."""
        bad = (~torch.isfinite(losses["loss"] + losses["grad_norm"])).float().reshape(1)
        if not bool(all_reduce_max(bad)):  # every rank decides the same
            return True
        parts = ", ".join(f"{k} {v.item():.4g}" for k, v in sorted(losses.items()))
        message = f"step {self.step + 1}: non-finite loss or gradient ({parts})"
        self.skipped_steps += 1
        if self.config.on_nan == "raise":
            raise ValueError(f"{message}; lower the learning rate, clip the gradients, or "
                             f"skip such steps with --on-nan skip")
        if self.skipped_steps > self.config.max_skipped_steps:
            raise ValueError(f"{message}: {self.skipped_steps} steps skipped, more than "
                             f"max_skipped_steps = {self.config.max_skipped_steps}")
        log.warning("%s: skipped (%d so far)", message, self.skipped_steps)
        return False

    def evaluate(self, split: str) -> dict[str, float]:
        """Task metrics on ``split`` (reduced over ranks; a collective)."""
        average_batch_norm_stats(self.task_module)
        dataset = self.eval_set if split == self.config.data.eval_split else \
            self._dataset(self.model.config, split)
        loader = eval_loader(dataset, self.config.data, self.device, self.info.rank,
                             self.info.world_size)
        if not self.fsdp:
            return evaluate(self.model, loader, self.config.task, self.device, self.config.amp)
        # Sharded blocks gather their weights in every forward: all ranks run as many.
        per_rank = -(-len(dataset) // self.info.world_size)
        with gathered(self.task_module):
            return evaluate(self.model, loader, self.config.task, self.device, self.config.amp,
                            min_batches=-(-per_rank // self.config.data.eval_batch_size))

    def _colour_guess(self, split: str) -> dict[str, float]:
        """The RefShapes baseline on ``split``: a random shape of the mentioned colour,
        scored by the task's metrics (Acc@0.5, or the mask metrics)."""
        dataset = self._dataset(self.model.config, split)
        if self.config.task == "res":
            return colour_guess_masks(dataset, seed=0)
        return {"acc@0.5": colour_guess_accuracy(dataset, seed=0)}

    def _budget_fraction(self, t_start: float) -> float | None:
        """Share of ``time_budget_s`` used (the maximum over ranks), or None without one."""
        if self.config.time_budget_s <= 0:
            return None
        used = torch.tensor([(time.perf_counter() - t_start) / self.config.time_budget_s])
        return float(all_reduce_max(used))

    def fit(self) -> dict:
        """Train to the end of the plan; returns the final metrics (also in metrics.json).
        A Trainer trains once: a further run is a new Trainer (``checkpoint.resume="auto"``
        continues this one's)."""
        if self._fit_started:
            raise RuntimeError("this Trainer has already run fit(); to train further, build a "
                               "new Trainer with checkpoint.resume='auto' (the newest "
                               "checkpoint of its output_dir) and more steps or budget")
        self._fit_started = True
        cfg = self.config
        logger = RunLogger(self.run_dir, enabled=self.main,
                           resume_step=self.step if self.resumed_from else None)
        self.model.train()
        t_start = time.perf_counter()
        t_budget = t_start - self.elapsed_before  # a resumed run continues the budget
        progress = _Progress(cfg, self.main, self.plan.total_steps, self.step,
                             self.elapsed_before)
        window = _LossWindow(t_start)
        start_step, epoch = self.step, 0
        self.losses: list[tuple[int, float]] = []
        stopped = 0  # the signal that stopped the run, agreed by every rank
        with StopRequest() as stop:
            for span, epoch, batches in self._batches():
                if not self._step(span, epoch, batches, window, logger, progress, t_budget):
                    break
                # A stop asked for after the last step lets the run finish.
                if self.step < self.plan.total_steps:
                    stopped = self._stop_signal(stop)
                    if stopped:
                        self.save(epoch, time.perf_counter() - t_budget)
                        break
        progress.close()
        try:
            if stopped:
                command = "pretrain" if cfg.task == "pretrain" else "train"
                raise TrainingInterrupted(
                    f"{signal.Signals(stopped).name} at step {self.step}: checkpoint "
                    f"written to {self.run_dir / 'checkpoints'}", signal_number=stopped,
                    resume=f"oneref {command} -o {self.run_dir} --resume")
            train_seconds = time.perf_counter() - t_start
            return self._finish(logger, epoch, train_seconds, self.step - start_step,
                                train_seconds + self.elapsed_before)
        finally:
            logger.close()

    def _step(self, span, epoch: int, batches: list[dict], window: "_LossWindow",
              logger: RunLogger, progress: "_Progress", t_budget: float) -> bool:
        """One optimizer step and what falls due after it: a log row, an evaluation, a
        checkpoint (every ``checkpoint.interval`` steps, and at an epoch's end with
        ``checkpoint.every_epoch``). False, with no step taken, once the time budget is
        used up."""
        cfg = self.config
        frac = self._budget_fraction(t_budget)
        if frac is not None and frac >= 1.0:
            self._report_budget_end()
            return False
        if span.index != self._stage_index:
            self._apply_stage(span.index)
        set_lr(self.optimizer, self.plan.lr_at(self.step, frac))
        window.add(self._train_step(batches), span.stage.samples_per_step * self.info.world_size)
        self.step += 1  # a skipped step still consumed its batch
        if self.step % cfg.log_interval == 0 or self.step == self.plan.total_steps:
            self._log_window(window, logger, progress, t_budget)
        before_end = self.step < self.plan.total_steps
        epoch_end = before_end and self.plan.locate(self.step)[2] == 0
        # The checkpoint first: a validation that fails (or a kill during it) keeps the step.
        if (cfg.checkpoint.every_epoch and epoch_end) or (
                cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
            self.save(epoch, time.perf_counter() - t_budget)
        if self.eval_set and ((cfg.eval_interval and self.step % cfg.eval_interval == 0)
                              or (cfg.eval_every_epoch and epoch_end)):
            try:
                self._validate(logger)
            except ValueError as err:  # bad data in the validation split, found only now
                raise self._evaluation_failed(err, at_end=False) from err
        return True

    def _evaluation_failed(self, err: ValueError, at_end: bool) -> ValueError:
        """The error of an evaluation that found bad data, with the step training reached
        and whether a checkpoint of it lets the run go on."""
        saved = ckpt.checkpoint_path(self.run_dir / "checkpoints", self.step)
        how, what = (("itself finished at", "evaluate and finish") if at_end
                     else ("reached", "continue"))
        then = (f"fix it, then {what} with: oneref train -o {self.run_dir} --resume"
                if saved.is_file() else "no checkpoint of it was kept")
        return ValueError(f"{own_message(err)} (training {how} step {self.step}; {then})")

    def _validate(self, logger: RunLogger) -> dict[str, float]:
        """Metrics of the validation split at this step (once per step: the end's
        evaluation reuses a due one), logged; with ``checkpoint.keep_best`` the weights go to
        RUN/best when they score best so far (a collective)."""
        if self._validated is not None and self._validated[0] == self.step:
            return self._validated[1]
        cfg = self.config
        metrics = self.evaluate(cfg.data.eval_split)
        self._validated = (self.step, metrics)
        logger.log(self.step, metrics, split="val")
        name = BEST_METRIC.get(cfg.task)
        if cfg.checkpoint.keep_best and (
                self.best is None or metrics[name] > self.best["value"]):
            self._save_best({"step": self.step, "split": cfg.data.eval_split, "metric": name,
                             "value": metrics[name]})
        return metrics

    def _save_best(self, record: dict) -> None:
        """The model as RUN/best with ``record`` (a collective). The old record and the
        evaluations of the old weights go first, so the record never names other weights."""
        self.best = record
        weights = full_state(self.model)[0] if self.fsdp else None

        def write():
            _remove_outputs(self.run_dir, {"best": (BEST_RECORD, *_EVAL_FILES)})
            unwrap(self.model).save_pretrained(self.run_dir / "best", weights)
            write_json(self.run_dir / "best" / BEST_RECORD, record)
        main_writes(write)

    def _adopt_best(self) -> None:
        """The best a resumed run compares with: what RUN/best holds (a real model and its
        score, also when written after the checkpoint), or, without it, none: the run keeps
        its best from its next validation. Rank 0 reads it for every rank."""
        record = None
        if self.main:
            record = _best_record(self.run_dir)
            if record is None and self.best is not None:
                log.warning("%s holds no weights of the checkpoint's best %s (step %d): this "
                            "run keeps its best from its next validation", self.run_dir / "best",
                            self.best["metric"], self.best["step"])
        self.best = broadcast_object(record)

    def _report_budget_end(self) -> None:
        """Log the end of the time budget; a warning when stages never ran (the final model
        is then not what the recipe is for), with the stage to shorten."""
        never = [span for span in self.plan.spans if span.start >= self.step]
        if not never:
            log.info("time budget of %g s used after %d steps: stopping",
                     self.config.time_budget_s, self.step)
            return
        hint = "give a larger --time-budget"
        if self.step > 0:
            last = self.plan.locate(self.step - 1)[0]
            field = "steps" if last.stage.steps > 0 else "epochs"
            hint += f" or shorten stage {last.index} (--set stages.{last.index}.{field}=N)"
        if self.main:
            log.warning("the time budget of %g s ran out after %d steps: stage(s) %s never "
                        "ran; %s", self.config.time_budget_s, self.step,
                        ", ".join(f"{span.index} ({span.stage.name})" for span in never), hint)

    def _stop_signal(self, stop: StopRequest) -> int:
        """The signal that asks the run to stop after this step, or 0: on one process at
        once; with several ranks, any rank's (the highest number), agreed every
        ``log_interval`` steps (one reduction then rather than a host sync per step;
        torchrun kills its workers 30 s after forwarding a signal, so those steps and the
        checkpoint must fit in that)."""
        if self.info.world_size == 1:
            return stop.signal_number or 0
        if self.step % self.config.log_interval:
            return 0
        return int(all_reduce_max(torch.tensor([float(stop.signal_number or 0)])).item())

    def _log_window(self, window: "_LossWindow", logger: RunLogger, progress: "_Progress",
                    t_budget: float) -> None:
        """Write the window's rank-averaged loss parts, lr and throughput; then reset it
        (every step of a window may have been skipped: nothing to write then)."""
        now = time.perf_counter()
        row = window.row(now)
        if row is None:
            return
        row.update(lr=self.optimizer.param_groups[0]["lr"], elapsed_s=now - t_budget)
        logger.log(self.step, row)
        self.losses.append((self.step, row["loss"]))
        progress.update(self.step, row, t_budget)

    def _samples_until(self, step: int) -> int:
        """Samples of all ranks in the first ``step`` steps (each stage has its batch)."""
        return sum(min(max(step - s.start, 0), s.steps) * s.stage.samples_per_step
                   for s in self.plan.spans) * self.info.world_size

    def _final_evaluation(self, results: dict, logger: RunLogger) -> None:
        """The end-of-run metrics: the validation split, and with ``final_test`` the test
        split (RefShapes: with the colour-guess baseline), into ``results`` and the log."""
        cfg = self.config
        results[cfg.data.eval_split] = self._validate(logger)
        if self.best is not None:
            results["best"] = self.best
        if cfg.final_test:
            results[cfg.data.test_split] = self.evaluate(cfg.data.test_split)
            logger.log(self.step, results[cfg.data.test_split], split="test")
            if not cfg.data.real:
                results["colour_guess"] = self._colour_guess(cfg.data.test_split)

    def _finish(self, logger: RunLogger, epoch: int, train_seconds: float, steps: int,
                elapsed: float) -> dict:
        cfg = self.config
        if steps and (cfg.checkpoint.interval == 0 or self.step % cfg.checkpoint.interval):
            if cfg.checkpoint.interval or cfg.checkpoint.keep_last or cfg.checkpoint.every_epoch:
                self.save(epoch, elapsed)  # (none when resumed at the end: that one exists)
        samples = self._samples_until(self.step)
        trained = samples - self._samples_until(self.step - steps)  # by this process's run
        # train_seconds: this process's; elapsed_s: the run's, earlier processes included
        results = {"task": cfg.task, "steps": self.step, "train_seconds": train_seconds,
                   "elapsed_s": elapsed,
                   "data_seconds": self.data_seconds, "world_size": self.info.world_size,
                   "samples_per_s": trained / train_seconds if steps and train_seconds > 0
                   else None,  # JSON null: no step trained by this process
                   "samples_seen": samples, "skipped_steps": self.skipped_steps}
        if self.losses:
            results["final_loss"] = self.losses[-1][1]
        if cfg.task != "pretrain":
            try:
                self._final_evaluation(results, logger)
            except ValueError as err:  # bad data in an evaluation split, found only now
                raise self._evaluation_failed(err, at_end=True) from err
        weights = full_state(self.model)[0] if self.fsdp else None

        def write():
            unwrap(self.model).save_pretrained(self.run_dir / "model", weights)
            write_json(self.run_dir / "train_config.json", cfg.to_dict())
            write_json(self.run_dir / "metrics.json", results)
            plot_curve(logger.rows, self.run_dir / "curve.png",
                       title=f"OneRef {cfg.model} {cfg.task} on {cfg.data.dataset}")
        main_writes(write)
        return results


#: The validation score a checkpoint.keep_best run selects by, per task.
BEST_METRIC = {"rec": "acc@0.5", "res": "miou"}
#: The file in RUN/best that says which step and score its weights are.
BEST_RECORD = "best.json"
#: What a run and ``oneref eval`` write into a run folder and its subfolders (file patterns).
_EVAL_FILES = ("eval.json", "eval.md", *(name.format("*") for name in SAMPLE_FILES))
_RUN_SUBFOLDERS = {
    ".": ("train_config.json", "metrics.csv", "metrics.json", "curve.png", *_EVAL_FILES),
    "checkpoints": ("step_*.pt", "*.tmp"), "tb": ("events.out.tfevents.*",),
    "model": (CONFIG_NAME, WEIGHTS_NAME),
    "best": (CONFIG_NAME, WEIGHTS_NAME, BEST_RECORD, *_EVAL_FILES)}


def _best_record(run_dir: Path) -> dict | None:
    """RUN/best's record when it holds one and the weights it names, else None."""
    try:
        record = json.loads((run_dir / "best" / BEST_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or not {"step", "value", "metric"} <= record.keys()
            or not (run_dir / "best" / WEIGHTS_NAME).is_file()):
        return None
    return record


def _holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that can be resumed or has finished: a step
    checkpoint, or its recorded settings and a final model."""
    return bool(ckpt.list_checkpoints(run_dir / "checkpoints")) or (
        (run_dir / "train_config.json").is_file() and (run_dir / "model" / CONFIG_NAME).is_file())


def _finished_at(run_dir: Path, step: int) -> bool:
    """Whether the run in ``run_dir`` wrote its final outputs at ``step`` (a metrics.json of
    an earlier end, before more steps were asked for, does not count)."""
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("steps") == step
    except (OSError, ValueError):
        return False


def _check_run_folder(run_dir: Path, config: TrainConfig) -> None:
    """``--output-dir`` can be created, and a run does not write over another one: a new
    run (no ``--resume``) only with ``--overwrite``, a resume only into its own folder or an
    empty one (its checkpoints would mix with the other run's)."""
    for folder in (run_dir, *run_dir.parents):  # the nearest one that exists
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--output-dir {run_dir}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"--output-dir {run_dir}: {folder} is not writable")
            break
    resume = config.checkpoint.resume
    if not resume or resume in ckpt.NEWEST:
        if not (resume or config.overwrite) and _holds_run(run_dir):
            raise ValueError(f"{run_dir} already holds a run: continue it with --resume "
                             "(checkpoint.resume='auto'), start it afresh with --overwrite "
                             "(overwrite=True), or choose another --output-dir (output_dir)")
        return
    source = ckpt.run_folder_of(resume)
    if source.resolve() != run_dir.resolve() and _holds_run(run_dir):
        raise ValueError(f"--resume {resume} continues the run of {source}, but --output-dir "
                         f"{run_dir} holds another run: continue it in {source}, or into an "
                         "empty folder")


def _start_run_folder(run_dir: Path, fresh: bool, overwrite: bool) -> None:
    """Create ``run_dir``; for a new run, remove what an earlier run wrote there (one
    replaced with ``--overwrite``, or one of ours stopped before its first checkpoint).
    Files of other names stay."""
    make_folder(run_dir, "--output-dir")
    if not fresh or not (overwrite or (run_dir / "train_config.json").is_file()):
        return
    _remove_outputs(run_dir, _RUN_SUBFOLDERS)


def _remove_outputs(run_dir: Path, subfolders: dict[str, tuple[str, ...]]) -> None:
    """Delete the files of ``subfolders`` (folder -> file patterns; "." the run folder) and
    the subfolders left empty. Files of other names stay."""
    for folder, patterns in subfolders.items():
        for path in [p for pattern in patterns for p in (run_dir / folder).glob(pattern)]:
            path.unlink(missing_ok=True)
        folder = run_dir / folder
        if (folder != run_dir and folder.is_dir() and not folder.is_symlink()
                and not any(folder.iterdir())):
            folder.rmdir()


class _LossWindow:
    """Loss parts and samples of the steps since the last log row."""

    def __init__(self, now: float):
        self.reset(now)

    def reset(self, now: float) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.since = now

    def add(self, losses: dict | None, samples: int) -> None:
        for k, v in (losses or {}).items():  # None: a skipped step
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.samples += samples

    def row(self, now: float) -> dict | None:
        """The rank-averaged means and samples/s since the last row, then a fresh window."""
        row = None
        if self.sums:
            names = sorted(self.sums)
            means = all_reduce_mean(torch.stack([self.sums[k] / self.counts[k]
                                                 for k in names]))
            row = dict(zip(names, means.tolist()))
            row["samples_per_s"] = self.samples / max(now - self.since, 1e-9)
        self.reset(now)
        return row


class _Progress:
    """The tqdm bar of the main process: budget seconds for a wall-clock budget (its ETA is
    the budget's), else steps; nothing when off."""

    def __init__(self, cfg: TrainConfig, main: bool, total_steps: int, step: int,
                 elapsed_before: float):
        self.budgeted = cfg.time_budget_s > 0
        self.bar = None
        if main and cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(cfg.time_budget_s) if self.budgeted else total_steps,
                            initial=round(elapsed_before) if self.budgeted else step,
                            unit="s" if self.budgeted else "step", dynamic_ncols=True,
                            desc=cfg.task, bar_format=(  # seconds of budget: no s/s rate
                                "{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}"
                                "{postfix}]" if self.budgeted else None))

    def update(self, step: int, row: dict, t_budget: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(step=step, loss=f"{row['loss']:.3f}",
                             sps=f"{row['samples_per_s']:.0f}")
        done = (min(round(time.perf_counter() - t_budget), self.bar.total) if self.budgeted
                else step)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(config: TrainConfig) -> dict:
    """Run a whole training job; returns the final metrics."""
    trainer = Trainer(config)
    return trainer.fit()
