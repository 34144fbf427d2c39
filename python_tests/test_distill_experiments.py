"""The experiment settings of the seed studies (issue 13, mechanism 9): a poor teacher stopped at a step budget or a
target accuracy (the trainer's ``stop_at_step`` / ``stop_at_accuracy``), a long-tailed digits training set, a
label-smoothed teacher and reversed KD, through the Python API and ``kdkernels distill``."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from kdkernels import distill
from kdkernels.distill.data import long_tailed_counts


@functools.lru_cache(maxsize=None)
def small_split():
    return distill.load_digits(train_size=160, seed=0)


def ce_run(**config):
    """A student-cnn trained with cross-entropy on 160 digits, 32 per batch (5 steps an epoch)."""
    torch.manual_seed(0)
    model = distill.digits_model("student-cnn")
    recipe = distill.build_recipe("ce", distill.Setup(student=model, num_classes=10))
    config = {"epochs": 3, "batch_size": 32, "progress": False, "device": "cpu", **config}
    return distill.Trainer(distill.TrainConfig(**config)).fit(recipe, small_split().train, small_split().test)


# ------------------------------------------------------------------------------------------ trainer: stopping


def test_stop_at_step_ends_the_run_mid_epoch_and_evaluates_there():
    result = ce_run(stop_at_step=7)
    assert result.steps == 7 and result.stopped == "step" and result.completed
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[-1]["stopped_at_step"] == 7 and "stopped_at_step" not in result.history[0]
    assert result.accuracy == result.history[-1]["test_acc_student"]
    full = ce_run()
    assert full.steps == 15 and full.stopped is None


def test_stop_at_step_leaves_the_model_of_the_uninterrupted_run_at_that_step():
    """The schedule spans the configured epochs: stopping at step 5 gives the model a full run has after epoch 1."""
    stopped, full = ce_run(stop_at_step=5), ce_run(epochs=3, stop_after_epochs=1)
    for a, b in zip(stopped.student.state_dict().values(), full.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stop_at_accuracy_stops_at_the_first_step_that_reaches_it():
    result = ce_run(epochs=4, stop_at_accuracy=40.0)
    assert result.stopped == "accuracy" and result.accuracy >= 40.0
    assert result.history[-1]["stopped_at_step"] == result.steps < 20
    previous = ce_run(epochs=4, stop_at_step=result.steps - 1)   # one step earlier it was below the target
    assert previous.accuracy < 40.0


def test_an_unreached_accuracy_target_trains_the_whole_run():
    result = ce_run(epochs=1, stop_at_accuracy=100.0)
    assert result.stopped is None and result.steps == 5 and result.accuracy < 100.0


@pytest.mark.parametrize("config, error, message", [
    ({"stop_at_step": 0}, ValueError, "stop_at_step must be a positive integer"),
    ({"stop_at_accuracy": 0.0}, ValueError, r"stop_at_accuracy must be in \(0, 100\]"),
    ({"stop_at_accuracy": 101}, ValueError, r"stop_at_accuracy must be in \(0, 100\]"),
    ({"stop_at_accuracy": "90"}, TypeError, "stop_at_accuracy must be a number"),
    ({"stop_at_step": 3, "resume": True}, ValueError, "stop_at_step ends a run for good.*resume"),
    ({"stop_at_accuracy": 90, "stop_after_epochs": 1}, ValueError, "stop_at_accuracy .*stop_after_epochs"),
])
def test_bad_stop_settings_name_the_argument(config, error, message):
    with pytest.raises(error, match=message):
        distill.TrainConfig(**config)


def test_stop_at_accuracy_needs_a_test_set():
    recipe = distill.build_recipe("ce", distill.Setup(student=distill.digits_model("student-cnn"), num_classes=10))
    with pytest.raises(ValueError, match="stop_at_accuracy needs a test set"):
        distill.Trainer(distill.TrainConfig(stop_at_accuracy=50, progress=False)).fit(recipe, small_split().train)


# ------------------------------------------------------------------------------------- long-tailed digits


@pytest.mark.parametrize("train_size, ratio", [(None, 10.0), (300, 10.0), (300, 3.0), (200, 1.0)])
def test_long_tailed_class_counts_follow_the_exponential_profile(train_size, ratio):
    balanced = distill.load_digits(train_size=train_size, seed=2)
    tailed = distill.load_digits(train_size=train_size, seed=2, imbalance_ratio=ratio)
    n_max = int(np.bincount(balanced.train.labels).min())
    expected = [int(np.floor(n_max * ratio ** (-c / 9) + 1e-9)) for c in range(10)]
    assert np.bincount(tailed.train.labels, minlength=10).tolist() == expected
    assert expected[0] == n_max and expected[-1] == int(n_max / ratio + 1e-9)
    # a subset of the balanced set of the same seed, with its standardisation: the test split is untouched
    kept = {tuple(x.flatten().tolist()) for x in balanced.train.inputs}
    assert all(tuple(x.flatten().tolist()) in kept for x in tailed.train.inputs)
    torch.testing.assert_close(tailed.test.inputs, balanced.test.inputs, rtol=0, atol=0)
    torch.testing.assert_close(tailed.test.targets, balanced.test.targets, rtol=0, atol=0)


def test_long_tailed_counts_match_the_ldam_formula():
    assert long_tailed_counts(5000, 100, 10) == [int(5000 * 0.01 ** (c / 9)) for c in range(10)]
    assert long_tailed_counts(30, 3, 10)[-1] == 10          # 30·3^-1 is 9.999… in floating point
    assert long_tailed_counts(30, 1, 10) == [30] * 10


def test_long_tailed_digits_are_deterministic_given_the_seed():
    first, again = (distill.load_digits(train_size=300, seed=5, imbalance_ratio=5) for _ in range(2))
    torch.testing.assert_close(first.train.inputs, again.train.inputs, rtol=0, atol=0)
    other = distill.load_digits(train_size=300, seed=6, imbalance_ratio=5)
    assert not torch.equal(first.train.targets, other.train.targets) or \
        not torch.equal(first.train.inputs, other.train.inputs)


@pytest.mark.parametrize("ratio, error, message", [
    (0.5, ValueError, "imbalance_ratio must be >= 1"),
    (float("inf"), ValueError, "imbalance_ratio must be >= 1 and finite"),
    ("10", TypeError, "imbalance_ratio must be a real number"),
    (40, ValueError, "imbalance_ratio 40 leaves the last class no image"),
])
def test_bad_imbalance_ratios_name_the_argument(ratio, error, message):
    with pytest.raises(error, match=message):
        distill.load_digits(train_size=100, imbalance_ratio=ratio)
