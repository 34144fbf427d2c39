"""Losses of data-free distillation, composing torch ops: DFAD's teacher–student logit discrepancy (the student
minimises it, the generator maximises it).

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the official code
named in its docstring. (DAFL's generator objective is in :mod:`kdkernels.losses.generative`.)
"""
from __future__ import annotations

import torch

from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import accumulate
from kdkernels.losses.feature import reduce_elements


def dfad_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              reduction: Reduction = "mean") -> torch.Tensor:
    """DFAD's discrepancy ``mean_{b,c} |z_s − z_t|`` (the MAE of the logits; Fang, Song, Song, Sun 2019;
    VainF/Data-Free-Adversarial-Distillation ``DFAD_mnist.py``/``DFAD_cifar.py``: ``F.l1_loss(s_logit, t_logit)``).
    The student minimises it on generated images (teacher detached), the generator maximises it (``loss_G = −it``,
    gradients through both networks). ``reduction`` over the B·C terms: ``"mean"`` (official), ``"batchmean"``,
    ``"sum"`` or ``"none"`` (per-sample sums). Computed in fp32 (float64 stays)."""
    check = Checks("dfad_loss")
    check.logits_pair(student_logits, teacher_logits)
    reduction = check.reduction(reduction)
    difference = (accumulate(student_logits) - accumulate(teacher_logits)).abs()
    return reduce_elements(difference.reshape(difference.shape[0], -1) if difference.dim() > 1
                           else difference.unsqueeze(0), reduction)

