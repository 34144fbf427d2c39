"""The strategy registry: every method's name, category, paper, presets and builder.

A method is a function ``build(setup: Setup, **hyperparameters) -> Recipe`` registered with :func:`register`. Its
keyword defaults are the official hyperparameters (the ``"default"`` preset); other presets override some of them
(e.g. DKD's per-pair CIFAR betas). :func:`build_recipe` merges preset and overrides and rejects unknown names.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import Callable, Mapping

from kdkernels.distill.recipe import Recipe, Setup

CATEGORIES = ("baseline", "response", "feature", "relation", "online", "self", "self-supervised", "adversarial",
              "data-free", "multi-teacher", "teacher-prep", "meta", "cross-modal")
TEACHER_ARCHITECTURES = ("any", "same-widths", "student")
_METHOD_MODULES = ("baseline", "response", "feature", "relation", "online", "online_feature", "self_distillation",
                   "self_supervised", "adversarial", "data_free", "multi_teacher", "teacher_prep", "meta",
                   "layer_assignment", "self_supervised_kd", "cross_modal")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    category: str
    paper: str
    build: Callable[..., Recipe]
    presets: Mapping[str, Mapping[str, object]]
    approximation: str | None = None   # "approximation of <paper>: ..." where the exact loss is not pinned down
    needs_teacher: bool = True
    teacher_architecture: str = "any"  # "any"; "same-widths" (equal channels per stage, FSP); "student" (Tf-KD self)
    # hyperparameters -> (views, batch key) of the modality the teacher reads (None: the plain "input")
    teacher_input: Callable[[Mapping[str, object]], tuple[tuple, str]] | None = None
    default_student: str | None = None  # the digits zoo student a runner picks when none is named (deit: a DeiT ViT)
    default_teacher: str | None = None  # the digits zoo teacher a runner picks when none is named (manifold: a ViT)

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line."""
        paragraph = (inspect.getdoc(self.build) or "").split("\n\n", 1)[0]
        return " ".join(paragraph.split())

    def hyperparameters(self, preset: str = "default") -> dict[str, object]:
        """The builder's keyword defaults updated by ``preset``."""
        if preset not in self.presets:
            raise ValueError(f"method {self.name!r} has no preset {preset!r}; presets: {sorted(self.presets)}")
        defaults = {name: p.default for name, p in inspect.signature(self.build).parameters.items()
                    if name != "setup" and p.default is not p.empty}
        return {**defaults, **self.presets[preset]}


    def teacher_modality(self, preset: str = "default",
                         overrides: Mapping[str, object] | None = None) -> tuple[tuple, str]:
        """``(views, key)``: the views that make the input the method's teacher reads, and its batch key, for the
        hyperparameters of ``preset`` updated by ``overrides`` (privileged and cross-modal KD: the teacher is
        trained and tested on its own modality); ``((), "input")`` for a teacher of the plain input."""
        if self.teacher_input is None:
            return (), "input"
        views, key = self.teacher_input({**self.hyperparameters(preset), **(overrides or {})})
        return tuple(views), key

    def check_overrides(self, overrides: Mapping[str, object]) -> None:
        known = set(inspect.signature(self.build).parameters) - {"setup"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyperparameter(s) {unknown}; it takes {sorted(known)}")


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, category: str, paper: str, presets: Mapping[str, Mapping[str, object]] | None = None,
             approximation: str | None = None, needs_teacher: bool = True, teacher_architecture: str = "any",
             teacher_input: Callable[[Mapping[str, object]], tuple[tuple, str]] | None = None,
             default_student: str | None = None, default_teacher: str | None = None):
    """Decorator registering ``build(setup, **hyperparameters) -> Recipe`` as method ``name``.

    ``teacher_architecture`` tells runners which teacher the method is defined for: ``"any"``, ``"same-widths"``
    (the teacher's stages have the student's channel counts, e.g. FSP) or ``"student"`` (a trained copy of the
    student's architecture, e.g. Tf-KD self). ``teacher_input(hyperparameters) -> (views, key)``: the modality
    the method's teacher reads (the views that make it and its batch key), so that runners train and test the
    teacher on it (:meth:`Method.teacher_modality`); None: the plain ``"input"``. ``default_student``: the zoo
    student runners use when none is named, for methods defined for one kind of student only (``deit``: a ViT with
    a distillation token); ``None``: the runner's default. ``default_teacher``: the same for the teacher
    (``manifold``: a ViT teacher)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if teacher_architecture not in TEACHER_ARCHITECTURES:
        raise ValueError(f"teacher_architecture must be one of {TEACHER_ARCHITECTURES}, got {teacher_architecture!r}")

    def decorate(build):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        all_presets = {"default": {}, **(presets or {})}
        parameters = inspect.signature(build).parameters
        for preset, values in all_presets.items():
            unknown = sorted(set(values) - set(parameters))
            if unknown:
                raise ValueError(f"method {name!r} preset {preset!r} sets unknown hyperparameters {unknown}")
        _REGISTRY[name] = Method(name, category, paper, build, all_presets, approximation, needs_teacher,
                                 teacher_architecture, teacher_input, default_student, default_teacher)
        return build

    return decorate


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(f"kdkernels.distill.methods.{module}")


def list_methods() -> list[Method]:
    """Every registered method, by category then name."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda m: (CATEGORIES.index(m.category), m.name))


def get_method(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} Run `kdkernels list` for all methods.")
    return _REGISTRY[name]


def build_recipe(name: str, setup: Setup, preset: str = "default", **overrides) -> Recipe:
    """Builds method ``name`` with its ``preset`` hyperparameters updated by ``overrides``."""
    method = get_method(name)
    method.check_overrides(overrides)
    hyperparameters = {**method.hyperparameters(preset), **overrides}
    recipe = method.build(setup, **hyperparameters)
    recipe.hyperparameters = hyperparameters
    return recipe
