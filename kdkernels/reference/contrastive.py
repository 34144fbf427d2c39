"""Pure-PyTorch reference for the ``contrastive`` family: the executable specification of CRD's NCE loss.

CRD (Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020; HobbitLong/RepDistiller
``crd/memory.py::ContrastMemory``, ``crd/criterion.py::ContrastLoss``; ../shared/reference/methods.md §2.8) scores an
L2-normalised embedding ``v`` [B, d] against K+1 rows of the OTHER side's memory bank ``M`` [N, d], picked by
``contrast_indices`` [B, K+1] (column 0: the sample's own index, the positive; columns 1..K: negatives)::

    s_bk = M[idx_bk] . v_b / T                     score_lse[b] = logsumexp_k s_bk
    x_bk = exp(s_bk) / Z                           (Z: RepDistiller's normalisation constant, set once)
    c    = m Pn + eps,   m Pn = K / N = noise_mass
    loss_rows[b] = -log(x_b0 / (x_b0 + c)) - sum_{k>=1} log(m Pn / (x_bk + c))

and ContrastLoss is ``sum_b loss_rows[b] / B``. Every term is formed in log space, with u = s - log Z and
softplus(z) = log(1 + exp(z)) (no exp that can overflow)::

    loss_rows[b] = softplus(log c - u_b0) + sum_{k>=1} (softplus(u_bk - log c) + log c - log m Pn)

and its gradient, d loss_rows[b] / d u_bk = w_bk with w_b0 = -sigmoid(log c - u_b0), w_bk = sigmoid(u_bk - log c),
is ``d loss_rows[b] / d v_b = sum_k w_bk M[idx_bk] / T`` (here by autograd). RepDistiller's ``Z = mean(exp(s)) N``
over the batch's B (K+1) scores equals ``exp(logsumexp_b score_lse[b]) N / (B (K+1))``.

The memory update (no grad) is ``M[y] <- normalize(momentum M[y] + (1 - momentum) v)`` for the batch's dataset
indices y. Accumulation is float64 for float64 inputs, else float32. ``eager_*`` are RepDistiller's formulas as it
writes them, in the inputs' dtype (they gather the B x (K+1) x d memory): the benchmarks' baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdkernels._validation import accumulation_dtype


def crd_nce(embed: torch.Tensor, memory: torch.Tensor, contrast_indices: torch.Tensor,
            log_normalizer: torch.Tensor, temperature: float, noise_mass: float, eps: float):
    """(loss_rows [B], score_lse [B]) in the accumulation dtype; loss_rows is differentiable w.r.t. embed."""
    acc = accumulation_dtype(embed, memory)
    gathered = memory.detach().to(acc)[contrast_indices]                      # [B, K+1, d]
    scores = torch.einsum("bkd,bd->bk", gathered, embed.to(acc)) / temperature
    u = scores - log_normalizer.to(acc)
    log_c = math.log(noise_mass + eps)
    positive = F.softplus(log_c - u[:, 0])
    negatives = (F.softplus(u[:, 1:] - log_c) + (log_c - math.log(noise_mass))).sum(dim=1)
    return positive + negatives, torch.logsumexp(scores.detach(), dim=1)


def normalizer_from_score_lse(score_lse: torch.Tensor, num_contrasts: int, num_data: int) -> torch.Tensor:
    """RepDistiller's Z = mean(exp(s)) N from the rows' logsumexps of the B x num_contrasts scores s."""
    count = score_lse.shape[0] * num_contrasts
    return torch.exp(torch.logsumexp(score_lse, dim=0) - math.log(count)) * num_data


def update_memory_(memory: torch.Tensor, embed: torch.Tensor, indices: torch.Tensor, momentum: float) -> None:
    """M[y] <- normalize(momentum M[y] + (1 - momentum) v) in float64 arithmetic, one index at a time in batch
    order: with duplicate indices, each later occurrence starts from the bank as it was BEFORE the batch (as
    RepDistiller's gather-then-scatter), and the last occurrence is what remains."""
    with torch.no_grad():
        old = memory.double()[indices]
        new = old * momentum + embed.double() * (1 - momentum)
        new = new / new.pow(2).sum(dim=1, keepdim=True).sqrt()
        for row, index in enumerate(indices.tolist()):
            memory[index] = new[row].to(memory.dtype)


# ---------------------------------------------------------------------------------------------------------------
# RepDistiller as written: the benchmark baseline.

def eager_contrast_scores(embed: torch.Tensor, memory: torch.Tensor, contrast_indices: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """ContrastMemory's ``exp(bmm(memory[idx], v) / T)`` [B, K+1, 1], gathering the B x (K+1) x d rows."""
    batch, contrasts = contrast_indices.shape
    weight = torch.index_select(memory, 0, contrast_indices.reshape(-1)).detach()
    weight = weight.view(batch, contrasts, memory.shape[1])
    return torch.exp(torch.div(torch.bmm(weight, embed.view(batch, memory.shape[1], 1)), temperature))


def eager_contrast_loss(x: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """ContrastLoss: NCE over normalised scores x [B, K+1, 1], m = K, Pn = 1 / num_data; a [1] tensor."""
    batch = x.shape[0]
    m = x.size(1) - 1
    noise = m / float(num_data)
    positive = x.select(1, 0)
    log_d1 = torch.div(positive, positive.add(noise + eps)).log_()
    negatives = x.narrow(1, 1, m)
    log_d0 = torch.div(negatives.clone().fill_(noise), negatives.add(noise + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / batch


def eager_crd(student_embed: torch.Tensor, teacher_embed: torch.Tensor, contrast_indices: torch.Tensor,
              memory_student: torch.Tensor, memory_teacher: torch.Tensor, normalizers: torch.Tensor,
              temperature: float = 0.07, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's CRD loss (ContrastMemory scores + two ContrastLoss) for given contrast indices; a [1] tensor.

    ``normalizers`` [2] = (Z_v1, Z_v2) as RepDistiller's ``params[2:4]``: an entry < 0 is set in place, on this call,
    to ``mean(out) N`` of its side (with a host read, as RepDistiller). The banks are not updated here (see
    eager_update_memory_)."""
    num_data = memory_student.shape[0]
    out_student = eager_contrast_scores(student_embed, memory_teacher, contrast_indices, temperature)  # out_v1
    out_teacher = eager_contrast_scores(teacher_embed, memory_student, contrast_indices, temperature)  # out_v2
    for side, out in enumerate((out_student, out_teacher)):
        if normalizers[side].item() < 0:
            normalizers[side] = out.detach().mean() * num_data
    out_student = torch.div(out_student, normalizers[0].item()).contiguous()
    out_teacher = torch.div(out_teacher, normalizers[1].item()).contiguous()
    return eager_contrast_loss(out_student, num_data, eps) + eager_contrast_loss(out_teacher, num_data, eps)


def eager_update_memory_(memory: torch.Tensor, embed: torch.Tensor, indices: torch.Tensor,
                         momentum: float = 0.5) -> None:
    """ContrastMemory's bank update: gather, momentum mix, L2-normalise, ``index_copy_`` back (no grad)."""
    with torch.no_grad():
        position = torch.index_select(memory, 0, indices.view(-1))
        position.mul_(momentum)
        position.add_(torch.mul(embed, 1 - momentum))
        norm = position.pow(2).sum(1, keepdim=True).pow(0.5)
        memory.index_copy_(0, indices, position.div(norm))
