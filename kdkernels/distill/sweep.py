"""``kdkernels sweep``: several methods over several seeds, one ``kdkernels distill`` run each, and their comparison.

Run ``(method, seed)`` lives in ``OUT/<method>/seed-<seed>/`` (a ``NAME:PRESET`` entry in ``<NAME>-<PRESET>``) with
its checkpoints, metrics, resolved ``config.yaml`` and ``summary.json``. The sweep is resumable: a run whose
``summary.json`` exists is done and is read back, an interrupted one continues from its ``last.pt`` (exactly, as
``distill --resume`` does), the others start. ``--stop-after-epochs N`` pauses the sweep at the first run that
does not finish within N epochs of this call, so a time-limited job reruns the same command until it is done. Teachers are trained once per seed and shared through
``OUT/teachers/`` (unless ``--teacher-cache`` says elsewhere). The comparison is the demo's: mean ± std test
accuracy over the seeds, the difference to ``ce`` when it is swept, train time and loss share, written as
``OUT/sweep.md``, ``OUT/sweep.json`` (every run's numbers) and ``OUT/sweep.png`` (bars with error bars, a dot per
seed).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path
from typing import Callable

import torch

import kdkernels
from kdkernels._results import device_name
from kdkernels.distill.demo import (LEARNED_COLUMNS, REPRESENTATION_COLUMNS, markdown_table, method_and_preset, plot,
                                   summarise)

SUMMARY = "summary.json"


def run_folder(out: Path, entry: str, seed: int) -> Path:
    """``OUT/<method>/seed-<seed>``; a ``NAME:PRESET`` entry is the folder ``NAME-PRESET``."""
    return Path(out) / entry.replace(":", "-") / f"seed-{seed}"


def run_arguments(arguments: argparse.Namespace, entry: str, seed: int) -> argparse.Namespace:
    """The ``distill`` options of one run of the sweep: the sweep's options, this method, preset and seed, its own
    folder (resumed when it holds a checkpoint) and summary file, and the sweep's teacher cache."""
    method, preset = method_and_preset(entry)
    folder = run_folder(arguments.out, entry, seed)
    run = copy.copy(arguments)
    for name in ("methods", "seeds"):
        delattr(run, name)
    run.command, run.config = "distill", None
    run.method, run.preset, run.seed = method, preset, seed
    run.out, run.resume, run.json = folder, True, folder / SUMMARY
    run.teacher_cache = arguments.teacher_cache or Path(arguments.out) / "teachers"
    return run


def sweep_entries(arguments: argparse.Namespace) -> list[str]:
    return [entry.strip() for entry in (arguments.methods or "").split(",") if entry.strip()]


def run_sweep(arguments: argparse.Namespace, distill: Callable[[argparse.Namespace], int],
              log=print) -> dict | None:
    """Runs (or reads back) every run of the sweep with ``distill`` and returns the comparison report, or None when
    a run paused (``--stop-after-epochs``: rerunning the sweep continues it)."""
    entries = sweep_entries(arguments)
    seeds = list(range(arguments.seed, arguments.seed + arguments.seeds))
    started = time.perf_counter()
    summaries: dict[str, list[dict]] = {}
    for entry in entries:
        for seed in seeds:
            run = run_arguments(arguments, entry, seed)
            if run.json.is_file():
                log(f"{entry} seed {seed}: done, read from {run.json}")
            else:
                log(f"{entry} seed {seed}: {'resuming' if (run.out / 'last.pt').is_file() else 'running'} in "
                    f"{run.out}")
                status = distill(run)
                if status != 0:
                    raise RuntimeError(f"the run {entry} seed {seed} failed (exit status {status})")
                if not run.json.is_file():   # paused by --stop-after-epochs: the sweep pauses with it
                    return None
            summaries.setdefault(entry, []).append(json.loads(run.json.read_text()))
    return report_of(arguments, entries, seeds, summaries, time.perf_counter() - started)


def report_of(arguments: argparse.Namespace, entries: list[str], seeds: list[int],
              summaries: dict[str, list[dict]], seconds: float) -> dict:
    """The sweep's comparison in the demo's report format (so the demo's table and plot render it)."""
    methods = {}
    for entry in entries:
        runs = [{"seed": seed, "accuracy": summary["accuracy"], "best_accuracy": summary["best_accuracy"],
                 "train_seconds": summary["train_seconds"], "loss_share": summary["loss_share"],
                 "teachers": summary["teachers"], **learned_values(summary), **representation_values(summary)}
                for seed, summary in zip(seeds, summaries[entry])]
        methods[entry] = summarise(entry, runs)
    teachers = [teacher for runs in summaries.values() for summary in runs for teacher in summary["teachers"]]
    experiment = next(iter(summaries.values()))[0]["experiment"] if summaries else {}
    teacher_accuracies = [teacher["accuracy"] for teacher in teachers]
    return {
        "title": f"kdkernels sweep: {arguments.dataset}",
        "setting": {"dataset": arguments.dataset, "experiment": experiment, "epochs": arguments.epochs,
                    "batch_size": arguments.batch_size, "lr": arguments.lr, "methods": entries, "seeds": seeds},
        "teacher": {"model": experiment.get("teacher"),
                    "accuracy": sum(teacher_accuracies) / len(teacher_accuracies) if teachers else None,
                    "distinct": len(set(teacher_accuracies))},
        "methods": methods,
        "device": device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "kdkernels_version": kdkernels.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": seconds,
    }


def learned_values(summary: dict) -> dict:
    """``{"learned": {column: value}}`` of the learned hyperparameters a run logged in its last metrics row
    (:data:`~kdkernels.distill.demo.LEARNED_COLUMNS`: mkd's temperatures), or nothing."""
    last = summary["history"][-1] if summary["history"] else {}
    learned = {key: last[key] for key in LEARNED_COLUMNS if key in last}
    return {"learned": learned} if learned else {}


def representation_values(summary: dict) -> dict:
    """``{"representation": {"probe_acc": ..., "knn_acc": ...}}``: the run's linear-probe and k-NN test accuracies
    (:mod:`~kdkernels.distill.task_metrics`, of its evaluated model) when it measured them, or nothing."""
    found = {}
    for metric in REPRESENTATION_COLUMNS:
        values = [value for key, value in summary.get("evaluation", {}).items()
                  if key.startswith(f"test_{metric}") and value is not None]
        if values:
            found[metric] = values[0]
    return {"representation": found} if found else {}


def write_sweep(report: dict, out: Path) -> dict[str, Path]:
    """``OUT/sweep.json``, ``OUT/sweep.md`` and ``OUT/sweep.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "markdown": out / "sweep.md", "plot": out / "sweep.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(report))
    plot(report, paths["plot"])
    return paths
