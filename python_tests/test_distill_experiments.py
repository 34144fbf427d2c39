"""The experiment settings of the seed studies (issue 13, mechanism 9): a poor teacher stopped at a step budget or a
target accuracy (the trainer's ``stop_at_step`` / ``stop_at_accuracy``), a long-tailed digits training set, a
label-smoothed teacher and reversed KD, through the Python API and ``kdkernels distill``."""
from __future__ import annotations

import functools
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distill_testing import first_step
from kdkernels import cli, distill
from kdkernels.distill import experiment as experiment_module
from kdkernels.distill.data import long_tailed_counts
from kdkernels.distill.experiment import DigitsExperiment, digits_setup, fit_teacher, teacher_recipe


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


# -------------------------------------------------------------------------------------- the digits runner


def tiny_config(**config):
    return distill.TrainConfig(**{"epochs": 1, "batch_size": 64, "progress": False, "device": "cpu", **config})


def test_a_poor_teacher_stops_at_its_step_budget_and_reports_the_accuracy_reached():
    experiment = DigitsExperiment(teacher="student-cnn", teacher_epochs=2, teacher_steps=3)
    trained = fit_teacher(experiment, tiny_config(), seed=0)
    assert (trained.steps, trained.stopped) == (3, "step")
    assert 0.0 <= trained.accuracy <= 100.0
    assert trained.describe(experiment).endswith("after 3 steps (the step budget)")


def test_a_poor_teacher_stops_at_its_target_accuracy():
    experiment = DigitsExperiment(teacher="student-cnn", teacher_epochs=3, teacher_target_accuracy=25.0)
    trained = fit_teacher(experiment, tiny_config(lr=0.1), seed=0)
    assert trained.stopped == "accuracy" and trained.accuracy >= 25.0 and trained.steps < 60
    assert "reached the 25% target" in trained.describe(experiment)


def test_a_step_budget_the_whole_training_never_reaches_is_an_error():
    experiment = DigitsExperiment(teacher="student-cnn", teacher_epochs=1, teacher_steps=21)   # 20 steps an epoch
    with pytest.raises(ValueError, match=r"teacher_steps \(21\) exceeds the teacher's whole training \(1 epochs "
                                         r"of 20 steps = 20\)"):
        fit_teacher(experiment, tiny_config(), seed=0)


def test_the_teacher_settings_reach_its_trainer_and_its_cache_key(monkeypatch, tmp_path):
    seen = []

    class FakeTrainer:
        def __init__(self, config):
            self.config = config

        def fit(self, recipe, train, test):
            seen.append((self.config, recipe, len(train)))
            return SimpleNamespace(accuracy=50.0, steps=7, stopped="accuracy")

    monkeypatch.setattr(experiment_module, "Trainer", FakeTrainer)
    experiment = DigitsExperiment(teacher="student-cnn", teacher_epochs=2, teacher_steps=9,
                                  teacher_target_accuracy=80.0, teacher_label_smoothing=0.2, imbalance_ratio=10,
                                  cache_dir=str(tmp_path))
    trained = fit_teacher(experiment, tiny_config(stop_after_epochs=1, resume=False), seed=3)
    config, recipe, train_size = seen[0]
    assert (config.epochs, config.seed, config.stop_at_step, config.stop_at_accuracy) == (2, 3, 9, 80.0)
    assert config.stop_after_epochs is None and config.mixup_alpha == 0.0
    assert recipe.stages[0].distiller.terms[0].label_smoothing == 0.2
    assert train_size == len(distill.load_digits().train)        # the teacher's split stays full and balanced
    assert (trained.accuracy, trained.steps, trained.stopped) == (50.0, 7, "accuracy")
    cached = fit_teacher(experiment, tiny_config(), seed=3)      # from the cache: no second training
    assert len(seen) == 1 and (cached.steps, cached.stopped) == (7, "accuracy")
    plain = experiment_module._teacher_cache_path(DigitsExperiment(cache_dir=str(tmp_path)), tiny_config(), 3)
    assert plain != experiment_module._teacher_cache_path(experiment, tiny_config(), 3)


def test_the_label_smoothed_teacher_minimises_the_smoothed_cross_entropy():
    """(1 − ε)·CE + ε·mean_c(−log p_c), i.e. CE against (1 − ε)·onehot + ε/C, by hand on one batch."""
    epsilon = 0.2
    experiment = DigitsExperiment(teacher_label_smoothing=epsilon)
    _, batch, values, output = first_step(teacher_recipe(experiment, distill.digits_model("teacher-cnn")))
    log_p = torch.log_softmax(values["student"].double(), dim=-1)
    targets = torch.full_like(log_p, epsilon / 10).scatter_(1, batch["target"][:, None], 1 - epsilon + epsilon / 10)
    expected = -(targets * log_p).sum(-1).mean()
    torch.testing.assert_close(output.loss.double(), expected, rtol=1e-5, atol=1e-6)
    plain = first_step(teacher_recipe(DigitsExperiment(), distill.digits_model("teacher-cnn")))
    assert plain[0].terms[0].label_smoothing == 0.0


def test_reversed_kd_swaps_the_teacher_and_student_models():
    experiment = DigitsExperiment(train_size=100).reversed()
    assert (experiment.student, experiment.teacher) == ("teacher-cnn", "student-cnn")
    assert experiment.reversed() == DigitsExperiment(train_size=100)
    setup = digits_setup(experiment, [distill.digits_model(experiment.teacher)], seed=0)
    widths = lambda model: [model.stage1[0].out_channels, model.stage2[0].out_channels, model.stage3[0].out_channels]
    assert widths(setup.student) == [32, 64, 128] and widths(setup.teachers[0]) == [4, 8, 16]
    assert len(setup.train_labels) == 100


@pytest.mark.parametrize("settings, error, message", [
    ({"teacher_steps": 0}, ValueError, "DigitsExperiment: teacher_steps must be an int >= 1, got 0"),
    ({"teacher_steps": 2.5}, TypeError, "teacher_steps must be an int"),
    ({"teacher_target_accuracy": 0}, ValueError, r"teacher_target_accuracy must be in \(0, 100\]"),
    ({"teacher_target_accuracy": 100.5}, ValueError, r"teacher_target_accuracy must be in \(0, 100\]"),
    ({"teacher_label_smoothing": 1.0}, ValueError, r"teacher_label_smoothing must be in \[0, 1\)"),
    ({"teacher_label_smoothing": -0.1}, ValueError, r"teacher_label_smoothing must be in \[0, 1\)"),
    ({"imbalance_ratio": 0.5}, ValueError, "imbalance_ratio must be >= 1"),
])
def test_bad_experiment_settings_name_the_setting(settings, error, message):
    with pytest.raises(error, match=message):
        DigitsExperiment(**settings)


# ------------------------------------------------------------------------------------------- the command line


def test_the_command_line_settings_reach_the_experiment(tmp_path, capsys):
    assert cli.main(["distill", "--method", "kd", "--student", "student-mlp", "--teacher", "student-cnn",
                     "--epochs", "1", "--teacher-epochs", "1", "--train-size", "100", "--batch-size", "32",
                     "--teacher-steps", "4", "--teacher-target-accuracy", "99", "--teacher-label-smoothing", "0.1",
                     "--imbalance-ratio", "3", "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert {key: result["experiment"][key] for key in ("teacher_steps", "teacher_target_accuracy",
                                                       "teacher_label_smoothing", "imbalance_ratio")} == {
        "teacher_steps": 4, "teacher_target_accuracy": 99.0, "teacher_label_smoothing": 0.1, "imbalance_ratio": 3.0}
    assert result["teachers"][0]["steps"] == 4 and result["teachers"][0]["stopped"] == "step"
    assert result["reversed"] is False
    assert "teacher 0 (student-cnn): " in capsys.readouterr().out


def test_reversed_on_the_command_line(tmp_path, capsys):
    assert cli.main(["distill", "--method", "kd", "--reversed", "--epochs", "1", "--teacher-epochs", "1",
                     "--teacher-steps", "2", "--train-size", "40", "--batch-size", "20", "--no-progress",
                     "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["reversed"] is True
    assert (result["experiment"]["student"], result["experiment"]["teacher"]) == ("teacher-cnn", "student-cnn")
    assert result["teachers"][0]["model"] == "student-cnn"


@pytest.mark.parametrize("arguments, message", [
    (["--teacher-steps", "0"], "--teacher-steps must be an int >= 1, got 0"),
    (["--teacher-target-accuracy", "0"], r"--teacher-target-accuracy must be in \(0, 100\]"),
    (["--teacher-target-accuracy", "120"], r"--teacher-target-accuracy must be in \(0, 100\]"),
    (["--teacher-label-smoothing", "1"], r"--teacher-label-smoothing must be in \[0, 1\)"),
    (["--imbalance-ratio", "0.5"], "--imbalance-ratio must be >= 1"),
    (["--teacher-steps", "500", "--teacher-epochs", "2"], r"--teacher-steps \(500\) exceeds .* --teacher-epochs"),
    (["--method", "ce", "--teacher-steps", "3"], "--teacher-steps: method 'ce' trains no teacher"),
    (["--method", "ce", "--teacher-label-smoothing", "0.1"], "--teacher-label-smoothing: method 'ce' trains no"),
    (["--method", "tfkd-self", "--reversed"], "--reversed swaps .* method 'tfkd-self'"),
    (["--method", "fsp", "--reversed"], "--reversed swaps .* method 'fsp'"),
])
def test_bad_experiment_settings_on_the_command_line(arguments, message, capsys):
    if "--method" not in arguments:
        arguments = ["--method", "kd", *arguments]
    assert cli.main(["distill", *arguments]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert re.search(message, error), error


def test_the_readme_s_experiment_settings_commands_parse():
    import argparse
    from pathlib import Path

    from kdkernels.distill import commands

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Experiment settings.**"):readme.index("## Backends")]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    parser = argparse.ArgumentParser()
    commands.add_parsers(parser.add_subparsers(dest="command"))
    lines = [line.split("#")[0].split()[1:] for line in block.splitlines() if line.strip()]
    assert len(lines) == 5
    for words in lines:
        parsed = parser.parse_args(words)
        assert parsed.command == "distill" and parsed.method == "kd"
