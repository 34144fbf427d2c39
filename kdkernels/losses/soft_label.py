"""Teacher-free soft-label losses: label smoothing (both conventions), Tf-KD's virtual teacher, teacher-free NKD and
Zipf's label smoothing. (Weighted soft labels, which come from a teacher, are in :mod:`kdkernels.losses.response`.)

Plain PyTorch: each function IS the reference implementation of its formula (a fused kernel may later replace it
behind the same signature). Every formula is transcribed from the official code named in its docstring
(../shared/reference/methods.md §1.3, §1.5-1.7, §4).
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import reduce_rows, soft_cross_entropy_rows

LabelSmoothingConvention = Literal["uniform", "others"]
LABEL_SMOOTHING_CONVENTIONS = get_args(LabelSmoothingConvention)
_BATCH_BY_CLASSES = "[batch, classes]"


def _check_2d(check: Checks, name: str, logits) -> None:
    check.logits(name, logits)
    if logits.dim() != 2:
        check.value_error(name, f"must have shape {_BATCH_BY_CLASSES}", f"shape {tuple(logits.shape)}")


def _non_target_columns(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """[B, C-1] indices of every class but each row's label, in class order (a gather index; no host sync)."""
    columns = torch.arange(classes - 1, device=labels.device).expand(labels.shape[0], -1)
    return columns + (columns >= labels.unsqueeze(1)).long()


# ------------------------------------------------------------------------------------------------ label smoothing

def label_smoothing_loss(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1,
                         convention: LabelSmoothingConvention = "uniform", *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Cross-entropy against smoothed one-hot targets, averaged over the batch: ``mean_b −Σ_c q_c log softmax(z)_c``.

    ``convention="uniform"``: ``q = (1 − ε)·onehot(y) + ε/C`` over all ``C`` classes, the target included (Müller,
    Kornblith, Hinton, NeurIPS 2019; timm ``LabelSmoothingCrossEntropy``; ``F.cross_entropy(label_smoothing=ε)``).
    ``convention="others"``: ``q = 1 − ε`` on ``y`` and ``ε/(C − 1)`` on every other class (Tf-KD
    ``my_loss_function.py::loss_label_smoothing``, zipfls ``losses.py::label_smooth_loss``, Self-KD-Lib
    ``label_smooth.py``).

    Args:
        logits: ``[B, C]``. labels: integer class indices ``[B]``. epsilon: ``0 ≤ ε < 1``.
        reduction: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over B · C) or ``"none"`` ([B]).
    """
    check = Checks("label_smoothing_loss")
    _check_2d(check, "logits", logits)
    convention = check.choice("convention", convention, LABEL_SMOOTHING_CONVENTIONS)
    epsilon = check.probability("epsilon", epsilon, upper_open=True)
    reduction = check.reduction(reduction)
    classes = logits.shape[1]
    if convention == "others" and classes < 2:
        check.value_error("logits", "must have C >= 2 classes with convention='others' (it spreads epsilon over the "
                          "C - 1 other classes)", f"C = {classes}")
    targets = check.class_labels(labels, logits)
    log_probs = F.log_softmax(logits, dim=1)
    off_target = epsilon / classes if convention == "uniform" else epsilon / (classes - 1)
    on_target = 1.0 - epsilon + (off_target if convention == "uniform" else 0.0)
    smoothed = torch.full_like(log_probs, off_target).scatter_(1, targets.unsqueeze(1), on_target)
    return reduce_rows(soft_cross_entropy_rows(smoothed, log_probs), reduction, elements=classes)


# ------------------------------------------------------------------------------------------------------ Tf-KD reg

def tf_kd_reg_loss(student_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 20.0,
                   correct_prob: float = 0.99, multiplier: float = 1.0, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Tf-KD_reg's virtual-teacher term AS CODED in yuanli2333/Teacher-free-Knowledge-Distillation
    ``my_loss_function.py::loss_kd_regularization``::

        q[b, c] = correct_prob if c == y_b else (1 − correct_prob)/(C − 1)      # a probability vector
        loss    = multiplier · Σ_{b,c} softmax(q/T)·(log softmax(q/T) − log_softmax(z_s)) / (B·C)

    i.e. ``nn.KLDivLoss()`` (element mean over ``B·C``) with NO temperature on the student and no ``T²``. Because
    ``q`` is already a probability vector, ``softmax(q/T)`` is close to uniform (C = 100, T = 20: 0.0105 on the
    target against 0.0100 elsewhere), so as coded this is effectively a near-uniform (maximum-entropy) prior, not
    the paper's sharp virtual teacher. Reproduced literally; the method adds ``(1 − α)·CE``.

    Args:
        student_logits: ``[B, C]``. labels: integer class indices ``[B]``. temperature: ``T > 0`` (Tf-KD's
        ``reg_temperature``). correct_prob: ``q`` on the label, in ``[0, 1]``. multiplier: Tf-KD's ``multiplier``.
        reduction: ``"mean"`` (the element mean above, as coded), ``"batchmean"``, ``"sum"`` or ``"none"`` ([B]).
    """
    check = Checks("tf_kd_reg_loss")
    _check_2d(check, "student_logits", student_logits)
    temperature = check.temperature(temperature)
    correct_prob = check.probability("correct_prob", correct_prob)
    multiplier = check.real("multiplier", multiplier)
    reduction = check.reduction(reduction)
    classes = student_logits.shape[1]
    if classes < 2:
        check.value_error("student_logits", "must have at least 2 classes", f"{classes}")
    targets = check.class_labels(labels, student_logits)
    virtual = torch.full_like(student_logits, (1.0 - correct_prob) / (classes - 1))
    virtual.scatter_(1, targets.unsqueeze(1), correct_prob)
    teacher = F.softmax(virtual / temperature, dim=1)
    student = F.log_softmax(student_logits, dim=1)
    if reduction == "mean":  # nn.KLDivLoss()'s default, as coded
        return multiplier * (F.kl_div(student, teacher, reduction="sum") / student.numel())
    rows = F.kl_div(student, teacher, reduction="none").sum(dim=1)
    return reduce_rows(rows, reduction, elements=classes, scale=multiplier)


# ------------------------------------------------------------------------------------------------------- tf-NKD

def _top_labels(check: Checks, labels: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, classes) ``[B, k]``: hard labels give k = 1 with value 1; soft labels ``[B, C]`` their top 2."""
    if labels.dtype.is_floating_point and labels.shape == logits.shape:
        values, classes = torch.sort(labels, dim=1, descending=True)
        return values[:, :2].to(logits.dtype), classes[:, :2]
    targets = check.class_labels(labels, logits)
    return torch.ones_like(logits[:, :1]), targets.unsqueeze(1)


def tf_nkd_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Teacher-free NKD (Yang et al., arXiv 2208.10139 v1) as yzd-v/cls_KD ``classification_distiller.py``
    @8a16562 codes it (``tf_nkd=True``)::

        y_t = softmax(z_s)[label]                                      # [B, 1]
        w_t = (y_t + value − mean_b y_t).detach();  w_t[value == 0] = 0  # value = 1 for a hard label
        loss = −mean_b (w_t · log y_t)

    Soft labels ``[B, C]`` (mixup / cutmix) are sorted descending and the loss is summed over the top 2 labels with
    their values, as coded. ``log y_t`` is taken from ``log_softmax`` (finite where the official ``log(softmax)``
    underflows; equal elsewhere). Add the student's cross-entropy separately, as cls_KD does.

    Args:
        student_logits: ``[B, C]``. labels: integer class indices ``[B]``, or soft labels shaped like the logits.
        reduction: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over B · C) or ``"none"`` ([B]).
    """
    check = Checks("tf_nkd_loss")
    _check_2d(check, "student_logits", student_logits)
    check.tensor("labels", labels)
    reduction = check.reduction(reduction)
    values, classes = _top_labels(check, labels, student_logits)
    log_y = torch.gather(F.log_softmax(student_logits, dim=1), 1, classes)
    y = log_y.detach().exp()
    weight = torch.where(values == 0, torch.zeros_like(y), y + values - y.mean(dim=0, keepdim=True))
    if reduction == "batchmean":  # as coded: the mean over the batch of each label's term, summed over labels
        return -(weight * log_y).mean(dim=0).sum()
    return reduce_rows(-(weight * log_y).sum(dim=1), reduction, elements=student_logits.shape[1])


# --------------------------------------------------------------------------------------- Zipf's label smoothing

def min_rank(scores: torch.Tensor) -> torch.Tensor:
    """Per-row descending rank with ties sharing the smallest rank (scipy ``rankdata(−scores, method='min')``),
    on the scores' device: ``rank = 1 + #{c' : scores[c'] > scores[c]}``, from one sort and a binary search."""
    ascending, _ = torch.sort(scores, dim=-1)
    not_greater = torch.searchsorted(ascending.contiguous(), scores.contiguous(), right=True)
    return scores.shape[-1] - not_greater + 1


def dense_votes(dense_logits: torch.Tensor) -> torch.Tensor:
    """``votes[b, c]`` = number of locations of ``dense_logits [B, L, C]`` whose argmax is class ``c``."""
    winners = dense_logits.argmax(dim=-1)
    votes = torch.zeros(dense_logits.shape[0], dense_logits.shape[-1], device=dense_logits.device)
    return votes.scatter_add_(1, winners, torch.ones_like(winners, dtype=votes.dtype))


def zipf_ls_loss(logits: torch.Tensor, dense_logits: torch.Tensor, labels: torch.Tensor, power: float = 1.0,
                 mask: bool = False, *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Zipf's label smoothing (Liang et al., ECCV 2022) as megvii-research/zipfls ``pytorch_zipfls/losses.py``
    (``zipf_loss`` with ``dense=True, rank='hard', distribution='rank_zipf'``) computes it::

        votes[b, c] = #locations l with argmax_c dense_logits[b, l, :] == c
        rank        = rankdata(−votes[b], method='min')                    # ties share the smallest rank
        pdf[b, c]   = rank^(−power) over the classes c ≠ y_b, renormalised to sum to 1
        loss        = mean_b Σ_{c≠y} pdf·(log pdf − log_softmax(z_s without column y))

    ``dense_logits`` are the classifier applied at every location of the last feature map (no gradient flows
    through them: only their argmax is used). The rank is computed on the device (no scipy, no host copy).
    ``mask=True`` (``--mask``) averages only over the rows whose prediction is correct (0 when there is none);
    ``reduction``: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over rows · (C − 1)) or ``"none"`` ([B], 0 for the
    rows that ``mask`` drops).
    The method adds ``CE + loss_lambda·loss``.

    Args:
        logits: ``[B, C]`` student logits. dense_logits: ``[B, L, C]`` per-location logits. labels: ``[B]``.
        power: the Zipf exponent (1). mask: see above.
    """
    check = Checks("zipf_ls_loss")
    _check_2d(check, "logits", logits)
    check.logits("dense_logits", dense_logits)
    if dense_logits.dim() != 3 or dense_logits.shape[0] != logits.shape[0] or dense_logits.shape[2] != logits.shape[1]:
        check.value_error("dense_logits", f"must have shape [batch, locations, classes] = [{logits.shape[0]}, L, "
                          f"{logits.shape[1]}]", f"shape {tuple(dense_logits.shape)}")
    power = check.real("power", power)
    check.flag("mask", mask)
    reduction = check.reduction(reduction)
    classes = logits.shape[1]
    if classes < 2:
        check.value_error("logits", "must have at least 2 classes", f"{classes}")
    targets = check.class_labels(labels, logits)
    columns = _non_target_columns(targets, classes)
    with torch.no_grad():
        ranks = min_rank(dense_votes(dense_logits.detach())).to(logits.dtype)
        pdf = torch.gather(ranks, 1, columns).pow(-power)
        pdf = pdf / pdf.sum(dim=1, keepdim=True)
    student = F.log_softmax(torch.gather(logits, 1, columns), dim=1)
    rows = (pdf * (pdf.log() - student)).sum(dim=1)
    if not mask:
        return reduce_rows(rows, reduction, elements=classes - 1)
    correct = logits.argmax(dim=1) == targets
    if reduction == "batchmean":  # as coded: the mean over the correctly predicted rows
        weights = correct.to(rows.dtype)
        return (rows * weights).sum() / weights.sum().clamp_min(1.0)
    return reduce_rows(rows, reduction, elements=classes - 1, keep=correct)
