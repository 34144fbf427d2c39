"""One call of :meth:`Trainer.fit`: the stages in order, each epoch's training and evaluation, then checkpoints,
metrics files and the exported model.

Per stage: ``stage.before()``, then :func:`~kdkernels.distill.stage.prepare_stage`; per epoch the sampler and the
loader's generator are reseeded from (seed, epoch) (epochs count across stages), the optimiser steps run
(:func:`~kdkernels.distill.step.optimizer_step`), the evaluated models are tested every ``eval_every`` epochs and at
the stage's end, and rank 0 writes ``last.pt`` (every ``checkpoint_every`` epochs, at the stage's end, and when
``stop_after_epochs`` ends the call), ``best.pt`` (when the exported model's accuracy improves) and the metrics.
``stop_at_step`` and ``stop_at_accuracy`` end the run after an optimiser step (mid-epoch): that epoch's row holds
its steps so far and the evaluation where the run stopped, and the later stages do not run.
A resumed run skips the finished stages (running their ``before`` again while loading, and rebuilding the modules
their terms own from the checkpoint), loads the stage's own state and restores the RNG states where training
continues, so it repeats the uninterrupted run bit for bit.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from kdkernels.distill import checkpoint as ckpt
from kdkernels.distill import metrics
from kdkernels.distill.batches import grouped
from kdkernels.distill.config import RunResult, TrainConfig
from kdkernels.distill.data import as_sample_dataset, dataset_labels
from kdkernels.distill.datasets import set_dataset_epoch
from kdkernels.distill.environment import LOADER_STREAM, barrier, set_up_environment, stream_seed
from kdkernels.distill.evaluation import Evaluator
from kdkernels.distill.mixing import check_mixup, mixup_generator
from kdkernels.distill.precision import AMP_DTYPES
from kdkernels.distill.progress import progress_bar
from kdkernels.distill.recipe import Recipe, Stage
from kdkernels.distill.stage import StageRun, prepare_stage, rebuild_finished_stage
from kdkernels.distill.step import EpochSums, optimizer_step


class Run:
    """One call of :meth:`Trainer.fit`."""

    def __init__(self, config: TrainConfig, recipe: Recipe, train_set: Dataset, test_set: Dataset | None):
        if not recipe.stages:
            raise ValueError(f"recipe {recipe.method!r} has no stages")
        self.config, self.recipe = config, recipe
        check_mixup(config.mixup_alpha, recipe)
        train_set, test_set = (data.dataset if isinstance(data, DataLoader) else data
                               for data in (train_set, test_set))
        self.env = set_up_environment(config.device)
        self.amp_dtype = AMP_DTYPES[config.amp]
        self.train_set = as_sample_dataset(train_set)
        self.labels = dataset_labels(self.train_set)
        self.test_set = as_sample_dataset(test_set) if test_set is not None else None
        self.evaluator = Evaluator(self.test_set, self.env, batch_size=config.eval_batch_size,
                                   num_workers=config.num_workers, amp_dtype=self.amp_dtype,
                                   metrics=recipe.evaluation_metrics(config.metrics), train_set=self.train_set) \
            if self.test_set is not None else None
        self.out_dir = Path(config.out_dir) if config.out_dir is not None else None
        self.writes = self.env.is_main and self.out_dir is not None
        self.show_progress = config.progress and self.env.is_main and sys.stderr.isatty()
        self.history: list[dict] = []
        self.best: float | None = None
        self.resume_stage, self.resume_epoch = 0, 0
        self.resume_payload: dict | None = None
        self.pending_rng: dict | None = None
        self.epochs_this_call = 0
        self.steps = 0                        # optimiser steps in this call, all stages
        self.stopped: str | None = None       # "step" / "accuracy" once stop_at_step / stop_at_accuracy ended the run
        self.stop_evaluation: dict | None = None
        self.stop_check_seconds = 0.0         # per-step evaluations of stop_at_accuracy: not counted as training
        if config.stop_at_accuracy is not None and self.test_set is None:
            raise ValueError("stop_at_accuracy needs a test set: the run stops when the test accuracy reaches it")

    # --------------------------------------------------------------------------------------------------- flow

    def execute(self) -> RunResult:
        ckpt.seed_everything(self.config.seed)
        for stage in self.recipe.stages:
            stage.distiller.to(self.env.device)
        self._resume()
        completed = True
        for index, stage in enumerate(self.recipe.stages):
            if not self._run_stage(index, stage):
                completed = self.stopped is not None   # stopped for good, not paused to be resumed
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
            self._restore_finished_stage(index, stage, epochs)
            return True
        continuing = index == self.resume_stage and self.resume_payload is not None and done > 0
        if not continuing:
            self._restore_pending_rng()
            if stage.before is not None:
                stage.before()
            if epochs == 0:
                return True
        offset = sum(self._stage_epochs(i) for i in range(index))
        run = prepare_stage(index, stage, epochs, offset, self.config, self.env, self.train_set, self.labels,
                            self.amp_dtype)
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
            if self.stopped is not None:
                row["stopped_at_step"] = self.steps
            self._after_epoch(run, epoch, row, force_checkpoint=stopping or self.stopped is not None)
            if stopping or self.stopped is not None:
                return False
        return True

    # ------------------------------------------------------------------------------------------------ training

    def _train_epoch(self, run: StageRun, epoch: int) -> dict:
        config = self.config
        run.sampler.set_epoch(run.offset + epoch)
        set_dataset_epoch(getattr(run.loader, "dataset", None), run.offset + epoch)
        run.loader.generator.manual_seed(stream_seed(config.seed, LOADER_STREAM, run.offset + epoch))
        run.distiller.train()
        mixing = None
        if config.mixup_alpha > 0:
            mixing = mixup_generator(config.seed, run.offset + epoch, self.env.rank)
        sums = EpochSums()
        lr = run.optimizer.param_groups[0]["lr"]
        bar = progress_bar(run.steps_per_epoch, f"{run.stage.name} {epoch}/{run.epochs}", self.show_progress)
        start, checks_before = time.perf_counter(), self.stop_check_seconds
        try:
            for group in grouped(run.loader, config.grad_accum):
                optimizer_step(run, group, epoch, config, self.env, mixing, sums)
                self.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sums.loss / max(sums.rows, 1):.4f}")
                if self._stops_here(run):
                    break
        finally:
            bar.close()
        seconds = time.perf_counter() - start - (self.stop_check_seconds - checks_before)
        return {"stage_index": run.index, "stage": run.stage.name, "epoch": epoch, "lr": lr,
                **sums.means(self.env), **(run.meta.logged() if run.meta is not None else {}),
                "seconds": seconds, "loss_seconds": sums.loss_seconds}

    def _stops_here(self, run: StageRun) -> bool:
        """Whether ``stop_at_step`` or ``stop_at_accuracy`` ends the run after the step just taken (the accuracy is
        the exported model's, evaluated after every step of the last stage)."""
        config = self.config
        if config.stop_at_step is not None and self.steps >= config.stop_at_step:
            self.stopped = "step"
        elif config.stop_at_accuracy is not None and run.index == len(self.recipe.stages) - 1:
            start = time.perf_counter()
            evaluation = self.evaluator(run.distiller)
            self.stop_check_seconds += time.perf_counter() - start
            key = self._exported_key()
            if key not in evaluation:
                raise ValueError(f"stop_at_accuracy needs the exported model's test accuracy ({key!r}); the "
                                 f"evaluation with metrics {list(config.metrics)} has {sorted(evaluation)}")
            if evaluation[key] >= config.stop_at_accuracy:
                self.stopped, self.stop_evaluation = "accuracy", evaluation
        return self.stopped is not None

    def _evaluate(self, run: StageRun, epoch: int) -> dict:
        """The task metrics (``test_<key>_<model>``) of each evaluated model, every ``eval_every`` epochs, at the
        stage's end and where the run stopped."""
        if self.stopped is not None and self.evaluator is not None:
            return self.stop_evaluation or self.evaluator(run.distiller)
        if self.evaluator is None or (epoch % self.config.eval_every and epoch != run.epochs):
            return {}
        return self.evaluator(run.distiller)

    # -------------------------------------------------------------------------------------------------- output

    def _exported_key(self) -> str:
        return f"{metrics.ACCURACY_PREFIX}{self.recipe.stages[-1].distiller.evaluate[0]}"

    def _after_epoch(self, run: StageRun, epoch: int, row: dict, force_checkpoint: bool) -> None:
        """Best accuracy, checkpoints and metrics files after an epoch."""
        accuracy = row.get(self._exported_key()) if run.index == len(self.recipe.stages) - 1 else None
        improved = accuracy is not None and (self.best is None or accuracy > self.best)
        if improved:
            self.best = accuracy
        if self.out_dir is None:
            return
        periodic = epoch % self.config.checkpoint_every == 0 or epoch == run.epochs
        if periodic or improved or force_checkpoint:
            rng_per_rank = ckpt.rng_per_rank(self.env.world_size)  # every rank takes part, rank 0 writes
            if self.writes:
                payload = ckpt.run_checkpoint(self.recipe, stage=run.index, epoch=epoch, run_state=run.state_dict(),
                                              rng_per_rank=rng_per_rank, history=self.history,
                                              best_accuracy=self.best, config=dataclasses.asdict(self.config))
                if periodic or force_checkpoint:
                    ckpt.save_checkpoint(self.out_dir / "last.pt", payload)
                if improved:
                    ckpt.save_checkpoint(self.out_dir / "best.pt", payload)
            barrier(self.env.world_size)  # no rank may read last.pt (a resume) before rank 0 has written it
        if self.writes:
            self._write_metrics()

    def _summary(self) -> dict:
        return metrics.summarize(self.history, method=self.recipe.method, last_stage=len(self.recipe.stages) - 1,
                                 exported_key=self._exported_key(), best_accuracy=self.best)

    def _write_metrics(self) -> dict[str, Path]:
        summary = {**self._summary(), "hyperparameters": self.recipe.hyperparameters,
                   "config": dataclasses.asdict(self.config)}
        return metrics.write_metrics(self.out_dir, self.history, summary)

    def _finish(self, completed: bool) -> RunResult:
        student = self.recipe.student
        student.eval()
        paths: dict[str, Path] = {}
        if self.writes:
            paths.update(self._write_metrics())
            paths["student"] = ckpt.export_student(student, self.out_dir)
            if self.history:
                paths.update(metrics.plot_run(self.history, self.out_dir, self.recipe.method))
            paths.update({name: self.out_dir / f"{name}.pt" for name in ("last", "best")
                          if (self.out_dir / f"{name}.pt").is_file()})
        return RunResult(history=list(self.history), student=student, paths=paths, completed=completed,
                         steps=self.steps, stopped=self.stopped, **self._summary())

    # -------------------------------------------------------------------------------------------------- resume

    def _resume(self) -> None:
        """Loads the checkpoint (if resuming): the stages up to its stage are set up again (their ``before``), the
        models and history are loaded; the stage's own state and the RNG are restored when training continues."""
        path = ckpt.resume_path(self.config.resume, self.out_dir)
        if path is None:
            return
        payload, self.pending_rng = ckpt.load_for_resume(path, self.recipe, self.env)
        self.resume_stage, self.resume_epoch = int(payload["stage"]), int(payload["epoch"])
        self.history = list(payload["history"])
        self.best = payload["best_accuracy"]
        self.resume_payload = payload

    def _restore_finished_stage(self, index: int, stage: Stage, epochs: int) -> None:
        """A stage finished before the checkpoint: the modules its terms own (a connector, FT's paraphraser, MHGD's
        attention networks) may serve a later stage, so they are built (on the stage's first batch, as when it ran)
        and loaded from the checkpoint. The RNG draws this takes are undone when the next stage restores its RNG."""
        state = self.resume_payload.get("terms", {}).get(str(index)) if self.resume_payload else None
        if not state or epochs == 0:
            return
        offset = sum(self._stage_epochs(i) for i in range(index))
        rebuild_finished_stage(stage, offset, self.config, self.env, self.train_set, self.labels)
        stage.distiller.terms.load_state_dict(state)

    def _restore_pending_rng(self) -> None:
        if self.pending_rng is not None:
            ckpt.restore_rng(self.pending_rng)
            self.pending_rng = None
