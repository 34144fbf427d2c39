"""Relation-based methods: the student matches relations among the samples of a batch (../shared/reference/methods.md
§3). Each is ``ce_weight·CE + weight·relation (+ kd_weight·KD)`` between a frozen teacher and the student; the relation
reads hooked features (by default the model's ``feature_points``; every builder accepts explicit tap paths)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.connectors import Embed, output_channels
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.hooks import find_module
from kdkernels.distill.methods._common import offline
from kdkernels.distill.recipe import FeaturePoints, Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.term_gradients import graph_leaves
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


MHGD_ATTENTION_SHARE = 40 / 100   # KD_methods_with_TF: 40 epochs of attention training before the 100-epoch run


def pooled_embedding(feature: torch.Tensor) -> torch.Tensor:
    """A stage map's global average pool ([B, C, H, W] -> [B, C]); other features flattened per sample."""
    return feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature.reshape(feature.shape[0], -1)


class MultiHeadGraph(nn.Module):
    """MHGD's multi-head attention network between a front and a back embedding (KD_methods_with_TF
    ``Attention_head`` and ``Estimator``).

    ``attention(back, front)`` ``[B, D_b], [B, D_f] -> [H, B, B]``: ``G_h[i, j] = <s_h(back_i), r_h(front_j)>`` with
    sender and receiver a bias-free linear layer to ``(D_b + D_f)//2 · H`` features then batch norm, split into H
    heads (the head index fastest, as the official reshape ``[B, D, H]``). ``estimate(front, graph)``
    reconstructs the back embedding: ``softmax`` of each row of G, each (head, sample) row kept where
    ``ε_h − mean_h ε > 0`` (ε standard normal: the official ``drop_head``, in training), the heads' graphs
    applied to ``relu(bn(W₀ front))`` (width ``(D_f + D_b)//2``), concatenated over heads, a linear layer (zero-
    initialised bias) to ``D_b`` and L2 normalisation."""

    def __init__(self, front: int, back: int, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        width = (front + back) // 2
        self.attention_width = width
        self.sender = nn.Sequential(nn.Linear(back, width * num_heads, bias=False),
                                    nn.BatchNorm1d(width * num_heads, eps=1e-5, momentum=0.1))
        self.receiver = nn.Sequential(nn.Linear(front, width * num_heads, bias=False),
                                      nn.BatchNorm1d(width * num_heads, eps=1e-5, momentum=0.1))
        self.hidden = nn.Sequential(nn.Linear(front, width, bias=False), nn.BatchNorm1d(width, eps=1e-5, momentum=0.1),
                                    nn.ReLU())
        self.output = nn.Linear(width * num_heads, back)
        nn.init.zeros_(self.output.bias)

    def attention(self, back: torch.Tensor, front: torch.Tensor) -> torch.Tensor:
        batch = back.shape[0]
        sender = self.sender(back).reshape(batch, -1, self.num_heads).permute(2, 0, 1)      # [H, B, D]
        receiver = self.receiver(front).reshape(batch, -1, self.num_heads).permute(2, 1, 0)  # [H, D, B]
        return sender @ receiver

    def estimate(self, front: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        heads, batch = graph.shape[0], graph.shape[1]
        graph = graph.softmax(dim=-1)
        if self.training:
            noise = torch.randn(heads, batch, 1, dtype=graph.dtype, device=graph.device)
            graph = graph * (noise - noise.mean(dim=0, keepdim=True) > 0).to(graph.dtype)
        mixed = graph @ self.hidden(front)                                                  # [H, B, D]
        return F.normalize(self.output(mixed.transpose(0, 1).reshape(batch, -1)), dim=-1, eps=1e-12)

    def reconstruction_loss(self, back: torch.Tensor, front: torch.Tensor) -> torch.Tensor:
        """Stage 1: ``mean_i (1 − <estimate(front, attention(back, front))_i, back_i>)`` (``MHA_loss``)."""
        return (1.0 - (self.estimate(front, self.attention(back, front)) * back).sum(dim=-1)).mean()


class MultiHeadGraphs(nn.Module):
    """The attention networks of the consecutive pairs of teacher stages of ``widths``, shared by MHGD's two
    stages."""

    def __init__(self, widths: Sequence[int], num_heads: int):
        super().__init__()
        self.widths = [int(width) for width in widths]
        self.pairs = nn.ModuleList(MultiHeadGraph(front, back, num_heads)
                                   for front, back in zip(self.widths[:-1], self.widths[1:]))

    def check(self, term: str, keys: Sequence[str], embeddings: list[torch.Tensor]) -> None:
        widths = [e.shape[1] for e in embeddings]
        if widths != self.widths:
            raise ValueError(f"term {term!r}: the pooled teacher features {list(keys)} have widths {widths}, the "
                             f"attention networks were sized for {self.widths} (pass teacher_widths)")


def stage_width(model: nn.Module, path: str) -> int | None:
    """The width a stage tap produces: its last conv's or BN's channels, else its last linear layer's features."""
    module = find_module(model, path, "teacher")
    width = output_channels(module)
    if width is None:
        width = next((sub.out_features for sub in reversed(list(module.modules())) if isinstance(sub, nn.Linear)),
                     None)
    return width


def mhgd_embeddings(features) -> list[torch.Tensor]:
    """L2-normalised pooled embeddings of the stage features (the official compresses them by KD-SVD)."""
    return [F.normalize(pooled_embedding(feature), dim=-1, eps=1e-12) for feature in features]


class MHGDAttentionTerm(Term):
    """MHGD stage 1: ``Σ_pairs reconstruction_loss`` of the attention networks on the teacher's stage embeddings."""

    def __init__(self, teacher_keys, graphs: MultiHeadGraphs):
        super().__init__("mhgd_attention", teacher_keys, 1.0)
        self.graphs = graphs

    def build(self, example):
        self.graphs.check(self.name, self.reads, mhgd_embeddings(example[key] for key in self.reads))

    def loss(self, *features, context):
        embeddings = mhgd_embeddings(features)
        return torch.stack([graph.reconstruction_loss(back, front) for graph, front, back
                            in zip(self.graphs.pairs, embeddings[:-1], embeddings[1:])]).sum()


def clipped_by_reference(loss: torch.Tensor, reference: torch.Tensor, scale: float) -> torch.Tensor:
    """``loss`` whose gradient on each parameter behind ``reference`` is clipped to ``scale·‖∇ reference‖`` of that
    parameter (``tf.clip_by_norm``, KD_methods_with_TF ``Optimizer_w_MHGD``); the value and the gradient on other
    parameters (connectors) are unchanged."""
    if not (torch.is_grad_enabled() and loss.requires_grad and reference.requires_grad):
        return loss
    params = [p for p in graph_leaves(reference) if p.requires_grad]
    reference_grads = torch.autograd.grad(reference, params, retain_graph=True, allow_unused=True)
    loss_grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    correction = loss.new_zeros(())
    for param, ref_grad, grad in zip(params, reference_grads, loss_grads):
        if grad is None or ref_grad is None:
            continue
        limit = scale * ref_grad.norm()
        clipped = grad * (limit / torch.maximum(grad.norm(), limit)).nan_to_num(0.0)
        correction = correction + ((clipped - grad).detach() * (param - param.detach())).sum()
    return loss + correction


class MHGDTerm(Term):
    """MHGD stage 2: ``Σ_pairs mhgd_loss(A(e_s), A(e_t))`` with the stage-1 attention networks frozen (eval mode),
    student embeddings through a bias-free linear connector where their width differs from the teacher's, and the
    official clipping of the term's student gradients by the CE gradients' norms."""

    def __init__(self, student_keys, teacher_keys, weight: float, graphs: MultiHeadGraphs, clip: bool):
        if len(student_keys) != len(teacher_keys) or len(student_keys) < 2:
            raise ValueError(f"term 'mhgd' needs the same number (>= 2) of student and teacher stages, got "
                             f"{list(student_keys)} and {list(teacher_keys)}")
        super().__init__("mhgd", [*student_keys, *teacher_keys, "student", "target"], weight)
        self.num_stages = len(student_keys)
        self.graphs, self.clip = graphs, clip
        self.connectors = nn.ModuleList()

    def build(self, example):
        values = [example[key] for key in self.reads]
        students = [pooled_embedding(v) for v in values[: self.num_stages]]
        teachers = mhgd_embeddings(values[self.num_stages: 2 * self.num_stages])
        self.graphs.check(self.name, self.reads[self.num_stages: 2 * self.num_stages], teachers)
        if not len(self.connectors):
            self.connectors.extend(nn.Identity() if s.shape[1] == t.shape[1] else nn.Linear(s.shape[1], t.shape[1],
                                                                                             bias=False)
                                   for s, t in zip(students, teachers))

    def graph_loss(self, students, teachers) -> torch.Tensor:
        students = [F.normalize(connector(pooled_embedding(s)), dim=-1, eps=1e-12)
                    for connector, s in zip(self.connectors, students)]
        teachers = mhgd_embeddings(teachers)
        losses = []
        for index, graph in enumerate(self.graphs.pairs):
            with torch.no_grad():
                teacher_graph = graph.attention(teachers[index + 1], teachers[index])
            losses.append(kdkernels.mhgd_loss(graph.attention(students[index + 1], students[index]), teacher_graph))
        return torch.stack(losses).sum()

    def loss(self, *values, context):
        n = self.num_stages
        loss = self.graph_loss(values[:n], values[n: 2 * n])
        if not self.clip or context is None:
            return loss
        ce = F.cross_entropy(values[2 * n], values[2 * n + 1])
        return clipped_by_reference(loss, ce, 1.0 / (1.0 + math.exp(-(context.epoch - 1))))


@register("mhgd", category="relation",
          paper="Lee, Song. Graph-based Knowledge Distillation by Multi-head Attention Network. BMVC 2019",
          approximation="stage embeddings are the L2-normalised pooled stage maps, not KD-SVD's singular vectors; "
                        "student stages narrower than the teacher's go through a learnt bias-free linear map")
def mhgd(setup: Setup, num_heads: int = 8, weight: float = 1.0, attention_epochs: int | float = MHGD_ATTENTION_SHARE,
         clip_gradients: bool = True, ce_weight: float = 1.0, student_layers: Sequence[str] | None = None,
         teacher_layers: Sequence[str] | None = None, teacher_widths: Sequence[int] | None = None) -> Recipe:
    """MHGD: attention training on the teacher, then ``CE + Σ_pairs Σ_{h,i} KL(softmax(tanh G_s) ‖ softmax(tanh G_t))``
    (sseung0703/KD_methods_with_TF @9fb5414 ``nets/Relation.py`` ``MHGD``, ``op_util.py`` ``Optimizer_w_MHGD``).

    Embeddings ``e`` of every stage (the last block of each, post-ReLU); for each consecutive pair (front, back) a
    :class:`MultiHeadGraph` of 8 heads. Stage ``mhgd-attention`` (``attention_epochs``, a float: share of the run;
    the official 40 epochs before its 100) trains only the attention networks on the frozen teacher to reconstruct
    the back embedding from the front one through the attention, ``mean_i (1 − cos(ê_back, e_back))``. Stage
    ``mhgd`` freezes them (batch norms on their running statistics) and trains the student on
    ``ce·CE + weight·Σ_pairs mhgd_loss(A(e_s,back, e_s,front), A(e_t,back, e_t,front))`` (weight 1, summed KL);
    ``clip_gradients`` clips the graph term's gradient on each student parameter to ``σ(epoch − 1)`` times the
    norm of the CE gradient on it (the official schedule, epochs counted from the stage's first).

    Approximations: the official compresses each map by KD-SVD (the teacher's top right-singular vector, the
    student's top 4 aligned to it); here the embedding is the L2-normalised global-average-pooled map. The official
    student has the teacher's widths; where they differ the student's pooled embedding passes through a learnt
    bias-free linear map to the teacher's width. The attention networks are sized from the teacher stages' widths
    (their last conv / BN / linear layer), or ``teacher_widths``; they start from PyTorch's default initialisation
    (the official: fan-out variance scaling) and train with the run's optimiser settings (the official: 5e-4
    weight decay on them)."""
    teacher = setup.require_teacher("mhgd")
    check = Checks("mhgd")
    heads = check.integer("num_heads", num_heads, minimum=1)
    check.flag("clip_gradients", clip_gradients)
    student_keys = [f"student:{path}" for path in (student_layers or feature_points(setup.student).stages)]
    teacher_keys = [f"teacher:{path}" for path in (teacher_layers or feature_points(teacher).stages)]
    if len(student_keys) != len(teacher_keys) or len(teacher_keys) < 2:
        raise ValueError(f"mhgd pairs at least two consecutive stages of the student and of the teacher, got "
                         f"{student_keys} and {teacher_keys}: pass student_layers and teacher_layers")
    teacher_paths = [key.split(":", 1)[1] for key in teacher_keys]
    if teacher_widths is None:
        teacher_widths = [stage_width(teacher, path) for path in teacher_paths]
        if None in teacher_widths:
            raise ValueError(f"mhgd cannot tell the widths of the teacher stages {teacher_paths} ({teacher_widths}): "
                             "pass teacher_widths")
    elif len(teacher_widths) != len(teacher_keys):
        raise ValueError(f"mhgd: teacher_widths must give one width per teacher stage {teacher_paths}, got "
                         f"{list(teacher_widths)}")
    widths = [check.integer(f"teacher_widths[{i}]", width, minimum=1) for i, width in enumerate(teacher_widths)]
    # The attention networks are a model of both stages (trained in the first, frozen and in eval mode in the
    # second), so that checkpoints carry them across the stage boundary; no term reads them as a model's output.
    graphs = MultiHeadGraphs(widths, heads)
    attention = Distiller({"teacher": teacher, "mhgd_graphs": graphs}, [MHGDAttentionTerm(teacher_keys, graphs)],
                          trainable=("mhgd_graphs",), evaluate=("teacher",))
    term = MHGDTerm(student_keys, teacher_keys, weight, graphs, clip_gradients)
    main = Distiller({"student": setup.student, "teacher": teacher, "mhgd_graphs": graphs},
                     [CrossEntropyTerm("student", ce_weight), term])
    return Recipe("mhgd", [Stage("mhgd-attention", attention, epochs=attention_epochs), Stage("mhgd", main)])


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


# ------------------------------------------------------------------------------------------ manifold distillation

def teacher_decision_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: ``CE(z_s, argmax z_t)`` (mean over the batch)."""
    return F.cross_entropy(student_logits, teacher_logits.detach().argmax(dim=-1))


def default_block_pairs(student_blocks: int, teacher_blocks: int) -> tuple[list[int], list[int]]:
    """Every student block, paired with the teacher's blocks at the same end of the network: the first half of the
    student's blocks with the teacher's first blocks, the second half with its last ones (the official DeiT-Tiny ←
    CaiT-S24 command pairs blocks 0-3, 8-11 of 12 with 0-3, 20-23 of 24)."""
    first = (student_blocks + 1) // 2
    last = student_blocks - first
    return (list(range(student_blocks)),
            list(range(first)) + list(range(teacher_blocks - last, teacher_blocks)))


class ManifoldTerm(Term):
    """``kdkernels.manifold_loss`` between the student's and the teacher's block tokens (the first half of ``reads``
    the student's layers, the second half the teacher's). ``patch_tokens_only``: drop each model's
    ``num_prefix_tokens`` leading tokens (class / distillation tokens); otherwise the official rule: drop the
    student's extra leading tokens (``N_s − N_t``) and keep the teacher's tokens whole."""

    def __init__(self, reads, weight: float, *, student_prefix: int, teacher_prefix: int, patch_tokens_only: bool,
                 **options):
        super().__init__("manifold", reads, weight)
        self.student_prefix, self.teacher_prefix = student_prefix, teacher_prefix
        self.patch_tokens_only = patch_tokens_only
        self.options = options

    def tokens(self, values):
        half = len(values) // 2
        student, teacher = list(values[:half]), list(values[half:])
        if self.patch_tokens_only:
            return ([s[:, self.student_prefix:] for s in student], [t[:, self.teacher_prefix:] for t in teacher])
        return [s[:, s.shape[1] - t.shape[1]:] for s, t in zip(student, teacher)], teacher

    def build(self, example):
        values = [example[key] for key in self.reads]
        if any(value.dim() != 3 for value in values):
            shapes = {key: tuple(example[key].shape) for key in self.reads}
            raise ValueError(f"term 'manifold' compares [B, tokens, dim] block outputs of vision transformers, got "
                             f"{shapes}")
        student, teacher = self.tokens(values)
        if student[0].shape[1] != teacher[0].shape[1]:
            raise ValueError(f"term 'manifold': the student and the teacher must have as many patch tokens, got "
                             f"{student[0].shape[1]} and {teacher[0].shape[1]}")

    def loss(self, *values, context):
        student, teacher = self.tokens(values)
        return kdkernels.manifold_loss(student, [t.detach() for t in teacher], **self.options)


def _block_taps(method: str, model: nn.Module, role: str, indices, override) -> list[str]:
    if override is not None:
        return list(override)
    stages = list(feature_points(model).stages)
    if any(index >= len(stages) for index in indices):
        raise ValueError(f"{method}: the {role} ({type(model).__name__}) declares {len(stages)} block taps "
                         f"{stages}: pass {role}_layers=[<tap path>, ...]")
    return [stages[index] for index in indices]


@register("manifold", category="relation",
          paper="Hao, Guo, Jia, Han, Tang, Zhang, Hu, Wang. Learning Efficient Vision Transformers via Fine-Grained "
                "Manifold Distillation. NeurIPS 2022",
          presets={"hard": {"distillation_type": "hard"}},
          default_student="student-vit", default_teacher="teacher-vit")
def manifold(setup: Setup, beta: float = 1.0, sample_weight: float = 0.1, patch_weight: float = 4.0,
             random_weight: float = 0.2, samples: int = 192, distillation_type: str = "soft", alpha: float = 1.0,
             temperature: float = 1.0, patch_tokens_only: bool = True,
             student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None) -> Recipe:
    """Manifold distillation: ``(1 − α)·CE + α·KD + β·mean_layers(0.1·sample + 4·patch + 0.2·random)`` with the
    intra-image (patch), inter-image (sample) and randomly sampled (192 rows) relation maps of the normalised patch
    tokens of paired blocks, :func:`kdkernels.manifold_loss`; KD soft ``T²·KL(p_t ‖ p_s)`` (batchmean, T 1) or hard
    ``CE(z_s, argmax z_t)`` (preset ``hard``).

    Provenance: Hao840/manifold-distillation @1096b82 ``losses.py`` (``DistillationLoss``, ``mf_loss``,
    ``layer_mf_loss``), ``customized_forward.py`` (the block outputs, before the final norm, are the taps) and the
    README's DeiT-Tiny ← CaiT-S24 command (``--distillation-type soft --distillation-alpha 1 --distillation-beta 1
    --w-sample 0.1 --w-patch 4 --w-rand 0.2 --K 192``): these are the defaults, so the labels' CE weight is 0 as
    there. Student and teacher are ViTs (the zoo's ``student-vit`` and ``teacher-vit``, the CLI's defaults for this
    method) with as many patches; a distilled student (``head_dist``) gets CE on its class head and KD on its
    distillation head, as the official. Layers: every student block, the first half paired with the teacher's first
    blocks and the second half with its last ones (the official command's rule: blocks 0-3, 8-11 of 12 with 0-3,
    20-23 of 24); ``student_layers`` / ``teacher_layers`` give tap paths instead. ``patch_tokens_only`` (default):
    the relations of the patch tokens only (the paper; what the official computes for its CaiT teacher, whose block
    outputs hold no class token); ``False``: the official code's rule for any pair, dropping only the student's
    extra leading tokens (with equal prefix counts the class tokens join the relations).
    """
    check = Checks("manifold")
    beta = check.real("beta", beta, nonnegative=True)
    alpha = check.probability("alpha", alpha)
    temperature = check.temperature(temperature)
    distillation_type = check.choice("distillation_type", distillation_type, ("soft", "hard"))
    patch_tokens_only = check.flag("patch_tokens_only", patch_tokens_only)
    samples = check.integer("samples", samples, minimum=1)
    weights = {name: check.real(name, value, nonnegative=True) for name, value in
               (("sample_weight", sample_weight), ("patch_weight", patch_weight), ("random_weight", random_weight))}
    teacher = setup.require_teacher("manifold")
    student = setup.student
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(getattr(model, "num_prefix_tokens", None), int):
            raise ValueError(f"method 'manifold' distils vision transformers (a model with `num_prefix_tokens` and "
                             f"[B, tokens, dim] block taps), got a {type(model).__name__} {role}: pass --student "
                             f"student-vit --teacher teacher-vit")
    student_indices, teacher_indices = default_block_pairs(len(feature_points(student).stages),
                                                           len(feature_points(teacher).stages))
    student_taps = _block_taps("manifold", student, "student", student_indices, student_layers)
    teacher_taps = _block_taps("manifold", teacher, "teacher", teacher_indices, teacher_layers)
    if len(student_taps) != len(teacher_taps):
        raise ValueError(f"manifold: student_layers and teacher_layers must pair up, got {len(student_taps)} student "
                         f"and {len(teacher_taps)} teacher layers")
    distilled = isinstance(getattr(student, "head_dist", None), nn.Module)
    class_logits = f"student:{feature_points(student).classifier}" if distilled else "student"
    kd_logits = "student:head_dist" if distilled else "student"
    kd = (FunctionTerm("kd", kdkernels.kd_loss, (kd_logits, "teacher"), alpha, temperature=temperature)
          if distillation_type == "soft" else
          FunctionTerm("kd", teacher_decision_cross_entropy, (kd_logits, "teacher"), alpha))
    term = ManifoldTerm([f"student:{path}" for path in student_taps] + [f"teacher:{path}" for path in teacher_taps],
                        beta, student_prefix=student.num_prefix_tokens, teacher_prefix=teacher.num_prefix_tokens,
                        patch_tokens_only=patch_tokens_only, samples=samples, **weights)
    return offline("manifold", setup, [CrossEntropyTerm(class_logits, 1.0 - alpha), kd, term])
