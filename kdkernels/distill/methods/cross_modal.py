"""Cross-modal and privileged distillation: the teacher reads one modality of each sample, the student another.

The modalities are deterministic views (:mod:`kdkernels.distill.modalities`: the image, a degraded image, the
row+column profiles, a random projection) that the distiller adds to every batch and that evaluation applies too, so
the student is trained AND tested on its own modality. Each method declares its teacher's modality
(``register(..., teacher_input=...)``): the runners (:meth:`DigitsExperiment.for_method
<kdkernels.distill.experiment.DigitsExperiment.for_method>`) train and test the teacher on it.
"""
from __future__ import annotations

import numbers
from typing import Mapping

from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.methods._common import single_stage, stage_tap
from kdkernels.distill.methods.feature import StageTerm
from kdkernels.distill.modalities import MODALITIES, modality_key, modality_transform, modality_views
from kdkernels.distill.recipe import Recipe, Setup, Stage
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm


def _modality(check: Checks, name: str, value, options_name: str, options) -> tuple[str, dict]:
    """A modality name and its options, checked (the options build the transform here, so a bad one fails now)."""
    value = check.choice(name, value, tuple(MODALITIES))
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        check.type_error(options_name, "None or a mapping of the modality's options", options)
    try:
        modality_transform(value, **options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{check.function}: {options_name}: {error}") from None
    return value, dict(options)


def modality_pair(method: str, student_modality, student_options, teacher_modality, teacher_options):
    """``(views, student key, teacher key)`` of a student and a teacher modality, checked: one view per modality
    (the same modality twice must have the same options)."""
    check = Checks(method)
    student, student_options = _modality(check, "student_modality", student_modality, "student_options",
                                         student_options)
    teacher, teacher_options = _modality(check, "teacher_modality", teacher_modality, "teacher_options",
                                         teacher_options)
    if student == teacher and student_options != teacher_options:
        check.value_error("teacher_options", f"must equal student_options when both models read {student!r} (one "
                                             "view per modality)", teacher_options)
    views = modality_views(student, **student_options)
    if teacher != student:
        views += modality_views(teacher, **teacher_options)
    return views, modality_key(student), modality_key(teacher)


def teacher_modality(hyperparameters: Mapping[str, object]) -> tuple[tuple, str]:
    """The teacher's modality of a method with ``teacher_modality`` / ``teacher_options`` hyperparameters."""
    name, options = hyperparameters["teacher_modality"], hyperparameters["teacher_options"] or {}
    return tuple(modality_views(name, **options)), modality_key(name)


# ----------------------------------------------------------------------------------------------------- privileged

@register("privileged", category="cross-modal",
          paper="Lopez-Paz, Bottou, Schölkopf, Vapnik. Unifying Distillation and Privileged Information. ICLR 2016",
          presets={"alone": {"imitation": 0.0},
                   "profiles": {"student_modality": "profiles"}},
          teacher_input=teacher_modality)
def privileged(setup: Setup, temperature: float = 1.0, imitation: float = 1.0, student_modality: str = "degraded",
               teacher_modality: str = "image", student_options: dict | None = None,
               teacher_options: dict | None = None) -> Recipe:
    """Generalised distillation: ``(1 − λ)·CE(y, σ(z_s(x))) + λ·T²·CE(σ(z_t(x*)/T), σ(z_s(x)))``, T = λ = 1.

    Lopez-Paz et al. (ICLR 2016) §4, lopezpaz/distillation_privileged_information @cdc4cae ``code/mnist.py``: the
    teacher is trained on the privileged features x* (here ``teacher_modality``, the clean image), the student on
    the regular features x (``student_modality``, the degraded image: ``Degrade`` of
    :mod:`kdkernels.distill.modalities` — area down-sampling by 2 and bilinear up-sampling, as the paper's MNIST
    experiment down-scales the images; ``student_options`` / ``teacher_options`` set the modalities' options, e.g.
    ``{"factor": 1, "occlude": 4}`` for an occluded block); the student reads x at training and at test time, the
    teacher reads x* only to give its soft labels (the experiment trains the teacher with CE on x*: the method
    declares its teacher's modality). The loss is :func:`kdkernels.privileged_loss`: the student's softmax is NOT
    tempered and the soft term carries the official code's T². Defaults T = λ = 1 (the paper's §5 simulations,
    ``code/synthetic.py``); the MNIST and CIFAR experiments sweep T ∈ {1, 2, 5, 10, 20, 50} and λ ∈ [0, 1].
    Presets: ``alone`` (λ = 0: the student on its own modality alone, the paper's baseline) and ``profiles`` (the
    student reads the 16 row+column intensity profiles: use ``--student modal-mlp``). The teacher's test accuracy
    on its modality is reported as ``test_acc_teacher``.
    """
    check = Checks("privileged")
    temperature = check.temperature(temperature)
    imitation = check.probability("imitation", imitation)
    views, student_key, teacher_key = modality_pair("privileged", student_modality, student_options,
                                                    teacher_modality, teacher_options)
    teacher = setup.require_teacher("privileged")
    term = FunctionTerm("privileged", kdkernels.privileged_loss, ("student", "teacher", "target"),
                        temperature=temperature, imitation=imitation)
    distiller = Distiller({"student": setup.student, "teacher": teacher}, [term], evaluate=("student", "teacher"),
                          inputs={"student": student_key, "teacher": teacher_key}, views=views)
    return single_stage("privileged", distiller)


# ---------------------------------------------------------------------------------------------------- cross-modal

CROSS_MODAL_APPROXIMATION = (
    "approximation of Gupta et al. (CVPR 2016), whose supervision-transfer training code is not public (the released "
    "s-gupta / fast-rcnn-distillation code ships the detectors): the L2 is taken as Caffe's EuclideanLoss "
    "(½‖·‖² summed, / B); the transfer layer is each model's last conv stage (the paper's pool5); a linear "
    "connector (1×1 conv / Linear) maps the student's width to the teacher's where they differ (the paper's "
    "networks share one architecture: identity); the transfer stage runs on the run's training set without its "
    "labels (the paper: a larger paired unlabelled set) for transfer_epochs (a share of the run), then the whole "
    "student is fine-tuned with CE for the run's epochs; transfer_weight 0.01 is ours: at the digits runs' "
    "learning rate the unweighted loss (~150 at the start on the teacher's 128x2x2 stage) drives the student's "
    "last-stage ReLUs dead (weight 1: the student ends at chance) or diverges")


def transfer_connector(student_shape, teacher_shape) -> nn.Module:
    """Identity when the shapes agree, else a linear map of the student's width to the teacher's: a 1×1 convolution
    for maps of one spatial size, a Linear layer for ``[B, D]`` features."""
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    if len(student_shape) == 2 and len(teacher_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    if len(student_shape) == 4 and len(teacher_shape) == 4 and tuple(student_shape[2:]) == tuple(teacher_shape[2:]):
        return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)
    raise ValueError(f"cross-modal: the transfer connector maps a student feature [B, C, H, W] to a teacher feature "
                     f"of the same H, W (or [B, D] to [B, D']), got student {tuple(student_shape)} and teacher "
                     f"{tuple(teacher_shape)}: pass student_layer / teacher_layer naming such features")


class SupervisionTransferTerm(StageTerm):
    """``supervision_transfer_loss(connector(φ_s), φ_t)`` on one pair of taps (:func:`transfer_connector`)."""

    def __init__(self, student_key: str, teacher_key: str, weight: float = 1.0):
        super().__init__("transfer", [student_key], [teacher_key], weight)

    def make_connector(self, index, student, teacher):
        return transfer_connector(student.shape, teacher.shape)

    def stage_loss(self, index, student, teacher):
        return kdkernels.supervision_transfer_loss(student, teacher)


@register("cross-modal", category="cross-modal",
          paper="Gupta, Hoffman, Malik. Cross Modal Distillation for Supervision Transfer. CVPR 2016",
          presets={"alone": {"transfer_epochs": 0},
                   "profiles": {"student_modality": "profiles", "student_layer": "hidden2",
                                "teacher_layer": "fc/input"}},
          approximation=CROSS_MODAL_APPROXIMATION, teacher_input=teacher_modality)
def cross_modal(setup: Setup, transfer_epochs: float | int = 0.5, transfer_weight: float = 0.01,
                student_modality: str = "degraded", teacher_modality: str = "image",
                student_options: dict | None = None, teacher_options: dict | None = None,
                student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """Supervision transfer: stage 1 ``0.01·Σ_b ½‖conn(φ_s(x_b)) − φ_t(x*_b)‖² / B`` on paired samples, then CE.

    Gupta, Hoffman, Malik (CVPR 2016) §3: a network trained with labels on modality A (here the teacher, trained by
    the experiment with CE on ``teacher_modality``, the clean image) supervises a network for a paired modality B
    (the student, on ``student_modality``, the degraded image: :mod:`kdkernels.distill.modalities`) without labels:
    the student regresses the teacher's mid-level features of the same sample with an L2 loss
    (:func:`kdkernels.supervision_transfer_loss`), the transfer layer being the paper's best, pool5 — here each
    model's last conv stage (``student_layer`` / ``teacher_layer`` name other taps), through a linear connector
    (:func:`transfer_connector`) when the widths differ. Stage 1 (``cross-modal-transfer``, ``transfer_epochs``: a
    float is a share of the run's epochs, an int a count; 0 skips it) reads no label; stage 2
    (``cross-modal-finetune``) fine-tunes the whole student with CE on its modality for the run's epochs, the
    transferred network being the initialisation (the connector is dropped). The student reads its modality at
    training and at test time. Presets: ``alone`` (no transfer: the student trained on its own modality with CE)
    and ``profiles`` (the 16 row+column profiles read by ``--student modal-mlp``; its ``hidden2`` regresses the
    teacher's pooled embedding ``fc/input`` through a Linear connector). ``transfer_weight`` 0.01 scales the loss
    (ours, not the paper's: at the digits runs' learning rate weight 1 kills the student's last-stage ReLUs).
    Approximation (flagged): see :data:`CROSS_MODAL_APPROXIMATION`.
    """
    check = Checks("cross-modal")
    if isinstance(transfer_epochs, bool) or not isinstance(transfer_epochs, numbers.Real):
        check.type_error("transfer_epochs", "an int (epochs) or a float in (0, 1] (a share of the run)",
                         transfer_epochs)
    if isinstance(transfer_epochs, numbers.Integral):
        transfer_epochs = check.integer("transfer_epochs", int(transfer_epochs), minimum=0)
    else:
        transfer_epochs = check.real("transfer_epochs", transfer_epochs, nonnegative=True, maximum=1.0)
    transfer_weight = check.real("transfer_weight", transfer_weight, positive=True)
    for name, value in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
        if value is not None:
            check.name(name, value, "tap path", "None or a str (a tap path)")
    views, student_key, teacher_key = modality_pair("cross-modal", student_modality, student_options,
                                                    teacher_modality, teacher_options)
    teacher = setup.require_teacher("cross-modal")
    student_views = [view for view in views if view.output == student_key]
    finetune = Stage("cross-modal-finetune",
                     Distiller({"student": setup.student}, [CrossEntropyTerm("student")],
                               inputs={"student": student_key}, views=student_views))
    if not transfer_epochs:
        return Recipe("cross-modal", [finetune])
    student_tap = student_layer or stage_tap("cross-modal", setup.student, -1, "student_layer")
    teacher_tap = teacher_layer or stage_tap("cross-modal", teacher, -1, "teacher_layer")
    term = SupervisionTransferTerm(f"student:{student_tap}", f"teacher:{teacher_tap}", transfer_weight)
    transfer = Stage("cross-modal-transfer",
                     Distiller({"student": setup.student, "teacher": teacher}, [term],
                               evaluate=("student", "teacher"),
                               inputs={"student": student_key, "teacher": teacher_key}, views=views),
                     epochs=transfer_epochs)
    return Recipe("cross-modal", [transfer, finetune])
