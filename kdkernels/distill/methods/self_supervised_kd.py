"""Knowledge distillation with self-supervised auxiliary tasks on transformed copies of the batch: SSKD (the
teacher's and student's similarities of rotated copies to the normal images) and HSAKD (joint class × rotation
classifiers on the intermediate stages)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.methods._common import stage_tap
from kdkernels.distill.methods.relation import stage_width
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import Term

SSKD_PAPER = "Xu, Liu, Li, Loy. Knowledge Distillation Meets Self-Supervision. ECCV 2020"
ROTATIONS = 4   # SSKD's copies: the image rotated by 0°, 90°, 180° and 270°


class Rotations(nn.Module):
    """Runs ``model`` once on the batch's four rotations, rows grouped per image: row ``4n + k`` is image n turned
    by k quarter turns (``torch.rot90(x, k, dims=(-2, -1))``, as SSKD's ``cifar.py`` stacks ``np.rot90(img, k)``
    for k = 0..3 and ``student.py`` flattens them into one batch of 4N: batch norm sees all four copies)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"sskd rotates the input by quarter turns: it needs square images [B, ..., H, H], got "
                             f"shape {tuple(x.shape)}")
        copies = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(ROTATIONS)], dim=1)
        return self.model(copies.flatten(0, 1))


def projection_head(width: int) -> nn.Sequential:
    """SSKD's self-supervision head (``wrapper.py`` ``proj_head``): ``Linear(D, D) → ReLU → Linear(D, D)`` on the
    penultimate feature, D its width; torch's default initialisation."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def embedding_of(method: str, model: nn.Module, role: str) -> tuple[str, int]:
    """(the tap of ``model``'s embedding inside :class:`Rotations`, its width): the embedding must be the input of
    the model's linear classifier (SSKD's ``wrapper.py`` reads ``feats[-1]``, the classifier's input, sized by the
    last child's ``in_features``)."""
    points = feature_points(model)
    classifier = model.get_submodule(points.classifier)
    if points.embedding != f"{points.classifier}/input" or not isinstance(classifier, nn.Linear):
        raise ValueError(f"{method}: the {role}'s embedding {points.embedding!r} must be the input of its nn.Linear "
                         f"classifier {points.classifier!r} (the self-supervision head reads the penultimate feature)")
    return f"model.{points.embedding}", classifier.in_features


class SSKDHeadTerm(Term):
    """Stage 1: :func:`kdkernels.sskd_head_loss` of the teacher's head on its stop-gradient embeddings of the four
    rotations (``student.py``'s ``# train ssp_head`` loop: ``bb_grad=False``, the backbone's lr 0)."""

    def __init__(self, embedding: str, head: nn.Module):
        super().__init__("sskd_head", (embedding,))
        self.head = head

    def loss(self, embedding, *, context):
        return kdkernels.sskd_head_loss(self.head(embedding.flatten(1).detach()), copies=ROTATIONS)


class SSKDTerm(Term):
    """Stage 2: :func:`kdkernels.sskd_loss` on the four rotations' logits and head outputs (student head trained,
    teacher head frozen), the teacher's values detached. The student's head is created when the stage is built (as
    connectors are), so that a run resumed at the stage boundary creates it from the same random state."""

    def __init__(self, reads, student_width: int, teacher_head: nn.Module, **weights):
        super().__init__("sskd", reads)
        self.student_width, self.teacher_head, self.weights = student_width, teacher_head, weights
        self.student_head: nn.Module | None = None

    def build(self, example):
        if self.student_head is None:
            self.student_head = projection_head(self.student_width)

    def loss(self, student_logits, teacher_logits, student_embedding, teacher_embedding, target, *, context):
        with torch.no_grad():
            teacher_features = self.teacher_head(teacher_embedding.flatten(1))
        return kdkernels.sskd_loss(student_logits, teacher_logits.detach(),
                                   self.student_head(student_embedding.flatten(1)), teacher_features, target,
                                   copies=ROTATIONS, **self.weights)


@register("sskd", category="relation", paper=SSKD_PAPER,
          approximation="the head stage is a share of the run (the official 60 epochs before the student's 240) "
                        "under the run's optimiser and schedule (official: lr 0.05, ×0.1 at epochs 30 and 45); the "
                        "four rotations are of the augmented image (official: each rotation cropped separately)")
def sskd(setup: Setup, ce_weight: float = 0.1, kd_weight: float = 0.9, tf_weight: float = 2.7,
         ss_weight: float = 10.0, kd_temperature: float = 4.0, tf_temperature: float = 4.0,
         ss_temperature: float = 0.5, tf_ratio: float = 1.0, ss_ratio: float = 0.75,
         head_epochs: int | float = 0.25) -> Recipe:
    """SSKD: a teacher self-supervision head stage, then
    ``0.1·CE + 0.9·KD_4(nor) + 2.7·KD_4(rot | kept) + 10·KD_0.5(S_s, S_t | kept)``, S the cosine similarities of each
    rotated copy's head output to each normal image's (:func:`kdkernels.sskd_loss`).

    As xuguodong03/SSKD @661b972 ``student.py`` (defaults ``--ce-weight 0.1 --kd-weight 0.9 --tf-weight 2.7
    --ss-weight 10 --kd-T 4 --tf-T 4 --ss-T 0.5 --ratio-tf 1.0 --ratio-ss 0.75``; ``cifar.py``; ``wrapper.py``):

    * every image comes with its rotations by 90°, 180° and 270°; each model runs once on the 4B copies
      (:class:`Rotations`); its self-supervision head is ``Linear → ReLU → Linear`` (width of the embedding, the
      classifier's input);
    * stage ``sskd-head`` (``head_epochs``: a float is a share of the run; official 60 epochs before the student's
      240, hence 0.25): the frozen teacher (eval mode, no gradient to its backbone) trains its head with
      :func:`kdkernels.sskd_head_loss` (each rotated copy must pick its own normal image by cosine similarity, CE);
      the head is then frozen;
    * stage ``sskd``: the student and its own head train with :func:`kdkernels.sskd_loss`: CE and KD on the normal
      images, KD on the rotated copies kept by the teacher's error-level ranking (``tf_ratio`` of the wrong ones)
      and the KD of the similarity matrices kept by the same ranking of the teacher's similarities (``ss_ratio``).

    The exported student is evaluated on normal images. Approximations (flagged): the head stage runs as a share of
    the run with the run's optimiser and schedule (official: SGD lr 0.05, ×0.1 at epochs 30 and 45 of 60 — the same
    base rate as its student's 0.05); the rotations are taken of the augmented batch (the official dataset crops
    each rotated copy independently and flips the image before rotating).
    """
    check = Checks("sskd")
    weights = {name: check.real(name, value, nonnegative=True) for name, value in
               (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("tf_weight", tf_weight),
                ("ss_weight", ss_weight))}
    temperatures = {name: check.temperature(value, name) for name, value in
                    (("kd_temperature", kd_temperature), ("tf_temperature", tf_temperature),
                     ("ss_temperature", ss_temperature))}
    ratios = {name: check.probability(name, value) for name, value in (("tf_ratio", tf_ratio),
                                                                       ("ss_ratio", ss_ratio))}
    if isinstance(head_epochs, bool) or not isinstance(head_epochs, (int, float)):
        check.type_error("head_epochs", "an int (epochs) or a float (a share of the run)", head_epochs)
    if head_epochs <= 0 or (isinstance(head_epochs, float) and head_epochs > 1):
        raise ValueError(f"sskd: head_epochs must be an int >= 1 or a share of the run in (0, 1], got "
                         f"{head_epochs!r}")
    teacher = setup.require_teacher("sskd")
    student_tap, student_width = embedding_of("sskd", setup.student, "student")
    teacher_tap, teacher_width = embedding_of("sskd", teacher, "teacher")
    teacher_head = projection_head(teacher_width)
    teacher_rotations, student_rotations = Rotations(teacher), Rotations(setup.student)

    head_stage = Distiller({"teacher": teacher, "teacher_rot": teacher_rotations},
                           [SSKDHeadTerm(f"teacher_rot:{teacher_tap}", teacher_head)], trainable=(),
                           evaluate=("teacher",))
    reads = ("student_rot", "teacher_rot", f"student_rot:{student_tap}", f"teacher_rot:{teacher_tap}", "target")
    main = Distiller({"student": setup.student, "teacher": teacher, "student_rot": student_rotations,
                      "teacher_rot": teacher_rotations},
                     [SSKDTerm(reads, student_width, teacher_head, **weights, **temperatures, **ratios)],
                     trainable=("student", "student_rot"), evaluate=("student",))
    return Recipe("sskd", [Stage("sskd-head", head_stage, epochs=head_epochs,
                                 before=lambda: teacher_head.requires_grad_(True)),
                           Stage("sskd", main, before=lambda: teacher_head.requires_grad_(False))])


# --------------------------------------------------------------------------------------------------------- HSAKD

HSAKD_PAPER = "Yang, An, Xu, Xu. Hierarchical Self-supervised Augmented Knowledge Distillation. IJCAI 2021"


def auxiliary_classifier(widths: Sequence[int], index: int, classes: int) -> nn.Sequential:
    """HSAKD's auxiliary branch on stage ``index`` of a model whose stages have ``widths`` channels: one conv 3×3
    (no bias) + BN + ReLU block per later stage (stride 2, to that stage's channels, as the CIFAR backbones halve the
    map at each stage; for the last stage one stride-1 block of its own width), global average pooling and a linear
    classifier over the ``4·classes`` joint labels. The official ``Auxiliary_Classifier`` (``models/wrn.py``,
    ``resnet.py``) stacks copies of the backbone's own residual stages instead; its initialisation is kept (conv
    weights N(0, 2/(k²·C_out)), BN weight 1, bias 0, linear bias 0)."""
    layers: list[nn.Module] = []
    channels = widths[index]
    later = [(width, 2) for width in widths[index + 1:]] or [(widths[-1], 1)]
    for out_channels, stride in later:
        conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        nn.init.normal_(conv.weight, 0.0, (2.0 / (9 * out_channels)) ** 0.5)
        layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]
        channels = out_channels
    linear = nn.Linear(channels, ROTATIONS * classes)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)


class AuxiliaryClassifiers(nn.ModuleList):
    """One :func:`auxiliary_classifier` per stage; a model of the distillers (trained in one stage, frozen in
    eval mode in the next, checkpointed with the models) that no term reads as an output: the terms call it on
    the tapped stage maps."""

    def __init__(self, widths: Sequence[int], classes: int):
        super().__init__(auxiliary_classifier(widths, index, classes) for index in range(len(widths)))

    def classify(self, term: str, keys: Sequence[str], maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for key, value in zip(keys, maps):
            if value.dim() != 4:
                raise ValueError(f"term {term!r} puts auxiliary classifiers on [B, C, H, W] stage maps, got {key} "
                                 f"{tuple(value.shape)}: pass student_layers / teacher_layers naming such maps")
        return [head(value) for head, value in zip(self, maps)]


class HSAKDHeadTerm(Term):
    """Stage 1: :func:`kdkernels.hsakd_head_loss` of the teacher's auxiliary classifiers on its stop-gradient stage
    maps of the four rotations (``train_teacher_cifar.py --freezed``: the backbone frozen in eval mode, ``net(input,
    grad=False)``)."""

    def __init__(self, stage_keys, classifiers: AuxiliaryClassifiers):
        super().__init__("hsakd_aux", (*stage_keys, "target"))
        self._classifiers = (classifiers,)     # a model of the distiller, not this term's parameters

    def loss(self, *values, context):
        *maps, target = values
        aux = self._classifiers[0].classify(self.name, self.reads[:-1], [m.detach() for m in maps])
        return kdkernels.hsakd_head_loss(aux, target, copies=ROTATIONS)


class HSAKDTerm(Term):
    """Stage 2: :func:`kdkernels.hsakd_loss` on the four rotations: the student's logits and auxiliary classifiers
    against the teacher's (its classifiers frozen in eval mode, run without gradients)."""

    def __init__(self, student_keys, teacher_keys, student_classifiers: AuxiliaryClassifiers,
                 teacher_classifiers: AuxiliaryClassifiers, temperature: float, ce_weight: float):
        super().__init__("hsakd", ("student_rot", "teacher_rot", *student_keys, *teacher_keys, "target"))
        self.stages = len(student_keys)
        self._classifiers = (student_classifiers, teacher_classifiers)   # models of the distiller
        self.temperature, self.ce_weight = temperature, ce_weight

    def loss(self, student_logits, teacher_logits, *values, context):
        student_maps, teacher_maps = values[:self.stages], values[self.stages:2 * self.stages]
        keys = self.reads[2:2 + 2 * self.stages]
        student_classifiers, teacher_classifiers = self._classifiers
        with torch.no_grad():
            teacher_aux = teacher_classifiers.classify(self.name, keys[self.stages:], teacher_maps)
        student_aux = student_classifiers.classify(self.name, keys[:self.stages], student_maps)
        return kdkernels.hsakd_loss(student_logits, teacher_logits.detach(), student_aux, teacher_aux, values[-1],
                                    temperature=self.temperature, ce_weight=self.ce_weight, copies=ROTATIONS)


def stage_taps_of(method: str, model: nn.Module, layers, argument: str) -> list[str]:
    """The model's stage taps (``feature_points``), or ``layers`` when given (a str or a sequence of str)."""
    if layers is None:
        stages = list(feature_points(model).stages)
        if not stages:
            stage_tap(method, model, 0, argument)
        return stages
    if isinstance(layers, str):
        return [layers]
    return [str(layer) for layer in layers]


def stage_widths(method: str, model: nn.Module, taps: Sequence[str], role: str) -> list[int]:
    widths = [stage_width(model, tap) for tap in taps]
    if None in widths:
        raise ValueError(f"{method} cannot tell the channels of the {role} stages {list(taps)} ({widths}): pass "
                         f"{role}_layers naming conv/BN outputs")
    return widths


@register("hsakd", category="feature", paper=HSAKD_PAPER,
          approximation="the auxiliary classifiers are conv 3×3–BN–ReLU blocks (stride 2) per later stage instead of "
                        "copies of the backbone's residual stages; the teacher's classifiers train for a share of the "
                        "run under the run's optimiser and schedule (official: 100 epochs, lr 0.05 ×0.1 at 30/60/90, "
                        "Nesterov)")
def hsakd(setup: Setup, temperature: float = 3.0, ce_weight: float = 1.0, aux_epochs: int | float = 100 / 240,
          student_layers=None, teacher_layers=None) -> Recipe:
    """HSAKD: the teacher's auxiliary joint classifiers, then
    ``CE(z_s[nor], y) + Σ_stages KD_3(a_s,i, a_t,i) + KD_3(z_s, z_t)`` over the four rotations
    (:func:`kdkernels.hsakd_loss`), ``a_i`` the 4·C-way class × rotation logits of stage i's auxiliary classifier.

    As winycg/HSAKD @28c8dc2 (``train_teacher_cifar.py --freezed``, ``train_teacher_freezed.sh``,
    ``train_student_cifar.py``, ``models/wrn.py`` ``Auxiliary_Classifier``/``WideResNet_Auxiliary``):

    * each image is stacked with its rotations by 90°, 180°, 270° (``torch.rot90(input, k, (2, 3))``), one forward
      of the 4B copies (:class:`Rotations`); the joint label of image n's copy k is ``4·y_n + k``
      (:func:`kdkernels.hsakd_joint_labels`);
    * every stage map (``feature_points(model).stages``, or ``student_layers``/``teacher_layers``) feeds an
      auxiliary classifier (:func:`auxiliary_classifier`) over the 4·C joint classes;
    * stage ``hsakd-aux`` (``aux_epochs``: a float is a share of the run; official 100 epochs against the
      student's 240): the trained teacher is frozen (eval mode, its maps detached) and its auxiliary classifiers
      train on ``Σ_i CE(a_t,i, 4y + k)`` (:func:`kdkernels.hsakd_head_loss`; the official loss also adds the frozen
      classifier's CE, a constant);
    * stage ``hsakd``: the student (with its auxiliary classifiers, whose gradient reaches its backbone:
      ``net(input, grad=True)``) trains on CE of the normal images' logits plus ``DistillKL`` (T = 3, batchmean
      ``T²·KL``) of each stage's joint distribution and of the logits of all 4B copies, the teacher's classifiers
      frozen in eval mode.

    The official student script has no CE on the joint labels for the student's classifiers (they learn from the
    teacher's distributions only); ``ce_weight`` scales the CE of the normal images (official 1). The exported
    student is evaluated on normal images. Approximations (flagged): generic auxiliary blocks (conv 3×3 + BN + ReLU,
    stride 2, per later stage) instead of copies of the backbone's residual stages; the teacher stage as a share of
    the run with the run's optimiser and schedule.
    """
    check = Checks("hsakd")
    temperature = check.temperature(temperature)
    ce_weight = check.real("ce_weight", ce_weight, nonnegative=True)
    if isinstance(aux_epochs, bool) or not isinstance(aux_epochs, (int, float)):
        check.type_error("aux_epochs", "an int (epochs) or a float (a share of the run)", aux_epochs)
    if aux_epochs <= 0 or (isinstance(aux_epochs, float) and aux_epochs > 1):
        raise ValueError(f"hsakd: aux_epochs must be an int >= 1 or a share of the run in (0, 1], got "
                         f"{aux_epochs!r}")
    teacher = setup.require_teacher("hsakd")
    student_paths = stage_taps_of("hsakd", setup.student, student_layers, "student_layers")
    teacher_paths = stage_taps_of("hsakd", teacher, teacher_layers, "teacher_layers")
    if len(student_paths) != len(teacher_paths):
        raise ValueError(f"hsakd pairs the stages one to one, got {len(student_paths)} student and "
                         f"{len(teacher_paths)} teacher stages: pass student_layers / teacher_layers of one length")
    student_aux = AuxiliaryClassifiers(stage_widths("hsakd", setup.student, student_paths, "student"),
                                       setup.num_classes)
    teacher_aux = AuxiliaryClassifiers(stage_widths("hsakd", teacher, teacher_paths, "teacher"), setup.num_classes)
    student_taps = [f"student_rot:model.{path}" for path in student_paths]
    teacher_taps = [f"teacher_rot:model.{path}" for path in teacher_paths]
    teacher_rotations = Rotations(teacher)
    aux_stage = Distiller({"teacher": teacher, "teacher_rot": teacher_rotations, "teacher_aux": teacher_aux},
                          [HSAKDHeadTerm(teacher_taps, teacher_aux)], trainable=("teacher_aux",),
                          evaluate=("teacher",))
    main = Distiller({"student": setup.student, "teacher": teacher, "student_rot": Rotations(setup.student),
                      "teacher_rot": teacher_rotations, "student_aux": student_aux, "teacher_aux": teacher_aux},
                     [HSAKDTerm(student_taps, teacher_taps, student_aux, teacher_aux, temperature, ce_weight)],
                     trainable=("student", "student_rot", "student_aux"), evaluate=("student",))
    return Recipe("hsakd", [Stage("hsakd-aux", aux_stage, epochs=aux_epochs), Stage("hsakd", main)])
