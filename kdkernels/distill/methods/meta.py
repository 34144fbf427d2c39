"""Meta-learned methods: hyperparameters of the distillation loss learned by a meta-step on a held-out split
(:mod:`kdkernels.distill.meta_steps`)."""
from __future__ import annotations

import math

import torch
from torch import nn

import kdkernels

from kdkernels.distill.meta_steps import MetaStep
from kdkernels.distill.methods._common import offline
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, StepContext, Term


class LearnedTemperatureKDTerm(Term):
    """KD at learnable temperatures ``T_s = exp(log_temperature_student)``, ``T_t = exp(log_temperature_teacher)``
    (:func:`kdkernels.two_temperature_kd_loss`, torch ops: twice differentiable); the log-temperatures are the term's
    parameters, learned by a meta-step."""

    def __init__(self, name: str = "kd", reads=("student", "teacher"), weight: float = 1.0, *,
                 temperature: float = 4.0):
        super().__init__(name, reads, weight)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"term {name!r}: temperature must be positive and finite, got {temperature!r}")
        self.log_temperature_student = nn.Parameter(torch.tensor(math.log(temperature)))
        self.log_temperature_teacher = nn.Parameter(torch.tensor(math.log(temperature)))

    def temperatures(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_temperature_student.exp(), self.log_temperature_teacher.exp()

    def loss(self, student, teacher, *, context: StepContext):
        t_s, t_t = self.temperatures()
        return kdkernels.two_temperature_kd_loss(student, teacher.detach(), t_s, t_t)

    def logged_values(self) -> dict[str, float]:
        t_s, t_t = self.temperatures()
        return {"temperature_student": float(t_s.detach()), "temperature_teacher": float(t_t.detach())}


MKD_APPROXIMATION = (
    "approximation of Liu et al. 2022 (no official code; the full text was not at hand, only its abstract): the "
    "abstract's learnable temperatures of the teacher's and the student's softmax are two scalars T_t, T_s "
    "(log-parameterised, both starting at `temperature`), the KD term is T_s·T_t·KL(softmax(z_t/T_t) ‖ "
    "softmax(z_s/T_s)) (Hinton's T² when equal), and the meta-step is a one-step, second-order look-ahead of the "
    "student (plain SGD at its current lr on CE + KD) with the held-out CE as meta objective and Adam on the "
    "log-temperatures; held-out share, meta lr and initial temperature are our choices")


@register("mkd", category="meta",
          paper="Liu, Liu, Li, Liu. Meta Knowledge Distillation. arXiv:2202.07940, 2022",
          approximation=MKD_APPROXIMATION)
def mkd(setup: Setup, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
        held_out: float = 0.1, meta_lr: float = 0.01, first_order: bool = False) -> Recipe:
    """MKD: ``ce_weight·CE + kd_weight·T_s·T_t·KL(softmax(z_t/T_t) ‖ softmax(z_s/T_s))``, T_s and T_t meta-learned.

    Before every student step the meta-step (:class:`~kdkernels.distill.meta_steps.MetaStep`) looks the student ahead
    by one SGD step on this loss, ``θ' = θ − η·∇_θ L(θ; T_s, T_t)``, and updates ``log T_s``, ``log T_t`` with Adam
    (``meta_lr``) on the gradient of ``CE(f(x_h; θ'), y_h)`` on a held-out batch; ``held_out`` (10 %) of the training
    set, per class, is kept out of the student's batches for it. Liu, Liu, Li, Liu, "Meta Knowledge Distillation",
    arXiv:2202.07940 (2022): the temperatures of the teacher's and the student's softmax are meta-learned by the
    gradients of the learning objective (abstract). Defaults: ``temperature`` 4 (the start of both), the weights of
    mdistiller's KD (0.1 CE, 0.9 KD), held-out share 0.1, meta lr 0.01, second order.

    approximation: see ``MKD_APPROXIMATION`` (the paper's full text and code were not available to pin down the
    scaling of the KD term, the initial temperatures, the meta optimiser's settings and the held-out data).
    """
    terms = [CrossEntropyTerm("student", ce_weight),
             LearnedTemperatureKDTerm("kd", weight=kd_weight, temperature=temperature)]
    meta_step = MetaStep(hyperparameters=("kd.log_temperature_student", "kd.log_temperature_teacher"),
                         held_out=held_out, lr=meta_lr, first_order=first_order)
    return offline("mkd", setup, terms, meta_step=meta_step)
