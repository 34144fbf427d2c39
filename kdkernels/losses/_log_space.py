"""Small log-space helpers shared by the losses assembled from per-row terms."""
from __future__ import annotations

import torch


def kl_from_log_probs(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum q (log q - log p) over the last dim, from log-probabilities; a zero-probability q entry adds
    exactly 0, and safe operands keep the backward of the discarded branch free of 0 * inf."""
    q = log_q.exp()
    present = q > 0
    zero = torch.zeros_like(q)
    ratio = torch.where(present, log_q, zero) - torch.where(present, log_p, zero)
    return torch.where(present, q * ratio, zero).sum(dim=-1)


def log_tail(log_probs: torch.Tensor, floor: float) -> torch.Tensor:
    """``log(1 - sum exp(log_probs))`` over the last dim, the mass clamped below at ``floor`` (0 allowed)."""
    mass = -torch.expm1(torch.logsumexp(log_probs, dim=-1).clamp_max(0.0))
    return mass.clamp_min(floor).log()


def topk_teacher_kl(log_p_student_topk: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float,
                    convention: str) -> torch.Tensor:
    """Per-row KL of a top-k teacher [N, k] to the student's log-probabilities at the same k classes [N, k]:
    ``"renormalize"`` the teacher's k log-probabilities re-softmaxed at ``temperature`` (a row of only −inf gives
    0); ``"tail"`` both sides extended by their remaining mass ``1 − Σ p`` as one extra class."""
    teacher = topk_logprobs.to(log_p_student_topk.dtype)
    if convention == "renormalize":
        scaled = teacher / temperature
        empty = torch.isneginf(scaled).all(dim=-1, keepdim=True)
        scaled = torch.where(empty, torch.zeros_like(scaled), scaled)
        log_q = torch.where(empty, torch.full_like(scaled, float("-inf")), torch.log_softmax(scaled, dim=-1))
        return kl_from_log_probs(log_q, log_p_student_topk)
    log_q = torch.cat((teacher, log_tail(teacher, 0.0).unsqueeze(-1)), dim=-1)
    tiny = torch.finfo(log_p_student_topk.dtype).tiny
    log_p = torch.cat((log_p_student_topk, log_tail(log_p_student_topk, tiny).unsqueeze(-1)), dim=-1)
    return kl_from_log_probs(log_q, log_p)
