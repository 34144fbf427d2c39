"""Teacher preparation: sparsify the trained teacher with ``torch.nn.utils.prune``, fine-tune it, then distil from
it (prune-then-distill, PrUE; ../shared/reference/methods.md §4)."""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import kdkernels
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.pruning import refresh_pruned_weights
from kdkernels.distill.recipe import Recipe, Setup, Stage
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term

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
