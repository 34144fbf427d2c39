"""A run's metrics on disk: the per-epoch history as CSV and JSON, and a learning-curve plot.

The run's summary (:func:`summarize`) is what :class:`~kdkernels.distill.RunResult` and ``metrics.json`` report:
the exported model's last and best accuracy, its NLL, ECE, teacher agreement and teacher KL at its last evaluation,
the last evaluation of each model of the last stage, train time and the share of it spent in the loss terms.

History rows are dicts (stage, epoch, lr, train_loss, each term's mean, the test metrics ``test_<key>_<model>``
such as ``test_acc_<model>``, seconds); stages have different terms, so the CSV's columns are the union of the
rows' keys in order of first appearance and a value a row lacks is left empty. The plot uses matplotlib's Agg
canvas directly (no global backend switch).
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

TEST_PREFIX = "test_"
ACCURACY_PREFIX = "test_acc_"
# summary key -> the metric key of the exported model's value (history key test_<metric key>_<model>)
SUMMARY_METRICS = {"nll": "nll", "ece": "ece", "teacher_agreement": "agreement", "teacher_kl": "teacher_kl"}


def test_key(metric_key: str, model: str) -> str:
    """The history key of a task metric's value for a model: ``test_<metric key>_<model>``."""
    return f"{TEST_PREFIX}{metric_key}_{model}"


def columns(rows: Sequence[dict]) -> list[str]:
    """The union of the rows' keys, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _jsonable(value):
    """Values json cannot write (tensors, numpy values, paths, dtypes, functions) as numbers, lists or strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(payload: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


def summarize(history: Sequence[dict], *, method: str, last_stage: int, exported_key: str,
              best_accuracy: float | None) -> dict:
    """The run's summary from its history rows: the fields of RunResult other than history, student, paths and
    completed (``exported_key``: the history key of the exported model's accuracy, ``test_acc_<model>``).
    ``nll``, ``ece``, ``teacher_agreement`` and ``teacher_kl`` are the exported model's at the last evaluation
    (None when not measured); ``evaluation`` is that evaluation's every ``test_*`` value."""
    evaluated = [row for row in history if row["stage_index"] == last_stage
                 and any(key.startswith(TEST_PREFIX) for key in row)]
    last = evaluated[-1] if evaluated else {}
    accuracies = {key[len(ACCURACY_PREFIX):]: value for key, value in last.items() if key.startswith(ACCURACY_PREFIX)}
    exported = exported_key[len(ACCURACY_PREFIX):]
    train_seconds = sum(row["seconds"] for row in history)
    loss_seconds = sum(row["loss_seconds"] for row in history)
    return {"method": method, "accuracy": last.get(exported_key), "best_accuracy": best_accuracy,
            "accuracies": accuracies,
            **{name: last.get(test_key(key, exported)) for name, key in SUMMARY_METRICS.items()},
            "evaluation": {key: value for key, value in last.items() if key.startswith(TEST_PREFIX)},
            "train_seconds": train_seconds, "loss_seconds": loss_seconds,
            "loss_share": loss_seconds / train_seconds if train_seconds else 0.0}


def write_metrics(out_dir: Path, history: Sequence[dict], summary: dict) -> dict[str, Path]:
    """``metrics.csv`` (the history) and ``metrics.json`` (``summary`` and the history) in ``out_dir``."""
    return {"metrics_csv": write_csv(history, out_dir / "metrics.csv"),
            "metrics_json": write_json({**summary, "history": history}, out_dir / "metrics.json")}


def plot_run(history: Sequence[dict], out_dir: Path, title: str) -> dict[str, Path]:
    """``curves.png`` in ``out_dir`` (:func:`plot_curves`); nothing, with a warning, without matplotlib."""
    try:
        return {"curves": plot_curves(history, out_dir / "curves.png", title)}
    except ImportError:  # pragma: no cover - matplotlib is optional
        warnings.warn("matplotlib is not installed: no curves.png", stacklevel=3)
        return {}


def accuracy_keys(rows: Sequence[dict]) -> list[str]:
    return [key for key in columns(rows) if key.startswith(ACCURACY_PREFIX)]


def keys_with(rows: Sequence[dict], *prefixes: str) -> list[str]:
    return [key for key in columns(rows) if key.startswith(prefixes)]


# curves.png: the accuracy panel also draws teacher agreement (%, dashed); a third panel, when measured, NLL (solid)
# and ECE (dashed), one colour per model
PERCENT_STYLES = {ACCURACY_PREFIX: "-", "test_agreement_": "--"}
CALIBRATION_STYLES = {"test_nll_": "-", "test_ece_": "--"}


def plot_curves(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Train loss, test accuracy (and teacher agreement) and, when measured, test NLL and ECE per epoch over the
    whole run (epochs of all stages, one after the other; dotted lines mark where a stage starts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = list(range(1, len(rows) + 1))
    calibrated = bool(keys_with(rows, *CALIBRATION_STYLES))
    figure = Figure(figsize=(15 if calibrated else 10, 4))
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 3 if calibrated else 2)
    loss_axes, accuracy_axes = panels[:2]
    _plot_per_stage(loss_axes, x, rows, "train_loss", color="C0", label=None)
    loss_axes.set(xlabel="epoch", ylabel="train loss", title="train loss")
    colors: dict[str, str] = {}   # one colour per model across the panels
    groups = [(accuracy_axes, PERCENT_STYLES)] + ([(panels[2], CALIBRATION_STYLES)] if calibrated else [])
    for axes, styles in groups:
        for prefix, style in styles.items():
            for key in keys_with(rows, prefix):
                model = key[len(prefix):]
                _plot_per_stage(axes, x, rows, key, color=colors.setdefault(model, f"C{len(colors) % 10}"),
                                label=f"{prefix[len(TEST_PREFIX):-1]} {model}", linestyle=style)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    accuracy_axes.set(xlabel="epoch", ylabel="%", title="test accuracy (agreement dashed)")
    if calibrated:
        panels[-1].set(xlabel="epoch", ylabel="nats / fraction", title="test NLL (ECE dashed)")
    for axes in panels:
        _mark_stages(axes, rows)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _plot_per_stage(axes, x: list[int], rows: Sequence[dict], key: str, color: str, label: str | None,
                    linestyle: str = "-") -> None:
    """``key`` against ``x``, one line per stage (losses differ per stage, and a name such as "student" may be
    another model in the next stage), with one legend entry."""
    stages = dict.fromkeys(row.get("stage_index", row.get("stage")) for row in rows)
    for stage in stages:
        points = [(i, row[key]) for i, row in zip(x, rows)
                  if row.get(key) is not None and row.get("stage_index", row.get("stage")) == stage]
        if points:
            axes.plot(*zip(*points), marker=".", color=color, label=label, linestyle=linestyle)
            label = None


def _mark_stages(axes, rows: Sequence[dict]) -> None:
    previous = None
    for index, row in enumerate(rows, start=1):
        if previous is not None and row.get("stage") != previous:
            axes.axvline(index - 0.5, linestyle=":", color="grey")
        previous = row.get("stage")
