"""Online (collaborative) distillation losses: PCL's peers, peer ensemble teacher and peer mean teachers.

Plain PyTorch on the fused ``kd_loss``: each function IS the reference of its formula. All results are float32
(float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, reduce_rows
from kdkernels.losses.ensemble import check_logits_list
from kdkernels.losses.kd import kd_loss


def pcl_loss(peer_logits: Sequence[torch.Tensor], ensemble_logits: torch.Tensor,
             mean_logits: Sequence[torch.Tensor], labels: torch.Tensor, temperature: float = 3.0,
             kl_weight: float = 1.0, *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """PCL, Peer Collaborative Learning (Wu & Gong, AAAI 2021): m peers, their peer ensemble teacher and the peers'
    temporal means (peer mean teachers)::

        loss = Σ_i CE(z_i, y) + CE(z_e, y)
               + w · Σ_i [ T² KL(p_e.detach() ‖ p_i) + 1/(m−1) Σ_{j≠i} T² KL(p̃_j.detach() ‖ p_i) ]

    ``z_i`` the peers' logits (``peer_logits``, m ≥ 2), ``z_e`` the peer ensemble teacher's (``ensemble_logits``:
    a classifier on the concatenated peer features), ``z̃_j`` the temporal-mean (EMA) network's peer j
    (``mean_logits``), ``p = softmax(·/T)``; T² KL batchmean. Peer ensemble teaching ``L_pe`` pulls every peer to the
    detached ensemble; peer mean teaching ``L_pm`` pulls peer i to the mean teachers of the OTHER peers, averaged.
    ``kl_weight`` ``w`` is the ramped-up weight of both (applied by the caller). As the third-party reproduction
    shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation (commit 6afb473) ``src/losses/
    loss_wrapper.py`` (``KDLoss`` T 3, ``PMLoss``: the mean over the other peers' mean teachers); no official code
    was released. Gradients reach the peers and, through ``CE(z_e, y)``, the ensemble; never the KL targets.
    ``reduction`` of the per-sample sum: ``"batchmean"``, ``"sum"``, ``"mean"`` (over B · C) or ``"none"``.
    """
    check = Checks("pcl_loss")
    peers = check_logits_list(check, "peer_logits", peer_logits, minimum=2)
    check.logits("ensemble_logits", ensemble_logits, dims=(2,))
    check.same_shape("ensemble_logits", ensemble_logits, "peer_logits[0]", peers[0])
    check.same_device("ensemble_logits", ensemble_logits, "peer_logits[0]", peers[0])
    means = check_logits_list(check, "mean_logits", mean_logits, peers[0], minimum=1, reference_name="peer_logits[0]")
    if len(means) != len(peers):
        check.value_error("mean_logits", f"must hold one temporal-mean output per peer ({len(peers)})",
                          f"{len(means)}")
    temperature = check.temperature(temperature)
    kl_weight = check.real("kl_weight", kl_weight, nonnegative=True)
    reduction = check.reduction(reduction)
    targets = check.class_labels(labels, peers[0])
    acc = accumulate(peers[0]).dtype
    rows = F.cross_entropy(ensemble_logits.to(acc), targets, reduction="none")
    teacher = ensemble_logits.detach()
    m = len(peers)
    for i, z in enumerate(peers):
        rows = rows + F.cross_entropy(z.to(acc), targets, reduction="none")
        if kl_weight:
            mutual = sum(kd_loss(z, means[j].detach(), temperature, reduction="none") for j in range(m) if j != i)
            rows = rows + kl_weight * (kd_loss(z, teacher, temperature, reduction="none") + mutual / (m - 1))
    return reduce_rows(rows, reduction, elements=peers[0].shape[1])


def _contrast_rows(logits: torch.Tensor, positives: torch.Tensor, off_diagonal: torch.Tensor) -> torch.Tensor:
    """Per anchor, ``−Σ_{p ∈ P(a)} log(exp(l_ap) / Σ_{k≠a} exp(l_ak)) / |P(a)|`` (0 for an anchor without
    positives)."""
    log_denominator = torch.logsumexp(logits.masked_fill(~off_diagonal, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    total = torch.where(positives, log_prob, torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)).sum(1)
    return -total / positives.sum(1).clamp_min(1).to(log_prob.dtype)


def mcl_loss(embeddings: Sequence[torch.Tensor], labels: torch.Tensor, temperature: float = 0.1,
             kl_temperature: float = 3.0, vcl_weight: float = 0.1, soft_vcl_weight: float = 1.0,
             icl_weight: float = 0.1, soft_icl_weight: float = 1.0, *,
             reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """MCL, Mutual Contrastive Learning (Yang, An, Xu, Xu, AAAI 2022), supervised, in-batch::

        e_i   = normalize(embeddings[i])         (network i's projected embedding, [B, D], m ≥ 2 networks)
        A_ij  = e_i e_jᵀ / τ                     (anchors of network i against the batch in network j)
        c(A)  = mean_a −Σ_{p ∈ P(a)} [A_ap − log Σ_{k≠a} exp A_ak] / |P(a)|   (P(a): the OTHER same-label samples)
        loss  = α Σ_i c(A_ii)                                                           (VCL)
              + γ Σ_{i≠j} T² KL(softmax(A_jj/T).detach() ‖ softmax(A_ii/T))              (soft VCL)
              + β Σ_{i<j} [c(A_ij) + c(A_ji)]                                           (ICL)
              + λ Σ_{i<j} T² [KL(A_ji.detach() ‖ A_ij) + KL(A_ij.detach() ‖ A_ji)]      (soft ICL, rows of A/T)

    winycg/MCL (commit 236da2f) ``losses/cifar_sup_mcl_loss.py`` ``SupMCL`` with ``main_cifar.py``'s defaults: τ
    ``--tau`` 0.1, T ``--kd_T`` 3 (``KLDiv``: batchmean, T², softmax over every column, the diagonal included), and
    ``scripts/train_cifar_mcl.sh``'s weights α (``--alpha``, VCL) 0.1, γ (``--gamma``, soft VCL) 1, β (``--beta``,
    ICL) 0.1, λ (``--lam``, soft ICL) 1. The contrastive denominators leave out the anchor's own column ``k = a``
    (``diag_mask``) and the positives are the other samples of its class (``intra_mask``), also for the
    interactive terms across networks, as the official code does. ``Embed``'s L2 normalisation is done here (with
    ``F.normalize``'s 1e-12 floor): pass the projection heads' outputs. The official code divides by ``|P(a)|``
    and so needs a same-class partner for every anchor (its ``MPerClassSampler`` draws 2 per class); here an anchor
    without one contributes 0. ``reduction`` of the per-anchor sum: ``"batchmean"`` (above), ``"sum"``, ``"none"``.
    """
    check = Checks("mcl_loss")
    views = check.tensor_list("embeddings", embeddings, minimum=2)
    for index, value in enumerate(views):
        check.features(f"embeddings[{index}]", value, dims=(2,))
        check.same_shape(f"embeddings[{index}]", value, "embeddings[0]", views[0])
        check.same_device(f"embeddings[{index}]", value, "embeddings[0]", views[0])
    temperature = check.temperature(temperature)
    kl_temperature = check.temperature(kl_temperature, "kl_temperature")
    weights = [check.real(name, value, nonnegative=True) for name, value in
               (("vcl_weight", vcl_weight), ("soft_vcl_weight", soft_vcl_weight), ("icl_weight", icl_weight),
                ("soft_icl_weight", soft_icl_weight))]
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    targets = check.labels(labels, views[0].shape[:1], views[0].device)
    batch = views[0].shape[0]
    normalized = [F.normalize(accumulate(value), dim=1) for value in views]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=views[0].device)
    positives = (targets[:, None] == targets[None, :]) & off_diagonal

    def kl(learner, target):
        return kd_loss(learner, target.detach(), kl_temperature, reduction="none")

    intra = [e @ e.t() / temperature for e in normalized]
    vcl = sum(_contrast_rows(a, positives, off_diagonal) for a in intra)
    soft_vcl = sum(kl(intra[i], intra[j]) for i in range(len(intra)) for j in range(len(intra)) if i != j)
    icl, soft_icl = 0, 0
    for i in range(len(normalized)):
        for j in range(i + 1, len(normalized)):
            a_ij = normalized[i] @ normalized[j].t() / temperature
            a_ji = normalized[j] @ normalized[i].t() / temperature
            icl = icl + _contrast_rows(a_ij, positives, off_diagonal) + _contrast_rows(a_ji, positives, off_diagonal)
            soft_icl = soft_icl + kl(a_ij, a_ji) + kl(a_ji, a_ij)
    rows = weights[0] * vcl + weights[1] * soft_vcl + weights[2] * icl + weights[3] * soft_icl
    return reduce_rows(rows, reduction)
