"""The trainer: runs a method's :class:`~kdkernels.distill.Recipe`, stage after stage.

    result = Trainer(TrainConfig(epochs=30, amp="bf16", out_dir="runs/dkd")).fit(recipe, split.train, split.test)

Per stage: ``stage.before()``; the distiller is built on the first batch (terms size their connectors) BEFORE the
optimiser exists, then activated; the optimiser covers ``distiller.trainable_parameters()`` at ``lr · lr_scale``
(times ``Stage.model_lr_scales`` per model);
the LR follows a per-step schedule (cosine, step, multistep or constant, after a linear warm-up) over the stage's
epochs; batches come from the stage's sampler (``Stage.batching``), a deterministic function of (seed, epoch).

Options: AMP (``torch.autocast`` around the models only: the loss terms always run in fp32; fp16 adds a
``GradScaler``), gradient accumulation (``grad_accum`` micro-batches of ``batch_size`` per optimiser step, each
loss weighted by its share of the step's samples, i.e. ``1/grad_accum`` for equal micro-batches), gradient-norm
clipping, MixUp (any method: the mixed input goes to every model, so teachers see what the student sees), and
data-parallel training under ``torchrun`` (each rank takes every ``world_size``-th batch; the step's gradient is
DDP's average over ranks).

Outputs (rank 0, when ``out_dir`` is set): ``metrics.csv`` and ``metrics.json`` (updated every epoch),
``curves.png``, ``last.pt`` (every ``checkpoint_every`` epochs and at the end of each stage), ``best.pt`` (best test
accuracy of the exported model) and ``student.pt`` (the exported model's ``state_dict``). ``resume`` continues from
a checkpoint exactly as the uninterrupted run would have (bit for bit on CPU, also under DDP with the same number
of processes: every rank's RNG states are saved).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from kdkernels.distill import checkpoint as ckpt
from kdkernels.distill import metrics
from kdkernels.distill.cache import CachedTeacher
from kdkernels.distill.data import as_sample_dataset, batch_sampler_for, dataset_labels
from kdkernels.distill.distiller import Distiller, DistillOutput
from kdkernels.distill.hooks import as_tensor
from kdkernels.distill.recipe import Recipe, Stage
from kdkernels.distill.terms import MixupBatch, StepContext
from kdkernels.distributed import rank_and_world_size

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "multistep", "constant")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MIXUP_STREAM, _LOADER_STREAM = 1, 2   # keep these draws apart from the samplers' (seed, epoch) streams


@dataclasses.dataclass
class TrainConfig:
    """How a recipe is trained.

    epochs: per stage, unless the stage fixes its own (``Stage.epochs``). batch_size: samples per micro-batch
    (per rank under DDP); an optimiser step takes ``grad_accum`` of them. lr: the base learning rate (times the
    stage's ``lr_scale``). schedule: ``"cosine"`` (to 0 over the stage), ``"step"`` (× ``gamma`` every
    ``step_size`` epochs, default a third of the stage), ``"multistep"`` (× ``gamma`` at each epoch of
    ``milestones``) or ``"constant"``; ``warmup_epochs`` (may be fractional) ramps the LR linearly first.
    amp: ``"off"``, ``"bf16"`` or ``"fp16"`` (fp16 uses a GradScaler). mixup_alpha: > 0 enables MixUp with
    ``lam ~ Beta(alpha, alpha)``. device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``. resume: False, True (``out_dir/last.pt`` when it exists) or a checkpoint path.
    stop_after_epochs: leave after this many epochs in this call (all stages counted), with a resumable
    checkpoint: for time-limited jobs. eval_batch_size: batch size of the test-set evaluation.
    """

    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    step_size: int | None = None
    warmup_epochs: float = 0
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    amp: str = "off"
    mixup_alpha: float = 0.0
    seed: int = 0
    device: str = "auto"
    out_dir: str | os.PathLike | None = None
    checkpoint_every: int = 1
    resume: bool | str | os.PathLike = False
    progress: bool = True
    eval_every: int = 1
    drop_last: bool = False
    num_workers: int = 0
    eval_batch_size: int = 256
    stop_after_epochs: int | None = None

    def __post_init__(self):
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("amp", self.amp, tuple(AMP_DTYPES))
        for name in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "eval_every", "eval_batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("step_size", "stop_after_epochs"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_epochs", "mixup_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {self.clip_grad_norm}")
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones (the epochs at which the LR is multiplied by "
                             "gamma)")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from error


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass
class RunResult:
    """What :meth:`Trainer.fit` returns. Accuracies are in %, ``None`` without a test set. ``accuracies`` holds the
    last evaluation of each evaluated model of the last stage; ``accuracy`` is the exported model's. ``completed``
    is False when ``stop_after_epochs`` ended the call early."""

    method: str
    accuracy: float | None
    best_accuracy: float | None
    accuracies: dict[str, float]
    history: list[dict]
    train_seconds: float
    loss_seconds: float
    loss_share: float
    student: nn.Module
    paths: dict[str, Path]
    completed: bool = True


# ------------------------------------------------------------------------------------------------ step machinery

def lr_lambda(config: TrainConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The LR multiplier at optimiser step ``step`` (0-based) of a stage of ``epochs`` epochs."""
    total = max(1, epochs * steps_per_epoch)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    step_size = config.step_size or max(1, epochs // 3)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        epoch_index = step // steps_per_epoch
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if config.schedule == "step":
            return config.gamma ** (epoch_index // step_size)
        if config.schedule == "multistep":
            return config.gamma ** sum(epoch_index >= milestone for milestone in config.milestones)
        return 1.0

    return factor


def make_optimizer(config: TrainConfig, parameters: list, lr: float) -> torch.optim.Optimizer:
    """The configured optimiser over parameters or parameter groups (groups may carry their own ``lr``)."""
    if not parameters:
        raise ValueError("the stage has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return optimizer(parameters, lr=lr, weight_decay=config.weight_decay)


class _DistillStep(nn.Module):
    """One forward of a distiller with the models under autocast and the terms in fp32 (DDP wraps this)."""

    def __init__(self, distiller: Distiller, amp_dtype: torch.dtype | None, device_type: str):
        super().__init__()
        self.distiller = distiller
        self.amp_dtype, self.device_type = amp_dtype, device_type

    def forward(self, batch: dict, context: StepContext) -> DistillOutput:
        with autocast(self.device_type, self.amp_dtype):
            values = self.distiller.run_models(batch)
        return self.distiller.compute_terms(values, context)


def autocast(device_type: str, dtype: torch.dtype | None):
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype is not None)


def mix_batch(batch: dict, alpha: float, rng: np.random.Generator) -> tuple[dict, MixupBatch]:
    """``input ← lam·input + (1 − lam)·input[perm]`` with ``lam ~ Beta(alpha, alpha)``, and the MixupBatch that
    tells the label terms (``CrossEntropyTerm``) to mix their targets the same way."""
    inputs = batch["input"]
    lam = float(rng.beta(alpha, alpha))
    permutation = torch.from_numpy(rng.permutation(inputs.shape[0])).to(inputs.device)
    mixed = dict(batch, input=lam * inputs + (1.0 - lam) * inputs[permutation])
    return mixed, MixupBatch(lam, permutation)


def stream_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (per-epoch generators that a resumed run recreates identically)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def grouped(items: Iterable, size: int):
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def rows_of(batch: dict) -> int:
    return int(batch["input"].shape[0])


def all_reduce_sum(values: Sequence[float], device: torch.device, world_size: int) -> list[float]:
    """Sums of ``values`` over the data-parallel ranks (the values themselves in one process)."""
    if world_size == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------------- environment

@dataclasses.dataclass
class _Environment:
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _environment(config: TrainConfig) -> _Environment:
    """The device and the data-parallel rank; initialises the process group under torchrun (WORLD_SIZE > 1)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = rank_and_world_size()
    return _Environment(device, rank, world_size)


def _progress_bar(total: int, description: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is an optional dependency
            enabled = False
        else:
            return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)
    return _NoBar()


class _NoBar:
    def update(self, _n: int = 1) -> None:
        pass

    def set_postfix(self, **_values) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------- a stage

@dataclasses.dataclass
class _StageRun:
    """A stage being trained: its distiller, data, optimiser state and position."""

    index: int
    stage: Stage
    epochs: int
    offset: int                  # epochs of the earlier stages (the samplers' epoch numbers continue across stages)
    loader: DataLoader
    sampler: object
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    model: nn.Module             # _DistillStep, wrapped in DDP when data-parallel
    steps_per_epoch: int
    step: int = 0

    @property
    def distiller(self) -> Distiller:
        return self.stage.distiller

    def state_dict(self) -> dict:
        return {"distiller": self.distiller.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])


class _EpochSums:
    """Sample-weighted sums of the loss and of each term over an epoch."""

    def __init__(self):
        self.rows, self.loss, self.loss_seconds = 0, 0.0, 0.0
        self.terms: dict[str, float] = {}

    def add(self, output: DistillOutput, rows: int) -> None:
        self.rows += rows
        self.loss += float(output.loss.detach()) * rows
        self.loss_seconds += output.loss_seconds
        for name, value in output.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + float(value) * rows

    def means(self, environment: _Environment) -> dict[str, float]:
        names = list(self.terms)
        totals = all_reduce_sum([self.rows, self.loss, *(self.terms[n] for n in names)], environment.device,
                                environment.world_size)
        rows = max(totals[0], 1.0)
        return {"train_loss": totals[1] / rows, **{name: total / rows for name, total in zip(names, totals[2:])}}


# ------------------------------------------------------------------------------------------------------ trainer

class Trainer:
    """Trains recipes with one :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig | None = None):
        self.config = config or TrainConfig()

    def fit(self, recipe: Recipe, train_set: Dataset, test_set: Dataset | None = None) -> RunResult:
        """Trains every stage of ``recipe`` on ``train_set``, evaluating on ``test_set``; see the module doc.

        Datasets yield ``{"input", "target", "index"}`` dicts or ``(input, target)`` pairs; a DataLoader is replaced
        by its dataset (the trainer batches itself: deterministic per (seed, epoch), sharded over ranks)."""
        return _Run(self.config, recipe, train_set, test_set).execute()


class _Run:
    """One call of :meth:`Trainer.fit`."""

    def __init__(self, config: TrainConfig, recipe: Recipe, train_set: Dataset, test_set: Dataset | None):
        if not recipe.stages:
            raise ValueError(f"recipe {recipe.method!r} has no stages")
        self.config, self.recipe = config, recipe
        _check_mixup(config, recipe)
        train_set, test_set = (data.dataset if isinstance(data, DataLoader) else data
                               for data in (train_set, test_set))
        self.env = _environment(config)
        self.amp_dtype = AMP_DTYPES[config.amp]
        self.train_set = as_sample_dataset(train_set)
        self.labels = dataset_labels(self.train_set)
        self.test_set = as_sample_dataset(test_set) if test_set is not None else None
        self.out_dir = Path(config.out_dir) if config.out_dir is not None else None
        self.writes = self.env.is_main and self.out_dir is not None
        self.show_progress = config.progress and self.env.is_main and sys.stderr.isatty()
        self.history: list[dict] = []
        self.best: float | None = None
        self.resume_stage, self.resume_epoch = 0, 0
        self.resume_payload: dict | None = None
        self.pending_rng: dict | None = None
        self.epochs_this_call = 0

    # --------------------------------------------------------------------------------------------------- flow

    def execute(self) -> RunResult:
        ckpt.seed_everything(self.config.seed)
        for stage in self.recipe.stages:
            stage.distiller.to(self.env.device)
        self._resume()
        completed = True
        for index, stage in enumerate(self.recipe.stages):
            if not self._run_stage(index, stage):
                completed = False
                break
        return self._finish(completed)

    def _stage_epochs(self, index: int) -> int:
        return self.recipe.stages[index].epochs_of(self.config.epochs)

    def _run_stage(self, index: int, stage: Stage) -> bool:
        """Trains one stage (or what is left of it after a resume); False when ``stop_after_epochs`` ends the call."""
        epochs = self._stage_epochs(index)
        done = self.resume_epoch if index == self.resume_stage else 0
        if index < self.resume_stage or (index == self.resume_stage and self.resume_payload is not None
                                         and done >= epochs):
            return True
        continuing = index == self.resume_stage and self.resume_payload is not None and done > 0
        if not continuing:
            self._restore_pending_rng()
            if stage.before is not None:
                stage.before()
            if epochs == 0:
                return True
        run = self._prepare_stage(index, stage, epochs)
        if continuing:
            run.load_state_dict(self.resume_payload["run"])
            self._restore_pending_rng()
        for epoch in range(done + 1, epochs + 1):
            row = self._train_epoch(run, epoch)
            row.update(self._evaluate(run, epoch))
            self.history.append(row)
            self.epochs_this_call += 1
            last_of_run = index == len(self.recipe.stages) - 1 and epoch == epochs
            stopping = not last_of_run and self.config.stop_after_epochs is not None \
                and self.epochs_this_call >= self.config.stop_after_epochs
            self._after_epoch(run, epoch, row, force_checkpoint=stopping)
            if stopping:
                return False
        return True

    def _prepare_stage(self, index: int, stage: Stage, epochs: int) -> _StageRun:
        config, env = self.config, self.env
        offset = sum(self._stage_epochs(i) for i in range(index))
        sampler = batch_sampler_for(stage.batching, self.labels, config.batch_size, num_samples=len(self.train_set),
                                    options=stage.batching_options, seed=config.seed, rank=env.rank,
                                    world_size=env.world_size, drop_last=config.drop_last)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=config.num_workers,
                            generator=torch.Generator().manual_seed(config.seed),
                            pin_memory=env.device.type == "cuda")
        sampler.set_epoch(offset + 1)
        first = next(iter(loader), None)
        if first is None:
            raise ValueError(f"stage {stage.name!r} gets no batch: {len(self.train_set)} training samples, "
                             f"batch_size {config.batch_size}, drop_last {config.drop_last}, "
                             f"{env.world_size} process(es)")
        distiller = stage.distiller
        distiller.build(to_device(first, env.device)).activate().to(env.device)
        parameters = distiller.trainable_parameters()
        lr = config.lr * stage.lr_scale
        optimizer = make_optimizer(config, distiller.parameter_groups(lr, stage.model_lr_scales), lr)
        steps_per_epoch = max(1, math.ceil(len(sampler) / config.grad_accum))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, epochs, steps_per_epoch))
        scaler = torch.amp.GradScaler(env.device.type, enabled=config.amp == "fp16")
        model = _DistillStep(distiller, self.amp_dtype, env.device.type)
        if env.world_size > 1:
            # Unused parameters are normal here: a hint stage trains only the layers below its tap, a term may read
            # one of several peers' features, and a model's classifier gets no gradient from feature-only terms.
            model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda"
                                            else None, find_unused_parameters=True)
        return _StageRun(index, stage, epochs, offset, loader, sampler, parameters, optimizer, scheduler, scaler,
                         model, steps_per_epoch)

    # ------------------------------------------------------------------------------------------------ training

    def _train_epoch(self, run: _StageRun, epoch: int) -> dict:
        config = self.config
        run.sampler.set_epoch(run.offset + epoch)
        run.loader.generator.manual_seed(stream_seed(config.seed, _LOADER_STREAM, run.offset + epoch))
        run.distiller.train()
        mixing = None
        if config.mixup_alpha > 0:
            mixing = np.random.default_rng([config.seed, _MIXUP_STREAM, run.offset + epoch, self.env.rank])
        sums = _EpochSums()
        lr = run.optimizer.param_groups[0]["lr"]
        bar = _progress_bar(run.steps_per_epoch, f"{run.stage.name} {epoch}/{run.epochs}", self.show_progress)
        start = time.perf_counter()
        try:
            for group in grouped(run.loader, config.grad_accum):
                self._optimizer_step(run, group, epoch, mixing, sums)
                bar.update(1)
                bar.set_postfix(loss=f"{sums.loss / max(sums.rows, 1):.4f}")
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        return {"stage_index": run.index, "stage": run.stage.name, "epoch": epoch, "lr": lr,
                **sums.means(self.env), "seconds": seconds, "loss_seconds": sums.loss_seconds}

    def _optimizer_step(self, run: _StageRun, group: list[dict], epoch: int, mixing, sums: _EpochSums) -> None:
        total_rows = sum(rows_of(batch) for batch in group)
        run.optimizer.zero_grad(set_to_none=True)
        for position, batch in enumerate(group):
            batch = to_device(batch, self.env.device)
            mixup = None
            if mixing is not None:
                batch, mixup = mix_batch(batch, self.config.mixup_alpha, mixing)
            context = StepContext(epoch=epoch, epochs=run.epochs, step=run.step, batch=batch, mixup=mixup)
            last = position == len(group) - 1
            with run.model.no_sync() if self.env.world_size > 1 and not last else contextlib.nullcontext():
                output = run.model(batch, context)
                run.scaler.scale(output.loss * (rows_of(batch) / total_rows)).backward()
            sums.add(output, rows_of(batch))
        if self.config.clip_grad_norm is not None:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.parameters, self.config.clip_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.step += 1

    # ---------------------------------------------------------------------------------------------- evaluation

    def _evaluate(self, run: _StageRun, epoch: int) -> dict:
        """``test_acc_<model>`` of each evaluated model, every ``eval_every`` epochs and at the stage's end."""
        if self.test_set is None or (epoch % self.config.eval_every and epoch != run.epochs):
            return {}
        distiller = run.distiller
        return {f"{metrics.ACCURACY_PREFIX}{name}": self.accuracy(distiller.models[name])
                for name in distiller.evaluate}

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy (%) of ``model`` on the test set (each rank evaluates its share; counts are summed)."""
        env = self.env
        indices = list(range(env.rank, len(self.test_set), env.world_size))
        size = self.config.eval_batch_size
        loader = DataLoader(self.test_set, batch_sampler=[indices[i:i + size] for i in range(0, len(indices), size)],
                            num_workers=self.config.num_workers)
        was_training = model.training
        model.eval()
        correct = seen = 0
        try:
            with torch.no_grad(), autocast(env.device.type, self.amp_dtype):
                for batch in loader:
                    batch = to_device(batch, env.device)
                    output = model(batch) if getattr(model, "takes_batch", False) else model(batch["input"])
                    correct += int((as_tensor(output, "model").argmax(dim=1) == batch["target"]).sum())
                    seen += rows_of(batch)
        finally:
            model.train(was_training)
        correct, seen = all_reduce_sum([correct, seen], env.device, env.world_size)
        return 100.0 * correct / max(seen, 1)

    # -------------------------------------------------------------------------------------------------- output

    def _exported_key(self) -> str:
        return f"{metrics.ACCURACY_PREFIX}{self.recipe.stages[-1].distiller.evaluate[0]}"

    def _after_epoch(self, run: _StageRun, epoch: int, row: dict, force_checkpoint: bool) -> None:
        """Best accuracy, checkpoints and metrics files after an epoch."""
        accuracy = row.get(self._exported_key()) if run.index == len(self.recipe.stages) - 1 else None
        improved = accuracy is not None and (self.best is None or accuracy > self.best)
        if improved:
            self.best = accuracy
        if self.out_dir is None:
            return
        periodic = epoch % self.config.checkpoint_every == 0 or epoch == run.epochs
        if periodic or improved or force_checkpoint:
            rng_per_rank = self._rng_per_rank()  # a collective under DDP: every rank takes part, rank 0 writes
            if self.writes:
                payload = self._checkpoint(run, epoch, rng_per_rank)
                if periodic or force_checkpoint:
                    ckpt.save_checkpoint(self.out_dir / "last.pt", payload)
                if improved:
                    ckpt.save_checkpoint(self.out_dir / "best.pt", payload)
            if self.env.world_size > 1:
                dist.barrier()  # no rank may read last.pt (a resume) before rank 0 has written it
        if self.writes:
            self._write_metrics()

    def _rng_per_rank(self) -> list[dict]:
        """Every rank's RNG states (ranks draw differently, e.g. dropout over a short last batch)."""
        state = ckpt.rng_state()
        if self.env.world_size == 1:
            return [state]
        states: list = [None] * self.env.world_size
        dist.all_gather_object(states, state)
        return states

    def _checkpoint(self, run: _StageRun, epoch: int, rng_per_rank: list[dict]) -> dict:
        return {"method": self.recipe.method, "stages": [stage.name for stage in self.recipe.stages],
                "stage": run.index, "epoch": epoch, "models": ckpt.models_state(self.recipe),
                "run": run.state_dict(), "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank,
                "history": list(self.history), "best_accuracy": self.best,
                "student": self.recipe.student.state_dict(), "config": dataclasses.asdict(self.config)}

    def _summary(self) -> dict:
        last_stage = len(self.recipe.stages) - 1
        evaluated = [row for row in self.history if row["stage_index"] == last_stage
                     and any(key.startswith(metrics.ACCURACY_PREFIX) for key in row)]
        accuracies = {key[len(metrics.ACCURACY_PREFIX):]: value for key, value in evaluated[-1].items()
                      if key.startswith(metrics.ACCURACY_PREFIX)} if evaluated else {}
        train_seconds = sum(row["seconds"] for row in self.history)
        loss_seconds = sum(row["loss_seconds"] for row in self.history)
        return {"method": self.recipe.method, "accuracy": evaluated[-1].get(self._exported_key()) if evaluated
                else None, "best_accuracy": self.best, "accuracies": accuracies, "train_seconds": train_seconds,
                "loss_seconds": loss_seconds, "loss_share": loss_seconds / train_seconds if train_seconds else 0.0}

    def _write_metrics(self) -> dict[str, Path]:
        summary = {**self._summary(), "hyperparameters": self.recipe.hyperparameters,
                   "config": dataclasses.asdict(self.config)}
        return {"metrics_csv": metrics.write_csv(self.history, self.out_dir / "metrics.csv"),
                "metrics_json": metrics.write_json({**summary, "history": self.history},
                                                   self.out_dir / "metrics.json")}

    def _finish(self, completed: bool) -> RunResult:
        student = self.recipe.student
        student.eval()
        paths: dict[str, Path] = {}
        if self.writes:
            paths.update(self._write_metrics())
            torch.save(student.state_dict(), self.out_dir / "student.pt")
            paths["student"] = self.out_dir / "student.pt"
            if self.history:
                paths.update(self._plot())
            paths.update({name: self.out_dir / f"{name}.pt" for name in ("last", "best")
                          if (self.out_dir / f"{name}.pt").is_file()})
        return RunResult(history=list(self.history), student=student, paths=paths, completed=completed,
                         **self._summary())

    def _plot(self) -> dict[str, Path]:
        try:
            return {"curves": metrics.plot_curves(self.history, self.out_dir / "curves.png", self.recipe.method)}
        except ImportError:  # pragma: no cover - matplotlib is optional
            warnings.warn("matplotlib is not installed: no curves.png", stacklevel=3)
            return {}

    # -------------------------------------------------------------------------------------------------- resume

    def _resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume is False or resume is None:
            return None
        if resume is True:
            if self.out_dir is None:
                raise ValueError("resume=True resumes from out_dir/last.pt: set out_dir (or pass a checkpoint path)")
            path = self.out_dir / "last.pt"
            return path if path.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        return path

    def _resume(self) -> None:
        """Loads the checkpoint (if resuming): the stages up to its stage are set up again (their ``before``), the
        models and history are loaded; the stage's own state and the RNG are restored when training continues."""
        path = self._resume_path()
        if path is None:
            return
        payload = ckpt.load_checkpoint(path, map_location=self.env.device)
        ckpt.check_matches(payload, self.recipe, path)
        self.resume_stage, self.resume_epoch = int(payload["stage"]), int(payload["epoch"])
        for stage in self.recipe.stages[: self.resume_stage + 1]:
            if stage.before is not None:
                stage.before()
        ckpt.load_models_state(self.recipe, payload["models"])
        self.history = list(payload["history"])
        self.best = payload["best_accuracy"]
        self.resume_payload = payload
        per_rank = payload.get("rng_per_rank", [])
        self.pending_rng = per_rank[self.env.rank] if len(per_rank) == self.env.world_size else payload["rng"]

    def _restore_pending_rng(self) -> None:
        if self.pending_rng is not None:
            ckpt.restore_rng(self.pending_rng)
            self.pending_rng = None


def _check_mixup(config: TrainConfig, recipe: Recipe) -> None:
    if config.mixup_alpha <= 0:
        return
    for stage in recipe.stages:
        for name, model in stage.distiller.models.items():
            if isinstance(model, CachedTeacher):
                raise ValueError(f"mixup_alpha > 0 with a cached teacher ({stage.name!r}: model {name!r}): the cache "
                                 "holds outputs for unmixed inputs; use the live teacher with MixUp")
