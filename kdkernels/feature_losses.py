"""Feature-based distillation losses (plain PyTorch; each function IS the reference of its method).

Each loss compares one student feature map with one teacher feature map (the strategies sum them over stages with
the official stage weights) and matches the official code named in its docstring
(../shared/reference/methods.md §2). Inputs are float tensors ``[B, C, H, W]`` (FitNet, VID and FT also take
``[B, D]``); the teacher side is used as given (detach it for offline distillation). Shape mismatches that a
connector would fix raise a ValueError naming both arguments and their shapes.

* :func:`fitnet_loss` — FitNet hint MSE;            * :func:`at_loss` — attention transfer;
* :func:`nst_loss` — NST polynomial-kernel MMD;      * :func:`fsp_loss` — FSP (flow) matrices;
* :func:`ofd_margins` / :func:`ofd_loss` — OFD;      * :func:`vid_loss` — VID Gaussian NLL;
* :func:`ab_loss` — AB alternative L2;               * :func:`ft_loss` — factor transfer L1.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.decoupled_losses import _check_real
from kdkernels.relation_losses import check_feature_pair, check_features

REDUCTIONS = ("sum", "batchmean")


def _check_pair(student_name: str, student, teacher_name: str, teacher, dims: Sequence[int] = (4,)) -> None:
    """Both floating tensors of an allowed rank, same batch size and device."""
    check_feature_pair(student_name, student, teacher_name, teacher)
    for name, value in ((student_name, student), (teacher_name, teacher)):
        if value.dim() not in dims:
            raise ValueError(f"{name} must have {' or '.join(str(d) for d in dims)} dims, got shape "
                             f"{tuple(value.shape)}")


def _check_same_shape(student_name: str, student, teacher_name: str, teacher) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{student_name} {tuple(student.shape)} and {teacher_name} {tuple(teacher.shape)} must have "
                         "the same shape (use a connector/regressor to map the student feature)")


def _reduce(total: torch.Tensor, batch: int, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return total if reduction == "sum" else total / batch


def pool_to_smaller(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's rule for maps of different sizes: adaptive-average-pool the larger map to the smaller one's
    spatial size."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size[0] > t_size[0]:
        student = F.adaptive_avg_pool2d(student, tuple(t_size))
    elif s_size[0] < t_size[0]:
        teacher = F.adaptive_avg_pool2d(teacher, tuple(s_size))
    return student, teacher


def fitnet_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss (Romero et al., ICLR 2015), as RepDistiller ``distiller_zoo/FitNet.py`` (``HintLoss``):
    ``mean((r(f_s) − f_t)²)`` over every element, where ``student_hint`` is already the regressor's output ``r(f_s)``.
    """
    _check_pair("student_hint", student_hint, "teacher_hint", teacher_hint, dims=(2, 3, 4))
    _check_same_shape("student_hint", student_hint, "teacher_hint", teacher_hint)
    return F.mse_loss(student_hint, teacher_hint)


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's spatial attention ``normalize(mean_c |f|^p)`` [B, H·W] (L2 over the positions)."""
    return F.normalize(features.pow(p).mean(1).reshape(features.shape[0], -1))


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) for one stage, as RepDistiller ``AT.py`` /
    attention-transfer ``utils.py::at_loss``: the larger map pooled to the smaller, ``a(f) = normalize(mean_c f^p)``,
    ``loss = mean_{B,HW} (a(f_s) − a(f_t))²``. Channel counts may differ."""
    _check_pair("student", student, "teacher", teacher)
    p = _check_real("p", p, positive=True)
    student, teacher = pool_to_smaller(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def _channel_maps(features: torch.Tensor) -> torch.Tensor:
    """[B, C, H·W] with every channel's spatial map L2-normalised."""
    return F.normalize(features.reshape(features.shape[0], features.shape[1], -1), dim=2)


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean((a bᵀ)²)`` over [B, C_a, C_b], by bmm (never the B×C×C×HW broadcast)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang, 2017) for one stage, as RepDistiller ``NST.py`` (full loss, c = 0):
    the larger map pooled to the smaller, every channel map L2-normalised over H·W (F [B, C, HW]), then
    ``loss = mean((F_t F_tᵀ)²).detach() + mean((F_s F_sᵀ)²) − 2·mean((F_s F_tᵀ)²)`` with batched matrix products
    (the official TuSimple ``mmd_poly`` uses ``batch_dot``; RepDistiller's broadcast builds B×C×C×HW)."""
    _check_pair("student", student, "teacher", teacher)
    student, teacher = pool_to_smaller(student, teacher)
    f_s, f_t = _channel_maps(student), _channel_maps(teacher)
    return _poly_kernel_mean(f_t, f_t).detach() + _poly_kernel_mean(f_s, f_s) - 2 * _poly_kernel_mean(f_s, f_t)


def fsp_matrices(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """FSP matrices of consecutive maps ``(g_i, g_{i+1})``, the larger pooled to the smaller:
    ``G = g_{i+1} g_iᵀ / HW`` [B, C_{i+1}, C_i] (RepDistiller ``FSP.compute_fsp``, by bmm)."""
    matrices = []
    for bottom, top in zip(features[:-1], features[1:]):
        bottom, top = pool_to_smaller(bottom, top)
        bottom = bottom.reshape(bottom.shape[0], bottom.shape[1], -1)
        top = top.reshape(top.shape[0], top.shape[1], -1)
        matrices.append(torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[2])
    return matrices


def fsp_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """FSP (Yim et al., CVPR 2017), as RepDistiller ``FSP.py`` summed as in ``helper/pretrain.py``:
    ``Σ_i mean((G_s,i − G_t,i)²)`` over the FSP matrices of consecutive stage maps (see :func:`fsp_matrices`).
    Student and teacher must have the same channel count at every stage (RepDistiller raises otherwise)."""
    if isinstance(student_features, torch.Tensor) or isinstance(teacher_features, torch.Tensor):
        raise TypeError("student_features and teacher_features must be sequences of [B, C, H, W] maps")
    if len(student_features) != len(teacher_features) or len(student_features) < 2:
        raise ValueError(f"student_features and teacher_features need the same number (>= 2) of maps, got "
                         f"{len(student_features)} and {len(teacher_features)}")
    for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        _check_pair(f"student_features[{index}]", student, f"teacher_features[{index}]", teacher)
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"FSP needs equal channel counts: student_features[{index}] has {student.shape[1]} "
                             f"channels {tuple(student.shape)}, teacher_features[{index}] has {teacher.shape[1]} "
                             f"{tuple(teacher.shape)}")
    pairs = zip(fsp_matrices(student_features), fsp_matrices(teacher_features))
    return torch.stack([(g_s - g_t).pow(2).mean() for g_s, g_t in pairs]).sum()


def ofd_margins(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """OFD's per-channel margins from the teacher's BN before ReLU (clovaai/overhaul-distillation
    ``distiller.py::get_margin_from_BN``), with s = |γ|, μ = β: the expectation of the negative part of N(μ, s²),
    ``m = −s·exp(−(μ/s)²/2)/√(2π)/Φ(−μ/s) + μ`` where ``Φ(−μ/s) > 1e-3``, else ``m = −3s``. Computed in float64,
    returned as float32 [C]."""
    for name, value in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        check_features(name, value)
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D [C], got shape {tuple(value.shape)}")
    if bn_weight.shape != bn_bias.shape:
        raise ValueError(f"bn_weight {tuple(bn_weight.shape)} and bn_bias {tuple(bn_bias.shape)} differ in shape")
    s = bn_weight.detach().double().abs()
    mu = bn_bias.detach().double()
    cdf = torch.special.ndtr(-mu / s)
    negative_mean = -s * torch.exp(-(mu / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + mu
    return torch.where(cdf > 1e-3, negative_mean, -3 * s).float()


def ofd_loss(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor,
             reduction: str = "sum") -> torch.Tensor:
    """OFD's partial L2 for one stage (Heo et al., ICCV 2019; overhaul-distillation ``distillation_loss``): with the
    teacher's pre-ReLU map clipped at the margin, ``t' = max(t, m_c)``,
    ``loss = Σ (s − t')² · 1[(s > t') ∨ (t' > 0)]``; ``student`` is the connector's output (pre-ReLU side).
    ``reduction="sum"`` is the official per-stage value; ``"batchmean"`` divides by B."""
    _check_pair("student", student, "teacher", teacher)
    _check_same_shape("student", student, "teacher", teacher)
    if not isinstance(margin, torch.Tensor) or margin.reshape(-1).shape[0] != teacher.shape[1]:
        raise ValueError(f"margin must be a tensor of {teacher.shape[1]} per-channel values, got "
                         f"{tuple(margin.shape) if isinstance(margin, torch.Tensor) else type(margin).__name__}")
    clipped = torch.max(teacher, margin.reshape(1, -1, 1, 1).to(teacher))
    mask = (student > clipped) | (clipped > 0)
    return _reduce(((student - clipped).pow(2) * mask).sum(), student.shape[0], reduction)


def vid_loss(mean: torch.Tensor, teacher: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VID (Ahn et al., CVPR 2019), as RepDistiller ``VID.py``: a Gaussian with per-channel variance
    ``σ²_c = softplus(log_scale_c) + eps`` around the regressor's ``mean`` (same shape as the teacher map),
    ``loss = mean_{B,C,H,W} ½((mean − t)²/σ² + log σ²)``."""
    _check_pair("mean", mean, "teacher", teacher, dims=(2, 4))
    _check_same_shape("mean", mean, "teacher", teacher)
    eps = _check_real("eps", eps)
    if not isinstance(log_scale, torch.Tensor) or log_scale.shape != (teacher.shape[1],):
        raise ValueError(f"log_scale must be a [{teacher.shape[1]}] tensor (one per teacher channel), got "
                         f"{tuple(log_scale.shape) if isinstance(log_scale, torch.Tensor) else type(log_scale)}")
    variance = (F.softplus(log_scale) + eps).reshape(1, -1, *([1] * (teacher.dim() - 2)))
    return (0.5 * ((mean - teacher).pow(2) / variance + variance.log())).mean()


def ab_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float = 1.0,
            reduction: str = "sum") -> torch.Tensor:
    """AB's alternative L2 (Heo et al., AAAI 2019; bhheo/AB_distillation, RepDistiller ``AB.py``) on pre-ReLU maps:
    ``Σ (s + m)²·1[(s > −m) ∧ (t ≤ 0)] + (s − m)²·1[(s ≤ m) ∧ (t > 0)]``; ``student`` is the connector's output.
    ``reduction="batchmean"`` divides by B (the official per-stage value before the stage weight and 3/1000)."""
    _check_pair("student", student, "teacher", teacher, dims=(2, 4))
    _check_same_shape("student", student, "teacher", teacher)
    margin = _check_real("margin", margin)
    positive_teacher = teacher > 0
    below = (student + margin).pow(2) * ((student > -margin) & ~positive_teacher)
    above = (student - margin).pow(2) * ((student <= margin) & positive_teacher)
    return _reduce((below + above).sum(), student.shape[0], reduction)


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """Factor transfer (Kim et al., NeurIPS 2018), as Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``
    (``FT(x) = normalize(x.view(B, −1))``, ``nn.L1Loss()``): ``mean |FT(F_s) − FT(F_t)|`` over B·D, on the translator's
    and the paraphraser's factors."""
    _check_pair("student_factor", student_factor, "teacher_factor", teacher_factor, dims=(2, 3, 4))
    _check_same_shape("student_factor", student_factor, "teacher_factor", teacher_factor)
    batch = student_factor.shape[0]
    return F.l1_loss(F.normalize(student_factor.reshape(batch, -1)), F.normalize(teacher_factor.reshape(batch, -1)))
