"""Cross-modal and privileged distillation: the teacher reads one modality of each sample, the student another.

The modalities are deterministic views (:mod:`kdkernels.distill.modalities`: the image, a degraded image, the
row+column profiles, a random projection) that the distiller adds to every batch and that evaluation applies too, so
the student is trained AND tested on its own modality. Each method declares its teacher's modality
(``register(..., teacher_input=...)``): the runners (:meth:`DigitsExperiment.for_method
<kdkernels.distill.experiment.DigitsExperiment.for_method>`) train and test the teacher on it.
"""
from __future__ import annotations

from typing import Mapping

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.modalities import MODALITIES, modality_key, modality_transform, modality_views
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import register
from kdkernels.distill.terms import FunctionTerm
from kdkernels.distill.methods._common import single_stage


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
