"""Ranking-based distillation: the student ranks samples as the teacher does (DarkRank).

Plain PyTorch: each function IS the reference implementation of its formula (a fused kernel may replace it later
without changing the callers). Gradients reach every input that requires grad; detach the side that must not learn.
"""
from __future__ import annotations

import torch

from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import pairwise_distances, reduce_rows


def darkrank_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 3.0, beta: float = 3.0,
                  list_length: int = 4, *, reduction: Reduction = "batchmean") -> torch.Tensor:
    """HardDarkRank (Chen et al., "DarkRank", AAAI 2018), as lenscloth/RKD ``metric/loss.py::HardDarkRank``.

    ``score = −alpha · pdist(x)^beta`` per side (Euclidean distances of the flattened features, diagonal 0); for each
    anchor, the teacher's ``list_length`` nearest other samples in order, ``s`` = the student's scores of those
    samples, and the Plackett–Luce (ListMLE) log-likelihood of the teacher's order under the student's scores::

        loss = −mean_b Σ_i ( s_bi − logsumexp(s_bi, …, s_bL) )

    A batch of ``B ≤ list_length`` samples ranks its ``B − 1`` others (the official slicing). Defaults α = 3,
    β = 3, L = 4 (the class defaults). ``reduction`` over anchors: ``"batchmean"`` (the official mean), ``"sum"``,
    ``"mean"`` (over anchors · ranked samples) or ``"none"`` ([B]).
    """
    check = Checks("darkrank_loss")
    check.feature_pair("student", student, "teacher", teacher)
    check.batch_of_at_least("student", student, 2, "a ranking needs at least 2 samples")
    alpha, beta = check.real("alpha", alpha), check.real("beta", beta, positive=True)
    list_length = check.integer("list_length", list_length, minimum=1)
    reduction = check.reduction(reduction)
    score_teacher = -alpha * pairwise_distances(teacher, squared=False).pow(beta)
    score_student = -alpha * pairwise_distances(student, squared=False).pow(beta)
    order = score_teacher.sort(dim=1, descending=True).indices[:, 1:list_length + 1]
    ranked = torch.gather(score_student, 1, order)
    tail_logsumexp = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    rows = -(ranked - tail_logsumexp).sum(dim=1)
    return reduce_rows(rows, reduction, elements=ranked.shape[1])
