"""The teacher "sweet spot" study of ``kdkernels sweep``: teachers trained over a grid of minibatch sizes and epochs,
every method of the sweep distilled from each, and one table of student accuracy per teacher setting.

``--teacher-grid-batch-sizes 16,64 --teacher-grid-epochs 5,30`` runs the sweep once per (batch size, epochs) pair,
in ``OUT/teacher-b<B>-e<E>/`` (each a complete, resumable sweep with its own ``sweep.md``), and writes
``OUT/teacher-grid.md`` and ``teacher-grid.json``: a row per teacher setting with the teachers' test accuracy and
each method's mean ± std student accuracy, the best setting of each method in bold. A better teacher is not always
a better teacher *for distillation* (Cho & Hariharan, ICCV 2019, found early-stopped teachers distil better): the
table shows where the student's accuracy peaks on this data, the teacher-training "sweet spot".
"""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Callable

GRID_OPTIONS = ("teacher_grid_batch_sizes", "teacher_grid_epochs")


def grid_requested(arguments) -> bool:
    return any(getattr(arguments, name, None) for name in GRID_OPTIONS)


def teacher_settings(arguments) -> list[tuple[int, int]]:
    """The (batch size, epochs) pairs of the grid; an axis left out is the run's single value."""
    batch_sizes = arguments.teacher_grid_batch_sizes or [arguments.teacher_batch_size or arguments.batch_size]
    epochs = arguments.teacher_grid_epochs or [arguments.teacher_epochs]
    for flag, values in (("--teacher-grid-batch-sizes", batch_sizes), ("--teacher-grid-epochs", epochs)):
        if any(value is None or value < 1 for value in values):
            raise ValueError(f"{flag} must be positive integers, got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"{flag} repeats a value: {values}")
    return list(itertools.product(batch_sizes, epochs))


def setting_folder(out: Path, batch_size: int, epochs: int) -> Path:
    return Path(out) / f"teacher-b{batch_size}-e{epochs}"


def setting_arguments(arguments, batch_size: int, epochs: int):
    """The sweep options of one teacher setting: its batch size and epochs, its own folder, no grid."""
    run = copy.copy(arguments)
    for name in GRID_OPTIONS:
        setattr(run, name, None)
    run.teacher_batch_size, run.teacher_epochs = batch_size, epochs
    run.out = setting_folder(arguments.out, batch_size, epochs)
    return run


def run_teacher_grid(arguments, sweep: Callable[[object], dict | None], log=print) -> dict | None:
    """Runs ``sweep`` (the methods and seeds in one folder, returning their report) for every teacher setting and
    returns the grid's report, or None when a sweep paused (``--stop-after-epochs``: rerunning continues it)."""
    settings = []
    for batch_size, epochs in teacher_settings(arguments):
        log(f"teacher setting: batch size {batch_size}, {epochs} epochs")
        report = sweep(setting_arguments(arguments, batch_size, epochs))
        if report is None:
            return None
        settings.append({"teacher_batch_size": batch_size, "teacher_epochs": epochs,
                         "teacher_accuracy": report["teacher"]["accuracy"], "report": report})
    return {"title": f"kdkernels teacher grid: {arguments.dataset}", "settings": settings,
            "methods": list(settings[0]["report"]["methods"]) if settings else []}


def markdown_grid(grid: dict) -> str:
    """The grid as a markdown table: a row per teacher setting, a column per method (mean ± std over the seeds),
    each method's best setting in bold."""
    methods, settings = grid["methods"], grid["settings"]
    best = {name: max(setting["report"]["methods"][name]["mean"] for setting in settings) for name in methods}
    first = settings[0]["report"]
    lines = [f"# {grid['title']}, {first['device']}", "",
             f"torch {first['torch_version']}, kdkernels {first['kdkernels_version']}, {first['threads']} threads. "
             f"Students: {first['setting']['experiment'].get('student')}, {first['setting']['epochs']} epochs, "
             f"{len(first['setting']['seeds'])} seed(s); teachers: {first['teacher']['model']} trained with each "
             "batch size and epoch count (the student's test accuracy, mean ± std; the best setting of each method "
             "in bold).", "",
             "| teacher batch | teacher epochs | teacher accuracy | " + " | ".join(methods) + " |",
             "|---:|---:|---:|" + "---:|" * len(methods)]
    for setting in settings:
        cells = []
        for name in methods:
            summary = setting["report"]["methods"][name]
            text = f"{summary['mean']:.2f} ± {summary['std']:.2f}"
            cells.append(f"**{text}**" if summary["mean"] == best[name] else text)
        accuracy = setting["teacher_accuracy"]
        lines.append(f"| {setting['teacher_batch_size']} | {setting['teacher_epochs']} | "
                     + (f"{accuracy:.2f}" if accuracy is not None else "-") + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_grid(grid: dict, out: Path) -> dict[str, Path]:
    """``OUT/teacher-grid.json`` (every setting's full sweep report) and ``OUT/teacher-grid.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "teacher-grid.json", "markdown": out / "teacher-grid.md"}
    paths["json"].write_text(json.dumps(grid, indent=2) + "\n")
    paths["markdown"].write_text(markdown_grid(grid))
    return paths
