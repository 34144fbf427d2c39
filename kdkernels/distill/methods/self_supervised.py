"""Self-supervised and consistency distillation: a model taught by another view of the data and by its own moving
average (mean teacher)."""
from __future__ import annotations

import math

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.methods._common import single_stage
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm
from kdkernels.distill.updates import EMA
from kdkernels.distill.views import HorizontalFlip, RandomCrop, View

MEAN_TEACHER_PAPER = ("Tarvainen, Valpola. Mean teachers are better role models: Weight-averaged consistency targets "
                      "improve semi-supervised deep learning results. NeurIPS 2017")


def sigmoid_rampup(epoch: float, rampup: float) -> float:
    """CuriousAI/mean-teacher ``pytorch/mean_teacher/ramps.py`` ``sigmoid_rampup``: ``exp(−5 (1 − e/R)²)`` with e
    clipped to [0, R]; 1 when R = 0 (Laine & Aila's ramp-up)."""
    if rampup == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), rampup) / rampup
    return math.exp(-5.0 * phase * phase)


class ConsistencyTerm(FunctionTerm):
    """``consistency · sigmoid_rampup(epoch − 1, rampup) · fn(*values)``: the mean teacher's ramped consistency cost
    (``get_current_consistency_weight`` of ``pytorch/main.py``, whose epochs count from 0 and are whole within an
    epoch; ours count from 1)."""

    def __init__(self, name, fn, reads, consistency: float, *, rampup: float):
        check = Checks(f"term {name!r}")
        super().__init__(name, fn, reads, check.real("consistency", consistency, minimum=0.0))
        self.rampup = check.real("rampup", rampup, minimum=0.0)

    def weight_at(self, context) -> float:
        return self.weight * sigmoid_rampup(context.epoch - 1, self.rampup)


def augmentation(source: str, output: str, translate: int, flip: bool) -> list[View]:
    """One random translation (zero padding) and, with ``flip``, a horizontal flip of ``source`` into ``output``."""
    views = [View(source, output, RandomCrop(padding=translate))] if translate else [View(source, output)]
    if flip:
        views.append(View(output, output, HorizontalFlip()))
    return views


@register("mean-teacher", category="self-supervised", needs_teacher=False, paper=MEAN_TEACHER_PAPER,
          presets={"digits": {"translate": 1, "flip": False}})
def mean_teacher(setup: Setup, consistency: float = 100.0, rampup: float = 5.0, ema_decay: float = 0.999,
                 translate: int = 4, flip: bool = True) -> Recipe:
    """Mean teacher: ``CE(s(x₁), y) + w(e) · Σ_b Σ_c (softmax(s(x₁)) − softmax(t(x₂)))² / C / B`` with t the EMA of s.

    As CuriousAI/mean-teacher ``pytorch/main.py`` trains (the CIFAR-10 configuration of
    ``pytorch/experiments/cifar10_test.py``: ``consistency`` 100, ``consistency_rampup`` 5 epochs, MSE consistency):

    * x₁ and x₂ are two independent augmentations of each image (``TransformTwice``: a random translation by up to
      ``translate`` pixels and a horizontal flip; the official translation pads by reflection, ours by zeros);
    * the consistency weight ``w(e) = consistency · exp(−5 (1 − min(e, R)/R)²)`` ramps up over the first R epochs
      (e counts epochs from 0, constant within an epoch);
    * the teacher is the EMA of the student's parameters, updated after every step with
      ``α = min(1 − 1/(step + 1), ema_decay)`` (``update_ema_variables``); it runs in train mode, so its batch norm
      keeps its own statistics from its own forward passes (only parameters are averaged), and gets no gradient;
    * the consistency is :func:`kdkernels.softmax_mse_loss` (``losses.py`` ``softmax_mse_loss`` divided by the
      minibatch size); the classification cost is the batch mean CE on the student's view (every sample is labelled
      here: the official semi-supervised setting ignores unlabelled samples in the CE).

    The CIFAR configuration's second "residual" head (``logit_distance_cost`` 0.01 on a two-output network) needs a
    two-output model; with one output it is off, as in the code's default (``--logit-distance-cost -1``). Preset
    ``digits``: a 1-pixel translation and no flip for 8×8 digit images (4/32 of CIFAR's side; digits are not
    mirror-symmetric). The exported model is the student; ``test_acc_teacher`` reports the EMA.
    """
    check = Checks("mean-teacher")
    consistency = check.real("consistency", consistency, minimum=0.0)
    rampup = check.real("rampup", rampup, minimum=0.0)
    ema_decay = check.real("ema_decay", ema_decay, minimum=0.0, maximum=1.0)
    translate = check.integer("translate", translate, minimum=0)
    if not isinstance(flip, bool):
        check.type_error("flip", "a bool", flip)
    views = augmentation("input", "input_teacher", translate, flip) + augmentation("input", "input", translate, flip)
    terms = [CrossEntropyTerm("student"),
             ConsistencyTerm("consistency", kdkernels.softmax_mse_loss, ("student", "teacher"), consistency,
                             rampup=rampup)]
    distiller = Distiller({"student": setup.student}, terms, frozen_train_mode=("teacher",),
                          evaluate=("student", "teacher"), inputs={"teacher": "input_teacher"}, views=views,
                          updates={"teacher": EMA("student", ema_decay, warmup=True, buffers="own")})
    return single_stage("mean-teacher", distiller)
