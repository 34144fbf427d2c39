"""The trainer layer's commands: ``kdkernels list``, ``kdkernels distill``, ``kdkernels sweep`` and
``kdkernels demo``."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import tempfile
from pathlib import Path

from kdkernels.distill.run_config import write_config
from kdkernels.distill.schedules import OPTIMIZERS, SCHEDULES
from kdkernels.distill.training_recipes import TRAINING_RECIPES


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


def int_list(text: str) -> tuple[int, ...]:
    """``"150,180,210"`` -> ``(150, 180, 210)`` (an empty string is no milestone)."""
    try:
        return tuple(int(item) for item in str(text).split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def resolve_training(arguments) -> None:
    """Fills the training options the command line and the config file left unset from ``--recipe`` (in place, so
    the resolved configuration written beside the results holds the values used)."""
    from kdkernels.distill.training_recipes import training_recipe

    for name, value in training_recipe(arguments.recipe, arguments.student).items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)


def train_config(arguments):
    """The TrainConfig of a resolved ``distill`` command line; bad values are usage errors naming the option."""
    from kdkernels.distill.config import TrainConfig

    try:
        return TrainConfig(epochs=arguments.epochs, batch_size=arguments.batch_size, optimizer=arguments.optimizer,
                           lr=arguments.lr, momentum=arguments.momentum, weight_decay=arguments.weight_decay,
                           schedule=arguments.schedule, milestones=tuple(arguments.milestones),
                           gamma=arguments.gamma, warmup_epochs=arguments.warmup_epochs,
                           grad_accum=arguments.grad_accum, clip_grad_norm=arguments.clip_grad_norm,
                           device=arguments.device, num_workers=arguments.workers, amp=arguments.amp,
                           channels_last={"on": True, "off": False}.get(arguments.channels_last, "auto"),
                           mixup_alpha=arguments.mixup, out_dir=arguments.out, resume=arguments.resume,
                           progress=not arguments.no_progress, seed=arguments.seed,
                           stop_after_epochs=arguments.stop_after_epochs, metrics=parse_metrics(arguments.metrics))
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def add_run_options(parser) -> None:
    """The options of one distillation run, shared by ``distill`` and ``sweep``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override one hyperparameter (repeatable), e.g. --set temperature=2")
    data = parser.add_argument_group("data and models")
    data.add_argument("--dataset", default="digits",
                      help="digits (bundled), cifar10, cifar100, imagefolder (DIR/train/<class>/*, DIR/val/<class>/*) "
                      "or module:function (a Python factory of (train, test) datasets)")
    data.add_argument("--data-dir", type=Path, help="where the dataset's files are (cifar10, cifar100, imagefolder)")
    data.add_argument("--image-size", type=int, help="imagefolder: the training crop and test centre crop (default "
                      "224)")
    data.add_argument("--teacher-weights", type=Path, help="a trained teacher's checkpoint (a state dict, or one "
                      "under 'model'/'state_dict' as RepDistiller and mdistiller save them): loaded, not trained")
    training = parser.add_argument_group("training", "the recipe's values unless given (see --recipe)")
    training.add_argument("--recipe", default="digits", choices=sorted(TRAINING_RECIPES),
                          help="optimiser and schedule of a protocol: digits (the demo's), cifar (mdistiller / "
                          "RepDistiller CIFAR-100: 240 epochs, ×0.1 at 150/180/210), imagenet (100 epochs, ×0.1 at "
                          "30/60/90)")
    training.add_argument("--epochs", type=int)
    training.add_argument("--batch-size", type=int)
    training.add_argument("--optimizer", choices=list(OPTIMIZERS))
    training.add_argument("--lr", type=float)
    training.add_argument("--momentum", type=float)
    training.add_argument("--weight-decay", type=float)
    training.add_argument("--schedule", choices=list(SCHEDULES))
    training.add_argument("--milestones", type=int_list, metavar="E1,E2,…", help="epochs of the multistep decays")
    training.add_argument("--gamma", type=float, help="the step and multistep decay factor")
    training.add_argument("--warmup-epochs", type=float, default=0.0)
    training.add_argument("--grad-accum", type=int, default=1)
    training.add_argument("--clip-grad-norm", type=float)
    training.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    training.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    training.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                          help="the channels-last memory format for 4-D weights and inputs (auto: on CUDA under AMP)")
    parser.add_argument("--train-size", type=int, help="labelled training images for the student, a per-class "
                        "subset (default: 300 of digits, all of the other datasets)")
    parser.add_argument("--student", help="the student's model (default on digits: student-cnn, or the "
                        "student the method is defined for: student-vit-distilled for deit, student-vit for manifold)")
    parser.add_argument("--teacher", help="the teacher's model (default on digits: teacher-cnn, or what the method "
                        "is defined for: the student's architecture for tfkd-self, equal widths for fsp, "
                        "teacher-vit for manifold)")
    parser.add_argument("--teacher-epochs", type=int, help="the teachers' epochs (default: the recipe's)")
    parser.add_argument("--teacher-seed", type=int, help="the first teacher's seed (default: the run's --seed; "
                        "teacher k gets it + k)")
    parser.add_argument("--teachers", type=int,
                        help="teachers to train (default: 3 for multi-teacher methods, else 1)")
    parser.add_argument("--teacher-cache", type=Path, help="store trained teachers here and reuse them")
    settings = parser.add_argument_group("experiment settings", "the settings the seed studies vary (see the README's "
                                         "'Experiment settings')")
    settings.add_argument("--teacher-steps", type=int, metavar="N",
                          help="a poor teacher: stop its training after N optimiser steps (defective KD)")
    settings.add_argument("--teacher-target-accuracy", type=float, metavar="P",
                          help="a poor teacher: stop its training once its test accuracy reaches P %%")
    settings.add_argument("--teacher-label-smoothing", type=float, default=0.0, metavar="EPS",
                          help="train the teacher with label-smoothed cross-entropy (targets (1-EPS)*onehot + EPS/C)")
    settings.add_argument("--teacher-batch-size", type=int, metavar="B",
                          help="the teachers' minibatch size (default: --batch-size)")
    settings.add_argument("--reversed", action="store_true",
                          help="reversed KD: the --student model (trained on the full split) teaches the --teacher "
                          "model (trained on the subset)")
    settings.add_argument("--imbalance-ratio", type=float, metavar="RHO",
                          help="a long-tailed student subset: class c keeps n_max*RHO^(-c/9) images")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="MixUp-KD with Beta(ALPHA, ALPHA)")
    parser.add_argument("--metrics", default="classification", metavar="NAME,NAME",
                        help="task metrics of the test-set evaluation, comma-separated (default: classification; e.g. "
                        "classification,linear_probe,knn); a method adds the ones its evaluation needs")
    parser.add_argument("--stop-after-epochs", type=int, metavar="N",
                        help="leave after N epochs with a resumable checkpoint (time-limited jobs; rerun with "
                        "--resume, or rerun the sweep, to continue)")
    parser.add_argument("--no-progress", action="store_true")


def add_parsers(commands) -> None:
    listing = commands.add_parser("list", help="every distillation method with its category and paper")
    listing.add_argument("--category", help="only this category")
    listing.add_argument("--json", type=Path, help="also write the list as JSON here")

    run = commands.add_parser("distill", help="distil a student with any method (see `kdkernels list`), on digits "
                              "or your own data")
    run.add_argument("--config", type=Path, help="a YAML file of these options (flags given here override it)")
    run.add_argument("--method", help="a name from `kdkernels list` (required, here or in --config)")
    run.add_argument("--preset", default="default", help="a preset of the method (default: official values)")
    add_run_options(run)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, help="directory for checkpoints, metrics and curves")
    run.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    run.add_argument("--json", type=Path, help="write the result summary here")

    sweep = commands.add_parser("sweep", help="several methods and seeds, one folder each (resumable), and their "
                                "comparison table")
    sweep.add_argument("--config", type=Path, help="a YAML file of these options (flags given here override it)")
    sweep.add_argument("--methods", help="comma-separated methods, each NAME or NAME:PRESET (required, here or in "
                       "--config)")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per method: --seed, --seed + 1, …")
    sweep.add_argument("--seed", type=int, default=0, help="the first seed")
    add_run_options(sweep)
    sweep.add_argument("--teacher-grid-batch-sizes", type=int_list, metavar="B1,B2,…",
                       help="the teacher sweet-spot study: train teachers with each of these batch sizes (and each "
                       "of --teacher-grid-epochs), distil every method from each, tabulate in OUT/teacher-grid.md")
    sweep.add_argument("--teacher-grid-epochs", type=int_list, metavar="E1,E2,…",
                       help="the teacher sweet-spot study: the teachers' epoch counts (see --teacher-grid-batch-sizes)")
    sweep.add_argument("--out", type=Path, default=Path("runs/sweep"),
                       help="the sweep's folder: OUT/<method>/seed-<k>/ per run, OUT/sweep.{md,json,png}")

    demo = commands.add_parser("demo", help="the main job: teacher, baseline and distilled students on digits")
    demo.add_argument("--quick", action="store_true", help="a short run (3 methods, 1 seed, 2 epochs) for CI")
    demo.add_argument("--methods", help="comma-separated methods, each NAME or NAME:PRESET (default: a representative "
                      "set)")
    demo.add_argument("--seeds", type=int, help="number of seeds")
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--out", type=Path, help="output directory (default: benchmarks/results/<device>/; a temporary "
                      "directory with --quick)")
    demo.add_argument("--json", type=Path, help="where to write the JSON (default: OUT/demo.json)")
    demo.add_argument("--runs", type=Path, help="keep each run's folder here (a rerun resumes; default: a temporary "
                      "directory)")
    demo.add_argument("--metrics", metavar="NAME,NAME",
                      help="task metrics of every run (default: classification; e.g. classification,linear_probe,knn "
                      "adds linear-probe and k-NN columns, for comparing self-supervised methods with ce)")


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
                 "teacher_label_smoothing": "--teacher-label-smoothing", "teacher_batch_size": "--teacher-batch-size",
                 "imbalance_ratio": "--imbalance-ratio"}


def _experiment(arguments, method):
    """The DigitsExperiment of a ``distill`` command line; bad settings and combinations are usage errors."""
    from kdkernels.distill.experiment import DigitsExperiment, check_settings, teacher_model_for

    settings = {name: getattr(arguments, name) for name in SETTING_FLAGS}
    try:
        check_settings(settings, "kdkernels distill", SETTING_FLAGS)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error).removeprefix("kdkernels distill: ")) from None
    teacher_flags = [SETTING_FLAGS[name] for name in ("teacher_steps", "teacher_target_accuracy",
                                                      "teacher_label_smoothing", "teacher_batch_size")
                     if settings[name]]
    if teacher_flags and not method.needs_teacher:
        raise UsageError(f"{', '.join(teacher_flags)}: method {method.name!r} trains no teacher")
    if arguments.reversed and method.needs_teacher and method.teacher_architecture != "any":
        raise UsageError(f"--reversed swaps the teacher and student models, but method {method.name!r} defines its "
                         f"teacher's architecture from the student's ({method.teacher_architecture!r})")
    digits = arguments.dataset == "digits"
    if not digits and not arguments.student:
        raise UsageError(f"--student is required with --dataset {arguments.dataset} (a model name, e.g. resnet8x4)")
    if not digits and method.needs_teacher and not arguments.teacher and method.teacher_architecture == "any":
        raise UsageError(f"--teacher is required with --dataset {arguments.dataset} for method {method.name!r} "
                         "(a model name, e.g. resnet32x4, and --teacher-weights to load it)")
    if arguments.teacher_weights is not None and not method.needs_teacher:
        raise UsageError(f"--teacher-weights: method {method.name!r} has no teacher")
    if arguments.teacher_weights is not None and arguments.reversed:
        raise UsageError("--teacher-weights does not combine with --reversed (which trains the swapped teacher)")
    try:
        experiment = DigitsExperiment(
            student=arguments.student or method.default_student or "student-cnn",
            train_size=arguments.train_size if arguments.train_size is not None or not digits else 300,
            teacher_epochs=arguments.teacher_epochs, cache_dir=arguments.teacher_cache, dataset=arguments.dataset,
            data_dir=arguments.data_dir, image_size=arguments.image_size,
            teacher_weights=arguments.teacher_weights, **settings)
        experiment.split()   # a bad dataset or directory fails here, before any training
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    if method.needs_teacher:   # the modality the method's teacher reads (privileged, cross-modal KD)
        experiment = experiment.for_method(method.name, arguments.preset, parse_overrides(arguments.overrides))
    try:
        experiment.teacher = arguments.teacher or teacher_model_for(arguments.method, experiment)
        if arguments.teacher_steps is not None and method.needs_teacher:
            from kdkernels.distill.config import TrainConfig
            from kdkernels.distill.experiment import teacher_config

            teacher_config(experiment, TrainConfig(batch_size=arguments.batch_size), 0)   # a reachable budget
        if experiment.teacher_weights is not None:   # a file that does not fit fails now, not after the set-up
            from kdkernels.distill.weights import load_weights

            load_weights(experiment.model(experiment.teacher), experiment.teacher_weights, allow_pickle=True)
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
    if not arguments.method:
        raise UsageError("--method is required (on the command line or in --config)")
    overrides = parse_overrides(arguments.overrides)
    method = _checked_method(arguments.method, arguments.preset, overrides)
    from kdkernels.distill.experiment import distil_digits, fit_teacher

    resolve_training(arguments)
    config = train_config(arguments)
    experiment = _experiment(arguments, method)
    teachers = []
    if method.needs_teacher:
        count = arguments.teachers or (3 if method.category == "multi-teacher" else 1)
        for index in range(count):
            first = arguments.seed if arguments.teacher_seed is None else arguments.teacher_seed
            trained = fit_teacher(experiment, config, seed=first + index)
            if is_main_process():
                print(f"teacher {index} ({experiment.teacher}): {trained.describe(experiment)}")
            teachers.append(trained)
    if arguments.out is not None and is_main_process():
        write_config(arguments, Path(arguments.out) / "config.yaml")
    result = distil_digits(arguments.method, experiment, config, [t.model for t in teachers], seed=arguments.seed,
                           preset=arguments.preset, overrides=overrides)
    if not is_main_process():
        return 0
    if not result.completed:
        print(f"{arguments.method}: paused after {len(result.history)} epoch(s) (--stop-after-epochs); continue "
              f"with --resume --out {arguments.out}")
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


def sweep_command(arguments) -> int:
    from kdkernels.distill import teacher_grid
    from kdkernels.distill.demo import markdown_table, method_and_preset
    from kdkernels.distill.registry import get_method
    from kdkernels.distill.sweep import run_arguments, run_sweep, sweep_entries, write_sweep

    entries = sweep_entries(arguments)
    if not entries:
        raise UsageError("--methods is required (on the command line or in --config): e.g. --methods ce,kd,dkd")
    if arguments.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {arguments.seeds}")
    overrides = parse_overrides(arguments.overrides)
    for entry in entries:
        _checked_method(*method_and_preset(entry), overrides)
    resolve_training(arguments)
    train_config(run_arguments(arguments, entries[0], arguments.seed))   # bad values fail before the first run
    if teacher_grid.grid_requested(arguments):
        try:
            teacher_grid.teacher_settings(arguments)
        except ValueError as error:
            raise UsageError(str(error)) from None
        teacherless = [entry for entry in entries if not get_method(method_and_preset(entry)[0]).needs_teacher]
        if teacherless:
            raise UsageError(f"--teacher-grid-batch-sizes/--teacher-grid-epochs vary the teacher, but {teacherless} "
                             "train no teacher: sweep them without the grid")
    if is_main_process():
        write_config(arguments, Path(arguments.out) / "config.yaml")
    log = print if is_main_process() else (lambda *_: None)
    if teacher_grid.grid_requested(arguments):
        return _teacher_grid_command(arguments, log)
    report = run_sweep(arguments, distill_command, log=log)
    if not is_main_process():
        return 0
    if report is None:
        print(f"sweep paused (--stop-after-epochs); rerun the same command to continue ({arguments.out})")
        return 0
    paths = write_sweep(report, arguments.out)
    print()
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _teacher_grid_command(arguments, log) -> int:
    """``kdkernels sweep`` with a teacher grid: one sweep per teacher setting, then the grid's table."""
    from kdkernels.distill import teacher_grid
    from kdkernels.distill.sweep import run_sweep, write_sweep

    def sweep(run_arguments_of_setting):
        report = run_sweep(run_arguments_of_setting, distill_command, log=log)
        if report is not None and is_main_process():
            write_sweep(report, run_arguments_of_setting.out)
        return report

    grid = teacher_grid.run_teacher_grid(arguments, sweep, log=log)
    if not is_main_process():
        return 0
    if grid is None:
        print(f"sweep paused (--stop-after-epochs); rerun the same command to continue ({arguments.out})")
        return 0
    paths = teacher_grid.write_grid(grid, arguments.out)
    print()
    print(teacher_grid.markdown_grid(grid))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
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
    if arguments.metrics:
        parse_metrics(arguments.metrics)
        settings.metrics = arguments.metrics
    report = run_demo(settings, runs=arguments.runs)
    out_dir = arguments.out or (Path(tempfile.mkdtemp(prefix="kdkernels-demo-")) if arguments.quick
                                else default_output_dir())
    paths = write_outputs(report, out_dir, arguments.json)
    print()
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


COMMANDS = {"list": list_command, "distill": distill_command, "sweep": sweep_command, "demo": demo_command}
