"""The trainer layer's commands: ``kdkernels list``, ``kdkernels distill`` and ``kdkernels demo``."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import tempfile
from pathlib import Path


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a plain process): the one that prints and writes summaries."""
    from kdkernels.distributed import rank_and_world_size

    rank, world_size = rank_and_world_size()
    return (rank if world_size > 1 else int(os.environ.get("RANK", "0"))) == 0


class UsageError(ValueError):
    """A bad command line (unknown method, preset or hyperparameter): reported without a traceback."""


def _checked_method(name: str, preset: str, overrides: dict):
    from kdkernels.distill.registry import get_method

    try:
        method = get_method(name)
        method.hyperparameters(preset)
        method.check_overrides(overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return method


def add_parsers(commands) -> None:
    listing = commands.add_parser("list", help="every distillation method with its category and paper")
    listing.add_argument("--category", help="only this category")
    listing.add_argument("--json", type=Path, help="also write the list as JSON here")

    run = commands.add_parser("distill", help="distil a digits student with any method (see `kdkernels list`)")
    run.add_argument("--method", required=True, help="a name from `kdkernels list`")
    run.add_argument("--preset", default="default", help="a preset of the method (default: official values)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                     help="override one hyperparameter (repeatable), e.g. --set temperature=2")
    run.add_argument("--dataset", default="digits", choices=["digits"], help="built-in data (digits)")
    run.add_argument("--epochs", type=int, default=30)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--lr", type=float, default=0.05)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--train-size", type=int, default=300, help="labelled training images for the student")
    run.add_argument("--student", default="student-cnn", help="digits zoo model of the student")
    run.add_argument("--teacher", help="digits zoo model of the teacher(s) (default: teacher-cnn, or what the method "
                     "is defined for: the student's architecture for tfkd-self, equal widths for fsp)")
    run.add_argument("--teacher-epochs", type=int, default=30)
    run.add_argument("--teachers", type=int, help="teachers to train (default: 3 for multi-teacher methods, else 1)")
    run.add_argument("--teacher-cache", type=Path, help="store trained teachers here and reuse them")
    settings = run.add_argument_group("experiment settings", "the settings the seed studies vary (see the README's "
                                      "'Experiment settings')")
    settings.add_argument("--teacher-steps", type=int, metavar="N",
                          help="a poor teacher: stop its training after N optimiser steps (defective KD)")
    settings.add_argument("--teacher-target-accuracy", type=float, metavar="P",
                          help="a poor teacher: stop its training once its test accuracy reaches P %%")
    settings.add_argument("--teacher-label-smoothing", type=float, default=0.0, metavar="EPS",
                          help="train the teacher with label-smoothed cross-entropy (targets (1-EPS)*onehot + EPS/C)")
    settings.add_argument("--reversed", action="store_true",
                          help="reversed KD: the --student model (trained on the full split) teaches the --teacher "
                          "model (trained on the subset)")
    settings.add_argument("--imbalance-ratio", type=float, metavar="RHO",
                          help="a long-tailed student subset: class c keeps n_max*RHO^(-c/9) images")
    run.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    run.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="MixUp-KD with Beta(ALPHA, ALPHA)")
    run.add_argument("--metrics", default="classification", metavar="NAME,NAME",
                     help="task metrics of the test-set evaluation, comma-separated (default: classification; e.g. "
                     "classification,linear_probe,knn); a method adds the ones its evaluation needs")
    run.add_argument("--out", type=Path, help="directory for checkpoints, metrics and curves")
    run.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    run.add_argument("--json", type=Path, help="write the result summary here")
    run.add_argument("--no-progress", action="store_true")

    demo = commands.add_parser("demo", help="the main job: teacher, baseline and distilled students on digits")
    demo.add_argument("--quick", action="store_true", help="a short run (3 methods, 1 seed, 2 epochs) for CI")
    demo.add_argument("--methods", help="comma-separated methods, each NAME or NAME:PRESET (default: a representative "
                      "set)")
    demo.add_argument("--seeds", type=int, help="number of seeds")
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--out", type=Path, help="output directory (default: benchmarks/results/<device>/; a temporary "
                      "directory with --quick)")
    demo.add_argument("--json", type=Path, help="where to write the JSON (default: OUT/demo.json)")


def list_command(arguments) -> int:
    from kdkernels.distill.registry import list_methods

    rows = [m for m in list_methods() if arguments.category in (None, m.category)]
    if not rows:
        print(f"no method in category {arguments.category!r}")
        return 1
    width = max(len(m.name) for m in rows)
    for method in rows:
        note = " [approximation]" if method.approximation else ""
        print(f"{method.name:<{width}}  {method.category:<13}  {method.paper}{note}")
    if arguments.json:
        arguments.json.write_text(json.dumps([
            {"name": m.name, "category": m.category, "paper": m.paper, "summary": m.summary,
             "approximation": m.approximation, "presets": sorted(m.presets)} for m in rows], indent=2) + "\n")
    return 0


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["temperature=2", "name=abc"]`` -> ``{"temperature": 2, "name": "abc"}`` (Python literals where possible)."""
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--set expects NAME=VALUE, got {item!r}")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[name] = text
    return overrides


SETTING_FLAGS = {"teacher_steps": "--teacher-steps", "teacher_target_accuracy": "--teacher-target-accuracy",
                 "teacher_label_smoothing": "--teacher-label-smoothing", "imbalance_ratio": "--imbalance-ratio"}


def _experiment(arguments, method):
    """The DigitsExperiment of a ``distill`` command line; bad settings and combinations are usage errors."""
    from kdkernels.distill.experiment import DigitsExperiment, check_settings, teacher_model_for

    settings = {name: getattr(arguments, name) for name in SETTING_FLAGS}
    try:
        check_settings(settings, "kdkernels distill", SETTING_FLAGS)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error).removeprefix("kdkernels distill: ")) from None
    teacher_flags = [SETTING_FLAGS[name] for name in ("teacher_steps", "teacher_target_accuracy",
                                                      "teacher_label_smoothing") if settings[name]]
    if teacher_flags and not method.needs_teacher:
        raise UsageError(f"{', '.join(teacher_flags)}: method {method.name!r} trains no teacher")
    if arguments.reversed and method.needs_teacher and method.teacher_architecture != "any":
        raise UsageError(f"--reversed swaps the teacher and student models, but method {method.name!r} defines its "
                         f"teacher's architecture from the student's ({method.teacher_architecture!r})")
    experiment = DigitsExperiment(student=arguments.student, train_size=arguments.train_size,
                                  teacher_epochs=arguments.teacher_epochs, cache_dir=arguments.teacher_cache,
                                  **settings)
    try:
        experiment.teacher = arguments.teacher or teacher_model_for(arguments.method, experiment)
        if arguments.teacher_steps is not None and method.needs_teacher:
            from kdkernels.distill.config import TrainConfig
            from kdkernels.distill.experiment import teacher_config

            teacher_config(experiment, TrainConfig(batch_size=arguments.batch_size), 0)   # a reachable budget
    except ValueError as error:
        raise UsageError(str(error).replace("teacher_steps", "--teacher-steps")
                         .replace("teacher_epochs", "--teacher-epochs")) from None
    return experiment.reversed() if arguments.reversed else experiment


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"classification,linear_probe"`` -> the checked task metric names (a usage error naming ``--metrics``)."""
    from kdkernels.distill import task_metrics

    try:
        return task_metrics.check_names(tuple(name.strip() for name in text.split(",") if name.strip()))
    except (TypeError, ValueError) as error:
        raise UsageError(f"--{error}") from None


def distill_command(arguments) -> int:
    overrides = parse_overrides(arguments.overrides)
    method = _checked_method(arguments.method, arguments.preset, overrides)
    metric_names = parse_metrics(arguments.metrics)
    from kdkernels.distill.experiment import distil_digits, fit_teacher
    from kdkernels.distill.config import TrainConfig

    experiment = _experiment(arguments, method)
    config = TrainConfig(epochs=arguments.epochs, batch_size=arguments.batch_size, lr=arguments.lr,
                         amp=arguments.amp, mixup_alpha=arguments.mixup, out_dir=arguments.out,
                         resume=arguments.resume, progress=not arguments.no_progress, seed=arguments.seed,
                         metrics=metric_names)
    teachers = []
    if method.needs_teacher:
        count = arguments.teachers or (3 if method.category == "multi-teacher" else 1)
        for index in range(count):
            trained = fit_teacher(experiment, config, seed=arguments.seed + index)
            if is_main_process():
                print(f"teacher {index} ({experiment.teacher}): {trained.describe(experiment)}")
            teachers.append(trained)
    result = distil_digits(arguments.method, experiment, config, [t.model for t in teachers], seed=arguments.seed,
                           preset=arguments.preset, overrides=overrides)
    if not is_main_process():
        return 0
    accuracy = "no" if result.accuracy is None else f"{result.accuracy:.2f}%"
    best = "" if result.best_accuracy is None else f" (best {result.best_accuracy:.2f}%)"
    representation = "".join(f", {key} {value:.2f}%" for key, value in result.evaluation.items()
                             if value is not None and key.startswith(("test_probe_acc", "test_knn_acc")))
    print(f"{arguments.method}: {accuracy} test accuracy{best}{representation}, "
          f"{result.train_seconds:.1f} s, {100 * result.loss_share:.1f}% of it in the loss")
    if arguments.json:
        summary = {"method": arguments.method, "preset": arguments.preset, "overrides": overrides,
                   "accuracy": result.accuracy, "best_accuracy": result.best_accuracy, "nll": result.nll,
                   "ece": result.ece, "teacher_agreement": result.teacher_agreement, "teacher_kl": result.teacher_kl,
                   "accuracies": result.accuracies, "evaluation": result.evaluation,
                   "train_seconds": result.train_seconds,
                   "loss_share": result.loss_share, "history": result.history,
                   "experiment": dataclasses.asdict(experiment), "reversed": arguments.reversed,
                   "teachers": [{"model": experiment.teacher, "accuracy": t.accuracy, "steps": t.steps,
                                 "stopped": t.stopped} for t in teachers]}
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def demo_command(arguments) -> int:
    from kdkernels.distill.demo import (DemoSettings, default_output_dir, markdown_table, method_and_preset, run_demo,
                                        write_outputs)

    settings = DemoSettings.quick() if arguments.quick else DemoSettings()
    if arguments.methods:
        settings.methods = tuple(name.strip() for name in arguments.methods.split(",") if name.strip())
    for entry in settings.methods:
        _checked_method(*method_and_preset(entry), {})
    if arguments.seeds:
        settings.seeds = tuple(range(arguments.seeds))
    if arguments.epochs:
        settings.epochs = arguments.epochs
    report = run_demo(settings)
    out_dir = arguments.out or (Path(tempfile.mkdtemp(prefix="kdkernels-demo-")) if arguments.quick
                                else default_output_dir())
    paths = write_outputs(report, out_dir, arguments.json)
    print()
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


COMMANDS = {"list": list_command, "distill": distill_command, "demo": demo_command}
