"""CRD (Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020) on the fused ``crd_nce`` op.

RepDistiller's ``CRDLoss`` = ``ContrastMemory`` (two memory banks, scores exp(M[idx] . v / T) / Z) + two
``ContrastLoss`` (NCE with noise distribution Pn = 1/N and m = K). Here the banks and the normalisation constants
are explicit, caller-owned state (:class:`kdkernels.nn.CRDLoss` holds them as buffers), so they can be checkpointed:

* :func:`crd_loss` — the loss for given banks and normalisers;
* :func:`crd_normalizers` — RepDistiller's Z (set on its first call) for both sides;
* :func:`crd_update_memory_` — the momentum update of a bank after the step;
* :func:`sample_contrast_indices` — RepDistiller's fallback sampler of negatives;
* :func:`crcd_loss`, :func:`crcd_normalizers` — CRCD's relation contrastive loss on the same banks (torch ops).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdkernels import backends
from kdkernels._validation import Checks, accumulation_dtype, promote_float64
from kdkernels.ops.contrastive import crd_nce
from kdkernels.reference.contrastive import normalizer_from_score_lse


def _check_embeddings(check: Checks, student_embed, teacher_embed) -> None:
    for name, x in (("student_embed", student_embed), ("teacher_embed", teacher_embed)):
        check.floating(name, x, dims=(2,))
    check.same_shape("teacher_embed", teacher_embed, "student_embed", student_embed)
    check.same_device("teacher_embed", teacher_embed, "student_embed", student_embed)


def _check_banks(check: Checks, memory_student, memory_teacher, embed: torch.Tensor) -> None:
    for name, bank in (("memory_student", memory_student), ("memory_teacher", memory_teacher)):
        check.floating(name, bank, dims=(2,))
        if bank.shape[1] != embed.shape[1]:
            check.value_error(name, f"must be a 2-D [N, {embed.shape[1]}] bank (the embeddings' width)",
                              f"shape {tuple(bank.shape)}")
        check.same_device(name, bank, "the embeddings", embed)
        if bank.requires_grad:
            check.value_error(name, "must not require grad (a CRD memory bank is a constant updated by "
                              "crd_update_memory_: register it as a buffer, or pass bank.detach())",
                              "a tensor that requires grad")
    check.same_shape("memory_teacher", memory_teacher, "memory_student", memory_student)


def _check_contrast_indices(check: Checks, contrast_indices, embed: torch.Tensor) -> torch.Tensor:
    check.index_tensor("contrast_indices", contrast_indices, (embed.shape[0], None), embed.device, "[B, K+1]")
    if contrast_indices.shape[1] < 2:
        check.value_error("contrast_indices", "needs K+1 >= 2 columns (the positive and at least one negative)",
                          f"{contrast_indices.shape[1]}")
    return contrast_indices


def sample_contrast_indices(indices: torch.Tensor, num_data: int, num_negatives: int = 16384, *,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """RepDistiller's fallback when the dataset gives no contrast indices: [B, K+1] int64 with column 0 = ``indices``
    and K = ``num_negatives`` columns drawn uniformly, with replacement, from the whole bank [0, num_data)
    (``AliasMethod`` over uniform unigrams). Unlike the dataset sampler (``CIFAR100InstanceSample``, negatives from
    other classes), these negatives may be of the sample's own class, or the sample itself."""
    check = Checks("sample_contrast_indices")
    check.integers("indices", indices)
    num_data = check.integer("num_data", num_data, minimum=1)
    num_negatives = check.integer("num_negatives", num_negatives, minimum=1)
    negatives = torch.randint(0, num_data, (indices.shape[0], num_negatives), generator=generator,
                              device=indices.device, dtype=torch.int64)
    return torch.cat([indices.reshape(-1, 1).to(torch.int64), negatives], dim=1)


def sample_other_class_indices(indices: torch.Tensor, bank_labels: torch.Tensor, num_negatives: int = 16384, *,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """RepDistiller's ``CIFAR100InstanceSample`` "exact" mode: [B, K+1] int64 with column 0 = ``indices`` and K =
    ``num_negatives`` columns drawn uniformly, with replacement, from the bank entries whose label differs from the
    anchor's (``bank_labels`` [num_data], integer class of every bank slot). On the device, no host sync: a draw r
    in [0, N − n_y) over the label-sorted bank skips the anchor's class block."""
    check = Checks("sample_other_class_indices")
    num_negatives = check.integer("num_negatives", num_negatives, minimum=1)
    check.integers("bank_labels", bank_labels, dims=(1,))
    check.index_tensor("indices", indices, (None,), bank_labels.device, "[B]")
    order = torch.argsort(bank_labels, stable=True)
    counts = torch.bincount(bank_labels)
    starts = torch.cumsum(counts, 0) - counts
    anchor_class = bank_labels[indices]
    own_start, own_count = starts[anchor_class].unsqueeze(1), counts[anchor_class].unsqueeze(1)
    others = bank_labels.shape[0] - own_count
    uniform = torch.rand(indices.shape[0], num_negatives, generator=generator, device=bank_labels.device)
    draw = torch.minimum((uniform * others).long(), others - 1)
    position = draw + (draw >= own_start) * own_count
    return torch.cat([indices.reshape(-1, 1).to(torch.int64), order[position]], dim=1)


def _resolve_contrast_indices(check: Checks, indices, contrast_indices, embed, num_data, num_negatives, generator):
    check.index_tensor("indices", indices, (embed.shape[0],), embed.device, "[B]")
    if contrast_indices is None:
        num_negatives = check.integer("num_negatives", num_negatives, minimum=1)
        return sample_contrast_indices(indices, num_data, num_negatives, generator=generator)
    return _check_contrast_indices(check, contrast_indices, embed)


def crd_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor, indices: torch.Tensor,
             contrast_indices: torch.Tensor | None, memory_student: torch.Tensor, memory_teacher: torch.Tensor,
             normalizers: torch.Tensor, temperature: float = 0.07, eps: float = 1e-7, *, num_negatives: int = 16384,
             generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """CRD's loss, as RepDistiller's ``CRDLoss`` (``ContrastMemory`` + two ``ContrastLoss``), for given state.

    ``student_embed``, ``teacher_embed`` [B, d]: the L2-normalised outputs of the two embedding heads (gradients flow
    to both). ``memory_student``, ``memory_teacher`` [N, d]: the banks (constants; see :func:`crd_update_memory_`).
    ``indices`` [B]: the samples' dataset indices. ``contrast_indices`` [B, K+1]: column 0 the positive (normally
    ``indices``), columns 1..K the negatives; None draws K = ``num_negatives`` uniformly from the bank (see
    :func:`sample_contrast_indices`). ``normalizers`` [2]: RepDistiller's (Z_v1, Z_v2), both > 0 (set them once with
    :func:`crd_normalizers`). With s = M[idx] . v / T, x = exp(s) / Z, c = K/N + eps::

        rows(v, M, Z)[b] = -log(x_b0 / (x_b0 + c)) - sum_{k>=1} log((K/N) / (x_bk + c))
        loss = (sum_b rows(student_embed, memory_teacher, Z_v1) + sum_b rows(teacher_embed, memory_student, Z_v2)) / B

    A 0-dim tensor in the accumulation dtype (float32, or float64 for float64 inputs); RepDistiller returns the same
    value as a [1] tensor. Every term is formed in log space (no exp overflow at low temperatures or in fp16), and
    the op never stores the B x (K+1) x d gathered memory (RepDistiller keeps two, ~537 MB each at B=64, K=16384).
    """
    check = Checks("crd_loss")
    _check_embeddings(check, student_embed, teacher_embed)
    _check_banks(check, memory_student, memory_teacher, student_embed)
    temperature = check.temperature(temperature)
    eps = check.real("eps", eps, nonnegative=True)
    num_data = memory_student.shape[0]
    contrast_indices = _resolve_contrast_indices(check, indices, contrast_indices, student_embed, num_data,
                                                 num_negatives, generator)
    check.floating("normalizers", normalizers)
    check.shape("normalizers", normalizers, (2,), "[2] (Z_v1, Z_v2)")
    check.same_device("normalizers", normalizers, "student_embed", student_embed)
    student_embed, teacher_embed, memory_student, memory_teacher = promote_float64(
        student_embed, teacher_embed, memory_student, memory_teacher)
    name = backends.select_backend(backend, student_embed, memory_teacher, required_ops=("crd_nce",))
    noise_mass = (contrast_indices.shape[1] - 1) / num_data
    log_normalizers = normalizers.detach().to(accumulation_dtype(student_embed)).log()
    student_rows, _ = crd_nce(student_embed, memory_teacher, contrast_indices, log_normalizers[0], temperature,
                              noise_mass, eps, name)
    teacher_rows, _ = crd_nce(teacher_embed, memory_student, contrast_indices, log_normalizers[1], temperature,
                              noise_mass, eps, name)
    return (student_rows.sum() + teacher_rows.sum()) / student_embed.shape[0]


def crd_normalizers(student_embed: torch.Tensor, teacher_embed: torch.Tensor, contrast_indices: torch.Tensor,
                    memory_student: torch.Tensor, memory_teacher: torch.Tensor, temperature: float = 0.07, *,
                    backend: str = "auto") -> torch.Tensor:
    """RepDistiller's normalisation constants (Z_v1, Z_v2) [2], set on its first call: ``Z = mean(exp(s)) N`` over
    the batch's B (K+1) scores of each side (student embeddings vs the teacher bank, then teacher embeddings vs the
    student bank), formed from per-row logsumexps (no exp overflow, no gathered tensor). No gradient."""
    check = Checks("crd_normalizers")
    _check_embeddings(check, student_embed, teacher_embed)
    _check_banks(check, memory_student, memory_teacher, student_embed)
    temperature = check.temperature(temperature)
    _check_contrast_indices(check, contrast_indices, student_embed)
    student_embed, teacher_embed, memory_student, memory_teacher = promote_float64(
        student_embed, teacher_embed, memory_student, memory_teacher)
    name = backends.select_backend(backend, student_embed, memory_teacher, required_ops=("crd_nce",))
    num_data, contrasts = memory_student.shape[0], contrast_indices.shape[1]
    zero = student_embed.new_zeros((), dtype=accumulation_dtype(student_embed))
    noise_mass = (contrasts - 1) / num_data  # any positive value: only score_lse is used
    values = []
    with torch.no_grad():
        for embed, bank in ((student_embed, memory_teacher), (teacher_embed, memory_student)):
            _, score_lse = crd_nce(embed.detach(), bank, contrast_indices, zero, temperature, noise_mass, 0.0, name)
            values.append(normalizer_from_score_lse(score_lse, contrasts, num_data))
    return torch.stack(values)


def crd_update_memory_(memory: torch.Tensor, embed: torch.Tensor, indices: torch.Tensor,
                       momentum: float = 0.5) -> torch.Tensor:
    """RepDistiller's bank update, in place and without grad: ``M[y] <- normalize(momentum M[y] + (1 - momentum) v)``
    (L2 norm, computed in float32, float64 for a float64 bank). Duplicate indices in a batch are deterministic: the
    last occurrence wins (every duplicate writes that value; RepDistiller's ``index_copy_`` races). No host
    synchronisation. Returns ``memory``."""
    check = Checks("crd_update_memory_")
    check.floating("memory", memory, dims=(2,), nonempty=False)
    check.floating("embed", embed, nonempty=False)
    check.shape("embed", embed, (None, memory.shape[1]), f"[B, {memory.shape[1]}] (2-D, the memory's width)")
    check.same_device("embed", embed, "memory", memory)
    check.index_tensor("indices", indices, (embed.shape[0],), memory.device, "[B]")
    momentum = check.probability("momentum", momentum)
    with torch.no_grad():
        acc = accumulation_dtype(memory)
        mixed = torch.index_select(memory, 0, indices).to(acc) * momentum + embed.detach().to(acc) * (1 - momentum)
        updated = mixed / mixed.pow(2).sum(dim=1, keepdim=True).pow(0.5)
        sorted_indices, order = torch.sort(indices, stable=True)
        last = torch.searchsorted(sorted_indices, sorted_indices, right=True) - 1  # a duplicate run's last entry
        memory.index_copy_(0, sorted_indices, updated[order[last]].to(memory.dtype))
    return memory


# ----------------------------------------------------------------------------------------------------------- CRCD

def _crcd_scores(embed: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor, contrast_indices: torch.Tensor,
                 eps: float = 1e-6) -> torch.Tensor:
    """CRCD's relation scores [B (sample i), B (anchor a), K+1] of one side (Lechatelia/CRCD ``crcd/memory.py``
    ``ContrastMemory.forward``): the anchors are the other side's bank rows of the batch, A_a = M[y_a]; the sample's
    relation to anchor a, normalize(v_i − A_a + eps), is scored against the bank's relations of the contrast rows,
    normalize(M[idx_ik] − A_a + eps), by their inner product. Formed without the B×B×(K+1)×d relation tensor: the
    bank relation's dot product and norm are expanded, except where idx_ik = y_a (the two rows are one: the bank
    relation is eps·1, scored exactly), in the accumulation dtype."""
    acc = accumulation_dtype(embed, memory)
    bank = memory.detach().to(acc)
    anchors = bank[indices]                                                            # [B, d]
    rows = bank[contrast_indices]                                                      # [B, K+1, d]
    width = embed.shape[1]
    relation = F.normalize(embed.to(acc).unsqueeze(1) - anchors.unsqueeze(0) + eps, p=2, dim=2)   # [i, a, d]
    relation_sum = relation.sum(dim=2)                                                 # [i, a]
    rows_dot = torch.bmm(rows, relation.transpose(1, 2)).transpose(1, 2)               # [i, a, k]
    anchors_dot = torch.einsum("ad,iad->ia", anchors, relation)                        # [i, a]
    numerator = rows_dot - anchors_dot.unsqueeze(2) + eps * relation_sum.unsqueeze(2)
    with torch.no_grad():
        rows_sq, anchors_sq = rows.pow(2).sum(dim=2), anchors.pow(2).sum(dim=1)        # [i, k], [a]
        cross = torch.einsum("ikd,ad->iak", rows, anchors)
        sums = rows.sum(dim=2).unsqueeze(1) - anchors.sum(dim=1).view(1, -1, 1)
        norm_sq = rows_sq.unsqueeze(1) - 2.0 * cross + anchors_sq.view(1, -1, 1) + 2.0 * eps * sums + width * eps ** 2
        same = contrast_indices.unsqueeze(1) == indices.view(1, -1, 1)                 # [i, a, k]
        norm = torch.where(same, torch.full_like(norm_sq, eps * width ** 0.5),
                           norm_sq.clamp_min(width * eps ** 2).sqrt()).clamp_min(1e-12)
    numerator = torch.where(same, (eps * relation_sum).unsqueeze(2).expand_as(numerator), numerator)
    return numerator / norm


def _crcd_inputs(check: Checks, student_embed, teacher_embed, indices, contrast_indices, memory_student,
                 memory_teacher, num_negatives, generator):
    _check_embeddings(check, student_embed, teacher_embed)
    _check_banks(check, memory_student, memory_teacher, student_embed)
    return _resolve_contrast_indices(check, indices, contrast_indices, student_embed, memory_student.shape[0],
                                     num_negatives, generator)


def crcd_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor, indices: torch.Tensor,
              contrast_indices: torch.Tensor | None, memory_student: torch.Tensor, memory_teacher: torch.Tensor,
              normalizers: torch.Tensor, temperature: float = 0.05, eps: float = 1e-7, *, num_negatives: int = 500,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """CRCD's relation contrastive loss (Zhu, Tang, Chen, Yu, Liu, Yang, Rong, Wang, "Complementary Relation
    Contrastive Distillation", CVPR 2021), as Lechatelia/CRCD ``crcd/criterion.py::CRCDLoss`` (``ContrastMemory``
    of ``crcd/memory.py`` + two ``ContrastLoss``), for given state. The inputs are CRD's (:func:`crd_loss`): the
    L2-normalised embeddings [B, d], CRD-style memory banks [N, d] (updated after the step by
    :func:`crd_update_memory_`), ``indices`` [B], ``contrast_indices`` [B, K+1] (column 0 the positive) and
    ``normalizers`` [2] (Z_v1, Z_v2, set once by :func:`crcd_normalizers`). The batch's bank rows of the other
    side are the anchors; every (sample i, anchor a) pair is one NCE row::

        r_ia  = normalize(v_i − A_a + 1e-6),    A = M_other[indices]
        s_iak = normalize(M_other[idx_ik] − A_a + 1e-6) · r_ia / temperature,   x = exp(s) / Z
        rows  = −log(x_ia0 / (x_ia0 + c)) − Σ_{k≥1} log((K/N) / (x_iak + c)),  c = K/N + eps
        loss  = Σ_{i,a} rows(student_embed, memory_teacher, Z_v1) / B² + Σ_{i,a} rows(teacher_embed, memory_student,
                Z_v2) / B²

    A 0-dim tensor in the accumulation dtype (float32, or float64 for float64 inputs), every NCE term in log space.
    Memory O(B²(K+1) + B(K+1)d) (the official code builds B²(K+1)d relation tensors); ``contrast_indices=None``
    draws ``num_negatives`` uniformly (:func:`sample_contrast_indices`).
    """
    check = Checks("crcd_loss")
    contrast_indices = _crcd_inputs(check, student_embed, teacher_embed, indices, contrast_indices, memory_student,
                                    memory_teacher, num_negatives, generator)
    temperature = check.temperature(temperature)
    eps = check.real("eps", eps, nonnegative=True)
    check.floating("normalizers", normalizers)
    check.shape("normalizers", normalizers, (2,), "[2] (Z_v1, Z_v2)")
    check.same_device("normalizers", normalizers, "student_embed", student_embed)
    num_data, negatives = memory_student.shape[0], contrast_indices.shape[1] - 1
    noise_mass = negatives / num_data
    log_c = math.log(noise_mass + eps)
    log_normalizers = normalizers.detach().to(accumulation_dtype(student_embed, memory_student)).log()
    total = None
    for side, (embed, bank) in enumerate(((student_embed, memory_teacher), (teacher_embed, memory_student))):
        u = _crcd_scores(embed, bank, indices, contrast_indices) / temperature - log_normalizers[side]
        rows = F.softplus(log_c - u[..., 0]).sum() + \
            (F.softplus(u[..., 1:] - log_c) + (log_c - math.log(noise_mass))).sum()
        total = rows if total is None else total + rows
    return total / (student_embed.shape[0] ** 2)


def crcd_normalizers(student_embed: torch.Tensor, teacher_embed: torch.Tensor, indices: torch.Tensor,
                     contrast_indices: torch.Tensor, memory_student: torch.Tensor, memory_teacher: torch.Tensor,
                     temperature: float = 0.05) -> torch.Tensor:
    """CRCD's normalisation constants (Z_v1, Z_v2) [2], set on its first call (``crcd/memory.py``): ``Z = mean(exp(s))
    N`` over the B·B·(K+1) relation scores of each side (:func:`crcd_loss`), from a logsumexp. No gradient."""
    check = Checks("crcd_normalizers")
    _check_embeddings(check, student_embed, teacher_embed)
    _check_banks(check, memory_student, memory_teacher, student_embed)
    check.index_tensor("indices", indices, (student_embed.shape[0],), student_embed.device, "[B]")
    _check_contrast_indices(check, contrast_indices, student_embed)
    temperature = check.temperature(temperature)
    num_data = memory_student.shape[0]
    values = []
    with torch.no_grad():
        for embed, bank in ((student_embed, memory_teacher), (teacher_embed, memory_student)):
            scores = _crcd_scores(embed.detach(), bank, indices, contrast_indices) / temperature
            values.append(torch.exp(torch.logsumexp(scores.reshape(-1), dim=0) - math.log(scores.numel())) * num_data)
    return torch.stack(values)
