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
clipping, the distiller's views (:mod:`kdkernels.distill.views`: per-sample transforms added to each batch on the
device before the models run, drawn from (seed, epoch, step, sample index)), MixUp (any method: the mixed input goes
to every model reading ``"input"``, so teachers see what the student sees; it runs after the views), and
data-parallel training under ``torchrun`` (each rank takes every ``world_size``-th batch; the step's gradient is
DDP's average over ranks).

Evaluation (every ``eval_every`` epochs and at each stage's end, on the test set, exact under DDP): the task
metrics ``TrainConfig.metrics`` names (:mod:`~kdkernels.distill.task_metrics`; by default accuracy, NLL, ECE and,
with a model named ``"teacher"``, agreement and KL) of each evaluated model, as ``test_<key>_<model>``.

Outputs (rank 0, when ``out_dir`` is set): ``metrics.csv`` and ``metrics.json`` (updated every epoch),
``curves.png``, ``last.pt`` (every ``checkpoint_every`` epochs and at the end of each stage), ``best.pt`` (best test
accuracy of the exported model) and ``student.pt`` (the exported model's ``state_dict``). ``resume`` continues from
a checkpoint exactly as the uninterrupted run would have (bit for bit on CPU, also under DDP with the same number
of processes: every rank's RNG states are saved).

The trainer's modules, one job each: ``config`` (TrainConfig, RunResult), ``schedules`` (LR schedules, optimisers),
``precision`` (AMP), ``environment`` (device, DDP rank, reductions, seed streams), ``batches``, ``mixing`` (MixUp),
``stage`` (setting up a stage), ``step`` (one optimiser step), ``optimisers`` (several optimisers per stage,
step plans, gradient reversal), ``task_metrics`` (streaming metrics of sums),
``evaluation`` (test metrics), ``checkpoint``
(checkpoints, resume, export), ``metrics`` (summary, CSV/JSON, curves), ``progress`` and ``loop`` (the stages and
epochs of one :meth:`Trainer.fit`).
"""
from __future__ import annotations

from torch.utils.data import Dataset

from kdkernels.distill.config import RunResult, TrainConfig
from kdkernels.distill.loop import Run
from kdkernels.distill.recipe import Recipe

__all__ = ["Trainer", "TrainConfig", "RunResult"]


class Trainer:
    """Trains recipes with one :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig | None = None):
        self.config = config or TrainConfig()

    def fit(self, recipe: Recipe, train_set: Dataset, test_set: Dataset | None = None) -> RunResult:
        """Trains every stage of ``recipe`` on ``train_set``, evaluating on ``test_set``; see the module doc.

        Datasets yield ``{"input", "target", "index"}`` dicts or ``(input, target)`` pairs; a DataLoader is replaced
        by its dataset (the trainer batches itself: deterministic per (seed, epoch), sharded over ranks)."""
        return Run(self.config, recipe, train_set, test_set).execute()
