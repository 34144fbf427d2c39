"""Target / non-target decoupled distillation losses on the fused ``target_split`` op: DKD and NKD.

Both are assembled from six per-row log-space terms of one pass over the logits (kdkernels/reference/target_split.py):
``log p[y]`` and ``log(1 - p[y])`` of each side, ``KL(q_t || q_s)`` and ``H(q_t)`` of the softmaxes ``q`` over the
non-target classes. No probability is ever logged, so these losses stay finite where the reference code's
``log(softmax)`` underflows (two classes, logit gaps of 100·T and more, fp16 inputs).
"""
from __future__ import annotations

import torch

from kdkernels import backends
from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import as_rows, reduce_rows
from kdkernels.losses._log_space import kl_from_log_probs
from kdkernels.ops.target_split import target_split_terms


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, reduction: Reduction = "batchmean",
             return_parts: bool = False, *, backend: str = "auto"):
    """Decoupled KD (Zhao et al., CVPR 2022), as mdistiller's ``DKD.py`` defines it, in log space and one pass.

    With ``p = softmax(z/T)``, target class ``y``, the two-bin distributions ``b = (p[y], 1 - p[y])`` and the
    non-target softmaxes ``q = softmax(z/T without column y)``::

        TCKD = T² · KL(b_t ‖ b_s),    NCKD = T² · KL(q_t ‖ q_s),    loss = alpha · TCKD + beta · NCKD

    per row, then ``reduction``: ``"batchmean"`` (mdistiller's ``size_average=False`` sum / B), ``"sum"``,
    ``"mean"`` (sum / (B · C), as KD's mean) or ``"none"`` (per-row values with the labels' shape). Per row ``KL(p_t ‖ p_s) = TCKD + (1 - p_t[y]) · NCKD``
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
    check = Checks("dkd_loss")
    check.logits_pair(student_logits, teacher_logits)
    temperature = check.temperature(temperature)
    alpha, beta = check.real("alpha", alpha), check.real("beta", beta)
    reduction = check.reduction(reduction)
    check.flag("return_parts", return_parts)
    targets = check.class_labels(labels, student_logits)
    student, teacher = as_rows(student_logits), as_rows(teacher_logits)
    name = backends.select_backend(backend, student, teacher, required_ops=("target_split",))
    terms = target_split_terms(student, teacher, targets, temperature, name)
    scale = temperature * temperature
    tckd = kl_from_log_probs(terms[:, 2:4], terms[:, 0:2]) * scale
    nckd = terms[:, 4] * scale
    leading_shape, classes = student_logits.shape[:-1], student_logits.shape[-1]
    if return_parts:
        return tuple(reduce_rows(part, reduction, leading_shape=leading_shape, elements=classes)
                     for part in (tckd, nckd))
    return reduce_rows(alpha * tckd + beta * nckd, reduction, leading_shape=leading_shape, elements=classes)


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 1.0, gamma: float = 1.5, *, reduction: Reduction = "batchmean",
             backend: str = "auto") -> torch.Tensor:
    """Normalized KD (Yang et al., ICCV 2023), as yzd-v/cls_KD ``nkd.py`` @9466b3f computes it, fused.

    With ``p = softmax(z)`` at temperature 1 and ``q = softmax(z/T without column y)``::

        loss = mean_b [ -p_t[y] · log p_s[y] ]  +  gamma · T² · mean_b [ -Σ_c q_t[c] log q_s[c] ]

    The teacher is a constant (cls_KD detaches ``p_t[y]`` and runs the teacher without gradients), so no gradient
    reaches ``teacher_logits``. Soft labels (mixup / cutmix, shaped like the logits) are reduced by argmax, as in
    cls_KD. At ``T = 1`` one pass over the logits gives both terms; otherwise the target term takes a second pass at
    temperature 1. Add the student's own cross-entropy separately, as cls_KD does. ``reduction``: the two means
    above (``"batchmean"``, cls_KD's), or the per-row sum of both terms reduced by ``"sum"``, ``"mean"`` (over
    rows · C) or ``"none"``.
    """
    check = Checks("nkd_loss")
    check.logits_pair(student_logits, teacher_logits)
    temperature = check.temperature(temperature)
    gamma = check.real("gamma", gamma)
    reduction = check.reduction(reduction)
    targets = check.class_labels(labels, student_logits, allow_soft=True)
    student, teacher = as_rows(student_logits), as_rows(teacher_logits.detach())
    name = backends.select_backend(backend, student, teacher, required_ops=("target_split",))
    non_target_terms = target_split_terms(student, teacher, targets, temperature, name)
    target_terms = non_target_terms if temperature == 1.0 else target_split_terms(student, teacher, targets, 1.0, name)
    target_rows = -(target_terms[:, 2].exp() * target_terms[:, 0])
    cross_entropy = non_target_terms[:, 4] + non_target_terms[:, 5]
    scale = gamma * temperature * temperature
    if reduction == "batchmean":  # cls_KD's two means, in its order
        return target_rows.mean() + scale * cross_entropy.mean()
    return reduce_rows(target_rows + scale * cross_entropy, reduction, leading_shape=student_logits.shape[:-1],
                       elements=student_logits.shape[-1])
