"""Pure-PyTorch reference for ``linear_kd``: knowledge distillation from hidden states and lm_head weights, the
executable specification of the fused kernels. It materialises the logits; the kernels must not.

For token rows ``x_s`` [N, H_s] (and ``x_t`` [N, H_t]), weights [V, H] as ``lm_head.weight`` stores them::

    z = x @ W^T + b                       (the teacher's columns beyond the student's V are dropped)
    z = c tanh(z / c)                     (optional soft-capping, both sides)
    log p = z / T - logsumexp(z / T)      (never log(softmax))

and per row, with ``KL(a || w a + (1 - w) b)`` the KL to a mixture formed in log space (``logaddexp``)::

    forward        KL(p_t || p_s)
    reverse        KL(p_s || p_t)
    jsd            beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
                   (beta = 0 is exactly forward KL, beta = 1 exactly reverse KL, as kd_loss, Liger-Kernel and TRL)
    skew_forward   KL(p_t || alpha p_t + (1 - alpha) p_s)                 (DistiLLM)
    skew_reverse   KL(p_s || alpha p_s + (1 - alpha) p_t)                 (DistiLLM)
    tvd            1/2 sum |p_t - p_s|
    symmetric      (forward + reverse) / 2

    row = soft_weight * soft * (T^2 if scale_by_t2) + hard_weight * CE(z_s at T = 1, label)

A top-k teacher (log-probabilities at temperature 1 at distinct student-vocabulary indices) replaces ``x_t, W_t``
for the forward KL, in kd_loss's two conventions: ``"renormalize"`` (``q = softmax(lp / T)`` over the k entries
against the student's full-row log-probabilities gathered there) and ``"tail"`` (the k probabilities plus the bucket
``1 - sum exp(lp)`` against the student's mass outside the support; T = 1). Rows whose label is ``ignore_index``
give exactly 0 and are not counted; reductions: ``"none"`` (the rows), ``"sum"``, ``"batchmean"`` (sum / counted
rows, or sum / ``num_items``; nothing counted gives 0).

Conventions for ``-inf`` logits (a masking bias): a term whose probability is 0 contributes exactly 0 (0 log 0 = 0),
and where both probabilities of a mixture vanish the term is dropped, so nothing gives NaN. Accumulation is float32
(logits formed in float32 from float16/bfloat16 inputs), or float64 when any input is float64; gradients come by
autograd in each input's dtype.
"""
from __future__ import annotations

import math

import torch

from kdkernels._validation import accumulation_dtype
from kdkernels.losses._log_space import kl_from_log_probs, topk_teacher_kl


def soft_capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)``, or the logits when ``cap`` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocabulary: int,
            dtype: torch.dtype) -> torch.Tensor:
    """Logits ``hidden @ weight[:V]^T + bias[:V]`` [N, V] in ``dtype``; rows of ``weight`` beyond ``vocabulary``
    are never read (they get exactly zero gradient)."""
    weight = weight[:vocabulary].to(dtype)
    bias = None if bias is None else bias[:vocabulary].to(dtype)
    return torch.nn.functional.linear(hidden.to(dtype), weight, bias)


def log_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z / T - logsumexp(z / T)`` over the last dim."""
    scaled = logits / temperature
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(weight p + (1 - weight) q)`` by ``logaddexp``, for 0 < weight < 1; where both are 0 the result is an
    (unused) 0 with a NaN-free backward."""
    vanish = (log_p == float("-inf")) & (log_q == float("-inf"))
    zero = torch.zeros_like(log_p)
    mixed = torch.logaddexp(torch.where(vanish, zero, log_p) + math.log(weight),
                            torch.where(vanish, zero, log_q) + math.log1p(-weight))
    return torch.where(vanish, torch.full_like(mixed, float("-inf")), mixed)


def kl_to_mixture_rows(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """``KL(p || weight p + (1 - weight) q)``: ``KL(p || q)`` at weight 0, exactly 0 at weight 1."""
    if weight == 1.0:
        return torch.zeros(log_p.shape[:-1], dtype=log_p.dtype, device=log_p.device)
    if weight == 0.0:
        return kl_from_log_probs(log_p, log_q)
    return kl_from_log_probs(log_p, log_mixture(log_p, log_q, weight))


def divergence_rows(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor, divergence: str, beta: float,
                    skew_alpha: float) -> torch.Tensor:
    """Per-row divergence between two [N, V] log-probability tensors (see the module docstring)."""
    student, teacher = log_p_student, log_p_teacher
    if divergence == "forward" or (divergence == "jsd" and beta == 0.0):
        return kl_from_log_probs(teacher, student)
    if divergence == "reverse" or (divergence == "jsd" and beta == 1.0):
        return kl_from_log_probs(student, teacher)
    if divergence == "jsd":
        log_m = log_mixture(teacher, student, beta)
        return beta * kl_from_log_probs(teacher, log_m) + (1.0 - beta) * kl_from_log_probs(student, log_m)
    if divergence == "skew_forward":
        return kl_to_mixture_rows(teacher, student, skew_alpha)
    if divergence == "skew_reverse":
        return kl_to_mixture_rows(student, teacher, skew_alpha)
    if divergence == "tvd":
        return 0.5 * (teacher.exp() - student.exp()).abs().sum(dim=-1)
    if divergence == "symmetric":
        return 0.5 * (kl_from_log_probs(teacher, student) + kl_from_log_probs(student, teacher))
    raise ValueError(f"unknown divergence {divergence!r}")


def topk_forward_kl_rows(log_p_student: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor,
                         temperature: float, convention: str) -> torch.Tensor:
    """Forward KL of the student's full-row log-probabilities [N, V] against a top-k teacher [N, k] -> [N]."""
    return topk_teacher_kl(log_p_student.gather(-1, topk_indices.long()), topk_logprobs, temperature, convention)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z) - z[label]`` per row at T = 1; ignored rows read class 0 (their value is discarded)."""
    targets = torch.where(keep, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def linear_kd_rows(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None, *,
                   student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                   teacher_topk_logprobs: torch.Tensor | None = None,
                   teacher_topk_indices: torch.Tensor | None = None, topk_convention: str = "renormalize",
                   labels: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                   divergence: str = "forward", beta: float = 0.5, skew_alpha: float = 0.1,
                   hard_weight: float = 0.0, soft_weight: float = 1.0, scale_by_t2: bool = False,
                   logit_softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token losses [N] of 2-D inputs (hidden [N, H], weights [V, H], top-k [N, k], labels [N]), exactly 0 at
    ignored rows, and the mask of counted rows (None without labels). Arguments are assumed valid."""
    floats = [t for t in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          teacher_topk_logprobs) if t is not None]
    dtype = accumulation_dtype(*floats)
    vocabulary = student_weight.shape[0]
    student_logits = soft_capped(project(student_hidden, student_weight, student_bias, vocabulary, dtype),
                                 logit_softcap)
    log_p_student = log_probabilities(student_logits, temperature)
    if teacher_topk_logprobs is not None:
        soft = topk_forward_kl_rows(log_p_student, teacher_topk_logprobs, teacher_topk_indices, temperature,
                                    topk_convention)
    else:
        teacher_logits = soft_capped(project(teacher_hidden, teacher_weight, teacher_bias, vocabulary, dtype),
                                     logit_softcap)
        soft = divergence_rows(log_p_student, log_probabilities(teacher_logits, temperature), divergence, beta,
                               skew_alpha)
    rows = soft * (soft_weight * (temperature * temperature if scale_by_t2 else 1.0))
    keep = None if labels is None else labels != ignore_index
    if hard_weight != 0.0:
        rows = rows + hard_weight * cross_entropy_rows(student_logits, labels, keep)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows, keep


def reduce_tokens(rows: torch.Tensor, keep: torch.Tensor | None, reduction: str,
                  num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """``"none"``: the rows; ``"sum"``; ``"batchmean"``: sum / ``num_items`` when given, else sum / counted rows
    (at least 1, so an all-ignored batch gives 0). The count stays on the device."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items is not None:
        return total / num_items
    count = rows.shape[0] if keep is None else keep.sum().clamp_min(1)
    return total / count


def linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None, *,
                   reduction: str = "batchmean", num_items: int | torch.Tensor | None = None,
                   **options) -> torch.Tensor:
    """The reduced loss of :func:`linear_kd_rows` (same arguments, 2-D inputs) under ``reduction``."""
    rows, keep = linear_kd_rows(student_hidden, student_weight, teacher_hidden, teacher_weight, **options)
    return reduce_tokens(rows, keep, reduction, num_items)
