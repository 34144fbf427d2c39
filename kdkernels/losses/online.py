"""Online (collaborative) distillation losses: PCL's peers, peer ensemble teacher and peer mean teachers.

Plain PyTorch on the fused ``kd_loss``: each function IS the reference of its formula. All results are float32
(float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks, Reduction
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
