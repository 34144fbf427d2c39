"""One optimiser step of a stage: ``grad_accum`` micro-batches, each forward with the models under autocast and the
loss terms in fp32, each loss weighted by its share of the step's samples (``1/grad_accum`` for equal
micro-batches), DDP's gradient all-reduce only on the last micro-batch, optional gradient-norm clipping, then the
(scaled) optimiser step, the LR schedule's step and the distiller's model updates (EMA and snapshot copies, skipped
by an EMA when the fp16 scaler skipped the step). A stage with several optimisers takes its step plan's turn instead
(:func:`plan_step`); a stage with a meta-step (:mod:`kdkernels.distill.meta_steps`) updates its hyperparameters
before the step. A stage with a source (:mod:`kdkernels.distill.sources`) draws each micro-batch's request in the
step and generates its inputs inside the forward. Also the epoch's sample-weighted loss sums."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kdkernels.distill.batches import rows_of, to_device, uses_channels_last
from kdkernels.distill.distiller import Distiller, DistillOutput
from kdkernels.distill.environment import Environment, all_reduce_sum
from kdkernels.distill.mixing import mix_batch
from kdkernels.distill.optimisers import average_gradients, broadcast_buffers
from kdkernels.distill.precision import autocast, scaler_step
from kdkernels.distill.sources import Source
from kdkernels.distill.terms import StepContext
from kdkernels.distill.updates import update_models

if TYPE_CHECKING:
    from kdkernels.distill.config import TrainConfig
    from kdkernels.distill.stage import StageRun

VIEW_KEY = "_view_key"   # in a source's request: the (seed, epoch, step) its views draw from, applied in the forward


class DistillStep(nn.Module):
    """One forward of a distiller with the models under autocast and the terms in fp32 (DDP wraps this)."""

    def __init__(self, distiller: Distiller, amp_dtype: torch.dtype | None, device_type: str,
                 source: Source | None = None):
        super().__init__()
        self.distiller = distiller
        self.amp_dtype, self.device_type = amp_dtype, device_type
        self.source = source

    def forward(self, batch: dict, context: StepContext) -> DistillOutput:
        with autocast(self.device_type, self.amp_dtype):
            if self.source is not None:   # the source's models (a generator) run in the forward, graph kept
                batch = dict(batch)
                view_key = batch.pop(VIEW_KEY)
                batch = self.distiller.apply_views(self.source.generate(self.distiller, batch), **view_key)
                context = dataclasses.replace(context, batch=batch)
            values = self.distiller.run_models(batch)
        return self.distiller.compute_terms(values, context)


def training_batch(run: StageRun, batch: dict, epoch: int, config: TrainConfig, env: Environment) -> dict:
    """A micro-batch as the forward takes it: the dataset's batch on the device with the views applied, or, in a
    stage with a source, the source's request for this micro-batch (drawn from seed, epoch, step, rank)."""
    if run.source is not None:   # the views apply in the forward, after the generation
        request = run.source.request(seed=config.seed, epoch=run.offset + epoch, step=run.step,
                                     micro=int(batch["micro"]), grad_accum=config.grad_accum, rank=env.rank,
                                     world_size=env.world_size, device=env.device)
        return {**request, VIEW_KEY: {"seed": config.seed, "epoch": run.offset + epoch, "step": run.step}}
    batch = to_device(batch, env.device, channels_last=uses_channels_last(config, env.device))
    return run.distiller.apply_views(batch, seed=config.seed, epoch=run.offset + epoch, step=run.step)


class EpochSums:
    """Sample-weighted sums of the loss and of each term over an epoch."""

    def __init__(self):
        self.rows, self.loss, self.loss_seconds = 0, 0.0, 0.0
        self.terms: dict[str, float] = {}

    def add(self, output: DistillOutput, rows: int) -> float:
        """Adds a micro-batch's losses, weighted by its rows; returns its loss as a float."""
        value = float(output.loss.detach())
        self.rows += rows
        self.loss += value * rows
        self.loss_seconds += output.loss_seconds
        for name, term in output.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + float(term) * rows
        return value

    def means(self, environment: Environment) -> dict[str, float]:
        names = list(self.terms)
        totals = all_reduce_sum([self.rows, self.loss, *(self.terms[n] for n in names)], environment.device,
                                environment.world_size)
        rows = max(totals[0], 1.0)
        return {"train_loss": totals[1] / rows, **{name: total / rows for name, total in zip(names, totals[2:])}}


def check_finite_loss(value: float, output: DistillOutput, run: StageRun, epoch: int, config: TrainConfig) -> None:
    """A FloatingPointError naming the stage, epoch, step and terms when a micro-batch's loss is NaN or infinite
    (training has diverged: an error, not a silently NaN run). Under fp16 the grad scaler skips such steps itself."""
    if math.isfinite(value) or config.amp == "fp16":
        return
    terms = ", ".join(f"{name} {float(term):.4g}" for name, term in output.terms.items())
    raise FloatingPointError(f"stage {run.stage.name!r}, epoch {epoch}, step {run.step}: the loss is {value} "
                             f"(terms: {terms}); training has diverged (lower the learning rate or a term's weight)")


def prepare_batch(run: StageRun, batch: dict, epoch: int, config: TrainConfig, env: Environment,
                  mixing: np.random.Generator | None) -> tuple[dict, StepContext]:
    """A micro-batch on the device with the distiller's views applied and the trainer's MixUp (if any), and the
    step's context for the terms."""
    batch = training_batch(run, batch, epoch, config, env)
    mixup = None
    if mixing is not None:
        batch, mixup = mix_batch(batch, config.mixup_alpha, mixing)
    return batch, StepContext(epoch=epoch, epochs=run.epochs, step=run.step, batch=batch, mixup=mixup)


def optimizer_step(run: StageRun, group: list[dict], epoch: int, config: TrainConfig, env: Environment,
                   mixing: np.random.Generator | None, sums: EpochSums) -> None:
    """Trains ``run`` on the micro-batches of ``group`` for one optimiser step; adds their losses to ``sums``."""
    if run.optimisers:
        return plan_step(run, group, epoch, config, env, mixing, sums)
    if run.meta is not None:
        run.meta.step(run, group, epoch, config, env)   # the hyperparameters first (kdkernels.distill.meta_steps)
    total_rows = sum(rows_of(batch) for batch in group) if run.source is None \
        else len(group) * run.source.batch_size
    run.optimizer.zero_grad(set_to_none=True)
    for position, batch in enumerate(group):
        batch, context = prepare_batch(run, batch, epoch, config, env, mixing)
        last = position == len(group) - 1
        with run.model.no_sync() if env.world_size > 1 and not last else contextlib.nullcontext():
            output = run.model(batch, context)
            run.scaler.scale(output.loss * (rows_of(batch) / total_rows)).backward()
        check_finite_loss(sums.add(output, rows_of(batch)), output, run, epoch, config)
    if config.clip_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.parameters, config.clip_grad_norm)
    applied = scaler_step(run.scaler, run.optimizer, report_skip=len(run.distiller.updates) > 0)
    run.scheduler.step()
    update_models(run, applied)   # EMA / snapshot copies (kdkernels.distill.updates)
    run.step += 1


def plan_step(run: StageRun, group: list[dict], epoch: int, config: TrainConfig, env: Environment,
              mixing: np.random.Generator | None, sums: EpochSums) -> None:
    """One turn of a stage with several optimisers (:mod:`kdkernels.distill.optimisers`): the turn's optimisers
    each get the gradient of their own terms' sum (a separate backward over the same forward, with respect to their
    own parameters, scaled by their own grad scaler), averaged over the ranks; then they step, every optimiser's
    schedule steps, and the model updates run."""
    active = [run.optimisers[name] for name in run.turns[run.step % len(run.turns)]]
    total_rows = sum(rows_of(batch) for batch in group) if run.source is None \
        else len(group) * run.source.batch_size
    for optimiser in active:
        optimiser.optimizer.zero_grad(set_to_none=True)
    for batch in group:
        batch, context = prepare_batch(run, batch, epoch, config, env, mixing)
        broadcast_buffers(run.distiller, env.world_size)
        output = run.model(batch, context)
        share = rows_of(batch) / total_rows
        for position, optimiser in enumerate(active):
            loss = sum(output.term_losses[name] for name in optimiser.spec.terms)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                continue   # nothing this optimiser owns is in its terms' graph in this micro-batch
            grads = torch.autograd.grad(optimiser.scaler.scale(loss * share), optimiser.parameters,
                                        retain_graph=position < len(active) - 1, allow_unused=True)
            for parameter, grad in zip(optimiser.parameters, grads):
                if grad is not None:
                    parameter.grad = grad if parameter.grad is None else parameter.grad + grad
        check_finite_loss(sums.add(output, rows_of(batch)), output, run, epoch, config)
    applied = True
    for optimiser in active:
        if all(parameter.grad is None for parameter in optimiser.parameters):
            continue   # its terms reached none of its parameters (the same on every rank): nothing to step
        average_gradients(optimiser.parameters, env.world_size)
        if config.clip_grad_norm is not None:
            optimiser.scaler.unscale_(optimiser.optimizer)
            torch.nn.utils.clip_grad_norm_(optimiser.parameters, config.clip_grad_norm)
        applied &= scaler_step(optimiser.scaler, optimiser.optimizer, report_skip=len(run.distiller.updates) > 0)
    with warnings.catch_warnings():   # an optimiser that has not stepped yet follows the stage's schedule too
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for optimiser in run.optimisers.values():
            optimiser.scheduler.step()
    update_models(run, applied)
    run.step += 1
