"""Relation-based distillation losses: RKD (distance, angle), SP, PKT and CC on the fused ``pairwise`` op, and the
instance relationship graph (IRG, plain PyTorch).

Each compares a relation among the samples of a batch of student features with the same relation of teacher
features. Features of any shape ``[B, ...]`` are flattened per sample; student and teacher widths may differ; fp32,
fp16 and bf16 inputs are computed in fp32 (fp64 in fp64). Gradients reach the student, and the teacher when it
requires grad. Formulas and the official code they match: :mod:`kdkernels.reference.pairwise`.

``gather=True`` all-gathers student and teacher features across the ``torch.distributed`` ranks first, so that the
relation spans the global batch (see :func:`kdkernels.distributed.all_gather_batch` for how gradients flow).
"""
from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from kdkernels import backends
from kdkernels._validation import Checks
from kdkernels.losses._common import DISTANCE_CLAMP, pairwise_distances
from kdkernels.ops.pairwise import relation_loss

CCKernel = Literal["gaussian", "bilinear"]
CC_KERNELS = get_args(CCKernel)


def _feature_rows(check: Checks, student, teacher, gather) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated [B, D] views of both feature tensors (all-gathered when asked)."""
    check.feature_pair("student", student, "teacher", teacher)
    check.flag("gather", gather)
    if student.dim() != 2 or teacher.dim() != 2:
        student, teacher = student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)
    if gather:
        from kdkernels.distributed import all_gather_batch
        student, teacher = all_gather_batch(student), all_gather_batch(teacher)
    check.batch_of_at_least("student", student, 2, "a batch relation needs at least 2 samples")
    return student, teacher


def _relation(function: str, relation: str, student, teacher, params: tuple, gather, backend: str,
              check: Checks | None = None) -> torch.Tensor:
    student, teacher = _feature_rows(check or Checks(function), student, teacher, gather)
    name = backends.select_backend(backend, student, teacher, required_ops=("pairwise",))
    return relation_loss(relation, student, teacher, params, name)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """RKD distance loss (Park et al., "Relational Knowledge Distillation", CVPR 2019), as lenscloth/RKD's
    ``RkdDistance``: pairwise Euclidean distances, each side divided by its mean positive distance, compared by
    smooth L1 (beta = 1) averaged over all B² pairs, diagonal included. O(B²) memory, no host synchronisation."""
    return _relation("rkd_distance_loss", "rkd_distance", student, teacher, (), gather, backend)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """RKD angle loss, as lenscloth/RKD's ``RKdAngle``: ``psi_ijk = <e_ij, e_ik>`` with ``e_ij`` the unit vector
    from x_i to x_j (zero for coincident points), smooth L1 (beta = 1) averaged over all B³ triples.

    Computed from the Gram matrix of the centred features, ``<e_ij, e_ik> = (G_jk - G_ij - G_ik + G_ii) /
    (d_ij d_ik)``: O(B²) memory instead of the official B×B×D and B×B×B tensors. The Gram is float64 (of the batch
    centred in float64) and the numerators are formed exactly from it, so angles between close samples are as
    accurate as the official fp32 code's down to a separation of about 1e-4 of their distance to the batch mean;
    samples closer than about 1.7e-7 of it count as coincident."""
    return _relation("rkd_angle_loss", "rkd_angle", student, teacher, (), gather, backend)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0, *, gather: bool = False, backend: str = "auto") -> torch.Tensor:
    """``distance_weight · rkd_distance_loss + angle_weight · rkd_angle_loss`` from one pair of Gram matrices.
    Defaults 25 / 50: RepDistiller's and mdistiller's classification setting (lenscloth's metric learning uses 1 / 2)."""
    check = Checks("rkd_loss")
    params = (check.real("distance_weight", distance_weight), check.real("angle_weight", angle_weight))
    return _relation("rkd_loss", "rkd", student, teacher, params, gather, backend, check)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
            backend: str = "auto") -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller's ``SP``: ``G = normalize_rows(Q Qᵀ)``
    (L2, eps 1e-12) of the flattened features, ``loss = Σ (G_t − G_s)² / B²``. (torchdistill's ``SPKDLoss``
    normalises rows by L1 by mistake; this follows the original.)"""
    return _relation("sp_loss", "sp", student, teacher, (), gather, backend)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7, *, gather: bool = False,
             backend: str = "auto") -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as probabilistic_kt's
    ``cosine_similarity_loss``: ``S = (cos + 1) / 2`` row-normalised per side,
    ``loss = mean_{B×B} S_t log((S_t + eps) / (S_s + eps))``. Computed in float64 below the Gram, so the fp32 loss
    is as accurate as the official formula's."""
    check = Checks("pkt_loss")
    return _relation("pkt_loss", "pkt", student, teacher, (check.real("eps", eps, positive=True),), gather, backend,
                     check)


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2,
            kernel: CCKernel = "gaussian", *, gather: bool = False, backend: str = "auto") -> torch.Tensor:
    """Correlation congruence (Peng et al., ICCV 2019), as Knowledge-Distillation-Zoo's ``CC``: features
    L2-normalised, ``S = x̂ x̂ᵀ``, ``K = Σ_{p ≤ order} e^{−2γ} (2γ)^p / p! · S^p`` (the Taylor series of the Gaussian
    RBF ``exp(−γ |x̂_i − x̂_j|²)``), ``loss = mean (K_s − K_t)²``. ``kernel="bilinear"`` uses ``K = S``.

    Other CC variants: torchdistill's ``CCKDLoss`` applies the same series to unnormalised embeddings and reports
    ``‖K_s − K_t‖_F / B²``; RepDistiller's ``Correlation`` is a consecutive-pair approximation. Neither is this loss.
    """
    check = Checks("cc_loss")
    gamma = check.real("gamma", gamma)
    order = check.integer("order", order, minimum=0, maximum=64)
    kernel = check.choice("kernel", kernel, CC_KERNELS)
    params = (gamma, float(order), 1.0 if kernel == "bilinear" else 0.0)
    return _relation("cc_loss", "cc", student, teacher, params, gather, backend, check)


def _irg_edge(x: torch.Tensor) -> torch.Tensor:
    """IRG edge: squared pairwise distances (diagonal 0) divided by their maximum."""
    distances = pairwise_distances(x, squared=True)
    return distances / distances.max()


def _irg_transform(check: Checks, earlier: torch.Tensor, later: torch.Tensor, side: str) -> torch.Tensor:
    """IRG transformation of one network: ``‖f1 − f2‖²`` per sample, clamped at 1e-12, divided by its maximum.
    ``f1`` is average-pooled to ``f2``'s spatial size when larger; when ``f1`` has fewer channels, ``f2``'s channels
    are averaged in adjacent pairs (KD-Zoo ``euclidean_dist_fms``)."""
    if earlier.dim() != 4 or later.dim() != 4:
        check.value_error(f"{side}[0], {side}[1]", "must be [B, C, H, W] maps (the transform compares two maps)",
                          f"shapes {tuple(earlier.shape)} and {tuple(later.shape)}")
    if earlier.shape[2] > later.shape[2]:
        earlier = F.adaptive_avg_pool2d(earlier, later.shape[2:])
    if earlier.shape[1] < later.shape[1]:
        later = (later[:, 0::2] + later[:, 1::2]) / 2.0
    if earlier.shape[1:] != later.shape[1:]:
        check.value_error(f"{side}[1]", f"must have {side}[0]'s channels, or twice as many, and at most its spatial "
                          "size (the transform compares the maps after pooling and channel pairing)",
                          f"{tuple(later.shape)} against {tuple(earlier.shape)}")
    distances = (earlier.reshape(earlier.shape[0], -1) - later.reshape(later.shape[0], -1)).pow(2).sum(dim=-1)
    distances = distances.clamp(min=DISTANCE_CLAMP)
    return distances / distances.max()


def irg_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], vertex_weight: float = 0.1,
             edge_weight: float = 5.0, transform_weight: float = 5.0) -> torch.Tensor:
    """Instance Relationship Graph distillation (Liu et al., CVPR 2019), as Knowledge-Distillation-Zoo's
    ``kd_losses/irg.py`` (the official code is Caffe).

    ``student`` and ``teacher`` are each ``(map1, map2, embedding, logits)``: two feature maps ``[B, C, H, W]`` (map1
    earlier in the network), the pooled embedding ``[B, D]`` and the logits ``[B, K]``. With ``E(x)`` the squared
    pairwise distances of the flattened ``x`` (diagonal 0) divided by their maximum and ``Tr(f1, f2)`` the squared
    per-sample distance between the two maps (map1 pooled to map2's size, map2's channels averaged in pairs when it
    has more) divided by its maximum::

        vertex    = mse(logits_s, logits_t)
        edge      = (mse(E(emb_s), E(emb_t)) + mse(E(map1_s), E(map1_t)) + mse(E(map2_s), E(map2_t))) / 3
        transform = mse(Tr_s, Tr_t)
        loss      = vertex_weight·vertex + edge_weight·edge + transform_weight·transform

    Defaults 0.1 / 5 / 5 are KD-Zoo's. Student and teacher widths may differ except for the logits.
    """
    check = Checks("irg_loss")
    weights = [check.real(name, value) for name, value in
               (("vertex_weight", vertex_weight), ("edge_weight", edge_weight), ("transform_weight", transform_weight))]
    for name, values in (("student", student), ("teacher", teacher)):
        if isinstance(values, torch.Tensor) or not isinstance(values, Sequence) or len(values) != 4:
            check.type_error(name, "a sequence (map1, map2, embedding, logits) of 4 tensors", values)
    for index, (s, t) in enumerate(zip(student, teacher)):
        check.feature_pair(f"student[{index}]", s, f"teacher[{index}]", t)
        check.batch_of_at_least(f"student[{index}]", s, 2, "a batch relation needs at least 2 samples")
    check.logits_pair(student[3], teacher[3], "student[3]", "teacher[3]")
    vertex = F.mse_loss(student[3], teacher[3])
    edge = sum(F.mse_loss(_irg_edge(s), _irg_edge(t)) for s, t in zip(student[:3], teacher[:3])) / 3.0
    transform = F.mse_loss(_irg_transform(check, student[0], student[1], "student"),
                           _irg_transform(check, teacher[0], teacher[1], "teacher"))
    return weights[0] * vertex + weights[1] * edge + weights[2] * transform
