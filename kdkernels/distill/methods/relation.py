"""Relation-based methods: the student matches relations among the samples of a batch (../shared/reference/methods.md
§3). Each is ``ce_weight·CE + weight·relation (+ kd_weight·KD)`` between a frozen teacher and the student; the relation
reads hooked features (by default the model's ``feature_points``; every builder accepts explicit tap paths)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.methods._common import offline
from kdkernels.distill.recipe import FeaturePoints, Recipe, Setup, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term


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


class CategoryStructureTerm(Term):
    """``kdkernels.category_structure_loss`` on (connector(student map), teacher map, labels, logits); the connector
    is CSKD's bias-free 1×1 convolution (a bias-free linear layer for [B, D] features) to the teacher's width."""

    def __init__(self, student_key: str, teacher_key: str, weight: float, **options):
        super().__init__("category_structure", (student_key, teacher_key, "target", "student", "teacher"), weight)
        self.options = options
        self.connector: nn.Module | None = None

    def build(self, example):
        student, teacher = example[self.reads[0]], example[self.reads[1]]
        if self.connector is None:
            if student.dim() == 4 and teacher.dim() == 4 and student.shape[2:] == teacher.shape[2:]:
                self.connector = nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False)
            elif student.dim() == 2 and teacher.dim() == 2:
                self.connector = nn.Linear(student.shape[1], teacher.shape[1], bias=False)
            else:
                raise ValueError(f"term 'category_structure' needs [B, C, H, W] maps of one spatial size or [B, D] "
                                 f"features on both sides: {self.reads[0]} {tuple(student.shape)}, {self.reads[1]} "
                                 f"{tuple(teacher.shape)}")
        try:
            with torch.no_grad():
                self.loss(*(example[key] for key in self.reads), context=None)
        except ValueError as error:
            raise ValueError(f"term 'category_structure' cannot compare {list(self.reads)}: {error}") from error

    def loss(self, student, teacher, target, student_logits, teacher_logits, *, context):
        return kdkernels.category_structure_loss(self.connector(student), teacher, target, student_logits,
                                                 teacher_logits, **self.options)


@register("category-structure", category="relation",
          paper="Chen, Zheng, Shen, Zeng, Zhou, Zhao. Improving Knowledge Distillation via Category Structure. "
                "ECCV 2020",
          approximation="the teacher's feature is its last stage map as it is; the official teacher reads it "
                        "through a 1×1 convolution saved with its checkpoint, whose training is not published")
def category_structure(setup: Setup, intra_weight: float = 0.002, inter_weight: float = 0.04,
                       center_weight: float = 0.1, filter_correct: bool = True, weight: float = 1.0,
                       ce_weight: float = 0.9, mse_weight: float = 1e-6, student_layer: str | None = None,
                       teacher_layer: str | None = None) -> Recipe:
    """CSKD: ``0.9·CE + category_structure + 1e-6·mse(z_s, z_t)`` (xeanzheng/CSKD ``train_cifar.py``, a309f0f).

    ``category_structure`` is :func:`kdkernels.category_structure_loss` (intra-category residuals to the class
    centres, inter-category cosine structure of the class centres in the batch, a centre term on the student's
    logits; weights 0.002 / 0.04 / 0.1, centres of correctly classified samples for the intra term) on the last stage
    maps, the student's mapped to the teacher's width by a learnt bias-free 1×1 convolution (the official
    ``branch4``), and on the logits. The official total is ``α·CE + category + (1 − α)·1e-5·mse(z_s, z_t)`` with
    α 0.9, hence ``ce_weight`` 0.9 and ``mse_weight`` 1e-6. ``weight`` scales the category term (1 officially).
    Approximation: the official teacher feature passes through the teacher checkpoint's own 1×1 convolution (not
    published); here it is the teacher's last stage map."""
    teacher = setup.require_teacher("category-structure")
    student_tap = tap(setup.student, student_layer, last_stage)
    teacher_tap = tap(teacher, teacher_layer, last_stage)
    check = Checks("category-structure")
    check.real("mse_weight", mse_weight, nonnegative=True)
    check.real("ce_weight", ce_weight, nonnegative=True)
    term = CategoryStructureTerm(f"student:{student_tap}", f"teacher:{teacher_tap}", weight,
                                 intra_weight=check.real("intra_weight", intra_weight),
                                 inter_weight=check.real("inter_weight", inter_weight),
                                 center_weight=check.real("center_weight", center_weight),
                                 filter_correct=check.flag("filter_correct", filter_correct))
    terms = [CrossEntropyTerm("student", ce_weight), term]
    if mse_weight:
        terms.append(FunctionTerm("logit_mse", F.mse_loss, ("student", "teacher"), mse_weight))
    return offline("category-structure", setup, terms)


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
