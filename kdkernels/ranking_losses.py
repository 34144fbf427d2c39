"""Relation losses on instance graphs and rankings (IRG, DarkRank) and the online-KD divergence balance of BD-KD.

Plain PyTorch: each function IS the reference implementation of its formula (a fused kernel may replace it later
without changing the callers). Gradients reach every input that requires grad; detach the side that must not learn.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.decoupled_losses import _check_real
from kdkernels.losses import check_logits_pair, kd_loss
from kdkernels.relation_losses import check_features

_EPS = 1e-12


def _pairwise_distances(x: torch.Tensor, squared: bool) -> torch.Tensor:
    """lenscloth/RKD ``pdist``: ``‖x_i‖² + ‖x_j‖² − 2 x_i·x_j`` clamped at 1e-12, square-rooted unless ``squared``,
    diagonal set to 0. ``x`` is flattened per sample."""
    x = x.reshape(x.shape[0], -1)
    norms = x.pow(2).sum(dim=1)
    distances = (norms.unsqueeze(1) + norms.unsqueeze(0) - 2.0 * x @ x.t()).clamp(min=_EPS)
    if not squared:
        distances = distances.sqrt()
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return distances * off_diagonal


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    check_features(f"student {what}", student)
    check_features(f"teacher {what}", teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher {what} must have the same batch size, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] < 2:
        raise ValueError(f"a batch relation needs at least 2 samples, got a batch of {student.shape[0]}")


# ------------------------------------------------------------------------------------------------------------ IRG

def _irg_edge(x: torch.Tensor) -> torch.Tensor:
    """IRG edge: squared pairwise distances (diagonal 0) divided by their maximum."""
    distances = _pairwise_distances(x, squared=True)
    return distances / distances.max()


def _irg_transform(earlier: torch.Tensor, later: torch.Tensor, side: str) -> torch.Tensor:
    """IRG transformation of one network: ``‖f1 − f2‖²`` per sample, clamped at 1e-12, divided by its maximum.
    ``f1`` is average-pooled to ``f2``'s spatial size when larger; when ``f1`` has fewer channels, ``f2``'s channels
    are averaged in adjacent pairs (KD-Zoo ``euclidean_dist_fms``)."""
    if earlier.dim() != 4 or later.dim() != 4:
        raise ValueError(f"irg_loss: the {side} transform needs two [B, C, H, W] maps, got {tuple(earlier.shape)} and "
                         f"{tuple(later.shape)}")
    if earlier.shape[2] > later.shape[2]:
        earlier = F.adaptive_avg_pool2d(earlier, later.shape[2:])
    if earlier.shape[1] < later.shape[1]:
        later = (later[:, 0::2] + later[:, 1::2]) / 2.0
    if earlier.shape[1:] != later.shape[1:]:
        raise ValueError(f"irg_loss: the {side} maps cannot be compared after pooling and channel pairing: "
                         f"{tuple(earlier.shape)} vs {tuple(later.shape)} (the later map needs the earlier map's "
                         "channels, or twice as many, and at most its spatial size)")
    distances = (earlier.reshape(earlier.shape[0], -1) - later.reshape(later.shape[0], -1)).pow(2).sum(dim=-1)
    distances = distances.clamp(min=_EPS)
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
    weights = [_check_real(name, value) for name, value in
               (("vertex_weight", vertex_weight), ("edge_weight", edge_weight), ("transform_weight", transform_weight))]
    for name, values in (("student", student), ("teacher", teacher)):
        if isinstance(values, torch.Tensor) or not isinstance(values, Sequence) or len(values) != 4:
            raise TypeError(f"irg_loss: {name} must be a sequence (map1, map2, embedding, logits) of 4 tensors")
    for what, s, t in zip(("map1", "map2", "embedding", "logits"), student, teacher):
        _check_pair(s, t, what)
    check_logits_pair(student[3], teacher[3])
    vertex = F.mse_loss(student[3], teacher[3])
    edge = sum(F.mse_loss(_irg_edge(s), _irg_edge(t)) for s, t in zip(student[:3], teacher[:3])) / 3.0
    transform = F.mse_loss(_irg_transform(student[0], student[1], "student"),
                           _irg_transform(teacher[0], teacher[1], "teacher"))
    return weights[0] * vertex + weights[1] * edge + weights[2] * transform


# ------------------------------------------------------------------------------------------------------- DarkRank

def darkrank_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 3.0, beta: float = 3.0,
                  list_length: int = 4) -> torch.Tensor:
    """HardDarkRank (Chen et al., "DarkRank", AAAI 2018), as lenscloth/RKD ``metric/loss.py::HardDarkRank``.

    ``score = −alpha · pdist(x)^beta`` per side (Euclidean distances of the flattened features, diagonal 0); for each
    anchor, the teacher's ``list_length`` nearest other samples in order, ``s`` = the student's scores of those
    samples, and the Plackett–Luce (ListMLE) log-likelihood of the teacher's order under the student's scores::

        loss = −mean_b Σ_i ( s_bi − logsumexp(s_bi, …, s_bL) )

    A batch of ``B ≤ list_length`` samples ranks its ``B − 1`` others (the official slicing). Defaults α = 3,
    β = 3, L = 4 (the class defaults).
    """
    _check_pair(student, teacher, "features")
    alpha, beta = _check_real("alpha", alpha), _check_real("beta", beta, positive=True)
    if isinstance(list_length, bool) or not isinstance(list_length, numbers.Integral) or list_length < 1:
        raise ValueError(f"list_length must be a positive integer, got {list_length!r}")
    score_teacher = -alpha * _pairwise_distances(teacher, squared=False).pow(beta)
    score_student = -alpha * _pairwise_distances(student, squared=False).pow(beta)
    order = score_teacher.sort(dim=1, descending=True).indices[:, 1:list_length + 1]
    ranked = torch.gather(score_student, 1, order)
    tail_logsumexp = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    return -(ranked - tail_logsumexp).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------------------- BD-KD

def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(logits / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def bdkd_loss(learner_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0, *,
              backend: str = "auto") -> torch.Tensor:
    """Balanced forward/reverse KL of one network of an online-KD pair towards the other: an approximation of BD-KD
    (Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation", arXiv:2212.12965).

    Per sample ``b``, with ``p = softmax(learner/T)``, ``q = softmax(target/T)`` and their entropies ``H_p``,
    ``H_q``, the weight ``w_b = H_q / (H_q + H_p)`` (no gradient) mixes the two divergences::

        loss = T² · mean_b ( w_b · KL(q ‖ p) + (1 − w_b) · KL(p ‖ q) )

    An over-confident learner (``H_p < H_q``) leans on the mode-covering forward KL, an under-confident one on the
    mode-seeking reverse KL. The paper weights the two KLs per sample from the teacher/student entropy gap for both
    networks; its exact rule could not be taken from a public source, so this weight is ours. Gradients reach the
    target too when it requires grad: detach it for the usual online-KD update.
    """
    check_logits_pair(learner_logits, target_logits)
    temperature = _check_real("temperature", temperature, positive=True)
    with torch.no_grad():
        h_learner = _entropy(learner_logits.float(), temperature)
        h_target = _entropy(target_logits.float(), temperature)
        forward_weight = h_target / (h_target + h_learner).clamp_min(_EPS)
    forward = kd_loss(learner_logits, target_logits, temperature, reduction="none", divergence="forward",
                      backend=backend)
    reverse = kd_loss(learner_logits, target_logits, temperature, reduction="none", divergence="reverse",
                      backend=backend)
    return (forward_weight * forward + (1.0 - forward_weight) * reverse).mean()
