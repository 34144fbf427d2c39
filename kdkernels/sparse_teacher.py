"""KD against a sparse (top-k) teacher, the form in which LLM teacher outputs are stored offline.

The teacher is given as log-probabilities ``lp`` [N, k] (at temperature 1, as ``log_softmax`` then ``topk`` gives
them) at class indices [N, k], distinct within a row. The student's full-row log-softmax is gathered at those
indices by the fused ``logsoftmax_gather`` op (one pass; the backward spreads the gradient over the whole row).
Two conventions:

* ``"renormalize"``: the teacher is renormalised over its top-k support, at temperature T:
  ``q = softmax(lp / T)`` over the k entries (exact: ``lp / T`` differs from the tempered teacher logits by a
  per-row constant), and ``loss = Σ_k q (log q - log p_s)`` with ``p_s = softmax(s / T)`` over all V classes. This is
  ``KL(q ‖ p_s restricted) ≥ 0``; it also pushes the student's mass into the support.
* ``"tail"``: the k teacher probabilities are kept as given, plus one tail bucket ``1 - Σ exp(lp)`` matched against
  the student's mass outside the support, ``1 - Σ_k p_s``: a (k+1)-bin KL. The tail mass at another temperature is
  not recoverable from top-k log-probabilities, so this convention needs ``T = 1``.

With k = V (every class, in any order) both equal the dense forward KL. Tail masses are formed in log space,
``log(1 - Σ) = log(-expm1(logsumexp))``; a student tail that rounds to zero is clamped to the dtype's smallest
normal number instead of giving ``log 0``.
"""
from __future__ import annotations

import torch

from kdkernels._log_space import kl_from_log_probs
from kdkernels.ops.logsoftmax_gather import logsoftmax_gather

TOPK_CONVENTIONS = ("renormalize", "tail")


def _log_tail(log_probs: torch.Tensor, floor: float) -> torch.Tensor:
    """log(1 - Σ exp(log_probs)) over the last dim, with the mass clamped below at ``floor`` (0 allowed)."""
    mass = -torch.expm1(torch.logsumexp(log_probs, dim=-1).clamp_max(0.0))
    return mass.clamp_min(floor).log()


def topk_kl_rows(student: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor,
                 temperature: float, convention: str, backend: str) -> torch.Tensor:
    """Per-row KL of 2-D student logits [N, V] against a top-k teacher [N, k] -> [N] (see the module docstring)."""
    log_p_student = logsoftmax_gather(student, topk_indices, temperature, backend)
    teacher = topk_logprobs.to(log_p_student.dtype)
    if convention == "renormalize":
        scaled = teacher / temperature
        empty = torch.isneginf(scaled).all(dim=-1, keepdim=True)
        scaled = torch.where(empty, torch.zeros_like(scaled), scaled)
        log_q = torch.where(empty, torch.full_like(scaled, float("-inf")), torch.log_softmax(scaled, dim=-1))
        return kl_from_log_probs(log_q, log_p_student)
    log_q = torch.cat((teacher, _log_tail(teacher, 0.0).unsqueeze(-1)), dim=-1)
    tiny = torch.finfo(log_p_student.dtype).tiny
    log_p = torch.cat((log_p_student, _log_tail(log_p_student, tiny).unsqueeze(-1)), dim=-1)
    return kl_from_log_probs(log_q, log_p)
