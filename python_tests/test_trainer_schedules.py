"""The trainer's learning-rate schedules (kdkernels.distill.schedules): the per-step factors, and the LR a run
records per epoch."""
import math

import pytest

from kdkernels.distill.schedules import lr_lambda
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, kd_recipe, small_split


def test_lr_schedules_with_warmup():
    cosine = lr_lambda(TrainConfig(schedule="cosine", warmup_epochs=1), epochs=3, steps_per_epoch=2)
    assert [cosine(s) for s in range(6)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    step = lr_lambda(TrainConfig(schedule="step", step_size=1, gamma=0.5), epochs=3, steps_per_epoch=2)
    assert [step(s) for s in range(6)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    multistep = lr_lambda(TrainConfig(schedule="multistep", milestones=(2,), gamma=0.1), epochs=3, steps_per_epoch=2)
    assert [multistep(s) for s in range(6)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1])
    constant = lr_lambda(TrainConfig(schedule="constant"), epochs=3, steps_per_epoch=2)
    assert {constant(s) for s in range(6)} == {1.0}


def test_history_lr_follows_the_schedule_per_step():
    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, schedule="multistep", milestones=(1, 2), gamma=0.5,
                         **QUIET)
    result = Trainer(config).fit(kd_recipe(), small_split().train)
    assert [row["lr"] for row in result.history] == pytest.approx([0.1, 0.05, 0.025])
