"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022) on the fused ``dist`` op."""
from __future__ import annotations

import torch

from kdkernels import backends
from kdkernels._validation import Checks
from kdkernels.losses._common import as_rows
from kdkernels.ops.dist import dist_pearson


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              beta: float = 1.0, gamma: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """DIST: Pearson-correlation matching of the student's and teacher's softmaxes, as DIST_KD's ``dist_kd.py``.

    With ``y = softmax(z/T)`` over the classes of each row and ``pearson(a, b) = cos(a - mean a, b - mean b)``,
    ``cos(a, b) = a·b / (‖a‖ ‖b‖ + 1e-8)``::

        inter = 1 - mean_n pearson(y_s[n, :], y_t[n, :])     # per sample, across classes
        intra = 1 - mean_c pearson(y_s[:, c], y_t[:, c])     # per class, across the batch
        loss  = beta · T² · inter + gamma · T² · intra

    Defaults ``beta = gamma = T = 1`` (DIST_KD's ``kd='dist'``; ``'dist_t4'`` uses ``T = 4``). The intra term is a
    statistic of the batch: it needs at least two rows (pass ``gamma=0`` for the inter term alone) and, under data
    parallelism, it is computed on each process's local batch, as in DIST_KD. Leading dims of ``[..., C]`` logits are
    rows (for segmentation maps, move the class dim last first). Gradients reach the teacher too when it requires
    grad. One fused op computes both terms in one pass over the logits and one more for the gradient, in float64 for
    every input dtype (DIST's statistics are ill-conditioned with few rows or classes and saturated softmaxes), and
    never stores a probability tensor. The loss is a statistic of the whole batch, so it takes no ``reduction``.
    """
    check = Checks("dist_loss")
    check.logits_pair(student_logits, teacher_logits)
    temperature = check.temperature(temperature)
    beta, gamma = check.real("beta", beta), check.real("gamma", gamma)
    student, teacher = as_rows(student_logits), as_rows(teacher_logits)
    if gamma != 0.0 and student.shape[0] < 2:
        check.value_error("student_logits", f"must hold at least 2 rows for the intra-class term (gamma={gamma}), "
                          "which correlates each class across the batch; pass gamma=0 to use the inter-class term "
                          "alone", f"{student.shape[0]}")
    name = backends.select_backend(backend, student, teacher, required_ops=("dist",))
    row_pearson, col_pearson = dist_pearson(student, teacher, temperature, name)
    scale = temperature * temperature
    return beta * scale * (1.0 - row_pearson.mean()) + gamma * scale * (1.0 - col_pearson.mean())
