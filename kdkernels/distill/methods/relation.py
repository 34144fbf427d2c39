"""Relation-based methods: the student matches relations among the samples of a batch (../shared/reference/methods.md
§3). Each is ``ce_weight·CE + weight·relation (+ kd_weight·KD)`` between a frozen teacher and the student; the relation
reads hooked features (by default the model's ``feature_points``; every builder accepts explicit tap paths)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.distill.connectors import Embed
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.hooks import find_module
from kdkernels.distill.methods._common import offline
from kdkernels.distill.recipe import FeaturePoints, Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, StepContext, Term


def tap(model, override: str | None, pick: Callable[[FeaturePoints], str]) -> str:
    """The tap path ``override`` or the one ``pick`` chooses from the model's feature points."""
    return override if override is not None else pick(feature_points(model))


def last_stage(points: FeaturePoints) -> str:
    if not points.stages:
        raise ValueError("the model's feature points list no stages: pass the tap path explicitly")
    return points.stages[-1]


def last_two_stages(method: str, model, override: tuple[str, str] | None) -> tuple[str, str]:
    """(earlier, later) stage taps: ``override`` or the model's last two stages."""
    if override is not None:
        if len(override) != 2:
            raise ValueError(f"{method}: expected two stage taps (earlier, later), got {override!r}")
        return tuple(override)
    stages = feature_points(model).stages
    if len(stages) < 2:
        raise ValueError(f"{method} needs two stages of {type(model).__name__}, its feature points list {stages}: "
                         "pass the stage taps explicitly")
    return stages[-2], stages[-1]


def embedding_pair(setup: Setup, method: str, student_layer: str | None, teacher_layer: str | None) -> tuple[str, str]:
    """Value names of the student's and the teacher's pooled embeddings."""
    teacher = setup.require_teacher(method)
    return (f"student:{tap(setup.student, student_layer, lambda p: p.embedding)}",
            f"teacher:{tap(teacher, teacher_layer, lambda p: p.embedding)}")


def relation_recipe(method: str, setup: Setup, relation: Term, ce_weight: float, kd_weight: float,
                    temperature: float) -> Recipe:
    """``ce_weight·CE + relation`` plus ``kd_weight·KD`` (T² batchmean) when ``kd_weight`` is not 0."""
    terms = [CrossEntropyTerm("student", ce_weight), relation]
    if kd_weight:
        terms.append(FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), kd_weight,
                                  temperature=temperature))
    return offline(method, setup, terms)


@register("rkd", category="relation",
          paper="Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019",
          presets={"metric": {"distance_weight": 1.0, "angle_weight": 2.0}})
def rkd(setup: Setup, distance_weight: float = 25.0, angle_weight: float = 50.0, weight: float = 1.0,
        ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
        student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """RKD: ``CE + weight·(w_d·L_dist + w_a·L_angle)`` on the pooled embeddings (lenscloth/RKD, RepDistiller RKDLoss).

    Defaults are RepDistiller's classification setting (``-a 0 -b 1``, w_d 25, w_a 50, on ``feat[-1]``); the
    ``metric`` preset is lenscloth's metric-learning 1 / 2. ``kd_weight`` adds Hinton KD at ``temperature``.
    """
    student, teacher = embedding_pair(setup, "rkd", student_layer, teacher_layer)
    term = FunctionTerm("rkd", kdkernels.rkd_loss, (student, teacher), weight, distance_weight=distance_weight,
                        angle_weight=angle_weight)
    return relation_recipe("rkd", setup, term, ce_weight, kd_weight, temperature)


@register("sp", category="relation",
          paper="Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019")
def sp(setup: Setup, weight: float = 3000.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
       temperature: float = 4.0, student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """SP: ``CE + 3000·‖normalize(G_t) − normalize(G_s)‖²_F / B²`` on the last stage map (RepDistiller SP)."""
    teacher = setup.require_teacher("sp")
    term = FunctionTerm("sp", kdkernels.sp_loss, (f"student:{tap(setup.student, student_layer, last_stage)}",
                                                  f"teacher:{tap(teacher, teacher_layer, last_stage)}"), weight)
    return relation_recipe("sp", setup, term, ce_weight, kd_weight, temperature)


@register("cc", category="relation",
          paper="Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang. Correlation Congruence for Knowledge Distillation. "
                "ICCV 2019")
def cc(setup: Setup, gamma: float = 0.4, order: int = 2, weight: float = 100.0, ce_weight: float = 1.0,
       kd_weight: float = 0.0, temperature: float = 4.0, student_layer: str | None = None,
       teacher_layer: str | None = None) -> Recipe:
    """CC: ``CE + 100·mse(K_s, K_t)``, Gaussian-RBF Taylor kernels of the embeddings (KD-Zoo ``kd_losses/cc.py``).

    K is the order-2 Taylor series of the Gaussian RBF (γ 0.4) of the L2-normalised pooled embeddings; KD-Zoo applies
    it to the features as they are (no learnt embedding).

    Other variants, not this one: torchdistill ``CCKDLoss`` (a learnt d→128 linear embedding, no normalisation,
    ``‖K_s − K_t‖_F / B²``, weight 0.003) and RepDistiller ``Correlation`` (a consecutive-pair approximation on
    128-d linear embeddings, weight 0.02).
    """
    student, teacher = embedding_pair(setup, "cc", student_layer, teacher_layer)
    term = FunctionTerm("cc", kdkernels.cc_loss, (student, teacher), weight, gamma=gamma, order=order)
    return relation_recipe("cc", setup, term, ce_weight, kd_weight, temperature)


class IRGTerm(Term):
    """``kdkernels.irg_loss`` on (map1, map2, embedding, logits) of the student then the teacher."""

    def __init__(self, reads, weight: float, **weights):
        super().__init__("irg", reads, weight)
        self.weights = weights

    def build(self, example):
        try:
            self.loss(*(example[key] for key in self.reads), context=None)
        except ValueError as error:
            raise ValueError(f"term 'irg' cannot compare {list(self.reads)}: {error}") from error

    def loss(self, *values, context):
        return kdkernels.irg_loss(values[:4], values[4:], **self.weights)


@register("irg", category="relation",
          paper="Liu, Cao, Li, Yuan, Hu, Li, Duan. Knowledge Distillation via Instance Relationship Graph. CVPR 2019")
def irg(setup: Setup, vertex_weight: float = 0.1, edge_weight: float = 5.0, transform_weight: float = 5.0,
        weight: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
        student_stages: tuple[str, str] | None = None, teacher_stages: tuple[str, str] | None = None,
        student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """IRG: ``CE + 0.1·vertex + 5·edge + 5·transform`` (Knowledge-Distillation-Zoo ``kd_losses/irg.py``, λ 1).

    Over the last two stage maps, the pooled embedding and the logits (the official code is Caffe). See
    ``kdkernels.irg_loss``."""
    teacher = setup.require_teacher("irg")
    student_maps = last_two_stages("irg", setup.student, student_stages)
    teacher_maps = last_two_stages("irg", teacher, teacher_stages)
    student_embedding, teacher_embedding = embedding_pair(setup, "irg", student_layer, teacher_layer)
    reads = ([f"student:{path}" for path in student_maps] + [student_embedding, "student"] +
             [f"teacher:{path}" for path in teacher_maps] + [teacher_embedding, "teacher"])
    term = IRGTerm(reads, weight, vertex_weight=vertex_weight, edge_weight=edge_weight,
                   transform_weight=transform_weight)
    return relation_recipe("irg", setup, term, ce_weight, kd_weight, temperature)


@register("darkrank", category="relation",
          paper="Chen, Wang, Zhang. DarkRank: Accelerating Deep Metric Learning via Cross Sample Similarities "
                "Transfer. AAAI 2018",
          presets={"cli": {"alpha": 2.0}})
def darkrank(setup: Setup, alpha: float = 3.0, beta: float = 3.0, list_length: int = 4, weight: float = 1.0,
             ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
             student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """HardDarkRank: ``CE + ListMLE`` of the student's ``−3·d³`` scores in the teacher's top-4 order (lenscloth/RKD).

    On the pooled embeddings, with the ``HardDarkRank`` class defaults; the ``cli`` preset is its ``--dark_alpha 2``.
    The official script has no classification setting: CE weight 1 and DarkRank weight 1 are ours."""
    student, teacher = embedding_pair(setup, "darkrank", student_layer, teacher_layer)
    term = FunctionTerm("darkrank", kdkernels.darkrank_loss, (student, teacher), weight, alpha=alpha, beta=beta,
                        list_length=list_length)
    return relation_recipe("darkrank", setup, term, ce_weight, kd_weight, temperature)


# ------------------------------------------------------------------------------------------------------- REFILLED

REFILLED_APPROXIMATION = (
    "stage 2 starts from the student at the end of stage 1 (the official code reloads the stage-1 checkpoint with "
    "the best validation NCM accuracy), and both stages use the run's optimiser and schedule (officially SGD "
    "Nesterov with cosine decay to 0.1·lr in stage 1, step decay in stage 2); the official 200 + 200 epochs become "
    "two halves of the run (embedding_epochs = 0.5)")


@register("refilled", category="relation",
          paper="Ye, Lu, Zhan. Distilling Cross-Task Knowledge via Relationship Matching. CVPR 2020",
          approximation=REFILLED_APPROXIMATION)
def refilled(setup: Setup, triplet_weight: float = 1000.0, triplet_temperature: float = 4.0,
             classifier_weight: float = 1000.0, classifier_temperature: float = 2.0, ce_weight: float = 1.0,
             embedding_epochs: int | float = 0.5, student_layer: str | None = None,
             teacher_layer: str | None = None) -> Recipe:
    """REFILLED, two stages on the pooled embeddings (njulus/ReFilled @c5e077f, the CVPR 2020 code: ``Train.py``,
    ``utils/Triplet.py``, ``main.py``):

    1. ``refilled-embedding`` (``embedding_epochs``: a share of the run, the rest going to stage 2, or an epoch count
       before a stage 2 of the run's epochs): only
       ``1000·refilled_triplet_loss(e_s, e_t, y, τ1 = 4)`` — on the semi-hard triplets the student's normalised
       embedding picks, the binary KL between the teacher's and the student's ``sigmoid((d_an − d_ap)/τ1)``;
    2. ``refilled``: ``CE + 1000·refilled_classifier_loss(z_s, e_t, y, τ = 2)`` — the KL (no T², an element mean
       over B×K) from the teacher's local classifier (inner products of its embedding with the normalised mean
       teacher embeddings of the K classes in the batch) to the student's logits of those classes.

    Weights and temperatures: ``main.py`` @c5e077f (``beta`` 1000, ``tau1`` 4, ``tau3`` 2) and the factor 1000 of
    stage 1 in ``Train.py``; two stages of equal length (half the run each) as the later code's 200 + 200 epochs
    (``main.py`` @HEAD).
    The repository's later revision (@be649aa, "important improvements") instead keeps all (a, p) negatives of
    ``pytorch_metric_learning``'s semi-hard miner (margin 0.2) and global class centres computed over the whole
    training set, with ``λ = 100`` and a batch mean; this method is the published version. The student trains
    alone in stage 1 (its classifier gets no gradient there); the teacher's embedding is its ``fc`` input."""
    student, teacher = embedding_pair(setup, "refilled", student_layer, teacher_layer)
    teacher_model = setup.require_teacher("refilled")
    models = {"student": setup.student, "teacher": teacher_model}
    triplet = FunctionTerm("refilled_triplet", kdkernels.refilled_triplet_loss, (student, teacher, "target"),
                           triplet_weight, temperature=triplet_temperature)
    classifier = FunctionTerm("refilled_classifier", kdkernels.refilled_classifier_loss,
                              ("student", teacher, "target"), classifier_weight, temperature=classifier_temperature)
    terms = ([CrossEntropyTerm("student", ce_weight)] if ce_weight else []) + [classifier]
    if isinstance(embedding_epochs, bool) or not isinstance(embedding_epochs, (int, float)):
        raise TypeError(f"refilled: embedding_epochs must be a share of the run in (0, 1) or an epoch count, got "
                        f"{embedding_epochs!r}")
    if isinstance(embedding_epochs, float) and not 0.0 < embedding_epochs < 1.0 or embedding_epochs <= 0:
        raise ValueError(f"refilled: embedding_epochs must be a share of the run in (0, 1) or a positive epoch "
                         f"count, got {embedding_epochs!r}")
    classifier_epochs = 1.0 - embedding_epochs if isinstance(embedding_epochs, float) else None
    return Recipe("refilled", [Stage("refilled-embedding", Distiller(models, [triplet]), epochs=embedding_epochs),
                               Stage("refilled", Distiller(models, terms), epochs=classifier_epochs)])


# ----------------------------------------------------------------------------------------------------------- CRCD

class MimicSchedule:
    """The official ``adjust_mimic_loss_weight(..., '240')`` (Lechatelia/CRCD ``helper/loops.py``): the distillation
    weights are 1 while the iteration is below ``until`` of the run (24/25: epoch 240 of 250), then 0; counted here in
    epochs, ``(epoch − 1) < until·epochs``."""

    def __init__(self, until: float):
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0.0 < until <= 1.0:
            raise ValueError(f"crcd: mimic_until must be a share of the run in (0, 1], got {until!r}")
        self.until = float(until)

    def __call__(self, context: StepContext) -> float:
        return 1.0 if context.epoch - 1 < self.until * context.epochs else 0.0


class MimicKDTerm(FunctionTerm):
    """Hinton KD whose weight follows a :class:`MimicSchedule`."""

    def __init__(self, weight: float, temperature: float, schedule: MimicSchedule):
        super().__init__("kd", kdkernels.kd_loss, ("student", "teacher"), weight, temperature=temperature)
        self.schedule = schedule

    def weight_at(self, context):
        return self.weight * self.schedule(context)


class SharedContrast:
    """The contrast indices [B, K+1] of a step, drawn once and shared by the feature and gradient criteria (the
    official loop passes the dataset's one ``contrast_idx`` to both): ``num_negatives`` of other classes when bank
    labels are given, else uniform over the bank; a second call with the same ``index`` tensor returns the same
    draw."""

    def __init__(self, num_data: int, num_negatives: int):
        self.num_data, self.num_negatives = num_data, num_negatives
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, index: torch.Tensor, bank_labels: torch.Tensor | None) -> torch.Tensor:
        if self.last is not None and self.last[0] is index:
            return self.last[1]
        if bank_labels is not None:
            contrast = kdkernels.sample_other_class_indices(index.long(), bank_labels, self.num_negatives)
        else:
            contrast = kdkernels.sample_contrast_indices(index.long(), self.num_data, self.num_negatives)
        self.last = (index, contrast)
        return contrast


class CRCDTerm(Term):
    """``weight · crcd_loss`` of embedding heads (Linear(d, feat_dim) + L2 norm, one per side, CRCD ``Embed``
    "linear") of the student's and the teacher's features, with its own two memory banks [num_data, feat_dim]
    (buffers; CRCD ``ContrastMemory``: U(−stdv, stdv) rows, L2-normalised) and normalisers Z (set on the first
    training call, :func:`kdkernels.crcd_normalizers`); the banks take the momentum update after every training
    call (:func:`kdkernels.crd_update_memory_`). Negatives from ``contrast`` (:class:`SharedContrast`)."""

    def __init__(self, name: str, reads, weight: float, num_data: int, feat_dim: int, contrast: SharedContrast,
                 temperature: float, momentum: float, bank_labels: torch.Tensor | None, schedule: MimicSchedule):
        super().__init__(name, reads, weight)
        self.feat_dim, self.contrast = feat_dim, contrast
        self.temperature, self.momentum, self.schedule = temperature, momentum, schedule
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for bank in ("memory_student", "memory_teacher"):
            self.register_buffer(bank, F.normalize(torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv), dim=1))
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self.register_buffer("bank_labels", None if bank_labels is None else bank_labels.long().clone())
        self.normalizers_set = False
        self.register_load_state_dict_post_hook(CRCDTerm._after_load)
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None

    @staticmethod
    def _after_load(module: "CRCDTerm", _incompatible_keys) -> None:
        module.normalizers_set = bool((module.normalizers > 0).all())

    def inputs(self, *values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student, teacher, index) to embed."""
        return values

    def build(self, example):
        student, teacher, _ = self.inputs(*(example[key] for key in self.reads))
        if self.embed_student is None:
            self.embed_student = Embed(student[0].numel(), self.feat_dim)
            self.embed_teacher = Embed(teacher[0].numel(), self.feat_dim)

    def loss(self, *values, context):
        student, teacher, index = self.inputs(*values)
        contrast = self.contrast(index, self.bank_labels)
        index = index.long()
        embed_s, embed_t = self.embed_student(student), self.embed_teacher(teacher)
        if not self.normalizers_set:
            self.normalizers.copy_(kdkernels.crcd_normalizers(embed_s, embed_t, index, contrast, self.memory_student,
                                                              self.memory_teacher, self.temperature))
            self.normalizers_set = True
        loss = kdkernels.crcd_loss(embed_s, embed_t, index, contrast, self.memory_student, self.memory_teacher,
                                   self.normalizers, self.temperature)
        if context is None or context.training:
            kdkernels.crd_update_memory_(self.memory_student, embed_s, index, self.momentum)
            kdkernels.crd_update_memory_(self.memory_teacher, embed_t, index, self.momentum)
        return loss

    def weight_at(self, context):
        return self.weight * self.schedule(context)


class CRCDGradientTerm(CRCDTerm):
    """CRCD's gradient relation (Lechatelia/CRCD ``helper/loops.py::get_grad_loss``): :class:`CRCDTerm` on the
    gradients of each network's cross-entropy w.r.t. its embedding, ``∂CE(head(f), y)/∂f``, ``head`` the classifier
    the embedding feeds (the student's with ``create_graph``, so that the loss trains through the gradient; the
    teacher's a constant)."""

    def __init__(self, name, student_key, teacher_key, student_head: nn.Module, teacher_head: nn.Module, **options):
        super().__init__(name, (student_key, teacher_key, "target", "index"), **options)
        self.heads = {"student": student_head, "teacher": teacher_head}   # the models' own modules, not registered

    def inputs(self, student, teacher, target, index):
        target = target.long()
        with torch.enable_grad():
            if not (torch.is_grad_enabled() and student.requires_grad):
                student = student.detach().requires_grad_()
            head_s = self.heads["student"](student)
            grad_s, = torch.autograd.grad(F.cross_entropy(head_s, target), student, create_graph=True)
            leaf = teacher.detach().requires_grad_()
            grad_t, = torch.autograd.grad(F.cross_entropy(self.heads["teacher"](leaf), target), leaf)
        return grad_s, grad_t, index


def crcd_head(method: str, model: nn.Module, tap: str, argument: str) -> nn.Module:
    """The classifier module whose input is the embedding tap ``<path>/input``."""
    if not tap.endswith("/input"):
        raise ValueError(f"{method}: the gradient relation differentiates CE through the classifier that the "
                         f"embedding feeds, so {argument} must be '<classifier path>/input', got {tap!r} (or pass "
                         f"gradient=False)")
    return find_module(model, tap[: -len("/input")], argument)


@register("crcd", category="relation",
          paper="Zhu, Tang, Chen, Yu, Liu, Yang, Rong, Wang. Complementary Relation Contrastive Distillation. "
                "CVPR 2021",
          approximation="the authors' reference repository (Lechatelia/CRCD) is a self-declared unchecked "
                        "reimplementation: its loops.py adds the gradient relation as α·KD·L_grad (a product with "
                        "the KD loss), here it is added as grad_weight·L_grad under the same mimic schedule as the "
                        "other distillation terms; the loop also leaves the teacher in train mode (batch-statistics "
                        "BN; its eval() line is commented out), here it stays frozen in eval mode as in RepDistiller; "
                        "the schedule's 24/25 switch is counted in epochs, not iterations")
def crcd(setup: Setup, weight: float = 1.0, grad_weight: float = 1.0, kd_weight: float = 0.9,
         temperature: float = 4.0, ce_weight: float = 1.0, gradient: bool = True, feat_dim: int = 128,
         num_negatives: int = 500, nce_temperature: float = 0.05, momentum: float = 0.5,
         mimic_until: float = 24 / 25, student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """CRCD: ``CE + m·(0.9·KD_T4 + 1·L_crcd(f_s, f_t) + 1·L_crcd(∂CE_s/∂f_s, ∂CE_t/∂f_t))`` on the pooled embeddings,
    m = 1 until 24/25 of the run then 0 (Lechatelia/CRCD @f9176f6).

    ``L_crcd`` (:func:`kdkernels.crcd_loss`, ``crcd/criterion.py``, ``crcd/memory.py``): Linear(d, 128) + L2 heads,
    two memory banks; every (sample, anchor) pair of the batch, anchors the other side's bank rows of the batch's
    samples, contrasts the sample's relation ``normalize(v − A + 1e-6)`` with the bank's relations of the positive
    and K = 500 negatives (NCE, T 0.05, Z set once, bank momentum 0.5). The gradient relation (``gradient``,
    ``helper/loops.py::get_grad_loss`` with ``--grad_kd_type crcd``) is a second criterion (own heads and banks) on
    the gradients of each network's CE w.r.t. its embedding. Weights: ``train_student.py`` defaults (γ 1, α 0.9,
    β 1, ``grad_kd_weight`` 1, ``kd_T`` 4, ``nce_k`` 500, ``nce_t`` 0.05, ``nce_m`` 0.5, ``feat_dim`` 128) and
    ``adjust_mimic_loss_weight(..., '240')``. Negatives as :func:`crd` (other classes with ``setup.train_labels``,
    with replacement), one draw per step shared by both criteria as the official ``contrast_idx``. See the
    approximation flag for the gradient term's weighting."""
    teacher = setup.require_teacher("crcd")
    if not setup.num_train or setup.num_train < 2:
        raise ValueError("crcd keeps one memory-bank slot per training sample: set Setup.num_train (at least 2), got "
                         f"{setup.num_train!r}")
    labels = setup.train_labels
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != setup.num_train):
        raise ValueError(f"crcd: train_labels must hold one label per training sample ({setup.num_train}), got "
                         f"shape {tuple(labels.shape)}")
    if labels is not None and int(torch.unique(labels).numel()) < 2:
        raise ValueError("crcd draws negatives from other classes: train_labels has a single class")
    for name, value in (("feat_dim", feat_dim), ("num_negatives", num_negatives)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"crcd: {name} must be a positive int, got {value!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"crcd: momentum must be in [0, 1], got {momentum!r}")
    if not nce_temperature > 0:
        raise ValueError(f"crcd: nce_temperature must be > 0, got {nce_temperature!r}")
    schedule = MimicSchedule(mimic_until)
    student_tap = student_layer or feature_points(setup.student).embedding
    teacher_tap = teacher_layer or feature_points(teacher).embedding
    negatives = num_negatives if labels is not None else min(num_negatives, setup.num_train - 1)
    options = dict(num_data=setup.num_train, feat_dim=feat_dim, contrast=SharedContrast(setup.num_train, negatives),
                   temperature=nce_temperature, momentum=momentum, bank_labels=labels, schedule=schedule)
    student_key, teacher_key = f"student:{student_tap}", f"teacher:{teacher_tap}"
    terms: list[Term] = [CrossEntropyTerm("student", ce_weight)] if ce_weight else []
    if kd_weight:
        terms.append(MimicKDTerm(kd_weight, temperature, schedule))
    terms.append(CRCDTerm("crcd", (student_key, teacher_key, "index"), weight, **options))
    if gradient:
        heads = (crcd_head("crcd", setup.student, student_tap, "student_layer"),
                 crcd_head("crcd", teacher, teacher_tap, "teacher_layer"))
        terms.append(CRCDGradientTerm("crcd_grad", student_key, teacher_key, *heads, weight=grad_weight, **options))
    return offline("crcd", setup, terms)
