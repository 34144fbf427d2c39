"""Response-based losses that compose torch ops (no fused kernel of their own): the soft-target cross-entropy of
BAN and BYOT, weighted soft labels (WSL), the balanced divergences of BD-KD, KD at separate (learnable) student
and teacher temperatures (MKD), KD / DKD on z-scored logits (logit standardisation) KD at a per-sample
temperature from the student's feature norm (FN-KD), and DeiT's distillation through a distillation token.

Plain PyTorch: each function IS the reference implementation of its formula (a fused kernel may replace it later
behind the same signature), transcribed from the official code named in its docstring.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, reduce_rows, soft_cross_entropy_rows
from kdkernels.losses.decoupled import dkd_loss
from kdkernels.losses.kd import kd_loss

_WEIGHT_EPS = 1e-12


def soft_cross_entropy_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                            *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """``−mean_b Σ_c softmax(t/T)_bc · log_softmax(s/T)_bc``: cross-entropy against the teacher's soft targets.

    It equals ``kd_loss(s, t, T, scale_by_t2=False)`` plus the teacher's entropy, so the gradients agree; the value
    is the one the official code logs. BYOT (luanyunteng/pytorch-be-your-own-teacher ``kd_loss_function``, there
    multiplied by T²) and BAN (Furlanello et al. 2018: the student's cross-entropy on the previous generation's
    output, T = 1) use it. The gradient reaches both inputs; detach the teacher for offline distillation.
    ``reduction`` over rows: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over rows · C) or ``"none"``.
    """
    check = Checks("soft_cross_entropy_loss")
    check.logits_pair(student_logits, teacher_logits)
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction)
    student = accumulate(student_logits)
    teacher = accumulate(teacher_logits).to(student.dtype)
    targets = torch.softmax(teacher / temperature, dim=-1)
    rows = soft_cross_entropy_rows(targets, torch.log_softmax(student / temperature, dim=-1))
    return reduce_rows(rows.reshape(-1), reduction, leading_shape=student_logits.shape[:-1],
                       elements=student_logits.shape[-1])


def _temperature_of(check: Checks, name: str, value) -> float | torch.Tensor:
    """A positive finite temperature: a real number, or a one-element floating tensor (which may require grad)."""
    if not isinstance(value, torch.Tensor):
        return check.temperature(value, name)
    if not value.is_floating_point():
        check.type_error(name, "a real number or a floating tensor", value)
    if value.numel() != 1:
        check.value_error(name, "must have one element", f"shape {tuple(value.shape)}")
    number = float(value.detach())
    if not (math.isfinite(number) and number > 0):
        check.value_error(name, "must be positive and finite", number)
    return value.reshape(())


def two_temperature_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            student_temperature: float = 4.0, teacher_temperature: float = 4.0, *,
                            reduction: Reduction = "batchmean") -> torch.Tensor:
    """``T_s·T_t · KL(softmax(z_t/T_t) ‖ softmax(z_s/T_s))``: KD with the student's and the teacher's softmax at their
    own temperatures (MKD, Liu et al., "Meta Knowledge Distillation", arXiv:2202.07940, 2022, meta-learns both);
    ``kd_loss(z_s, z_t, T)`` when ``T_s = T_t = T``. The scale ``T_s·T_t`` (Hinton's T² at equal temperatures) is
    our reading: the paper's scaling was not available to us.

    Torch ops, twice differentiable, also in the temperatures: each may be a real number or a one-element floating
    tensor that requires grad (a learned temperature; the ``mkd`` method passes ``exp(log T)``). The gradient reaches
    both logits; detach the teacher for offline distillation. ``reduction`` over rows: ``"batchmean"`` (above),
    ``"sum"``, ``"mean"`` (over rows · C) or ``"none"``.
    """
    check = Checks("two_temperature_kd_loss")
    check.logits_pair(student_logits, teacher_logits)
    t_s = _temperature_of(check, "student_temperature", student_temperature)
    t_t = _temperature_of(check, "teacher_temperature", teacher_temperature)
    reduction = check.reduction(reduction)
    student = accumulate(student_logits)
    teacher = accumulate(teacher_logits).to(student.dtype)
    log_p_s = torch.log_softmax(student / t_s, dim=-1)
    log_p_t = torch.log_softmax(teacher / t_t, dim=-1)
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    loss = reduce_rows(rows.reshape(-1), reduction, leading_shape=student_logits.shape[:-1],
                       elements=student_logits.shape[-1])
    return t_s * t_t * loss


def wsl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
             temperature: float = 2.0, *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Weighted soft labels (Zhou et al., "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance
    Tradeoff Perspective", ICLR 2021) as PaddleClas ``ppcls/loss/wslloss.py`` codes it::

        ce_s = CE(z_s, y), ce_t = CE(z_t, y)              # temperature 1, both detached, per sample
        w    = 1 − exp(−max(ce_s / (ce_t + 1e-7), 0))
        loss = T² · mean_b w · (−Σ_c softmax(z_t/T)·log_softmax(z_s/T))   # a soft cross-entropy, not a KL

    ``labels=None`` uses the teacher's argmax as ``y`` (PaddleClas ``target=None``). The method adds ``CE +
    2.5·loss`` (``resnet34_distill_resnet18_wsl.yaml``). ``reduction`` over samples: ``"batchmean"`` (above),
    ``"sum"``, ``"mean"`` (over samples · C) or ``"none"``.

    Args:
        student_logits, teacher_logits: ``[B, C]``. labels: integer class indices ``[B]`` or None. temperature: T.
    """
    check = Checks("wsl_loss")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction)
    teacher_logits = teacher_logits.detach()
    targets = teacher_logits.argmax(dim=1) if labels is None else check.class_labels(labels, student_logits)
    targets = targets.reshape(-1, 1)
    with torch.no_grad():
        ce_student = -torch.gather(F.log_softmax(student_logits.detach(), dim=1), 1, targets).squeeze(1)
        ce_teacher = -torch.gather(F.log_softmax(teacher_logits, dim=1), 1, targets).squeeze(1)
        weight = 1.0 - torch.exp(-(ce_student / (ce_teacher + 1e-7)).clamp_min(0.0))
    soft_ce = soft_cross_entropy_rows(F.softmax(teacher_logits / temperature, dim=1),
                                      F.log_softmax(student_logits / temperature, dim=1))
    return reduce_rows(weight * soft_ce, reduction, elements=student_logits.shape[1],
                       scale=temperature * temperature)


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(logits / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def bdkd_loss(learner_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0, *,
              reduction: Reduction = "batchmean", backend: str = "auto") -> torch.Tensor:
    """Balanced forward/reverse KL of one network of an online-KD pair towards the other: an approximation of BD-KD
    (Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation", arXiv:2212.12965).

    Per sample ``b``, with ``p = softmax(learner/T)``, ``q = softmax(target/T)`` and their entropies ``H_p``,
    ``H_q``, the weight ``w_b = H_q / (H_q + H_p)`` (no gradient) mixes the two divergences::

        loss = T² · mean_b ( w_b · KL(q ‖ p) + (1 − w_b) · KL(p ‖ q) )

    An over-confident learner (``H_p < H_q``) leans on the mode-covering forward KL, an under-confident one on the
    mode-seeking reverse KL. The paper weights the two KLs per sample ("sample-wise weighting of forward and reverse
    Kullback-Leibler divergence" on "both the student and teacher losses", arXiv v2 abstract; v1: "at the level of
    the student distillation loss"), but its weighting rule could not be read: the page store returns the
    beginning of the arXiv pages only (abstract, introduction), and no code was found (repository names with
    bd-kd / bdkd, code, issue and page searches for the title, the authors and the balancing of forward and reverse
    KL). So this weight is ours, not the paper's. Gradients reach the
    target too when it requires grad: detach it for the usual online-KD update. ``reduction`` over samples:
    ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over samples · C) or ``"none"``.
    """
    check = Checks("bdkd_loss")
    check.logits_pair(learner_logits, target_logits, "learner_logits", "target_logits")
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction)
    with torch.no_grad():
        h_learner = _entropy(accumulate(learner_logits), temperature)
        h_target = _entropy(accumulate(target_logits), temperature)
        forward_weight = h_target / (h_target + h_learner).clamp_min(_WEIGHT_EPS)
    forward = kd_loss(learner_logits, target_logits, temperature, reduction="none", divergence="forward",
                      backend=backend)
    reverse = kd_loss(learner_logits, target_logits, temperature, reduction="none", divergence="reverse",
                      backend=backend)
    rows = forward_weight * forward + (1.0 - forward_weight) * reverse
    return reduce_rows(rows.reshape(-1), reduction, leading_shape=learner_logits.shape[:-1],
                       elements=learner_logits.shape[-1])


def mmt_loss(logits_1: torch.Tensor, logits_2: torch.Tensor, ema_logits_1: torch.Tensor,
             ema_logits_2: torch.Tensor, labels: torch.Tensor, soft_ce_weight: float = 0.5, epsilon: float = 0.1, *,
             reduction: Reduction = "batchmean") -> torch.Tensor:
    """Mutual mean-teaching (Ge, Chen, Li, ICLR 2020), classification part: two peers, each taught by the OTHER
    peer's temporal-average (EMA) model::

        loss = (1 − w) · (CE_ε(z₁, y) + CE_ε(z₂, y)) + w · (SCE(z₁, ẑ₂) + SCE(z₂, ẑ₁))
        CE_ε(z, y) = −mean_b Σ_c q_bc log softmax(z)_bc,   q = (1 − ε)·onehot(y) + ε/C
        SCE(z, ẑ)  = −mean_b Σ_c softmax(ẑ)_bc log softmax(z)_bc

    ``z₁``, ``z₂``: the peers' logits; ``ẑ₁``, ``ẑ₂``: their EMA models' logits (detached here, as ``SoftEntropy``).
    yxgeee/MMT ``mmt/trainers.py`` ``MMTTrainer.train`` (``ce_soft_weight`` 0.5) with ``mmt/loss/crossentropy.py``
    ``CrossEntropyLabelSmooth`` (ε 0.1) and ``SoftEntropy`` (T 1); the re-ID triplet and soft-triplet terms are not
    part of this loss. ``reduction`` over samples: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (over samples · C)
    or ``"none"`` ([B]).
    """
    check = Checks("mmt_loss")
    check.logits("logits_1", logits_1, dims=(2,))
    for name, value in (("logits_2", logits_2), ("ema_logits_1", ema_logits_1), ("ema_logits_2", ema_logits_2)):
        check.logits(name, value, dims=(2,))
        check.same_shape(name, value, "logits_1", logits_1)
        check.same_device(name, value, "logits_1", logits_1)
    weight = check.probability("soft_ce_weight", soft_ce_weight)
    epsilon = check.probability("epsilon", epsilon, upper_open=True)
    reduction = check.reduction(reduction)
    classes = logits_1.shape[1]
    targets = check.class_labels(labels, logits_1)
    z1, z2 = accumulate(logits_1), accumulate(logits_2).to(accumulate(logits_1).dtype)
    log_p1, log_p2 = F.log_softmax(z1, dim=1), F.log_softmax(z2, dim=1)
    smoothed = torch.full_like(log_p1, epsilon / classes).scatter_(1, targets.unsqueeze(1),
                                                                   1.0 - epsilon + epsilon / classes)
    with torch.no_grad():
        soft_1 = F.softmax(accumulate(ema_logits_1).to(z1.dtype), dim=1)
        soft_2 = F.softmax(accumulate(ema_logits_2).to(z1.dtype), dim=1)
    hard = soft_cross_entropy_rows(smoothed, log_p1) + soft_cross_entropy_rows(smoothed, log_p2)
    soft = soft_cross_entropy_rows(soft_2, log_p1) + soft_cross_entropy_rows(soft_1, log_p2)
    return reduce_rows((1.0 - weight) * hard + weight * soft, reduction, elements=classes)


StandardizedBase = Literal["kd", "dkd"]
STANDARDIZED_BASES = get_args(StandardizedBase)


def standardized(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """``(z − mean(z)) / (std(z) + eps)`` over the classes, the std unbiased (torch's default, as the official code)."""
    logits = accumulate(logits)
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + eps)


def logit_standardized_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               labels: torch.Tensor | None = None, temperature: float = 2.0,
                               base: StandardizedBase = "kd", alpha: float = 1.0, beta: float = 8.0,
                               eps: float = 1e-7, *, reduction: Reduction = "batchmean",
                               backend: str = "auto") -> torch.Tensor:
    """KD (or DKD) on z-scored logits: logit standardisation (Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024), as sunshangquan/logit-standardization-KD ``mdistiller/distillers/KD.py`` and
    ``DKD.py`` (``normalize`` then ``kd_loss`` / ``dkd_loss`` with ``logit_stand=True``)::

        Z(z)  = (z − mean_c z) / (std_c z + eps)             # unbiased std, eps = 1e-7 added to the std
        "kd":  loss = T² · KL(softmax(Z(z_t)/T) ‖ softmax(Z(z_s)/T))
        "dkd": loss = alpha · TCKD + beta · NCKD  of Z(z_s), Z(z_t)   (see :func:`kdkernels.dkd_loss`)

    Each sample's temperature is in effect ``T·std(z)``: the student matches the teacher's logit relations, not
    their magnitude. The official base temperature is 2 (``--base-temp 2``). ``labels`` are needed for ``"dkd"``
    only. ``reduction`` over samples: ``"batchmean"`` (the official sum / B), ``"sum"``, ``"mean"`` (over samples ·
    C) or ``"none"``. The gradient reaches both inputs through the standardisation; detach the teacher for offline
    distillation.
    """
    check = Checks("logit_standardized_kd_loss")
    check.logits_pair(student_logits, teacher_logits)
    temperature = check.temperature(temperature)
    base = check.choice("base", base, STANDARDIZED_BASES)
    eps = check.real("eps", eps, nonnegative=True)
    reduction = check.reduction(reduction)
    if student_logits.shape[-1] < 2:
        check.value_error("student_logits", "must have at least 2 classes to standardise",
                          f"shape {tuple(student_logits.shape)}")
    student, teacher = standardized(student_logits, eps), standardized(teacher_logits, eps)
    if base == "kd":
        return kd_loss(student, teacher.to(student.dtype), temperature, reduction=reduction, backend=backend)
    if labels is None:
        check.value_error("labels", "are needed when base is 'dkd'", None)
    return dkd_loss(student, teacher.to(student.dtype), labels, temperature, alpha, beta, reduction,
                    backend=backend)


def feature_normalized_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               student_features: torch.Tensor, tau: float = 1.0, *,
                               reduction: Reduction = "batchmean") -> torch.Tensor:
    """Feature-normalised KD (Xu, Rui, Li, Gu, "Feature Normalized Knowledge Distillation for Image Classification",
    ECCV 2020): KD whose temperature is per sample, the L2 norm of the student's penultimate feature::

        T_i = ‖f_i‖₂ / τ,    loss = Σ_i KL(softmax(z^t_i / T_i) ‖ softmax(z^s_i / T_i)) / N

    No T² factor. The norm acts as a temperature: it is detached (no gradient through it). ``reduction`` over the
    samples: ``"batchmean"`` (above), ``"sum"``, ``"mean"`` (/ (N·C)) or ``"none"`` [N]. ``student_features``
    ``[N, ...]`` (flattened per sample). The teacher is used as given (detach it for offline distillation).
    """
    check = Checks("feature_normalized_kd_loss")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    check.features("student_features", student_features)
    if student_features.shape[0] != student_logits.shape[0]:
        check.value_error("student_features", f"must have the same batch size as student_logits "
                          f"{tuple(student_logits.shape)}", f"shape {tuple(student_features.shape)}")
    check.same_device("student_features", student_features, "student_logits", student_logits)
    tau = check.real("tau", tau, positive=True)
    reduction = check.reduction(reduction)
    student = accumulate(student_logits)
    teacher = accumulate(teacher_logits).to(student.dtype)
    norms = student_features.detach().to(student.dtype).flatten(1).norm(dim=1, keepdim=True)
    scale = tau / norms.clamp_min(torch.finfo(student.dtype).tiny)
    log_p_s = F.log_softmax(student * scale, dim=-1)
    log_p_t = F.log_softmax(teacher * scale, dim=-1)
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return reduce_rows(rows, reduction, elements=student.shape[-1])


DEIT_DISTILLATION_TYPES = ("none", "soft", "hard")


def deit_loss(class_logits: torch.Tensor, distillation_logits: torch.Tensor, teacher_logits: torch.Tensor,
              labels: torch.Tensor, distillation_type: str = "hard", alpha: float = 0.5, temperature: float = 1.0,
              *, reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """DeiT's distillation loss (Touvron et al., "Training data-efficient image transformers & distillation through
    attention", ICML 2021), facebookresearch/deit ``losses.py`` ``DistillationLoss`` (commit 7e160fe)::

        base = CE(z_cls, y)                                           # the class token's head
        soft: D = T² · Σ_{b,c} p_t (log p_t − log p_s) / (B·C)        # KL(softmax(z_t/T) ‖ softmax(z_dist/T)),
                                                                      # sum / numel (the official "legacy" mean)
        hard: D = CE(z_dist, argmax_c z_t)                            # the teacher's decision as a label
        loss = (1 − α) · base + α · D;        "none": loss = base (no α)

    ``z_dist`` is the distillation token's head (``distillation_logits``), ``z_t`` the teacher's logits (detached:
    the official computes them under ``no_grad``). Defaults: ``hard``, α 0.5, T 1 (the official ``main.py``
    arguments; the paper's best is hard distillation). ``reduction`` over the samples, each sample's value being
    ``(1 − α)·CE_b + α·D_b`` with the soft ``D_b = T²·KL_b / C``: ``"batchmean"`` (the official value), ``"sum"``
    or ``"none"`` [B].

    Args:
        class_logits, distillation_logits, teacher_logits: ``[B, C]``. labels: class indices ``[B]``.
        distillation_type: ``"none"``, ``"soft"`` or ``"hard"``. alpha: in [0, 1]. temperature: T > 0 (soft only).
    """
    check = Checks("deit_loss")
    check.logits_pair(class_logits, teacher_logits, "class_logits", "teacher_logits", dims=(2,))
    check.logits_pair(class_logits, distillation_logits, "class_logits", "distillation_logits", dims=(2,))
    distillation_type = check.choice("distillation_type", distillation_type, DEIT_DISTILLATION_TYPES)
    alpha = check.probability("alpha", alpha)
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    targets = check.class_labels(labels, class_logits)
    student = accumulate(class_logits)
    rows = F.cross_entropy(student, targets, reduction="none")
    if distillation_type == "none":
        return reduce_rows(rows, reduction)
    distilled = accumulate(distillation_logits).to(student.dtype)
    teacher = accumulate(teacher_logits.detach()).to(student.dtype)
    if distillation_type == "soft":
        log_p_s = F.log_softmax(distilled / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / temperature, dim=-1)
        distillation = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * (temperature * temperature / student.shape[-1])
    else:
        distillation = F.cross_entropy(distilled, teacher.argmax(dim=-1), reduction="none")
    return reduce_rows((1.0 - alpha) * rows + alpha * distillation, reduction)
