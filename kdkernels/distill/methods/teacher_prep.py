"""Teacher preparation: sparsify the trained teacher with ``torch.nn.utils.prune``, fine-tune it, then distil from
it (prune-then-distill, PrUE; ../shared/reference/methods.md §4); give the teacher task-oriented auxiliary
classifiers, then distil their features (TOFD)."""
from __future__ import annotations

import copy
import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.connectors import output_channels
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.hooks import find_module
from kdkernels.distill.pruning import refresh_pruned_weights
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, StepContext, Term

CONV_AND_LINEAR = (nn.Conv2d, nn.Linear)


def prunable_weights(model: nn.Module, layer_types: Sequence[type] = CONV_AND_LINEAR) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every layer of the given types."""
    layers = [(module, "weight") for module in model.modules() if isinstance(module, tuple(layer_types))]
    if not layers:
        names = ", ".join(t.__name__ for t in layer_types)
        raise ValueError(f"{type(model).__name__} has no {names} layer to prune")
    return layers


def check_amount(name: str, amount) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {amount!r}")
    return float(amount)


def magnitude_prune_(model: nn.Module, amount: float, layer_types: Sequence[type] = CONV_AND_LINEAR) -> None:
    """Global unstructured L1 pruning of ``amount`` of the still-unpruned weights of all such layers (repeated
    calls prune a share of what remains, as torch's pruning containers do), ranked by the current weights."""
    refresh_pruned_weights(model)
    prune.global_unstructured(prunable_weights(model, layer_types), pruning_method=prune.L1Unstructured,
                              amount=check_amount("amount", amount))


def weight_sparsity(model: nn.Module, layer_types: Sequence[type] = CONV_AND_LINEAR) -> float:
    """Share of exactly-zero weights over the layers of the given types (pruned weights are zeros)."""
    weights = [getattr(module, name) for module, name in prunable_weights(model, layer_types)]
    return float(sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights))


def pruning_rounds(ratio: float, per_round: float = 0.2) -> int:
    """The number of rounds of ``per_round`` pruning whose total sparsity ``1 − (1 − per_round)^n`` is closest to
    ``ratio`` (ties to the smaller n), as prune-then-distill's ``iter_pruning_freq_determiner``."""
    ratio = check_amount("pruning_ratio", ratio)
    totals = 1.0 - (1.0 - per_round) ** np.arange(0, 200)
    return int(np.argmin(np.abs(totals - ratio)))


def offline_kd_stage(name: str, setup: Setup, teacher: nn.Module, ce_weight: float, kd_weight: float,
                     temperature: float) -> Stage:
    """The student distilled from the prepared teacher: ``ce_weight·CE + kd_weight·T²·KL`` (batchmean)."""
    terms = [CrossEntropyTerm("student", ce_weight),
             FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), kd_weight, temperature=temperature)]
    return Stage(name, Distiller({"student": setup.student, "teacher": teacher}, terms))


def fine_tune_stage(name: str, teacher: nn.Module, terms: Sequence[Term], epochs, before=None) -> Stage:
    """The (pruned) teacher trained on the labels; it is what this stage evaluates."""
    return Stage(name, Distiller({"teacher": teacher}, list(terms), trainable=("teacher",)), epochs=epochs,
                 before=before)


# ------------------------------------------------------------------------------------------------ prune-then-distill

@register("prune-kd", category="teacher-prep",
          paper="Park, No. Prune Your Model Before Distill It. ECCV 2022 (arXiv:2109.14960)")
def prune_kd(setup: Setup, pruning_ratio: float = 0.8, finetune_epochs: int | float = 0.65,
             temperature: float = 10.0, alpha: float = 0.95) -> Recipe:
    """Prune, then distil: iterative global L1 pruning of the teacher's weights, then ``α·T²·KL + (1−α)·CE``.

    As ososos888/prune-then-distill: each round prunes 20% of the remaining conv/linear weights (global magnitude)
    and fine-tunes the teacher (learning-rate rewinding).

    The number of rounds gives the sparsity closest to ``pruning_ratio`` (0.8: 7 rounds, 79%). Each round is a stage
    whose ``before`` prunes and which fine-tunes the teacher with cross-entropy for ``finetune_epochs`` (a share of
    the run's epochs: 130 of the official 200 KD epochs; its own optimiser and schedule, i.e. the learning rate
    rewinds). ``finetune_epochs=0`` prunes once to ``pruning_ratio`` with no fine-tune. Defaults: the repository's
    ``prune_default.json`` and ``kd_default.json`` (α 0.95, T 10). The paper's student built from the pruned
    teacher's structure is not constructed: the student is the given model.
    """
    teacher = setup.require_teacher("prune-kd")
    check_amount("pruning_ratio", pruning_ratio)
    kd = offline_kd_stage("distill", setup, teacher, 1.0 - alpha, alpha, temperature)
    if not finetune_epochs:
        kd.before = functools.partial(magnitude_prune_, teacher, pruning_ratio)
        return Recipe("prune-kd", [kd])
    rounds = [fine_tune_stage(f"prune-{index}", teacher, [CrossEntropyTerm("teacher")], finetune_epochs,
                              before=functools.partial(magnitude_prune_, teacher, 0.2))
              for index in range(1, pruning_rounds(pruning_ratio) + 1)]
    return Recipe("prune-kd", rounds + [kd])


# ------------------------------------------------------------------------------------------------------------ PrUE

def prue_objective(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PrUE's ``Σ_b |mean_{y_b} − p_b[y_b]|``: the spread of each sample's true-class probability around its
    class's mean (the means are constants, computed over the same samples without gradient)."""
    true_class = torch.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    with torch.no_grad():
        classes = int(targets.max()) + 1
        sums = torch.zeros(classes, dtype=true_class.dtype, device=true_class.device).index_add_(0, targets,
                                                                                                  true_class)
        counts = torch.bincount(targets, minlength=classes).clamp_min(1).to(true_class)
        means = (sums / counts)[targets]
    return (means - true_class).abs().sum()


def prue_prune_(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, amount: float) -> None:
    """PrUE's mask (wangshaopu/prue ``pruner.prue``): score each conv weight by ``|w · ∂L/∂w|`` for
    :func:`prue_objective` L (the gradient of its mask), in eval mode, and keep those scoring above the global
    ``amount`` quantile (``kthvalue`` at ``int(amount·total)``)."""
    amount = check_amount("pruning_ratio", amount)
    layers = prunable_weights(model, (nn.Conv2d,))
    weights = [getattr(module, name) for module, name in layers]
    flags, mode = [w.requires_grad for w in weights], model.training
    model.eval()
    try:
        with torch.enable_grad():
            for weight in weights:
                weight.requires_grad_(True)
            gradients = torch.autograd.grad(prue_objective(model(inputs), targets), weights)
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)
        model.train(mode)
    scores = [(w.detach() * g).abs() for w, g in zip(weights, gradients)]
    kth = int(amount * sum(s.numel() for s in scores))
    if kth == 0:
        return
    threshold = torch.cat([s.flatten() for s in scores]).kthvalue(kth).values
    for (module, name), score in zip(layers, scores):
        prune.custom_from_mask(module, name, same_on_every_rank(score.gt(threshold)))


def same_on_every_rank(mask: torch.Tensor) -> torch.Tensor:
    """Rank 0's mask on every data-parallel rank (each rank scores its own batch); the mask itself otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = mask.to(torch.uint8)
        torch.distributed.broadcast(shared, src=0)
        return shared.bool()
    return mask


class SparsifyingCrossEntropyTerm(Term):
    """The teacher's fine-tune cross-entropy; its :meth:`build` first applies the PrUE mask to the teacher, from
    the example batch it is given (once)."""

    def __init__(self, teacher: nn.Module, amount: float):
        super().__init__("ce_teacher", ("teacher", "target", "input"))
        self._teacher = (teacher,)   # the model being fine-tuned, not a submodule of the term
        self.amount = check_amount("pruning_ratio", amount)
        self.pruned = False

    def build(self, example):
        if not self.pruned and not prune.is_pruned(self._teacher[0]):  # a resumed run loads the pruned teacher
            prue_prune_(self._teacher[0], example["input"], example["target"], self.amount)
        self.pruned = True

    def loss(self, logits, target, _inputs, *, context):
        return F.cross_entropy(logits, target)


@register("prue", category="teacher-prep",
          paper="Wang, Chen, Kou, Shi. PrUE: Distilling Knowledge from Sparse Teacher Networks. ECML-PKDD 2022 "
                "(arXiv:2207.00586)",
          approximation="approximation of PrUE (Wang et al. 2022): the mask scores and the per-class mean "
                        "predictions come from the fine-tune stage's example batch, where the official code "
                        "accumulates them over the whole (label-sorted) training set")
def prue(setup: Setup, pruning_ratio: float = 0.5, finetune_epochs: int | float | None = None,
         temperature: float = 4.0, alpha: float = 0.9) -> Recipe:
    """PrUE: prune the teacher's conv weights by their effect on its prediction uncertainty, fine-tune, then
    ``α·CE + (1−α)·T²·KL`` (wangshaopu/prue).

    Scores ``|w·∂L/∂w|`` with ``L = Σ_b |mean_{y_b} − p_b[y_b]|`` (how much each weight keeps the true-class
    probability away from its class mean); the lowest ``pruning_ratio`` are pruned globally, then the sparse
    teacher is fine-tuned with cross-entropy (``finetune_epochs``, default the run's epochs, as the official second
    ``lightning_main.py`` run) and distilled with ``DistillModule``'s ``(1−α)·KD + α·CE`` (α 0.9, T 4, batchmean).
    """
    teacher = setup.require_teacher("prue")
    check_amount("pruning_ratio", pruning_ratio)
    if finetune_epochs is not None and not finetune_epochs:
        raise ValueError("prue: the mask is computed when the fine-tune stage starts, finetune_epochs must be > 0")
    sparsify = fine_tune_stage("sparsify", teacher, [SparsifyingCrossEntropyTerm(teacher, pruning_ratio)],
                               finetune_epochs)
    return Recipe("prue", [sparsify, offline_kd_stage("distill", setup, teacher, alpha, 1.0 - alpha, temperature)])


# ------------------------------------------------------------------------------------------------------------ TOFD

TOFD_PAPER = "Zhang, Shi, Ma. Task-Oriented Feature Distillation. NeurIPS 2020"


class SepConv(nn.Sequential):
    """TOFD's down-sampling block (``models/resnet.py`` ``SepConv``): depthwise conv 3×3 stride 2, pointwise conv,
    BN, ReLU, depthwise conv 3×3 stride 1, pointwise conv to ``out_channels``, BN, ReLU (no conv bias); the convs
    initialised as the official models (Kaiming normal, fan-out, ReLU), BN weight 1 and bias 0."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class TOFDHead(nn.Module):
    """The auxiliary classifier of one shallow stage (official ``auxiliary<i>`` + ``fc<i>``): one
    :class:`SepConv` per later stage (to that stage's width, halving the map), global average pooling (the
    official ``AvgPool2d(4, 4)`` of the 4×4 CIFAR map) and a linear classifier. ``forward`` returns
    ``(feature [B, widths[-1]], logits [B, classes])``: the feature is what TOFD distils."""

    def __init__(self, widths: Sequence[int], index: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(*(SepConv(widths[k], widths[k + 1]) for k in range(index, len(widths) - 1)),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[-1], classes)
        self.feature_dim = widths[-1]

    def forward(self, stage_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.features(stage_map)
        return feature, self.fc(feature)


class TOFDHeads(nn.ModuleList):
    """A :class:`TOFDHead` on every stage but the deepest (whose head is the model's own pooling and classifier);
    a model of the distillers, which the terms call on the tapped stage maps."""

    def __init__(self, widths: Sequence[int], classes: int):
        super().__init__(TOFDHead(widths, index, classes) for index in range(len(widths) - 1))

    def classify(self, term: str, keys: Sequence[str], maps: Sequence[torch.Tensor]):
        """``(features, logits)`` lists of the heads on ``maps`` (one per head, shallow to deep)."""
        for key, value in zip(keys, maps):
            if value.dim() != 4:
                raise ValueError(f"term {term!r} puts auxiliary classifiers on [B, C, H, W] stage maps, got {key} "
                                 f"{tuple(value.shape)}: pass student_layers / teacher_layers naming such maps")
        outputs = [head(value) for head, value in zip(self, maps)]
        return [f for f, _ in outputs], [z for _, z in outputs]


class TOFDHeadTerm(Term):
    """Stage ``tofd-aux``: ``Σ_i CE(head_i(f_t,i), y)`` of the teacher's auxiliary classifiers on its stop-gradient
    shallow stage maps (the teacher frozen in eval mode)."""

    def __init__(self, stage_keys, heads: TOFDHeads):
        super().__init__("tofd_aux", (*stage_keys, "target"))
        self._heads = (heads,)     # a model of the distiller, not this term's parameters

    def loss(self, *values, context):
        *maps, target = values
        _, logits = self._heads[0].classify(self.name, self.reads[:-1], [m.detach() for m in maps])
        return torch.stack([F.cross_entropy(z, target) for z in logits]).sum()


class TOFDTerm(Term):
    """Stage ``tofd``: :func:`kdkernels.tofd_loss` over the heads (the auxiliary classifiers, then the model's own
    classifier on its pooled embedding), the student's features through bias-free linear links (this term's
    submodules, sized from the example), the teacher's heads frozen (no gradient), at ``T = 1 + t·epoch/epochs``."""

    def __init__(self, student_keys, teacher_keys, student_heads: TOFDHeads, teacher_heads: TOFDHeads,
                 temperature: float, feature_weight: float, orthogonal_weight: float):
        # reads: shallow student maps, student embedding, student logits, the same for the teacher, the labels
        super().__init__("tofd", (*student_keys, *teacher_keys, "target"))
        self.stages = len(student_keys) - 2
        self._heads = (student_heads, teacher_heads)    # models of the distiller
        self.temperature, self.feature_weight = temperature, feature_weight
        self.orthogonal_weight = orthogonal_weight
        self.links = nn.ModuleList()

    def temperature_at(self, context: StepContext | None) -> float:
        """The official ``1 + (t/250)·(1 + epoch)`` (epoch 0-based, of 250) on the stage's length."""
        if context is None:
            return 1.0 + self.temperature
        return 1.0 + self.temperature * context.epoch / max(context.epochs, 1)

    def _sides(self, values):
        n = self.stages + 2
        return values[:n], values[n:2 * n], values[-1]

    def build(self, example):
        values = [example[key] for key in self.reads]
        student, teacher, _ = self._sides(values)
        if not len(self.links):
            student_dims = [head.feature_dim for head in self._heads[0]] + [student[-2].flatten(1).shape[1]]
            teacher_dims = [head.feature_dim for head in self._heads[1]] + [teacher[-2].flatten(1).shape[1]]
            self.links = nn.ModuleList(nn.Linear(s, t, bias=False) for s, t in zip(student_dims, teacher_dims))
        for key, value in zip(self.reads, values):
            if value.dim() != 4 and key in self.reads[:self.stages] + self.reads[self.stages + 2:2 * self.stages + 2]:
                raise ValueError(f"term {self.name!r} puts auxiliary classifiers on [B, C, H, W] stage maps, got "
                                 f"{key} {tuple(value.shape)}: pass student_layers / teacher_layers naming such maps")

    def loss(self, *values, context):
        (*student_maps, student_embedding, student_logits), (*teacher_maps, teacher_embedding, teacher_logits), \
            target = self._sides(values)
        student_heads, teacher_heads = self._heads
        n = self.stages
        with torch.no_grad():
            teacher_features, teacher_aux = teacher_heads.classify(self.name, self.reads[n + 2:2 * n + 2],
                                                                   teacher_maps)
        student_features, student_aux = student_heads.classify(self.name, self.reads[:n], student_maps)
        student_features = [link(f) for link, f in zip(self.links, [*student_features, student_embedding.flatten(1)])]
        teacher_features = [f.detach() for f in [*teacher_features, teacher_embedding.flatten(1)]]
        return kdkernels.tofd_loss(student_features, teacher_features, [*student_aux, student_logits],
                                   [z.detach() for z in [*teacher_aux, teacher_logits]], target,
                                   [link.weight for link in self.links], temperature=self.temperature_at(context),
                                   feature_weight=self.feature_weight, orthogonal_weight=self.orthogonal_weight)


def tofd_taps(model: nn.Module, layers, argument: str) -> tuple[list[str], list[int], str]:
    """(stage taps, their widths, the embedding tap) of a model for TOFD: ``layers`` or its ``feature_points``
    stages (at least two: the deepest is read through the model's own classifier)."""
    points = feature_points(model)
    taps = list(points.stages) if layers is None else [layers] if isinstance(layers, str) else [str(x) for x in layers]
    if len(taps) < 2:
        raise ValueError(f"tofd puts auxiliary classifiers on every stage but the deepest: it needs at least two "
                         f"stages, got {taps}: pass {argument}")
    widths = [output_width(model, tap) for tap in taps]
    if None in widths:
        raise ValueError(f"tofd cannot tell the channels of the stages {taps} ({widths}): pass {argument} naming "
                         f"conv/BN outputs")
    return taps, widths, points.embedding


def output_width(model: nn.Module, path: str) -> int | None:
    """The channels a stage tap produces (its last conv's or BN's)."""
    return output_channels(find_module(model, path, "model"))


@register("tofd", category="teacher-prep", paper=TOFD_PAPER,
          approximation="the teacher's auxiliary classifiers are trained on the frozen trained teacher (a first "
                        "stage of aux_epochs, CE only) where the official teacher checkpoint was trained with them; "
                        "the temperature ramp 1 + t·(1+epoch)/250 runs over the stage's epochs")
def tofd(setup: Setup, temperature: float = 3.0, feature_weight: float = 0.05, orthogonal_weight: float = 0.03,
         aux_epochs: int | float = 0.5, student_layers=None, teacher_layers=None) -> Recipe:
    """TOFD: task-oriented auxiliary classifiers on the teacher's and the student's shallow stages, then
    ``Σ_i [α·‖W_i·a_s,i − a_t,i‖_F + CE(z_s,i, y) + softCE_T(z_s,i, z_t,i)] + β·Σ_i (‖W_iW_iᵀ − I‖_F + ‖W_iᵀW_i − I‖_F)``
    (:func:`kdkernels.tofd_loss`) over the heads i (the auxiliary classifiers and the model's own), ``a`` a head's
    pooled feature, ``W_i`` a bias-free linear link, ``T = 1 + t·epoch/epochs``.

    As ArchipLab-LinfengZhang/Task-Oriented-Feature-Distillation @8fa49d0 (``distill.py``; the newest commit
    fcfd4be moved the optimiser step out of the batch loop, an indentation slip: the per-batch step of 8fa49d0 is
    followed), ``utils.py`` (``CrossEntropy``) and ``models/resnet.py`` (``SepConv``, ``auxiliary1..4``,
    ``fc1..4``):

    * every stage but the deepest gets an auxiliary classifier (:class:`TOFDHead`: one :class:`SepConv` per later
      stage, pooling, linear), the deepest is read through the model's own pooling and classifier (official
      ``auxiliary4`` = pooling, ``fc4`` the main head); the features distilled are the heads' pooled features;
    * stage ``tofd-aux`` (``aux_epochs``: an int, or a float share of the run): the teacher's auxiliary classifiers
      learn the task (``Σ_i CE``) on the frozen teacher's detached stage maps;
    * stage ``tofd``: the student with its auxiliary classifiers (trained through its backbone, as the official
      joint forward), one link ``Linear(D_s, D_t, bias=False)`` per head, ``α`` = ``feature_weight`` 0.05 on the
      Frobenius norm over the batch (``torch.dist``), CE and the soft cross-entropy (no T²) on every head,
      ``t`` = ``temperature`` 3 (the official ``--t``: T rises from ≈1 to 4 over the 250 epochs; here over the
      stage's epochs), ``β`` = ``orthogonal_weight`` 0.03 (``--beta``). The teacher and its classifiers are frozen
      but in train mode (batch statistics), as the official script (it never calls ``teacher.eval()``). The
      exported student is its main head.

    Official schedule (not a hyperparameter here): SGD lr 0.1, momentum 0.9, weight decay 5e-4, 250 epochs, lr
    ÷10 at 80/160/240, batch 128. Approximations (flagged): the teacher's auxiliary classifiers are trained on the
    frozen trained teacher (the official teacher checkpoint ``teacher/resnet18.pth`` was trained with its
    classifiers; its training script is not published); the temperature ramp on the stage's length.
    """
    check = Checks("tofd")
    temperature = check.real("temperature", temperature, nonnegative=True)
    feature_weight = check.real("feature_weight", feature_weight, nonnegative=True)
    orthogonal_weight = check.real("orthogonal_weight", orthogonal_weight, nonnegative=True)
    if isinstance(aux_epochs, bool) or not isinstance(aux_epochs, (int, float)):
        check.type_error("aux_epochs", "an int (epochs) or a float (a share of the run)", aux_epochs)
    if aux_epochs <= 0 or (isinstance(aux_epochs, float) and aux_epochs > 1):
        raise ValueError(f"tofd: aux_epochs must be an int >= 1 or a share of the run in (0, 1], got {aux_epochs!r}")
    teacher = setup.require_teacher("tofd")
    student_taps, student_widths, student_embedding = tofd_taps(setup.student, student_layers, "student_layers")
    teacher_taps, teacher_widths, teacher_embedding = tofd_taps(teacher, teacher_layers, "teacher_layers")
    if len(student_taps) != len(teacher_taps):
        raise ValueError(f"tofd pairs the stages one to one, got {len(student_taps)} student and {len(teacher_taps)} "
                         f"teacher stages: pass student_layers / teacher_layers of one length")
    student_heads = TOFDHeads(student_widths, setup.num_classes)
    teacher_heads = TOFDHeads(teacher_widths, setup.num_classes)
    teacher_shallow = [f"teacher:{tap}" for tap in teacher_taps[:-1]]
    aux_stage = Distiller({"teacher": teacher, "teacher_aux": teacher_heads},
                          [TOFDHeadTerm(teacher_shallow, teacher_heads)], trainable=("teacher_aux",),
                          evaluate=("teacher",))
    student_keys = [*(f"student:{tap}" for tap in student_taps[:-1]), f"student:{student_embedding}", "student"]
    teacher_keys = [*teacher_shallow, f"teacher:{teacher_embedding}", "teacher"]
    main = Distiller({"student": setup.student, "teacher": teacher, "student_aux": student_heads,
                      "teacher_aux": teacher_heads},
                     [TOFDTerm(student_keys, teacher_keys, student_heads, teacher_heads, temperature, feature_weight,
                               orthogonal_weight)],
                     trainable=("student", "student_aux"), frozen_train_mode=("teacher", "teacher_aux"),
                     evaluate=("student",))
    return Recipe("tofd", [Stage("tofd-aux", aux_stage, epochs=aux_epochs), Stage("tofd", main)])


# ------------------------------------------------------------------------------------------------------------- HKD

HKD_PAPER = "Passalis, Tzelepi, Tefas. Heterogeneous Knowledge Distillation using Information Flow Modeling. CVPR 2020"


class CriticalPeriodWeights:
    """pkth ``exp2_proposed.py``: the last layer pair weighs 1, every other ``w = init·decay^e`` in epoch e
    (0-based, of the official 50); here e = (epoch − 1)·``reference_epochs``/epochs, the schedule on the stage's
    length."""

    def __init__(self, init: float, decay: float, reference_epochs: float):
        self.init, self.decay, self.reference_epochs = init, decay, reference_epochs

    def __call__(self, pairs: int, context: StepContext | None) -> list[float]:
        if context is None:
            return [1.0] + [self.init] * (pairs - 1)
        elapsed = (context.epoch - 1) * self.reference_epochs / max(context.epochs, 1)
        return [1.0] + [self.init * self.decay ** elapsed] * (pairs - 1)


class InformationFlowTerm(Term):
    """:func:`kdkernels.hkd_loss` over the layer pairs (the last layer first), the teacher side detached; the
    weights from a :class:`CriticalPeriodWeights` (None: the last pair only, weight 1)."""

    def __init__(self, name: str, student_keys, teacher_keys, schedule: CriticalPeriodWeights | None):
        super().__init__(name, (*student_keys, *teacher_keys))
        self.pairs, self.schedule = len(student_keys), schedule

    def loss(self, *values, context):
        students, teachers = values[:self.pairs], [t.detach() for t in values[self.pairs:]]
        weights = self.schedule(self.pairs, context) if self.schedule is not None else None
        return kdkernels.hkd_loss(list(students), teachers, weights)


def hkd_taps(model: nn.Module, layers, argument: str) -> list[str]:
    """The layers HKD reads, the deepest first: ``layers`` (given deepest first), or the model's embedding then its
    stages deep to shallow (pkth's layers (3, 2, 1, 0): the penultimate layer, then the conv blocks)."""
    if layers is not None:
        return [layers] if isinstance(layers, str) else [str(layer) for layer in layers]
    points = feature_points(model)
    taps = [points.embedding, *reversed(points.stages)]
    if len(taps) < 2:
        raise ValueError(f"hkd models the flow over several layers, got {taps}: pass {argument}")
    return taps


@register("hkd", category="teacher-prep", paper=HKD_PAPER,
          approximation="the student stage adds ce_weight·CE (the official student learns only the information "
                        "flow and is evaluated by retrieval; ce_weight=0 is the official objective); the auxiliary "
                        "teacher's CE pre-training and PKT stages and the critical-period decay run on shares of the "
                        "run (official 80, 40 and 50 epochs, Adam) instead of the official epochs")
def hkd(setup: Setup, init_weight: float = 100.0, decay: float = 0.7, ce_weight: float = 1.0,
        aux_ce_epochs: int | float = 1.0, aux_epochs: int | float = 0.8, reference_epochs: float = 50.0,
        student_layers=None, teacher_layers=None, assistant_layers=None) -> Recipe:
    """Heterogeneous KD by information-flow modelling: an auxiliary teacher of the student's capacity learns the
    task and the teacher's last-layer geometry, then the student learns the auxiliary teacher's information flow
    over all its layers with critical-period weighting:
    ``ce·CE + D(e_s, e_a) + w(e)·Σ_stages D(f_s,l, f_a,l)``, ``w(e) = 100·0.7^e``, D = :func:`kdkernels.hkd_loss`
    (Jeffreys divergence of the batch's cosine and Student-t conditional probabilities, mean over B²).

    As passalis/pkth @5766e63 (``cifar10/exp0_train_base.py``, ``exp1_train_aux.py``, ``exp2_proposed.py``,
    ``nn/pkt_transfer.py`` ``prob_loss``/``prob_transfer`` with the 'combined' kernels):

    * stage ``hkd-aux-ce`` (``aux_ce_epochs``): the auxiliary teacher (``Setup.new_assistant``, else a fresh
      student; official ``Cifar_Tiny`` between the ResNet-18 teacher and the ``Cifar_Very_Tiny`` student) trains on
      CE (official 80 epochs, Adam 1e-3 then 1e-4);
    * stage ``hkd-aux`` (``aux_epochs``): it learns the teacher's last layer (``D(e_a, e_t)`` on the penultimate
      features, no CE; official 40 epochs, Adam 1e-3 then 1e-4);
    * stage ``hkd``: the student learns the auxiliary teacher's flow on the layers (penultimate, then the stages deep
      to shallow: the official layers 3, 2, 1, 0), weights ``(1, w, w, w)``, ``w = init_weight·decay^e`` with e
      the 0-based epoch scaled to ``reference_epochs`` (official 50 epochs, Adam 1e-3, w ×0.7 per epoch), plus
      ``ce_weight``·CE (see the approximation flag). The auxiliary teacher is frozen in eval mode.

    Layers: ``student_layers`` / ``teacher_layers`` / ``assistant_layers`` deepest first (default: the model's
    ``feature_points`` embedding, then its stages deep to shallow; every map is flattened, as the official
    ``get_features``); the teacher is read on its first tap only.
    """
    check = Checks("hkd")
    init_weight = check.real("init_weight", init_weight, nonnegative=True)
    decay = check.real("decay", decay, minimum=0.0, maximum=1.0)
    ce_weight = check.real("ce_weight", ce_weight, nonnegative=True)
    reference_epochs = check.real("reference_epochs", reference_epochs, positive=True)
    for name, value in (("aux_ce_epochs", aux_ce_epochs), ("aux_epochs", aux_epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            check.type_error(name, "an int (epochs) or a float (a share of the run)", value)
        if value < 0 or (isinstance(value, float) and value > 1):
            raise ValueError(f"hkd: {name} must be an int >= 0 or a share of the run in [0, 1], got {value!r}")
    teacher = setup.require_teacher("hkd")
    assistant = setup.fresh_assistant("hkd")
    student_taps = hkd_taps(setup.student, student_layers, "student_layers")
    assistant_taps = hkd_taps(assistant, assistant_layers, "assistant_layers")
    teacher_tap = hkd_taps(teacher, teacher_layers, "teacher_layers")[0]
    if len(student_taps) != len(assistant_taps):
        raise ValueError(f"hkd pairs the student's and the auxiliary teacher's layers one to one, got "
                         f"{len(student_taps)} student and {len(assistant_taps)} assistant layers: pass "
                         f"student_layers / assistant_layers of one length")
    stages = []
    if aux_ce_epochs:
        stages.append(Stage("hkd-aux-ce", Distiller({"assistant": assistant}, [CrossEntropyTerm("assistant")],
                                                    trainable=("assistant",)), epochs=aux_ce_epochs))
    if aux_epochs:
        transfer = InformationFlowTerm("hkd_aux", [f"assistant:{assistant_taps[0]}"], [f"teacher:{teacher_tap}"],
                                       None)
        stages.append(Stage("hkd-aux", Distiller({"assistant": assistant, "teacher": teacher}, [transfer],
                                                 trainable=("assistant",)), epochs=aux_epochs))
    flow = InformationFlowTerm("hkd", [f"student:{tap}" for tap in student_taps],
                               [f"assistant:{tap}" for tap in assistant_taps],
                               CriticalPeriodWeights(init_weight, decay, reference_epochs))
    terms: list[Term] = [flow] + ([CrossEntropyTerm("student", ce_weight)] if ce_weight > 0 else [])
    stages.append(Stage("hkd", Distiller({"student": setup.student, "assistant": assistant}, terms)))
    return Recipe("hkd", stages)


# --------------------------------------------------------------------------------------------------- prune-student

def conv_chain(model: nn.Module, method: str = "prune-student") -> tuple[list[str], dict[str, str], str]:
    """(conv paths, BN path -> its conv's path, the classifier's path) of a plain convolution chain: each conv reads
    the previous conv's channels (groups 1), each batch norm follows a conv of its width (registration order), and
    one linear classifier reads the last conv's channels (after global pooling): VGG-style models and the digits
    CNNs. Anything else (a residual model, a grouped conv) is a ValueError naming the method and the layer."""
    convs, norms, linears, last = [], {}, [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if type(module) is not nn.Conv2d or module.groups != 1:
                raise ValueError(f"{method} slims plain convolution chains: {name} ({module}) is not a plain "
                                 f"ungrouped nn.Conv2d")
            if last is not None and module.in_channels != last.out_channels:
                raise ValueError(f"{method} slims plain convolution chains: {name} reads {module.in_channels} "
                                 f"channels, not the {last.out_channels} of the conv before it (a residual or "
                                 f"branching model)")
            convs.append(name)
            last = module
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if type(module) is not nn.BatchNorm2d or last is None or module.num_features != last.out_channels:
                raise ValueError(f"{method} slims plain convolution chains: the batch norm {name} does not follow "
                                 f"a conv of its {getattr(module, 'num_features', '?')} channels")
            norms[name] = convs[-1]
        elif isinstance(module, nn.Linear):
            linears.append(name)
    if not convs or len(linears) != 1:
        raise ValueError(f"{method} slims plain convolution chains ending in one linear classifier: "
                         f"{type(model).__name__} has {len(convs)} conv(s) and linear layers {linears}")
    classifier = model.get_submodule(linears[0])
    if classifier.in_features != last.out_channels:
        raise ValueError(f"{method} slims plain convolution chains: the classifier {linears[0]} reads "
                         f"{classifier.in_features} features, not the last conv's {last.out_channels} channels")
    return convs, norms, linears[0]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def slim_chain_(model: nn.Module, widths: Sequence[int], method: str = "prune-student") -> None:
    """Rebuilds the model's convolution chain (:func:`conv_chain`) in place with ``widths`` output channels per
    conv (fresh layers of the same kind, kernel, stride, padding and bias; each batch norm and the classifier
    follow), so that it loads a state of those shapes; the new layers have PyTorch's default initialisation."""
    convs, norms, classifier = conv_chain(model, method)
    if len(widths) != len(convs):
        raise ValueError(f"{method}: {len(widths)} widths for the {len(convs)} convs {convs}")
    widths = [int(w) for w in widths]
    previous = None
    for path, width in zip(convs, widths):
        old = model.get_submodule(path)
        in_channels = old.in_channels if previous is None else previous
        _replace(model, path, nn.Conv2d(in_channels, width, old.kernel_size, stride=old.stride, padding=old.padding,
                                        dilation=old.dilation, bias=old.bias is not None,
                                        padding_mode=old.padding_mode))
        previous = width
    for path, conv_path in norms.items():
        old = model.get_submodule(path)
        _replace(model, path, nn.BatchNorm2d(widths[convs.index(conv_path)], eps=old.eps, momentum=old.momentum,
                                             affine=old.affine, track_running_stats=old.track_running_stats))
    old = model.get_submodule(classifier)
    _replace(model, classifier, nn.Linear(widths[-1], old.out_features, bias=old.bias is not None))


def chain_widths(model: nn.Module) -> list[int]:
    """The output channels of each conv of the model's chain."""
    return [model.get_submodule(path).out_channels for path in conv_chain(model)[0]]


def pruned_student_widths(teacher: nn.Module) -> list[int]:
    """prune-then-distill's student plan from the pruned teacher: per conv l of the chain, the channels whose dense
    layer holds the teacher layer's remaining weights ``r_l`` (its ``weight_mask`` sum; all weights when not
    pruned), ``c_l = round(r_l / (k_l · c_{l−1}))``, ``k_l`` the kernel area, ``c_{−1}`` the input channels (at
    least 1 channel)."""
    widths: list[int] = []
    for path in conv_chain(teacher)[0]:
        conv = teacher.get_submodule(path)
        mask = getattr(conv, "weight_mask", None)
        remaining = float(mask.sum()) if isinstance(mask, torch.Tensor) else float(conv.weight.numel())
        inputs = conv.in_channels if not widths else widths[-1]
        area = conv.kernel_size[0] * conv.kernel_size[1]
        widths.append(max(1, round(remaining / (area * inputs))))
    return widths


def init_like_prune_then_distill_(model: nn.Module) -> None:
    """prune-then-distill ``models/cifar_vgg.py`` ``_initialize_weights``: Kaiming normal conv and linear weights
    (PyTorch's defaults: fan-in, gain √2), zero biases, batch norm weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)


def _resize_to_state(module, state_dict, prefix, *_):
    """Load pre-hook of the slimmed student: a state of other widths (a checkpoint written after the student was
    built from the pruned teacher) first reshapes the chain to them."""
    convs = conv_chain(module)[0]
    keys = [f"{prefix}{path}.weight" for path in convs]
    if all(key in state_dict for key in keys):
        widths = [int(state_dict[key].shape[0]) for key in keys]
        if widths != chain_widths(module):
            slim_chain_(module, widths)


def slimmed_teacher_copy(teacher: nn.Module) -> nn.Module:
    """A copy of the teacher's architecture (its widths for now) with fresh weights, that follows the widths of the
    states it loads; the stage that distils it rebuilds it from the pruned teacher."""
    student = copy.deepcopy(teacher)
    slim_chain_(student, chain_widths(teacher))
    init_like_prune_then_distill_(student)
    student.register_load_state_dict_pre_hook(_resize_to_state)
    return student


@register("prune-student", category="teacher-prep",
          paper="Park, No. Prune Your Model Before Distill It. ECCV 2022 (arXiv:2109.14960)",
          approximation="the student's widths are the dense channel counts holding each pruned teacher layer's "
                        "remaining weights, c_l = round(r_l / (k_l·c_{l−1})), which reproduces the repository's "
                        "experiment students (models/cifar_vgg.py _plan('19_st_79'): 4.14 M weights for the 79 %-"
                        "pruned 20 M VGG-19), where its get_student_plan divides by 3·c_{l−1}; only plain "
                        "convolution chains (VGG-style) are slimmed, as the repository's vgg-custom")
def prune_student(setup: Setup, pruning_ratio: float = 0.8, finetune_epochs: int | float = 0.65,
                  temperature: float = 10.0, alpha: float = 0.95) -> Recipe:
    """Prune, then distil into the pruned teacher's shape: the teacher is pruned as :func:`prune_kd` (rounds of 20%
    global L1 pruning with fine-tuning), then a fresh student with the TEACHER's architecture slimmed to the pruned
    teacher's per-layer weight budget learns ``α·T²·KL(p_t ‖ p_s) + (1−α)·CE`` from the pruned teacher.

    As ososos888/prune-then-distill @1b5f3d3 (``main.py --pre_train --pruning --kd``; ``kd/kd_runner.py`` with
    ``--student_model vgg-custom``: ``get_model(..., plan=teacher_model.get_student_plan())``; ``models/base.py``
    ``get_teacher_plan_base``: the remaining weights of each pruned layer; ``models/cifar_vgg.py`` (VGG of a plan,
    ``_initialize_weights``, the experiment plans ``19_st_36/59/79``); ``kd_default.json``: α 0.95, T 10). The
    student's conv l gets ``c_l = round(r_l / (k_l·c_{l−1}))`` channels (:func:`pruned_student_widths`), so that
    its dense layer has the pruned teacher layer's weight count; the classifier follows the last width. The student
    is the teacher's architecture (:func:`slim_chain_`, fresh Kaiming-normal weights), built when the ``distill``
    stage starts (after the pruning rounds): ``Setup.student`` is not used. Only plain convolution chains (VGG-style
    models, the digits CNNs: each conv reads the previous one, one linear classifier) can be slimmed, as the
    repository's ``vgg-custom`` (ResNets: "will be updated"); other teachers raise a ValueError. The KD step and the
    pruning schedule are :func:`prune_kd`'s.
    """
    teacher = setup.require_teacher("prune-student")
    check_amount("pruning_ratio", pruning_ratio)
    student = slimmed_teacher_copy(teacher)
    recipe = prune_kd(Setup(student=student, num_classes=setup.num_classes, teacher=teacher),
                      pruning_ratio=pruning_ratio, finetune_epochs=finetune_epochs, temperature=temperature,
                      alpha=alpha)
    distill, prune_first = recipe.stages[-1], recipe.stages[-1].before

    def build_student():
        if prune_first is not None:
            prune_first()
        slim_chain_(student, pruned_student_widths(teacher))
        init_like_prune_then_distill_(student)

    distill.before = build_student
    return Recipe("prune-student", recipe.stages)
