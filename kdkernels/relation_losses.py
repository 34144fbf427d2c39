"""Relation-based distillation losses on the fused ``pairwise`` op: RKD (distance, angle), SP, PKT and CC.

Each compares a relation among the samples of a batch of student features with the same relation of teacher
features. Features of any shape ``[B, ...]`` are flattened per sample; student and teacher widths may differ; fp32,
fp16 and bf16 inputs are computed in fp32 (fp64 in fp64). Gradients reach the student, and the teacher when it
requires grad. Formulas and the official code they match: :mod:`kdkernels.reference.pairwise`.

``gather=True`` all-gathers student and teacher features across the ``torch.distributed`` ranks first, so that the
relation spans the global batch (see :func:`kdkernels.distributed.all_gather_batch` for how gradients flow).
"""
from __future__ import annotations

import math
import numbers

import torch

from kdkernels import backends
from kdkernels.decoupled_losses import _check_real
from kdkernels.ops.pairwise import relation_loss

CC_KERNELS = ("gaussian", "bilinear")


def check_features(name: str, features, min_dim: int = 1) -> None:
    """A floating-point tensor [B, ...] of at least `min_dim` dims with at least one feature per sample."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if features.dim() < max(min_dim, 1) or math.prod(features.shape[1:]) == 0:
        raise ValueError(f"{name} must have shape [B, ...] with at least one feature per sample, got "
                         f"{tuple(features.shape)}")


def check_feature_pair(student_name: str, student, teacher_name: str, teacher) -> None:
    """Two feature tensors (:func:`check_features`) with the same batch size, on the same device."""
    check_features(student_name, student)
    check_features(teacher_name, teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{student_name} and {teacher_name} must have the same batch size, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"{student_name} and {teacher_name} must be on the same device, got {student.device} and "
                         f"{teacher.device}")


def _feature_rows(student, teacher, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated [B, D] views of both feature tensors (all-gathered when asked)."""
    check_feature_pair("student", student, "teacher", teacher)
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    if student.dim() != 2 or teacher.dim() != 2:
        student, teacher = student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)
    if gather:
        from kdkernels.distributed import all_gather_batch
        student, teacher = all_gather_batch(student), all_gather_batch(teacher)
    if student.shape[0] < 2:
        raise ValueError(f"a batch relation needs at least 2 samples, got a batch of {student.shape[0]}")
    return student, teacher


def _relation(relation: str, student, teacher, params: tuple, gather: bool, backend: str) -> torch.Tensor:
    student, teacher = _feature_rows(student, teacher, gather)
    name = backends.select_backend(backend, student, teacher, required_ops=("pairwise",))
    return relation_loss(relation, student, teacher, params, name)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """RKD distance loss (Park et al., "Relational Knowledge Distillation", CVPR 2019), as lenscloth/RKD's
    ``RkdDistance``: pairwise Euclidean distances, each side divided by its mean positive distance, compared by
    smooth L1 (beta = 1) averaged over all B² pairs, diagonal included. O(B²) memory, no host synchronisation."""
    return _relation("rkd_distance", student, teacher, (), gather, backend)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """RKD angle loss, as lenscloth/RKD's ``RKdAngle``: ``psi_ijk = <e_ij, e_ik>`` with ``e_ij`` the unit vector
    from x_i to x_j (zero for coincident points), smooth L1 (beta = 1) averaged over all B³ triples.

    Computed from the Gram matrix of the centred features, ``<e_ij, e_ik> = (G_jk - G_ij - G_ik + G_ii) /
    (d_ij d_ik)``: O(B²) memory instead of the official B×B×D and B×B×B tensors. In fp32, points closer to each other
    than about 0.4 % of their distance to the batch mean count as coincident (the Gram formula cannot resolve them)."""
    return _relation("rkd_angle", student, teacher, (), gather, backend)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0, *, gather: bool = False, backend: str = "auto") -> torch.Tensor:
    """``distance_weight · rkd_distance_loss + angle_weight · rkd_angle_loss`` from one pair of Gram matrices.
    Defaults 25 / 50: RepDistiller's and mdistiller's classification setting (lenscloth's metric learning uses 1 / 2)."""
    params = (_check_real("distance_weight", distance_weight), _check_real("angle_weight", angle_weight))
    return _relation("rkd", student, teacher, params, gather, backend)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
            backend: str = "auto") -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller's ``SP``: ``G = normalize_rows(Q Qᵀ)``
    (L2, eps 1e-12) of the flattened features, ``loss = Σ (G_t − G_s)² / B²``. (torchdistill's ``SPKDLoss``
    normalises rows by L1 by mistake; this follows the original.)"""
    return _relation("sp", student, teacher, (), gather, backend)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7, *, gather: bool = False,
             backend: str = "auto") -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as probabilistic_kt's
    ``cosine_similarity_loss``: ``S = (cos + 1) / 2`` row-normalised per side,
    ``loss = mean_{B×B} S_t log((S_t + eps) / (S_s + eps))``."""
    return _relation("pkt", student, teacher, (_check_real("eps", eps, positive=True),), gather, backend)


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2,
            kernel: str = "gaussian", *, gather: bool = False, backend: str = "auto") -> torch.Tensor:
    """Correlation congruence (Peng et al., ICCV 2019), as Knowledge-Distillation-Zoo's ``CC``: features
    L2-normalised, ``S = x̂ x̂ᵀ``, ``K = Σ_{p ≤ order} e^{−2γ} (2γ)^p / p! · S^p`` (the Taylor series of the Gaussian
    RBF ``exp(−γ |x̂_i − x̂_j|²)``), ``loss = mean (K_s − K_t)²``. ``kernel="bilinear"`` uses ``K = S``.

    Other CC variants: torchdistill's ``CCKDLoss`` applies the same series to unnormalised embeddings and reports
    ``‖K_s − K_t‖_F / B²``; RepDistiller's ``Correlation`` is a consecutive-pair approximation. Neither is this loss.
    """
    gamma = _check_real("gamma", gamma)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 0 <= order <= 64:
        raise ValueError(f"order must be an integer in [0, 64], got {order!r}")
    if kernel not in CC_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(CC_KERNELS)}; got {kernel!r}")
    params = (gamma, float(order), 1.0 if kernel == "bilinear" else 0.0)
    return _relation("cc", student, teacher, params, gather, backend)
