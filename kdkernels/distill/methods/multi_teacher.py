"""Several teachers, or teacher assistants between teacher and student: the averaged ensemble, CA-MKD, TAKD and
DGKD (../shared/reference/methods.md §1.12–1.13, §4)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.hooks import find_module
from kdkernels.distill.methods._common import single_stage, stage_tap
from kdkernels.distill.methods.self_distillation import positive_int
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term


def teacher_names(count: int) -> list[str]:
    return [f"teacher{index}" for index in range(1, count + 1)]


def require_teachers(setup: Setup, method: str, minimum: int = 1) -> list[nn.Module]:
    if len(setup.teachers) < minimum:
        raise ValueError(f"method {method!r} needs at least {minimum} trained teachers (Setup.teachers), got "
                         f"{len(setup.teachers)}")
    return list(setup.teachers)


def with_teachers(setup: Setup, teachers: Sequence[nn.Module]) -> dict[str, nn.Module]:
    return {"student": setup.student, **dict(zip(teacher_names(len(teachers)), teachers))}


class TeacherSetTerm(Term):
    """``fn(student, [teacher values…], *extra, **kwargs)``: a loss over a variable number of teachers."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], student: str, teachers: Sequence[str],
                 weight: float = 1.0, *, extra: Sequence[str] = (), **kwargs):
        super().__init__(name, (student, *teachers, *extra), weight)
        self.fn, self.count, self.kwargs = fn, len(teachers), kwargs

    def loss(self, student, *values, context):
        return self.fn(student, list(values[: self.count]), *values[self.count:], **self.kwargs)


# -------------------------------------------------------------------------------------------------------- ensemble

@register("ensemble", category="multi-teacher",
          paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (distilling an ensemble). "
                "arXiv:1503.02531, 2015")
def ensemble(setup: Setup, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> Recipe:
    """Averaged ensemble: ``ce_weight·CE + kd_weight·T²·KL(mean_k softmax(t_k/T) ‖ softmax(s/T))`` (batchmean).

    The teachers' tempered probabilities (not logits) are averaged (``kdkernels.ensemble_kd_loss``); the defaults
    are the ``kd`` method's (mdistiller), so one teacher gives exactly ``kd``.
    """
    teachers = require_teachers(setup, "ensemble")
    terms = [CrossEntropyTerm("student", ce_weight),
             TeacherSetTerm("kd", kdkernels.ensemble_kd_loss, "student", teacher_names(len(teachers)), kd_weight,
                            temperature=temperature)]
    return single_stage("ensemble", Distiller(with_teachers(setup, teachers), terms))


# ---------------------------------------------------------------------------------------------------------- CA-MKD

class Embed(nn.Module):
    """CA-MKD's adapter (``models/util.py::Embed``, ``convs=False``): 1×1 conv, batch norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.transfer = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
                                      nn.ReLU())

    def forward(self, x):
        return self.transfer(x)


def resize_to(feature_map: torch.Tensor, size: int) -> torch.Tensor:
    """CA-MKD's ``CalWeight`` resize: adaptive average pooling down, bilinear interpolation up."""
    if feature_map.shape[-1] >= size:
        return F.adaptive_avg_pool2d(feature_map, (size, size))
    return F.interpolate(feature_map, size=(size, size), mode="bilinear")


class ConfidenceFeatureTerm(Term):
    """CA-MKD's intermediate term (``kdkernels.camkd_feature_loss``): the student map, resized and adapted to each
    teacher by its own :class:`Embed`, is matched to that teacher's map with weights from the teacher's classifier
    on the adapted feature (global-average-pooled). Weight 0 in epoch 1, as coded."""

    def __init__(self, name: str, student: str, teachers: Sequence[str], classifiers: Sequence[nn.Module],
                 weight: float, target: str = "target"):
        super().__init__(name, (student, *teachers, target), weight)
        self._classifiers = tuple(classifiers)   # the frozen teachers' own layers: not this term's parameters
        self.adapters = nn.ModuleList()

    def build(self, example):
        maps = [example[key] for key in self.reads[:-1]]
        for key, value in zip(self.reads, maps):
            if value.dim() != 4:
                raise ValueError(f"term {self.name!r}: CA-MKD's intermediate term needs feature maps [B, C, H, W]; "
                                 f"{key!r} has shape {tuple(value.shape)}")
        student = maps[0]
        self.adapters = nn.ModuleList(Embed(student.shape[1], t.shape[1]) for t in maps[1:]).to(student.device)

    def weight_at(self, context):
        return 0.0 if context.epoch == 1 else self.weight

    def loss(self, student, *values, context):
        teachers, target = values[:-1], values[-1]
        adapted = [adapter(resize_to(student, t.shape[-1])) for adapter, t in zip(self.adapters, teachers)]
        logits = [classifier(F.adaptive_avg_pool2d(a, 1).flatten(1)) for classifier, a in zip(self._classifiers,
                                                                                                adapted)]
        return kdkernels.camkd_feature_loss(adapted, list(teachers), logits, target)


@register("ca-mkd", category="multi-teacher",
          paper="Zhang, Chen, Wang. Confidence-Aware Multi-Teacher Knowledge Distillation. ICASSP 2022")
def ca_mkd(setup: Setup, temperature: float = 4.0, gamma: float = 1.0, alpha: float = 1.0, beta: float = 50.0,
           student_layer: str | None = None, teacher_layer: str | None = None,
           teacher_classifier: str | None = None) -> Recipe:
    """CA-MKD: ``γ·CE + α·Σ w_kb·KL_kb/(B·K) + β·Σ w'_kb·MSE_kb/(B·K)`` with confidence weights (Rorozhl/CA-MKD).

    ``w = (1 − softmax_k CE(t_k, y))/(K−1)``; the KL (T²-scaled, per sample) uses the teachers' logits; the
    intermediate term adapts the student's deepest stage map to each teacher's (per-teacher Embed) and weights the
    MSE by the confidence of the teacher's classifier on the adapted feature (not detached), skipped in epoch 1.
    Defaults are the README command (``-r 1 -a 1 -b 50``, T 4); at least two teachers. ``student_layer``,
    ``teacher_layer`` and ``teacher_classifier`` override the kd_points (deepest stage, classifier).
    """
    teachers = require_teachers(setup, "ca-mkd", minimum=2)
    names = teacher_names(len(teachers))
    s_layer = student_layer or stage_tap("ca-mkd", setup.student, -1, "student_layer")
    t_layers = [teacher_layer or stage_tap("ca-mkd", t, -1, "teacher_layer") for t in teachers]
    classifiers = [find_module(t, teacher_classifier or feature_points(t).classifier, name)
                   for name, t in zip(names, teachers)]
    terms = [CrossEntropyTerm("student", gamma),
             TeacherSetTerm("kd", kdkernels.camkd_loss, "student", names, alpha, extra=("target",),
                            temperature=temperature),
             ConfidenceFeatureTerm("inter", f"student:{s_layer}",
                                   [f"{name}:{layer}" for name, layer in zip(names, t_layers)], classifiers, beta)]
    return single_stage("ca-mkd", Distiller(with_teachers(setup, teachers), terms))


# ------------------------------------------------------------------------------------------------------------ TAKD

def takd_stage(name: str, student: nn.Module, teacher: nn.Module, lam: float, temperature: float) -> Stage:
    """``(1−λ)·CE + λ·T²·KLDiv_mean(log_softmax(s/T), softmax(t/T))`` (element mean, ÷B·C)."""
    terms = [CrossEntropyTerm("student", 1.0 - lam),
             FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), lam, temperature=temperature,
                          reduction="mean")]
    return Stage(name, Distiller({"student": student, "teacher": teacher}, terms))


@register("takd", category="multi-teacher",
          paper="Mirzadeh, Farajtabar, Li, Levine, Matsukawa, Ghasemzadeh. Improved Knowledge Distillation via "
                "Teacher Assistant. AAAI 2020")
def takd(setup: Setup, lam: float = 0.5, temperature: float = 5.0, assistants: int = 1) -> Recipe:
    """TAKD: teacher → assistant(s) → student, each step ``(1−λ)CE + λ·T²·KLDiv_mean`` (imirzadeh/…/train.py).

    The KL is ``nn.KLDivLoss()``'s element mean (÷B·C, ``kd_loss(reduction="mean")``). The repository fixes no λ
    or T (an NNI search over λ∈[0.05, 1], T∈{1, 2, 5, 10, 15, 20}): the defaults take λ 0.5 and T 5 (the default
    of the TAKD-derived DGKD code). Assistants are fresh ``Setup.new_assistant`` models, trained in order.
    """
    assistants = positive_int("takd", "assistants", assistants)
    teacher = setup.require_teacher("takd")
    chain = [setup.fresh_assistant("takd") for _ in range(assistants)] + [setup.student]
    stages = []
    for index, student in enumerate(chain, start=1):
        name = f"assistant{index}" if index <= assistants else "student"
        stages.append(takd_stage(name, student, teacher, lam, temperature))
        teacher = student
    return Recipe("takd", stages)


# ------------------------------------------------------------------------------------------------------------ DGKD

class DenseGuidanceTerm(Term):
    """DGKD's ``T²·Σ_{kept g} KLDiv_mean(log_softmax(s/T), softmax(g/T))`` over the guides (teacher and larger
    assistants), ``drop`` of them removed at random per optimiser step (never all: at most ``len(guides) − 1``).
    The draw is a function of ``(seed, epoch, step)``, so that resumed and data-parallel runs drop the same ones."""

    def __init__(self, name: str, student: str, guides: Sequence[str], weight: float, *, temperature: float,
                 drop: int, seed: int = 0):
        super().__init__(name, (student, *guides), weight)
        self.temperature, self.drop, self.seed = temperature, min(drop, len(guides) - 1), seed

    def kept(self, context) -> list[int]:
        """Indices (into the guides) used at this step."""
        count = len(self.reads) - 1
        if self.drop == 0 or not context.training:
            return list(range(count))
        rng = np.random.default_rng([self.seed, context.epoch, context.step])
        dropped = set(rng.choice(count, size=self.drop, replace=False).tolist())
        return [index for index in range(count) if index not in dropped]

    def loss(self, student, *guides, context):
        return sum(kdkernels.kd_loss(student, guides[index], self.temperature, reduction="mean")
                   for index in self.kept(context))


def dgkd_stage(name: str, student: nn.Module, guides: dict[str, nn.Module], lam: float, temperature: float,
               drop: int) -> Stage:
    terms: list[Term] = [DenseGuidanceTerm("kd", "student", list(guides), lam, temperature=temperature, drop=drop)]
    if lam < 1.0:
        terms.insert(0, CrossEntropyTerm("student", 1.0 - lam))
    return Stage(name, Distiller({"student": student, **guides}, terms))


@register("dgkd", category="multi-teacher",
          paper="Son, Na, Choi, Hwang. Densely Guided Knowledge Distillation using Multiple Teacher Assistants. "
                "ICCV 2021",
          approximation="approximation of Son et al. (ICCV 2021): the dense guidance and random guide dropping follow "
                        "the paper; lambda 1, T 5 and one dropped guide per step come from a reimplementation whose "
                        "provenance could not be confirmed")
def dgkd(setup: Setup, lam: float = 1.0, temperature: float = 5.0, assistants: int = 2, drop: int = 1) -> Recipe:
    """DGKD: ``(1−λ)·CE + λ·T²·Σ_kept KLDiv_mean(s, g)`` over the teacher and all larger assistants, some dropped.

    Each assistant, then the student, learns from the teacher and ALL larger assistants (the guides g), with
    ``drop`` guides removed at random per mini-batch (stochastic DGKD).

    The weighting (a plain sum of TAKD's element-mean KL terms, one per kept guide) and the defaults (λ 1, T 5,
    one guide dropped) follow the DGKD training script found in the public code index (TAKD-derived; its
    repository could not be confirmed as the authors'). A stage with a single guide drops none. Assistants are
    fresh ``Setup.new_assistant`` models, trained largest-first in order.
    """
    assistants = positive_int("dgkd", "assistants", assistants)
    drop = positive_int("dgkd", "drop", drop, minimum=0)
    guides: dict[str, nn.Module] = {"teacher": setup.require_teacher("dgkd")}
    stages = []
    for index in range(1, assistants + 1):
        assistant = setup.fresh_assistant("dgkd")
        stages.append(dgkd_stage(f"assistant{index}", assistant, dict(guides), lam, temperature, drop))
        guides[f"assistant{index}"] = assistant
    stages.append(dgkd_stage("student", setup.student, guides, lam, temperature, drop))
    return Recipe("dgkd", stages)
