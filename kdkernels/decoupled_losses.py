"""Target / non-target decoupled distillation losses on the fused ``target_split`` op: DKD and NKD.

Both are assembled from six per-row log-space terms of one pass over the logits (kdkernels/reference/target_split.py):
``log p[y]`` and ``log(1 - p[y])`` of each side, ``KL(q_t || q_s)`` and ``H(q_t)`` of the softmaxes ``q`` over the
non-target classes. No probability is ever logged, so these losses stay finite where the reference code's
``log(softmax)`` underflows (two classes, logit gaps of 100·T and more, fp16 inputs).
"""
from __future__ import annotations

import numbers

import torch

from kdkernels import backends
from kdkernels._log_space import kl_from_log_probs
from kdkernels.losses import _as_rows, _check_temperature, check_logits_pair
from kdkernels.ops.target_split import target_split_terms

DKD_REDUCTIONS = ("batchmean", "sum", "none")


def _check_real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, got {value}")
    return value


def class_labels(labels, logits: torch.Tensor, *, allow_soft: bool = False) -> torch.Tensor:
    """Validated int64 class indices [N] for logits [..., V]: hard labels with the logits' leading shape, or (with
    ``allow_soft``) soft labels [..., V] reduced by argmax. Values outside [0, V) raise; outside torch.compile this
    check reads the labels on the host (one synchronisation on a GPU)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    classes = logits.shape[-1]
    if allow_soft and labels.dtype.is_floating_point and labels.shape == logits.shape:
        return labels.reshape(-1, classes).argmax(dim=-1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        expected = "an integer tensor" + (" or soft labels shaped like the logits" if allow_soft else "")
        raise TypeError(f"labels must be {expected}, got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have the logits' leading shape {tuple(logits.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    labels = labels.reshape(-1).long()
    if not torch.compiler.is_compiling() and labels.numel() and bool(((labels < 0) | (labels >= classes)).any()):
        bad = labels[(labels < 0) | (labels >= classes)][0].item()
        raise ValueError(f"labels must be class indices in [0, {classes}), got {bad}")
    return labels


def _reduce(rows: torch.Tensor, reduction: str, leading_shape: torch.Size) -> torch.Tensor:
    if reduction == "none":
        return rows.reshape(leading_shape)
    total = rows.sum()
    return total / rows.shape[0] if reduction == "batchmean" else total


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, reduction: str = "batchmean",
             return_parts: bool = False, *, backend: str = "auto"):
    """Decoupled KD (Zhao et al., CVPR 2022), as mdistiller's ``DKD.py`` defines it, in log space and one pass.

    With ``p = softmax(z/T)``, target class ``y``, the two-bin distributions ``b = (p[y], 1 - p[y])`` and the
    non-target softmaxes ``q = softmax(z/T without column y)``::

        TCKD = T² · KL(b_t ‖ b_s),    NCKD = T² · KL(q_t ‖ q_s),    loss = alpha · TCKD + beta · NCKD

    per row, then ``reduction``: ``"batchmean"`` (mdistiller's ``size_average=False`` sum / B), ``"sum"`` or
    ``"none"`` (per-row values with the labels' shape). Per row ``KL(p_t ‖ p_s) = TCKD + (1 - p_t[y]) · NCKD``
    (before T²). ``log b`` comes from logsumexps (``log(1 - p[y]) = LSE(z/T without y) - LSE(z/T)``), never from
    the log of a summed softmax, so the loss is finite wherever mdistiller's is NaN or inf (2 classes, gaps of
    100·T, fp16) and equal to it elsewhere. The warm-up factor ``min(epoch / warmup, 1)`` belongs to the trainer.

    Args:
        student_logits, teacher_logits: ``[..., C]`` logits (float32/16, bfloat16, float64; they may differ).
        labels: integer class indices with the logits' leading shape, in ``[0, C)``.
        temperature, alpha, beta: mdistiller's defaults ``T = 4``, ``alpha = 1``, ``beta = 8``.
        return_parts: return ``(tckd, nckd)`` (each reduced and T²-scaled, without alpha / beta) instead.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
    """
    check_logits_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    alpha, beta = _check_real("alpha", alpha), _check_real("beta", beta)
    if reduction not in DKD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(DKD_REDUCTIONS)} for dkd_loss; got {reduction!r}")
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")
    targets = class_labels(labels, student_logits)
    student, teacher = _as_rows(student_logits), _as_rows(teacher_logits)
    name = backends.select_backend(backend, student, teacher, required_ops=("target_split",))
    terms = target_split_terms(student, teacher, targets, temperature, name)
    scale = temperature * temperature
    tckd = kl_from_log_probs(terms[:, 2:4], terms[:, 0:2]) * scale
    nckd = terms[:, 4] * scale
    leading_shape = student_logits.shape[:-1]
    if return_parts:
        return _reduce(tckd, reduction, leading_shape), _reduce(nckd, reduction, leading_shape)
    return _reduce(alpha * tckd + beta * nckd, reduction, leading_shape)


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 1.0, gamma: float = 1.5, *, backend: str = "auto") -> torch.Tensor:
    """Normalized KD (Yang et al., ICCV 2023), as yzd-v/cls_KD ``nkd.py`` @9466b3f computes it, fused.

    With ``p = softmax(z)`` at temperature 1 and ``q = softmax(z/T without column y)``::

        loss = mean_b [ -p_t[y] · log p_s[y] ]  +  gamma · T² · mean_b [ -Σ_c q_t[c] log q_s[c] ]

    The teacher is a constant (cls_KD detaches ``p_t[y]`` and runs the teacher without gradients), so no gradient
    reaches ``teacher_logits``. Soft labels (mixup / cutmix, shaped like the logits) are reduced by argmax, as in
    cls_KD. At ``T = 1`` one pass over the logits gives both terms; otherwise the target term takes a second pass at
    temperature 1. Add the student's own cross-entropy separately, as cls_KD does.
    """
    check_logits_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    gamma = _check_real("gamma", gamma)
    targets = class_labels(labels, student_logits, allow_soft=True)
    student, teacher = _as_rows(student_logits), _as_rows(teacher_logits.detach())
    name = backends.select_backend(backend, student, teacher, required_ops=("target_split",))
    non_target_terms = target_split_terms(student, teacher, targets, temperature, name)
    target_terms = non_target_terms if temperature == 1.0 else target_split_terms(student, teacher, targets, 1.0, name)
    loss_target = -(target_terms[:, 2].exp() * target_terms[:, 0]).mean()
    cross_entropy = non_target_terms[:, 4] + non_target_terms[:, 5]
    return loss_target + gamma * temperature * temperature * cross_entropy.mean()
