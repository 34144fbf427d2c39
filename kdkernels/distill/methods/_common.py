"""Small helpers shared by the method builders."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from kdkernels.distill.distiller import Distiller
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.terms import Term


def single_stage(method: str, distiller: Distiller, **stage_options) -> Recipe:
    """A one-stage recipe named after the method."""
    return Recipe(method, [Stage(method, distiller, **stage_options)])


def offline(method: str, setup: Setup, terms: Sequence[Term], *, frozen_train_mode: bool = False,
            **stage_options) -> Recipe:
    """Student (trainable) and teacher (frozen, eval mode unless ``frozen_train_mode``), one stage."""
    teacher = setup.require_teacher(method)
    models: dict[str, nn.Module] = {"student": setup.student, "teacher": teacher}
    distiller = Distiller(models, terms, trainable=("student",),
                          frozen_train_mode=("teacher",) if frozen_train_mode else ())
    return single_stage(method, distiller, **stage_options)


def stage_tap(method: str, model: nn.Module, position: int, argument: str) -> str:
    """The model's ``feature_points`` stage at ``position`` (``-1``: the deepest); a ValueError naming the method,
    the model and the argument that sets the tap explicitly when the model declares too few stages (a ViT)."""
    stages = list(feature_points(model).stages)
    if len(stages) < (position + 1 if position >= 0 else -position):
        wanted = "its deepest stage" if position == -1 else f"stage {position}"
        raise ValueError(f"{method}: {type(model).__name__} declares {len(stages)} stage feature point(s) {stages} "
                         f"and the method reads {wanted}: pass {argument}=<tap path>")
    return stages[position]
