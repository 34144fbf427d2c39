"""Pure-PyTorch reference for the ``target_split`` op: the executable specification of DKD's and NKD's row terms.

For one row of student logits ``s``, teacher logits ``t`` (length V), label ``y`` and temperature ``T``, with
``a = s / T``, ``b = t / T`` and the non-target distributions ``q_s = softmax(a without column y)``,
``q_t = softmax(b without column y)`` (over the V - 1 other columns), the op returns six per-row terms::

    0  log p_s[y]       = a[y] - logsumexp(a)
    1  log (1 - p_s[y]) = logsumexp(a without y) - logsumexp(a)       # the non-target mass, in log space
    2  log p_t[y]       (the same for the teacher)
    3  log (1 - p_t[y])
    4  KL(q_t || q_s)   = sum_c q_t[c] (log q_t[c] - log q_s[c])       # mdistiller's NCKD before T^2 / B
    5  H(q_t)           = -sum_c q_t[c] log q_t[c]                     # NKD's non-target cross-entropy is 4 + 5

No probability is ever logged: every log comes from a logsumexp difference, so the terms stay finite at logit
gaps of any size and in every dtype (mdistiller takes ``log`` of a summed softmax bin, which is ``-inf`` once the
non-target mass underflows).

Conventions for ``-inf`` entries (the kernels honour them exactly):

* a side whose non-target columns are all ``-inf`` (or V = 1) has ``log (1 - p[y]) = -inf`` and an empty ``q``:
  terms 4 and 5 are 0 when the teacher's ``q_t`` is empty; a side whose every column is ``-inf`` has
  ``log p[y] = log (1 - p[y]) = -inf``;
* a non-target term whose teacher probability is 0 contributes 0 to terms 4 and 5; a teacher-finite non-target
  column whose student logit is ``-inf`` makes term 4 ``+inf``.

Gradients (``g_k`` = upstream gradient of term k; ``p`` = softmax of the full row; ``[c != y]`` the indicator)::

    d/d s[c] = 1/T * ( g0 (d_cy - p_s[c]) + g1 ([c != y] q_s[c] - p_s[c]) + g4 [c != y] (q_s[c] - q_t[c]) )
    d/d t[c] = 1/T * ( g2 (d_cy - p_t[c]) + g3 ([c != y] q_t[c] - p_t[c])
                       + [c != y] q_t[c] (g4 (log q_t[c] - log q_s[c] - term4) - g5 (log q_t[c] + term5)) )

Here they come from autograd through the formula; every term accumulates in float64 for float64 inputs, else
float32.
"""

from __future__ import annotations

import torch

from kdkernels._validation import accumulation_dtype

TERM_NAMES = ("log_p_target_student", "log_p_rest_student", "log_p_target_teacher", "log_p_rest_teacher",
              "kl_non_target", "entropy_non_target_teacher")


def _side_terms(x: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor):
    """(log p[y], log(1 - p[y]), log q, q empty) of one side's scaled logits ``x`` [N, V].

    Everything is measured from the non-target maximum m (a constant for autograd: no term depends on it), with
    L = log sum exp(x - m) over the non-target columns (at most log V) and x^_y = x[y] - m::

        log q = (x - m) - L,   log p[y] = -softplus(L - x^_y),   log(1 - p[y]) = -softplus(x^_y - L)

    so a log-probability carries the rounding of its own size, not that of logsumexp(x) (a log near 0, such as
    log(1 - p[y]) for a confident target, stays accurate to its last digits)."""
    neg_inf = float("-inf")
    rest = torch.where(is_target, torch.full_like(x, neg_inf), x)
    target = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    top = rest.detach().amax(dim=-1)
    below = rest - torch.where(torch.isneginf(top), torch.zeros_like(top), top).unsqueeze(-1)
    target_gap = target - torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    log_sum = torch.logsumexp(below, dim=-1)
    rest_empty = torch.isneginf(log_sum)
    row_empty = rest_empty & torch.isneginf(target)
    # safe operands where the row is empty (both -inf: the difference would be NaN, in the backward too)
    zero = torch.zeros_like(log_sum)
    gap = torch.where(row_empty, zero, target_gap) - torch.where(row_empty, zero, log_sum)
    log_p_target = torch.where(row_empty, log_sum, -torch.logaddexp(-gap, zero))
    log_p_rest = torch.where(row_empty, log_sum, -torch.logaddexp(gap, zero))
    log_q = below - torch.where(rest_empty, zero, log_sum).unsqueeze(-1)
    return log_p_target, log_p_rest, log_q, rest_empty


def target_split_terms(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """The six per-row terms of the module docstring for 2-D logits [N, V] and labels [N] -> [N, 6].

    Differentiable with respect to both logits (float64 for float64 inputs, else float32).
    """
    acc = accumulation_dtype(student, teacher)
    labels = labels.long()
    is_target = torch.nn.functional.one_hot(labels, student.shape[-1]).bool()
    lp_s, lr_s, log_q_s, _ = _side_terms(student.to(acc) / temperature, labels, is_target)
    lp_t, lr_t, log_q_t, teacher_rest_empty = _side_terms(teacher.to(acc) / temperature, labels, is_target)
    q_t = log_q_t.exp()
    contributes = q_t > 0
    safe_log_q_t = torch.where(contributes, log_q_t, torch.zeros_like(log_q_t))
    safe_log_q_s = torch.where(contributes, log_q_s, torch.zeros_like(log_q_s))
    kl = (q_t * (safe_log_q_t - safe_log_q_s)).sum(dim=-1)
    entropy = -(q_t * safe_log_q_t).sum(dim=-1)
    # a teacher-finite column under a student -inf: the true KL is +inf
    student_hole = (contributes & torch.isneginf(log_q_s)).any(dim=-1)
    kl = torch.where(student_hole, torch.full_like(kl, float("inf")), kl)
    kl = torch.where(teacher_rest_empty, torch.zeros_like(kl), kl)
    entropy = torch.where(teacher_rest_empty, torch.zeros_like(entropy), entropy)
    return torch.stack((lp_s, lr_s, lp_t, lr_t, kl, entropy), dim=-1)


def eager_dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
              beta: float = 8.0, temperature: float = 4.0, return_parts: bool = False):
    """DKD as mdistiller's ``distillers/DKD.py`` writes it (softmax, summed bins, ``log`` of the bins, the
    ``-1000`` mask, two ``kl_div(reduction="sum")``), in the inputs' dtype: the baseline of the benchmarks and the
    formula the fused loss must equal wherever this one is finite."""
    gt_mask = torch.zeros_like(student).scatter_(1, labels.long().unsqueeze(1), 1).bool()
    other_mask = ~gt_mask
    p_s = torch.softmax(student / temperature, dim=1)
    p_t = torch.softmax(teacher / temperature, dim=1)
    bins_s = torch.cat(((p_s * gt_mask).sum(1, keepdim=True), (p_s * other_mask).sum(1, keepdim=True)), dim=1)
    bins_t = torch.cat(((p_t * gt_mask).sum(1, keepdim=True), (p_t * other_mask).sum(1, keepdim=True)), dim=1)
    scale = temperature ** 2 / labels.shape[0]
    tckd = torch.nn.functional.kl_div(torch.log(bins_s), bins_t, reduction="sum") * scale
    q_t = torch.softmax(teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_q_s = torch.log_softmax(student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = torch.nn.functional.kl_div(log_q_s, q_t, reduction="sum") * scale
    if return_parts:
        return tckd, nckd
    return alpha * tckd + beta * nckd


def eager_nkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
              gamma: float = 1.5) -> torch.Tensor:
    """NKD as yzd-v/cls_KD ``nkd.py`` @9466b3f writes it (gathers, a scatter mask that drops the target column,
    two softmaxes over the V - 1 others), in the inputs' dtype; soft labels [N, V] are reduced by argmax."""
    label = labels.argmax(dim=1, keepdim=True) if labels.dim() > 1 else labels.long().view(-1, 1)
    rows = student.shape[0]
    log_p_s = torch.log_softmax(student, dim=1)
    p_t = torch.softmax(teacher, dim=1)
    loss_target = -(p_t.gather(1, label).detach() * log_p_s.gather(1, label)).mean()
    keep = torch.ones_like(student).scatter_(1, label, 0).bool()
    rest_s = student[keep].reshape(rows, -1)
    rest_t = teacher[keep].reshape(rows, -1)
    log_q_s = torch.log_softmax(rest_s / temperature, dim=1)
    q_t = torch.softmax(rest_t / temperature, dim=1)
    loss_non_target = -gamma * temperature ** 2 * (q_t * log_q_s).sum(dim=1).mean()
    return loss_target + loss_non_target
