"""Functional distillation losses: argument validation, backend choice and reductions over per-row losses."""
from __future__ import annotations

import math
import numbers

import torch

from kdkernels import backends
from kdkernels.ops.softmax_kl import softmax_jsd_rows, softmax_kl_rows
from kdkernels.sparse_teacher import TOPK_CONVENTIONS, topk_kl_rows

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


def check_logits_pair(student_logits, teacher_logits) -> None:
    """Both logits valid, of one shape and on one device."""
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got "
                         f"{student_logits.device} and {teacher_logits.device}")


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


def soft_cap(logits: torch.Tensor, cap) -> torch.Tensor:
    """Gemma-style logit soft-capping ``cap · tanh(logits / cap)``, in the logits' dtype."""
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
        raise TypeError(f"logit_softcap must be a real number or None, got {type(cap).__name__}")
    cap = float(cap)
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"logit_softcap must be positive and finite, got {cap}")
    return torch.tanh(logits / cap) * cap


def _check_topk_teacher(student_logits: torch.Tensor, teacher_logits, logprobs, indices) -> None:
    """A top-k teacher: both tensors, no dense teacher, shapes [..., k] with the student's leading shape,
    1 <= k <= V, float log-probabilities and integer indices in [0, V) (checked on the host outside torch.compile)."""
    if teacher_logits is not None:
        raise ValueError("pass either teacher_logits or teacher_topk_logprobs / teacher_topk_indices, not both")
    if logprobs is None or indices is None:
        raise ValueError("a top-k teacher needs both teacher_topk_logprobs and teacher_topk_indices")
    for name, tensor in (("teacher_topk_logprobs", logprobs), ("teacher_topk_indices", indices)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != student_logits.device:
            raise ValueError(f"{name} must be on the student's device {student_logits.device}, got {tensor.device}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_topk_logprobs must be a float tensor, got {logprobs.dtype}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"teacher_topk_indices must be an integer tensor, got {indices.dtype}")
    if logprobs.shape != indices.shape:
        raise ValueError(f"teacher_topk_logprobs and teacher_topk_indices must have the same shape, got "
                         f"{tuple(logprobs.shape)} and {tuple(indices.shape)}")
    classes = student_logits.shape[-1]
    if indices.dim() != student_logits.dim() or indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_topk_indices must have shape [..., k] with the student's leading shape "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(indices.shape)}")
    if not 1 <= indices.shape[-1] <= classes:
        raise ValueError(f"teacher_topk_indices must hold 1 <= k <= {classes} indices per row, got {indices.shape[-1]}")
    if not torch.compiler.is_compiling():
        bad = (indices < 0) | (indices >= classes)
        if bool(bad.any()):
            raise ValueError(f"teacher_topk_indices must be in [0, {classes}), got {indices[bad][0].item()}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, temperature: float = 1.0, *,
            reduction: str = "batchmean", scale_by_t2: bool = True, labels: torch.Tensor | None = None,
            ignore_index: int = -100, divergence: str = "forward", beta: float = 0.5,
            teacher_topk_logprobs: torch.Tensor | None = None, teacher_topk_indices: torch.Tensor | None = None,
            topk_convention: str = "renormalize", logit_softcap: float | None = None,
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
        teacher_topk_logprobs, teacher_topk_indices: a sparse teacher instead of ``teacher_logits``: its
            log-probabilities at temperature 1 (``[..., k]``, float) at distinct class indices (``[..., k]``,
            integer in ``[0, V)``), as stored offline for LLM distillation. Forward KL only; the gradient reaches
            the student's whole row. See :mod:`kdkernels.sparse_teacher`.
        topk_convention: ``"renormalize"`` (the teacher renormalised over its top-k support at temperature T) or
            ``"tail"`` (the top-k probabilities plus one bucket for the rest against the student's mass outside
            the support; needs ``T = 1``). Both equal the dense loss when k = V.
        logit_softcap: ``c > 0`` applies Gemma-style soft-capping ``c · tanh(z / c)`` to the logits (both sides
            when the teacher is dense; only the student for a top-k teacher, whose log-probabilities already come
            from capped logits) before the temperature. It is an extra elementwise pass in the logits' dtype.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (see ``kdkernels.backends``).

    Gradients flow to the teacher too when it requires grad (mutual learning). The scalar result is float32
    (float64 for float64 inputs).
    """
    _check_logits("student_logits", student_logits)
    sparse = teacher_topk_logprobs is not None or teacher_topk_indices is not None
    if sparse:
        _check_topk_teacher(student_logits, teacher_logits, teacher_topk_logprobs, teacher_topk_indices)
    else:
        if teacher_logits is None:
            raise TypeError("kd_loss needs teacher_logits, or teacher_topk_logprobs and teacher_topk_indices")
        check_logits_pair(student_logits, teacher_logits)
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
    if sparse:
        if divergence != "forward":
            raise ValueError(f"a top-k teacher supports divergence='forward' only, got {divergence!r}")
        if topk_convention not in TOPK_CONVENTIONS:
            raise ValueError(f"topk_convention must be one of {', '.join(TOPK_CONVENTIONS)}; got {topk_convention!r}")
        if topk_convention == "tail" and temperature != 1.0:
            raise ValueError("topk_convention='tail' needs temperature=1: the tail mass at another temperature "
                             f"cannot be recovered from top-k log-probabilities (got temperature={temperature})")
    leading_shape = student_logits.shape[:-1]
    if labels is not None:
        _check_labels(labels, leading_shape, student_logits.device, ignore_index)
    if logit_softcap is not None:
        student_logits = soft_cap(student_logits, logit_softcap)
        if not sparse:
            teacher_logits = soft_cap(teacher_logits, logit_softcap)
    student = _as_rows(student_logits)
    if sparse:
        indices = teacher_topk_indices.reshape(-1, teacher_topk_indices.shape[-1]).long()
        name = backends.select_backend(backend, student, required_ops=("logsoftmax_gather",))
        rows = topk_kl_rows(student, teacher_topk_logprobs.reshape(indices.shape), indices, temperature,
                            topk_convention, name)
    else:
        teacher = _as_rows(teacher_logits)
        needs_jsd_kernel = divergence == "jsd" and 0.0 < beta < 1.0
        name = backends.select_backend(backend, student, teacher,
                                       required_ops=("softmax_jsd",) if needs_jsd_kernel else ())
        rows = divergence_rows(student, teacher, temperature, divergence, name, beta)
    scale = temperature * temperature if scale_by_t2 else 1.0
    return reduce_rows(rows, leading_shape, student_logits.shape[-1], reduction, labels, ignore_index, scale)
