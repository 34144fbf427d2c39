"""CRD (Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020) on the fused ``crd_nce`` op.

RepDistiller's ``CRDLoss`` = ``ContrastMemory`` (two memory banks, scores exp(M[idx] . v / T) / Z) + two
``ContrastLoss`` (NCE with noise distribution Pn = 1/N and m = K). Here the banks and the normalisation constants
are explicit, caller-owned state (:class:`kdkernels.nn.CRDLoss` holds them as buffers), so they can be checkpointed:

* :func:`crd_loss` — the loss for given banks and normalisers;
* :func:`crd_normalizers` — RepDistiller's Z (set on its first call) for both sides;
* :func:`crd_update_memory_` — the momentum update of a bank after the step;
* :func:`sample_contrast_indices` — RepDistiller's fallback sampler of negatives.
"""
from __future__ import annotations

import math
import numbers

import torch

from kdkernels import backends
from kdkernels.losses import _check_temperature
from kdkernels.ops._registration import accumulation_dtype
from kdkernels.ops.contrastive import crd_nce
from kdkernels.reference.contrastive import normalizer_from_score_lse

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_embeddings(student_embed, teacher_embed) -> None:
    for name, x in (("student_embed", student_embed), ("teacher_embed", teacher_embed)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must be a non-empty 2-D [B, d] tensor, got shape {tuple(x.shape)}")
    if student_embed.shape != teacher_embed.shape:
        raise ValueError(f"student_embed and teacher_embed must have the same shape [B, d], got "
                         f"{tuple(student_embed.shape)} and {tuple(teacher_embed.shape)}")
    if student_embed.device != teacher_embed.device:
        raise ValueError(f"student_embed and teacher_embed must be on the same device, got {student_embed.device} "
                         f"and {teacher_embed.device}")


def _check_banks(memory_student, memory_teacher, embed: torch.Tensor) -> None:
    for name, bank in (("memory_student", memory_student), ("memory_teacher", memory_teacher)):
        if not isinstance(bank, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(bank).__name__}")
        if bank.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {bank.dtype}")
        if bank.dim() != 2 or bank.shape[0] < 1 or bank.shape[1] != embed.shape[1]:
            raise ValueError(f"{name} must be a 2-D [N, {embed.shape[1]}] bank (the embeddings' width), got shape "
                             f"{tuple(bank.shape)}")
        if bank.device != embed.device:
            raise ValueError(f"{name} must be on the embeddings' device {embed.device}, got {bank.device}")
        if bank.requires_grad:
            raise ValueError(f"{name} requires grad, but a CRD memory bank is a constant updated by "
                             "crd_update_memory_ (register it as a buffer, or pass bank.detach())")
        if (bank.dtype == torch.float64) != (embed.dtype == torch.float64):
            raise TypeError(f"{name} is {bank.dtype} but the embeddings are {embed.dtype}: float64 must be used "
                            "for both")
    if memory_student.shape != memory_teacher.shape:
        raise ValueError(f"memory_student and memory_teacher must have the same shape [N, d], got "
                         f"{tuple(memory_student.shape)} and {tuple(memory_teacher.shape)}")


def _check_index_tensor(name: str, x, shape: tuple, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {x.dtype}")
    if x.dim() != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        expected = ", ".join("K+1" if want is None else str(want) for want in shape)
        raise ValueError(f"{name} must have shape [{expected}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the embeddings' device {device}, got {x.device}")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def sample_contrast_indices(indices: torch.Tensor, num_data: int, num_negatives: int = 16384, *,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """RepDistiller's fallback when the dataset gives no contrast indices: [B, K+1] int64 with column 0 = ``indices``
    and K = ``num_negatives`` columns drawn uniformly, with replacement, from the whole bank [0, num_data)
    (``AliasMethod`` over uniform unigrams). Unlike the dataset sampler (``CIFAR100InstanceSample``, negatives from
    other classes), these negatives may be of the sample's own class, or the sample itself."""
    num_data = _check_positive_int("num_data", num_data)
    num_negatives = _check_positive_int("num_negatives", num_negatives)
    negatives = torch.randint(0, num_data, (indices.shape[0], num_negatives), generator=generator,
                              device=indices.device, dtype=torch.int64)
    return torch.cat([indices.reshape(-1, 1).to(torch.int64), negatives], dim=1)


def sample_other_class_indices(indices: torch.Tensor, bank_labels: torch.Tensor, num_negatives: int = 16384, *,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """RepDistiller's ``CIFAR100InstanceSample`` "exact" mode: [B, K+1] int64 with column 0 = ``indices`` and K =
    ``num_negatives`` columns drawn uniformly, with replacement, from the bank entries whose label differs from the
    anchor's (``bank_labels`` [num_data], integer class of every bank slot). On the device, no host sync: a draw r
    in [0, N − n_y) over the label-sorted bank skips the anchor's class block."""
    num_negatives = _check_positive_int("num_negatives", num_negatives)
    if not isinstance(bank_labels, torch.Tensor) or bank_labels.dim() != 1 or bank_labels.dtype.is_floating_point:
        raise ValueError("bank_labels must be a 1-D integer tensor with one class per bank slot")
    _check_index_tensor("indices", indices, (indices.shape[0],), bank_labels.device)
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


def _resolve_contrast_indices(indices, contrast_indices, embed, num_data, num_negatives, generator):
    _check_index_tensor("indices", indices, (embed.shape[0],), embed.device)
    if contrast_indices is None:
        return sample_contrast_indices(indices, num_data, num_negatives, generator=generator)
    _check_index_tensor("contrast_indices", contrast_indices, (embed.shape[0], None), embed.device)
    if contrast_indices.shape[1] < 2:
        raise ValueError(f"contrast_indices needs K+1 >= 2 columns (the positive and at least one negative), got "
                         f"{contrast_indices.shape[1]}")
    return contrast_indices


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite real >= 0, got {eps!r}")
    return float(eps)


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
    _check_embeddings(student_embed, teacher_embed)
    _check_banks(memory_student, memory_teacher, student_embed)
    temperature = _check_temperature(temperature)
    eps = _check_eps(eps)
    num_data = memory_student.shape[0]
    contrast_indices = _resolve_contrast_indices(indices, contrast_indices, student_embed, num_data, num_negatives,
                                                 generator)
    if (not isinstance(normalizers, torch.Tensor) or normalizers.shape != (2,)
            or not normalizers.dtype.is_floating_point):
        raise ValueError(f"normalizers must be a float tensor of shape [2] (Z_v1, Z_v2), got "
                         f"{normalizers if not isinstance(normalizers, torch.Tensor) else tuple(normalizers.shape)}")
    if normalizers.device != student_embed.device:
        raise ValueError(f"normalizers must be on the embeddings' device {student_embed.device}, got "
                         f"{normalizers.device}")
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
    _check_embeddings(student_embed, teacher_embed)
    _check_banks(memory_student, memory_teacher, student_embed)
    temperature = _check_temperature(temperature)
    _check_index_tensor("contrast_indices", contrast_indices, (student_embed.shape[0], None), student_embed.device)
    if contrast_indices.shape[1] < 2:
        raise ValueError(f"contrast_indices needs K+1 >= 2 columns, got {contrast_indices.shape[1]}")
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
    if not isinstance(memory, torch.Tensor) or memory.dim() != 2 or memory.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"memory must be a 2-D float [N, d] tensor, got "
                         f"{tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__}")
    if not isinstance(embed, torch.Tensor) or embed.dim() != 2 or embed.shape[1] != memory.shape[1]:
        raise ValueError(f"embed must be a 2-D [B, {memory.shape[1]}] tensor, got "
                         f"{tuple(embed.shape) if isinstance(embed, torch.Tensor) else type(embed).__name__}")
    if embed.device != memory.device:
        raise ValueError(f"embed must be on the memory's device {memory.device}, got {embed.device}")
    _check_index_tensor("indices", indices, (embed.shape[0],), memory.device)
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a real in [0, 1], got {momentum!r}")
    with torch.no_grad():
        acc = accumulation_dtype(memory)
        mixed = torch.index_select(memory, 0, indices).to(acc) * momentum + embed.detach().to(acc) * (1 - momentum)
        updated = mixed / mixed.pow(2).sum(dim=1, keepdim=True).pow(0.5)
        sorted_indices, order = torch.sort(indices, stable=True)
        last = torch.searchsorted(sorted_indices, sorted_indices, right=True) - 1  # a duplicate run's last entry
        memory.index_copy_(0, sorted_indices, updated[order[last]].to(memory.dtype))
    return memory
