"""Attention-based distillation losses: the student matches the teacher's attention maps (attention transfer).

Plain PyTorch: each function IS the reference of its method, transcribed from the official code named in its
docstring (../shared/reference/methods.md §2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import pool_to_smaller
from kdkernels.losses.feature import reduce_elements


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's spatial attention ``normalize(mean_c |f|^p)`` [B, H·W] (L2 over the positions)."""
    return F.normalize(features.pow(p).mean(1).reshape(features.shape[0], -1))


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) for one stage, as RepDistiller ``AT.py`` /
    attention-transfer ``utils.py::at_loss``: the larger map pooled to the smaller, ``a(f) = normalize(mean_c f^p)``,
    ``loss = mean_{B,HW} (a(f_s) − a(f_t))²``. Channel counts may differ. ``reduction`` over the B·HW terms:
    ``"mean"`` (official), ``"batchmean"``, ``"sum"`` or ``"none"`` (per sample)."""
    check = Checks("at_loss")
    check.feature_pair("student", student, "teacher", teacher, dims=(4,))
    p = check.real("p", p, positive=True)
    reduction = check.reduction(reduction)
    student, teacher = pool_to_smaller(student, teacher)
    return reduce_elements((attention_map(student, p) - attention_map(teacher, p)).pow(2), reduction)
