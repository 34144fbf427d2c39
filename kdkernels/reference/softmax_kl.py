"""Pure-PyTorch reference for the ``softmax_kl`` family: the executable specification.

Every backend (cpu, cuda, triton) must reproduce these definitions. For one row of student logits ``s`` and
teacher logits ``t`` (length V) and temperature ``T``::

    a = s / T,  b = t / T
    lse_s = logsumexp(a),  lse_t = logsumexp(b)
    p_t = exp(b - lse_t)
    loss = sum_j  p_t[j] * ((b[j] - lse_t) - (a[j] - lse_s))      # KL(p_t || p_s), Hinton et al. 2015

with these conventions for masked (``-inf``) entries, which the kernels must honour exactly:

* a term whose teacher probability is 0 (``t[j] = -inf``, or underflow) contributes exactly 0, so entries that are
  ``-inf`` in both inputs never produce NaN;
* a row whose teacher is entirely ``-inf`` is empty: loss 0 and gradient 0 for both inputs;
* a teacher-finite entry whose student logit is ``-inf`` makes the loss ``+inf`` (the true KL); the teacher gradient
  of such a row is undefined.

Gradients (``g`` = upstream gradient of the row's loss)::

    d loss / d s[j] = g / T * (p_s[j] - p_t[j])
    d loss / d t[j] = g / T * p_t[j] * ((b[j] - lse_t) - (a[j] - lse_s) - loss)

This module computes them by autograd through the formula above, so it doubles as an independent check of the
kernels' hand-written backward. Accumulation is in float32 for half/bfloat16/float32 inputs and float64 for float64.
"""

from __future__ import annotations

import math

import torch

from kdkernels._validation import accumulation_dtype



def softmax_kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(softmax(teacher/T) || softmax(student/T)) over the last dim of 2-D inputs [N, V] -> [N].

    Differentiable with respect to both inputs. Returns the accumulation dtype (float64 for float64 inputs, else float32).
    """
    acc = accumulation_dtype(student, teacher)
    a = student.to(acc) / temperature
    b = teacher.to(acc) / temperature
    neg_inf = float("-inf")
    teacher_empty = (b == neg_inf).all(dim=-1, keepdim=True)
    student_empty = (a == neg_inf).all(dim=-1, keepdim=True)
    # Empty rows are replaced by zeros before any log/exp so that no NaN reaches the forward or the backward.
    b = torch.where(teacher_empty, torch.zeros_like(b), b)
    a = torch.where(student_empty | teacher_empty, torch.zeros_like(a), a)
    log_p_t = b - torch.logsumexp(b, dim=-1, keepdim=True)
    log_p_s = a - torch.logsumexp(a, dim=-1, keepdim=True)
    p_t = log_p_t.exp()
    contributes = p_t > 0
    log_ratio = torch.where(contributes, log_p_t - log_p_s, torch.zeros_like(p_t))
    rows = (p_t * log_ratio).sum(dim=-1)
    rows = torch.where(student_empty.squeeze(-1) & ~teacher_empty.squeeze(-1), torch.full_like(rows, float("inf")),
                       rows)
    return torch.where(teacher_empty.squeeze(-1), torch.zeros_like(rows), rows)


def eager_hinton_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss as reference repositories write it in eager PyTorch (mdistiller / RepDistiller convention):

    ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="batchmean") * T**2``.
    Used as the baseline in benchmarks; it has none of the ``-inf`` conventions above.
    """
    log_p_s = torch.log_softmax(student / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher / temperature, dim=-1)
    return torch.nn.functional.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature ** 2


def softmax_jsd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """Per-row generalised (β-skew) Jensen-Shannon divergence of GKD-style distillation, 0 < β < 1::

        p_s = softmax(s/T),  p_t = softmax(t/T),  log m = logaddexp(log β + log p_t, log(1-β) + log p_s)
        jsd = β KL(p_t || m) + (1-β) KL(p_s || m)

    The mixture is formed in log space, so nothing underflows to NaN however small both probabilities are
    (Liger-Kernel #1453). Terms with zero probability contribute exactly 0; a row in which either input is
    entirely ``-inf`` is empty (loss 0, gradient 0). Gradients (``g`` upstream, both KLs per row)::

        d jsd / d s[j] = g (1-β)/T p_s[j] (log p_s[j] - log m[j] - KL(p_s || m))
        d jsd / d t[j] = g β/T     p_t[j] (log p_t[j] - log m[j] - KL(p_t || m))

    β = 0 and β = 1 are not defined here (the divergence vanishes there); ``kd_loss`` maps them to forward and
    reverse KL, as Liger-Kernel and TRL do.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for the JSD rows, got {beta}")
    acc = accumulation_dtype(student, teacher)
    a = student.to(acc) / temperature
    b = teacher.to(acc) / temperature
    neg_inf = float("-inf")
    empty = (b == neg_inf).all(dim=-1, keepdim=True) | (a == neg_inf).all(dim=-1, keepdim=True)
    a = torch.where(empty, torch.zeros_like(a), a)
    b = torch.where(empty, torch.zeros_like(b), b)
    log_p_s = a - torch.logsumexp(a, dim=-1, keepdim=True)
    log_p_t = b - torch.logsumexp(b, dim=-1, keepdim=True)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    zero = torch.zeros_like(p_s)
    # Where both probabilities are 0 the mixture term is discarded; safe inputs keep logaddexp's backward NaN-free.
    both_zero = (p_s == 0) & (p_t == 0)
    log_m = torch.logaddexp(torch.where(both_zero, zero, log_p_t) + math.log(beta),
                            torch.where(both_zero, zero, log_p_s) + math.log1p(-beta))
    kl_t = (p_t * torch.where(p_t > 0, log_p_t - log_m, zero)).sum(dim=-1)
    kl_s = (p_s * torch.where(p_s > 0, log_p_s - log_m, zero)).sum(dim=-1)
    rows = beta * kl_t + (1.0 - beta) * kl_s
    return torch.where(empty.squeeze(-1), torch.zeros_like(rows), rows)


def eager_generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                          beta: float) -> torch.Tensor:
    """Generalised JSD as TRL's GKD trainer writes it in eager PyTorch (``generalized_jsd_loss``, batchmean): the
    log-mixture by ``logsumexp`` over stacked log-probabilities, then two ``kl_div`` calls. The benchmark baseline."""
    log_p_s = torch.log_softmax(student / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p_s + math.log1p(-beta), log_p_t + math.log(beta)]), dim=0)
    kl_teacher = torch.nn.functional.kl_div(log_m, log_p_t, reduction="none", log_target=True)
    kl_student = torch.nn.functional.kl_div(log_m, log_p_s, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum() / student.shape[0]
