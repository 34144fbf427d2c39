"""A stage being trained: what :func:`prepare_stage` sets up when a stage starts (its batches, the built and activated
distiller, the optimiser at ``lr · lr_scale`` with per-model scales, the per-step LR schedule, the AMP grad scaler,
the forward module, DDP-wrapped when data-parallel) and the position and state a checkpoint holds. A stage with
several optimisers (``Stage.optimisers``, :mod:`kdkernels.distill.optimisers`) has one :class:`OptimiserRun` each
(optimiser, schedule, grad scaler) and its step plan's turns; it is not DDP-wrapped (its gradients are averaged by
hand after each turn). A stage with a source (``Stage.source``, :mod:`kdkernels.distill.sources`) iterates over
the source's micro-batch requests instead of the training set; its models run on what the source generates. A stage
with a meta-step (``Stage.meta_step``, :mod:`kdkernels.distill.meta_steps`) trains without its held-out split and
has a :class:`MetaStepRun` (the hyperparameters' optimiser, left out of the stage's)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from kdkernels.distill.batches import to_device, uses_channels_last
from kdkernels.distill.config import TrainConfig
from kdkernels.distill.datasets import set_dataset_epoch
from kdkernels.distill.data import batch_sampler_for
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.environment import Environment
from kdkernels.distill.meta_steps import MetaStepRun, split_training_set
from kdkernels.distill.optimisers import Optimiser, optimiser_parameters, plan_turns
from kdkernels.distill.precision import grad_scaler
from kdkernels.distill.recipe import Stage
from kdkernels.distill.schedules import make_optimizer, make_scheduler
from kdkernels.distill.sources import Source, SourceLoader
from kdkernels.distill.step import DistillStep


@dataclasses.dataclass
class OptimiserRun:
    """One of a stage's several optimisers: its spec, parameters, optimiser, LR schedule and grad scaler."""

    spec: Optimiser
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


@dataclasses.dataclass
class StageRun:
    """A stage being trained: its distiller, data, optimiser state and position."""

    index: int
    stage: Stage
    epochs: int
    offset: int                  # epochs of the earlier stages (the samplers' epoch numbers continue across stages)
    loader: DataLoader           # a SourceLoader (also the sampler) in a stage with a source
    sampler: object
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    model: nn.Module             # DistillStep, wrapped in DDP when data-parallel
    steps_per_epoch: int
    step: int = 0
    optimisers: dict[str, OptimiserRun] = dataclasses.field(default_factory=dict)   # several: name -> run
    turns: list[tuple[str, ...]] = dataclasses.field(default_factory=list)          # their step plan's cycle
    source: Source | None = None    # the stage's source with the run's batch size and epoch length filled in
    meta: MetaStepRun | None = None   # the stage's meta-step (kdkernels.distill.meta_steps)

    @property
    def distiller(self) -> Distiller:
        return self.stage.distiller

    def state_dict(self) -> dict:
        if self.optimisers:
            return {"distiller": self.distiller.state_dict(), "step": self.step,
                    "optimisers": {name: run.state_dict() for name, run in self.optimisers.items()}}
        state = {"distiller": self.distiller.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step}
        if self.meta is not None:
            state["meta_step"] = self.meta.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"])
        if self.meta is not None:
            self.meta.load_state_dict(state["meta_step"])
        if self.optimisers:
            for name, run in self.optimisers.items():
                run.load_state_dict(state["optimisers"][name])
            self.step = int(state["step"])
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])


def _stage_data(stage: Stage, offset: int, config: TrainConfig, env: Environment, train_set: Dataset,
                labels: np.ndarray | None):
    """The stage's loader, sampler, source (or None), held-out split (or None) and first batch (for build)."""
    distiller = stage.distiller
    if stage.source is not None:
        if config.mixup_alpha > 0:
            raise ValueError(f"stage {stage.name!r}: the trainer's MixUp (mixup_alpha > 0) does not combine with a "
                             "source (it mixes the dataset's inputs and labels)")
        data_steps = len(batch_sampler_for("shuffle", None, config.batch_size, num_samples=len(train_set),
                                           rank=env.rank, world_size=env.world_size, drop_last=config.drop_last))
        source = stage.source.resolved(config.batch_size, max(1, math.ceil(data_steps / config.grad_accum)))
        loader = sampler = SourceLoader(source, config.grad_accum)
        distiller.to(env.device)
        training = distiller.training
        distiller.eval()   # an example batch for build(): the generator's output on step 0's noise, no state change
        try:
            with torch.no_grad():
                first = source.generate(distiller, source.request(
                    seed=config.seed, epoch=offset + 1, step=0, grad_accum=config.grad_accum, rank=env.rank,
                    world_size=env.world_size, device=env.device))
        finally:
            distiller.train(training)
        first = {key: value.detach() for key, value in first.items()}
        held_out_set = None
    else:
        source = None
        train_set, labels, held_out_set = split_training_set(stage.meta_step, train_set, labels, config.seed)
        sampler = batch_sampler_for(stage.batching, labels, config.batch_size, num_samples=len(train_set),
                                    options=stage.batching_options, seed=config.seed, rank=env.rank,
                                    world_size=env.world_size, drop_last=config.drop_last)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=config.num_workers,
                            generator=torch.Generator().manual_seed(config.seed),
                            pin_memory=env.device.type == "cuda")
        sampler.set_epoch(offset + 1)
        set_dataset_epoch(train_set, offset + 1)   # a dataset's own augmentation draws per (seed, epoch, index)
        first = next(iter(loader), None)
        if first is None:
            raise ValueError(f"stage {stage.name!r} gets no batch: {len(train_set)} training samples, "
                             f"batch_size {config.batch_size}, drop_last {config.drop_last}, "
                             f"{env.world_size} process(es)")
    return loader, sampler, source, held_out_set, first


def prepare_stage(index: int, stage: Stage, epochs: int, offset: int, config: TrainConfig, env: Environment,
                  train_set: Dataset, labels: np.ndarray | None, amp_dtype: torch.dtype | None) -> StageRun:
    """Sets up stage ``index`` (``epochs`` epochs, after ``offset`` epochs of the earlier stages). The distiller is
    built on the stage's first batch (terms size their connectors) before the optimiser exists."""
    distiller = stage.distiller
    loader, sampler, source, held_out_set, first = _stage_data(stage, offset, config, env, train_set, labels)
    distiller.build(to_device(first, env.device)).activate().to(env.device)
    if uses_channels_last(config, env.device):   # every model and connector of the stage, built above
        distiller.to(memory_format=torch.channels_last)
    parameters = distiller.trainable_parameters()
    lr = config.lr * stage.lr_scale
    steps_per_epoch = max(1, math.ceil(len(sampler) / config.grad_accum))
    model = DistillStep(distiller, amp_dtype, env.device.type, source)
    if stage.optimisers is not None:
        optimisers = {}
        for name, params in optimiser_parameters(stage.name, distiller, stage.optimisers).items():
            spec = stage.optimisers[name]
            optimizer = make_optimizer(config, params, lr * spec.lr_scale)
            optimisers[name] = OptimiserRun(spec, params, optimizer,
                                            make_scheduler(config, optimizer, epochs, steps_per_epoch),
                                            grad_scaler(config.amp, env.device.type))
        first = next(iter(optimisers.values()))
        return StageRun(index, stage, epochs, offset, loader, sampler, parameters, first.optimizer,
                        first.scheduler, first.scaler, model, steps_per_epoch, optimisers=optimisers,
                        turns=plan_turns(stage.name, list(optimisers), stage.step_plan), source=source)
    groups = distiller.parameter_groups(lr, stage.model_lr_scales)
    meta = None
    if stage.meta_step is not None:   # its hyperparameters have their own optimiser
        meta = MetaStepRun(stage.name, stage.meta_step, distiller, held_out_set)
        parameters, groups = meta.without_hyperparameters(parameters), meta.groups_without_hyperparameters(groups)
    optimizer = make_optimizer(config, groups, lr)
    scheduler = make_scheduler(config, optimizer, epochs, steps_per_epoch)
    scaler = grad_scaler(config.amp, env.device.type)
    if env.world_size > 1:
        # Unused parameters are normal here: a hint stage trains only the layers below its tap, a term may read
        # one of several peers' features, and a model's classifier gets no gradient from feature-only terms.
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda"
                                        else None, find_unused_parameters=True)
    return StageRun(index, stage, epochs, offset, loader, sampler, parameters, optimizer, scheduler, scaler,
                    model, steps_per_epoch, source=source, meta=meta)


def rebuild_finished_stage(stage: Stage, offset: int, config: TrainConfig, env: Environment,
                           train_set: Dataset, labels: np.ndarray | None) -> None:
    """Builds the distiller of a stage that finished before a checkpoint (its terms size their connectors on the
    stage's first batch, as when it ran), without activating it: a resumed run then loads the terms' state."""
    *_, first = _stage_data(stage, offset, config, env, train_set, labels)
    stage.distiller.build(to_device(first, env.device)).to(env.device)
    if uses_channels_last(config, env.device):
        stage.distiller.to(memory_format=torch.channels_last)
