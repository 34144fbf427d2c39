"""Functional distillation losses: argument validation, backend choice and reductions over per-row losses."""
from __future__ import annotations

import math
import numbers

import torch

from kdkernels import backends
from kdkernels.ops.softmax_kl import softmax_jsd_rows, softmax_kl_rows

REDUCTIONS = ("batchmean", "sum", "mean", "none")
DIVERGENCES = ("forward", "reverse", "symmetric", "jsd")
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension (classes last), got a 0-d tensor")
    if logits.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(logits.shape)}); expected at least one row and one class")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return temperature


def _check_labels(labels, leading_shape: torch.Size, device: torch.device, ignore_index) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(f"labels must have the logits' leading shape {tuple(leading_shape)}, got "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with a unit-stride last dim (copies only when the input's last dim is strided)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, logits.shape[-1])


def reduce_rows(rows: torch.Tensor, leading_shape: torch.Size, classes: int, reduction: str,
                labels: torch.Tensor | None, ignore_index: int, scale: float = 1.0) -> torch.Tensor:
    """Scales and reduces per-row losses [N]; rows whose label is ``ignore_index`` give 0 and are not counted.

    batchmean = sum / counted rows; sum; mean = sum / (counted rows * classes); none = per row, leading shape.
    The count stays on the device (no host synchronisation); an all-ignored batch gives 0.
    """
    count = rows.shape[0]
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        count = keep.sum().clamp_min(1)
    if reduction == "none":
        return (rows * scale if scale != 1.0 else rows).reshape(leading_shape)
    divisor = {"sum": 1, "batchmean": count, "mean": count * classes}[reduction]
    if isinstance(divisor, torch.Tensor):
        return rows.sum() * scale / divisor
    return rows.sum() * (scale / divisor)


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, divergence: str,
                    backend: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence of 2-D logits on one backend: forward KL(p_t ‖ p_s), reverse KL(p_s ‖ p_t) (the same
    fused op with the roles swapped), JSD(beta) (forward KL at beta = 0, reverse KL at beta = 1), or symmetric
    (forward + reverse) / 2."""
    if divergence == "jsd" and 0.0 < beta < 1.0:
        return softmax_jsd_rows(student, teacher, temperature, beta, backend)
    if divergence == "forward" or (divergence == "jsd" and beta == 0.0):
        return softmax_kl_rows(student, teacher, temperature, backend)
    if divergence == "reverse" or divergence == "jsd":
        return softmax_kl_rows(teacher, student, temperature, backend)
    return 0.5 * (softmax_kl_rows(student, teacher, temperature, backend) +
                  softmax_kl_rows(teacher, student, temperature, backend))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, *,
            reduction: str = "batchmean", scale_by_t2: bool = True, labels: torch.Tensor | None = None,
            ignore_index: int = -100, divergence: str = "forward", beta: float = 0.5,
            backend: str = "auto") -> torch.Tensor:
    """Hinton knowledge-distillation loss, fused: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the last dim.

    Equals ``F.kl_div(F.log_softmax(s/T, -1), F.log_softmax(t/T, -1), log_target=True, reduction=...) * T**2``
    (the mdistiller / RepDistiller convention for ``batchmean``) without materialising any probability tensor.

    Args:
        student_logits, teacher_logits: ``[..., V]`` logits, float32/float16/bfloat16/float64 (they may differ);
            leading dims are rows. ``-inf`` entries (masked vocabulary) are allowed: see the reference module.
        temperature: ``T > 0``.
        reduction: ``"batchmean"`` (sum / counted rows), ``"sum"``, ``"mean"`` (sum / (counted rows · V), as
            ``nn.KLDivLoss()``) or ``"none"`` (per-row float32 losses with the leading shape).
        scale_by_t2: multiply by ``T²`` (Hinton's gradient-magnitude correction).
        labels, ignore_index: rows whose label equals ``ignore_index`` contribute 0 and are not counted.
        divergence: with ``p_s = softmax(s/T)``, ``p_t = softmax(t/T)``:
            ``"forward"``: ``KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)`` (Hinton KD; mode-covering);
            ``"reverse"``: ``KL(p_s ‖ p_t)`` (mode-seeking, as in on-policy LLM distillation);
            ``"symmetric"``: ``(KL(p_t ‖ p_s) + KL(p_s ‖ p_t)) / 2``, the symmetric KL of SSLD / PaddleClas DML;
            ``"jsd"``: the generalised JSD of GKD, ``β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)`` with
            ``m = β p_t + (1 − β) p_s`` formed in log space (never NaN); ``beta = 0`` is exactly forward KL and
            ``beta = 1`` exactly reverse KL (the Liger-Kernel / TRL convention). A row in which either input is
            entirely ``-inf`` gives 0.
        beta: the JSD skew, ``0 ≤ beta ≤ 1`` (used only by ``divergence="jsd"``).
            The ``-inf`` conventions apply with the roles of the two distributions as written.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (see ``kdkernels.backends``).

    Gradients flow to the teacher too when it requires grad (mutual learning). The scalar result is float32
    (float64 for float64 inputs).
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got "
                         f"{student_logits.device} and {teacher_logits.device}")
    temperature = _check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__}")
    leading_shape = student_logits.shape[:-1]
    if labels is not None:
        _check_labels(labels, leading_shape, student_logits.device, ignore_index)
    student, teacher = _as_rows(student_logits), _as_rows(teacher_logits)
    needs_jsd_kernel = divergence == "jsd" and 0.0 < beta < 1.0
    name = backends.select_backend(backend, student, teacher,
                                   required_ops=("softmax_jsd",) if needs_jsd_kernel else ())
    rows = divergence_rows(student, teacher, temperature, divergence, name, beta)
    scale = temperature * temperature if scale_by_t2 else 1.0
    return reduce_rows(rows, leading_shape, student_logits.shape[-1], reduction, labels, ignore_index, scale)
