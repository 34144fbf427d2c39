"""Adversarial distillation: a discriminator trained to tell the teacher's features from the student's, the student
trained to fool it (a stage with two optimisers, :mod:`kdkernels.distill.optimisers`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.methods._common import offline
from kdkernels.distill.methods.relation import embedding_pair
from kdkernels.distill.optimisers import Optimiser
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term

ADV_FEATURE_PAPER = ("Wang, Xu, Xu, Tao. Adversarial Learning of Portable Student Networks. AAAI 2018")
ADV_FEATURE_APPROXIMATION = (
    "approximation of Wang et al. (AAAI 2018): no official code could be confirmed; the loss structure (CE + KD + a "
    "GAN loss of a feature discriminator on the pooled features) follows the paper, while the discriminator's MLP, "
    "its L2-normalised inputs, the non-saturating student loss, the linear connector for unequal widths, the "
    "weights and the one-forward simultaneous updates are this implementation's choices")


def feature_discriminator(width: int, hidden: int, layers: int) -> nn.Sequential:
    """An MLP ``width → hidden → … → 1`` (``layers`` linear layers, LeakyReLU(0.2) between them): a logit per
    sample, high for teacher features."""
    sizes = [width] + [hidden] * (layers - 1) + [1]
    modules: list[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if index:
            modules.append(nn.LeakyReLU(0.2))
        modules.append(nn.Linear(size_in, size_out))
    return nn.Sequential(*modules)


class StudentAdversarialTerm(Term):
    """The student's adversarial loss ``weight · mean_b −log D(u(φ(f_s)))`` (non-saturating; u scales rows to unit
    L2 norm). Owns the connector ``φ``
    (``Identity`` when the widths match, else ``Linear(d_s, d_t)``), trained with the student; reads the
    discriminator, which :class:`DiscriminatorTerm` owns."""

    def __init__(self, student: str, teacher: str, weight: float):
        super().__init__("adv", (student, teacher), weight)
        self.connector: nn.Module = nn.Identity()
        self._discriminator: list[nn.Module] = []     # a reference, not a submodule: its owner is DiscriminatorTerm

    def build(self, example):
        student, teacher = (example[key] for key in self.reads)
        if student.dim() != 2 or teacher.dim() != 2:
            raise ValueError(f"term {self.name!r}: {self.reads} must be pooled [B, D] features, got shapes "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if student.shape[1] != teacher.shape[1]:
            self.connector = nn.Linear(student.shape[1], teacher.shape[1])

    def loss(self, student, teacher, *, context):
        return kdkernels.gan_generator_loss(self._discriminator[0](F.normalize(self.connector(student), dim=1)))


class DiscriminatorTerm(Term):
    """The discriminator's loss ``weight · (mean_b −log D(u(f_t)) + mean_b −log(1 − D(u(φ(f_s)))))`` with ``φ(f_s)``
    detached: teacher features are real, the student's fake. Owns the discriminator (sized on the teacher's width
    when the distiller builds)."""

    def __init__(self, student_term: StudentAdversarialTerm, hidden: int, layers: int, weight: float):
        super().__init__("adv_d", student_term.reads, weight)
        self.hidden, self.layers = hidden, layers
        self.discriminator: nn.Module = nn.Identity()
        self._student_term = [student_term]          # a reference: the connector is the student's
        student_term._discriminator.append(self.discriminator)

    def build(self, example):
        teacher = example[self.reads[1]]
        self.discriminator = feature_discriminator(teacher.shape[1], self.hidden, self.layers)
        self._student_term[0]._discriminator[:] = [self.discriminator]

    def loss(self, student, teacher, *, context):
        real = self.discriminator(F.normalize(teacher, dim=1))
        fake = self.discriminator(F.normalize(self._student_term[0].connector(student), dim=1).detach())
        return kdkernels.gan_discriminator_loss(real, fake)


@register("adv-feature", category="adversarial", paper=ADV_FEATURE_PAPER, approximation=ADV_FEATURE_APPROXIMATION)
def adv_feature(setup: Setup, ce_weight: float = 1.0, kd_weight: float = 1.0, temperature: float = 4.0,
                adv_weight: float = 0.1, hidden: int = 128, layers: int = 2, discriminator_lr_scale: float = 1.0,
                step_plan: str = "simultaneous", student_layer: str | None = None,
                teacher_layer: str | None = None) -> Recipe:
    """Adversarial feature KD: ``ce·CE + kd·T²·KL(p_t ‖ p_s) + adv·mean −log D(u(φ(f_s)))`` for the student, and
    ``mean −log D(u(f_t)) + mean −log(1 − D(u(φ(f_s))))`` for the feature discriminator D, trained by its own
    optimiser; u scales each feature row to unit L2 norm.

    Wang, Xu, Xu and Tao (AAAI 2018) train a discriminator on the features before the classifier to tell the
    teacher's from the student's, and the student with its classification loss, a KD term and the adversarial loss
    that makes its features indistinguishable from the teacher's. No official code could be confirmed, so this is an
    approximation (see ``approximation``) with our choices: f = the pooled embeddings (``kd_points.embedding``,
    ``fc/input``), φ a ``Linear(d_s, d_t)`` connector trained with the student when the widths differ (identity
    otherwise), D an MLP of ``layers`` linear layers of width ``hidden`` with LeakyReLU(0.2), binary cross-entropy on
    logits (means over the batch), the non-saturating student loss ``−log D(u(φ(f_s)))``, KD as Hinton's (batchmean,
    T²); defaults ce 1, kd 1 (T = 4), adv 0.1. Two optimisers (``Stage.optimisers``): ``"student"`` (the student and
    φ: CE, KD, adv) and ``"discriminator"`` (D: adv_d, at ``discriminator_lr_scale`` × the stage's rate), both
    stepping on every batch from one forward (``step_plan="simultaneous"``; ``"alternate"`` or a mapping give the
    other plans). The discriminator reads unit-norm features: on raw (unbounded, post-ReLU) features the game
    diverged on the digits demo (the student inflated its features to fool D; the losses reached NaN by epoch 25).
    """
    check = Checks("adv-feature")
    ce_weight = check.real("ce_weight", ce_weight, minimum=0.0)
    kd_weight = check.real("kd_weight", kd_weight, minimum=0.0)
    temperature = check.temperature(temperature)
    adv_weight = check.real("adv_weight", adv_weight, minimum=0.0)
    hidden = check.integer("hidden", hidden, minimum=1)
    layers = check.integer("layers", layers, minimum=1)
    discriminator_lr_scale = check.real("discriminator_lr_scale", discriminator_lr_scale, positive=True)
    student_feature, teacher_feature = embedding_pair(setup, "adv-feature", student_layer, teacher_layer)
    adversarial = StudentAdversarialTerm(student_feature, teacher_feature, adv_weight)
    terms = [CrossEntropyTerm("student", ce_weight),
             FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), kd_weight, temperature=temperature),
             adversarial, DiscriminatorTerm(adversarial, hidden, layers, 1.0)]
    optimisers = {"student": Optimiser(models=("student",), terms_params=("adv",),
                                       terms=("ce_student", "kd", "adv")),
                  "discriminator": Optimiser(terms_params=("adv_d",), terms=("adv_d",),
                                             lr_scale=discriminator_lr_scale)}
    return offline("adv-feature", setup, terms, optimisers=optimisers, step_plan=step_plan)
