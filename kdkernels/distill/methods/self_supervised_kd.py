"""Knowledge distillation with self-supervised auxiliary tasks on transformed copies of the batch: SSKD (the
teacher's and student's similarities of rotated copies to the normal images)."""
from __future__ import annotations

import torch
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import Distiller
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
