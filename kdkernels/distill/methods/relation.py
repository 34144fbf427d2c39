"""Relation-based methods: the student matches relations among the samples of a batch (../shared/reference/methods.md
§3). Each is ``ce_weight·CE + weight·relation (+ kd_weight·KD)`` between a frozen teacher and the student; the relation
reads hooked features (by default the model's ``feature_points``; every builder accepts explicit tap paths)."""
from __future__ import annotations

from typing import Callable

import kdkernels
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.methods._common import offline
from kdkernels.distill.recipe import FeaturePoints, Recipe, Setup, Stage, feature_points
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
