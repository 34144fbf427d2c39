"""Self-supervised and consistency losses that compose torch ops: what a model is taught by another view of the
data or by its own moving average (the mean teacher's softmax MSE, BYOL's regression loss).

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the official code
named in its docstring.
"""
from __future__ import annotations

import torch

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, reduce_rows


def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                     reduction: Reduction = "batchmean") -> torch.Tensor:
    """``Σ_b Σ_c (softmax(s)_bc − softmax(t)_bc)² / C / B``: the mean teacher's consistency cost.

    As CuriousAI/mean-teacher ``pytorch/mean_teacher/losses.py`` ``softmax_mse_loss`` codes it (a sum over the batch
    and the C classes divided by C; ``pytorch/main.py`` then divides by the minibatch size and multiplies by the
    ramped-up consistency weight). Per sample: ``Σ_c (p_s − p_t)² / C``. ``reduction`` over samples:
    ``"batchmean"`` (above), ``"sum"`` (the official function's return value), ``"mean"`` (the same as batchmean:
    a sample's value is already a mean over classes) or ``"none"``. The gradient reaches both inputs; the official
    code sends it to the student only (pass the teacher's logits detached, or from a frozen model).
    """
    check = Checks("softmax_mse_loss")
    check.logits_pair(student_logits, teacher_logits)
    reduction = check.reduction(reduction)
    student = accumulate(student_logits)
    teacher = accumulate(teacher_logits).to(student.dtype)
    classes = student_logits.shape[-1]
    squares = (torch.softmax(student, dim=-1) - torch.softmax(teacher, dim=-1)).pow(2)
    rows = squares.reshape(-1, classes).sum(dim=-1)
    return reduce_rows(rows, "batchmean" if reduction == "mean" else reduction,
                       leading_shape=student_logits.shape[:-1], scale=1.0 / classes)


BYOL_NORM_EPSILON = 1e-12   # deepmind-research byol/utils/helpers.py l2_normalize: rsqrt(max(Σ x², 1e-12))


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x · rsqrt(max(Σ_d x², ε))`` over the last dim (BYOL's ``l2_normalize``, ε = 1e-12 on the squared norm)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True).clamp_min(BYOL_NORM_EPSILON))


def byol_loss(prediction: torch.Tensor, target: torch.Tensor, *,
              reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """``‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z)`` per sample: BYOL's regression loss (Grill et al., NeurIPS 2020).

    As deepmind-research ``byol/utils/helpers.py`` ``regression_loss`` codes it: both inputs [B, D] are
    L2-normalised over D by ``l2_normalize`` (``x · rsqrt(max(Σ x², 1e-12))``), then the squared differences are
    summed over D. ``byol/byol_experiment.py`` ``loss_fn`` takes the batch mean (``"batchmean"``, the default;
    also ``"sum"`` and ``"none"``) of ``regression_loss(online prediction of view 1, target projection of view 2)``
    plus the same with the views swapped. The gradient reaches both inputs; the official code stops it at the
    target (``jax.lax.stop_gradient``): pass the target projection detached, or from a frozen model.
    """
    check = Checks("byol_loss")
    check.feature_pair("prediction", prediction, "target", target, dims=(2,), same_shape=True)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    online = accumulate(prediction)
    target = accumulate(target).to(online.dtype)
    rows = (_l2_normalize(online) - _l2_normalize(target)).pow(2).sum(dim=-1)
    return reduce_rows(rows, reduction)
