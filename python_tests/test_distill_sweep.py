"""``kdkernels sweep`` (kdkernels.distill.sweep): one folder per method and seed, the comparison table, resume of a
sweep (finished runs read back, an interrupted one continued exactly), shared teachers and usage errors."""
import json

import pytest

from kdkernels.cli import main

QUICK = ["--epochs", "2", "--train-size", "50", "--batch-size", "16", "--teacher-epochs", "1", "--no-progress"]


def test_a_sweep_runs_each_method_and_seed_and_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--methods", "ce,kd", "--seeds", "2", "--out", str(out), *QUICK]) == 0
    for entry in ("ce", "kd"):
        for seed in (0, 1):
            summary = json.loads((out / entry / f"seed-{seed}" / "summary.json").read_text())
            assert len(summary["history"]) == 2 and (out / entry / f"seed-{seed}" / "config.yaml").is_file()
            assert summary["method"] == entry and summary["experiment"]["train_size"] == 50
    report = json.loads((out / "sweep.json").read_text())
    assert list(report["methods"]) == ["ce", "kd"] and report["setting"]["seeds"] == [0, 1]
    kd = report["methods"]["kd"]
    runs = [json.loads((out / "kd" / f"seed-{seed}" / "summary.json").read_text()) for seed in (0, 1)]
    assert kd["accuracies"] == [run["accuracy"] for run in runs]
    assert kd["mean"] == pytest.approx(sum(kd["accuracies"]) / 2)
    assert len(list((out / "teachers").iterdir())) == 2                  # one teacher per seed, shared by methods
    table = (out / "sweep.md").read_text()
    assert "| ce | baseline |" in table and "| kd | response |" in table
    assert (out / "sweep.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_a_paused_sweep_continues_where_it_stopped_and_equals_an_uninterrupted_one(tmp_path, capsys):
    """With --stop-after-epochs 1 each call trains one epoch of one run and pauses; rerunning the same command
    reads the finished runs back, resumes the paused one from its checkpoint, and ends with the uninterrupted
    sweep's numbers."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["sweep", "--methods", "ce,kd", "--out", str(whole), *QUICK]) == 0
    command = ["sweep", "--methods", "ce,kd", "--out", str(parts), "--stop-after-epochs", "1", *QUICK]
    calls = 0
    while not (parts / "sweep.json").is_file():
        capsys.readouterr()
        assert main(command) == 0 and calls < 6
        calls += 1
        if calls == 3:
            log = capsys.readouterr().out
            assert "ce seed 0: done" in log and "kd seed 0: resuming" in log
    assert calls == 3      # ce's first epoch; ce's second, then kd's first; kd's second and the table
    resumed = json.loads((parts / "sweep.json").read_text())["methods"]
    reference = json.loads((whole / "sweep.json").read_text())["methods"]
    for entry in ("ce", "kd"):
        assert resumed[entry]["accuracies"] == reference[entry]["accuracies"]
        histories = [json.loads((root / entry / "seed-0" / "summary.json").read_text())["history"]
                     for root in (parts, whole)]
        strip = lambda rows: [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]  # noqa: E731
        assert strip(histories[0]) == strip(histories[1])


@pytest.mark.parametrize("argv, message", [
    (["sweep"], "--methods is required"),
    (["sweep", "--methods", "kd,nope"], "unknown method 'nope'|no method 'nope'|nope"),
    (["sweep", "--methods", "kd", "--seeds", "0"], "--seeds must be >= 1"),
    (["sweep", "--methods", "ce,kd", "--set", "temperature=2"], "method 'ce' has no hyperparameter"),
])
def test_sweep_usage_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "s")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_a_teacher_grid_distils_from_each_batch_size_and_epoch_count(tmp_path, capsys):
    """The sweet-spot study: one sweep per (teacher batch size, teacher epochs), teachers trained with exactly those
    settings (their optimiser steps show it), and the grid table with each method's best setting in bold."""
    out = tmp_path / "grid"
    argv = ["sweep", "--methods", "kd", "--out", str(out), "--teacher-grid-batch-sizes", "32,128",
            "--teacher-grid-epochs", "1,2", *QUICK]
    assert main(argv) == 0
    grid = json.loads((out / "teacher-grid.json").read_text())
    pairs = [(s["teacher_batch_size"], s["teacher_epochs"]) for s in grid["settings"]]
    assert pairs == [(32, 1), (32, 2), (128, 1), (128, 2)]
    teacher_images = 1258                                  # digits' full training split, where teachers train
    for setting, (batch_size, epochs) in zip(grid["settings"], pairs):
        folder = out / f"teacher-b{batch_size}-e{epochs}"
        summary = json.loads((folder / "kd" / "seed-0" / "summary.json").read_text())
        assert summary["teachers"][0]["steps"] == -(-teacher_images // batch_size) * epochs
        assert setting["teacher_accuracy"] == summary["teachers"][0]["accuracy"]
        assert setting["report"]["methods"]["kd"]["accuracies"] == [summary["accuracy"]]
        assert (folder / "sweep.md").is_file()
    table = (out / "teacher-grid.md").read_text()
    means = [s["report"]["methods"]["kd"]["mean"] for s in grid["settings"]]
    assert table.count("**") == 2 * means.count(max(means)) and f"**{max(means):.2f} ± 0.00**" in table
    assert "| 128 | 2 |" in table
    capsys.readouterr()
    assert main(argv) == 0                                 # a rerun reads every run back
    assert capsys.readouterr().out.count(": done, read from") == 4


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--methods", "ce,kd", "--teacher-grid-epochs", "1,2"], r"\['ce'\] train no teacher"),
    (["sweep", "--methods", "kd", "--teacher-grid-epochs", "2,2"], "--teacher-grid-epochs repeats a value"),
    (["sweep", "--methods", "kd", "--teacher-grid-batch-sizes", "0,8"], "--teacher-grid-batch-sizes must be positive"),
    (["sweep", "--methods", "kd", "--teacher-batch-size", "0"], "--teacher-batch-size must be"),
    (["distill", "--method", "ce", "--teacher-batch-size", "8"], "--teacher-batch-size: method 'ce' trains no teacher"),
])
def test_teacher_grid_usage_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "s"), *QUICK]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
