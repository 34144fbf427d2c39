"""Checkpoints of a training run: what a resumed run needs to continue exactly where the interrupted one stopped.

A checkpoint is written at the end of an epoch and holds the position (stage index, epochs done in that stage,
optimiser steps), the state of every model of the recipe (each shared model once), the current stage's distiller
(its terms' connectors and buffers such as memory banks), the optimiser, LR scheduler and AMP grad scaler, the RNG
states of torch, numpy and ``random``, and the metrics history. Files are written atomically (a temporary file then
``os.replace``), so an interrupted write never leaves a truncated ``last.pt``.

This module also finds the checkpoint a run resumes from (:func:`resume_path`) and loads it (:func:`load_for_resume`),
and exports the trained model (``student.pt``: its ``state_dict`` alone).

Checkpoints are this package's own files and hold numpy RNG state: they are loaded with ``weights_only=False``;
load only files you wrote.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from kdkernels.distill import pruning
from kdkernels.distill.environment import Environment, all_gather_objects
from kdkernels.distill.recipe import Recipe

FORMAT = 1


def rng_state() -> dict:
    """The states of torch's CPU (and CUDA, when available) generators, numpy's global generator and ``random``."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping) -> None:
    """Restores what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def rng_per_rank(world_size: int) -> list[dict]:
    """Every rank's RNG states (ranks draw differently, e.g. dropout over a short last batch); a collective under
    DDP: every rank takes part."""
    return all_gather_objects(rng_state(), world_size)


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy's global generator and ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def recipe_models(recipe: Recipe) -> dict[str, nn.Module]:
    """Every model of the recipe once, keyed ``"<stage index>/<model name>"`` by its first appearance (a model
    trained in one stage and frozen in the next is one entry)."""
    seen, result = set(), {}
    for index, stage in enumerate(recipe.stages):
        for name, model in stage.distiller.models.items():
            if id(model) not in seen:
                seen.add(id(model))
                result[f"{index}/{name}"] = model
    return result


def models_state(recipe: Recipe) -> dict[str, dict]:
    return {key: model.state_dict() for key, model in recipe_models(recipe).items()}


def terms_state(recipe: Recipe, stage: int) -> dict[str, dict]:
    """The state of the modules the terms own (connectors, a paraphraser...) of every stage up to ``stage``, keyed by
    stage index: a later stage may use what an earlier one trained."""
    return {str(index): recipe.stages[index].distiller.terms.state_dict() for index in range(stage + 1)}


def load_models_state(recipe: Recipe, states: Mapping[str, Mapping]) -> None:
    """Loads :func:`models_state` into the recipe's models; the recipe must have the same stages and models.
    Pruned weights (``torch.nn.utils.prune``'s ``<name>_orig`` and ``<name>_mask``) load into models that are not
    pruned yet, and every pruned weight is recomputed from what was loaded."""
    models = recipe_models(recipe)
    if set(models) != set(states):
        raise ValueError(f"the checkpoint's models {sorted(states)} do not match the recipe's {sorted(models)}")
    for key, model in models.items():
        pruning.prepare_pruned_parameters(model, states[key])
        model.load_state_dict(states[key])
        pruning.refresh_pruned_weights(model)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Writes ``payload`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kdkernels training checkpoint (format {FORMAT})")
    return payload


def check_matches(payload: Mapping, recipe: Recipe, path: str | os.PathLike) -> None:
    """A ValueError when the checkpoint was written by another method or stage layout than ``recipe``."""
    stages = [stage.name for stage in recipe.stages]
    if payload.get("method") != recipe.method or list(payload.get("stages", [])) != stages:
        raise ValueError(f"checkpoint {path} is of method {payload.get('method')!r} with stages "
                         f"{payload.get('stages')}, but the recipe is {recipe.method!r} with stages {stages}")


def run_checkpoint(recipe: Recipe, *, stage: int, epoch: int, run_state: dict, rng_per_rank: list[dict],
                   history: list[dict], best_accuracy: float | None, config: dict) -> dict:
    """The payload of a checkpoint after ``epoch`` epochs of stage ``stage`` (``run_state``: the stage's own state,
    ``rng_per_rank``: from :func:`rng_per_rank`, ``config``: the TrainConfig as a dict)."""
    return {"method": recipe.method, "stages": [s.name for s in recipe.stages], "stage": stage, "epoch": epoch,
            "models": models_state(recipe), "terms": terms_state(recipe, stage), "run": run_state, "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank,
            "history": list(history), "best_accuracy": best_accuracy, "student": recipe.student.state_dict(),
            "config": config}


def resume_path(resume: bool | str | os.PathLike | None, out_dir: Path | None) -> Path | None:
    """The checkpoint ``TrainConfig.resume`` names: None for False; ``out_dir/last.pt`` for True (None when it does
    not exist yet); else the path, which must exist."""
    if resume is False or resume is None:
        return None
    if resume is True:
        if out_dir is None:
            raise ValueError("resume=True resumes from out_dir/last.pt: set out_dir (or pass a checkpoint path)")
        path = out_dir / "last.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path


def load_for_resume(path: Path, recipe: Recipe, env: Environment) -> tuple[dict, dict]:
    """Loads the checkpoint at ``path`` into ``recipe``: the stages up to the checkpoint's stage are set up again
    (their ``before``), then every model is loaded. Returns the payload and this rank's RNG states (restored by the
    caller when training continues)."""
    payload = load_checkpoint(path, map_location=env.device)
    check_matches(payload, recipe, path)
    for stage in recipe.stages[: int(payload["stage"]) + 1]:
        if stage.before is not None:
            stage.before()
    load_models_state(recipe, payload["models"])
    per_rank = payload.get("rng_per_rank", [])
    return payload, per_rank[env.rank] if len(per_rank) == env.world_size else payload["rng"]


def export_student(student: nn.Module, out_dir: Path) -> Path:
    """Writes ``out_dir/student.pt``: the exported model's ``state_dict``."""
    path = out_dir / "student.pt"
    torch.save(student.state_dict(), path)
    return path
