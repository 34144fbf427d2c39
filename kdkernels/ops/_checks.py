"""The inputs of every op, checked the same way wherever the op runs: in its fake (meta) kernel, which the C++ op
and its Triton twin share (so a traced call fails as an eager one does), and in the Triton op itself.
csrc/common/host.h and csrc/<family>/<family>_host.h are the C++ mirror.

One policy (kdkernels/_validation.py): TypeError for a wrong type or dtype, ValueError for a wrong value, shape or
device; every message starts with the op (``<op>_forward``, ``triton_<op>_backward``, ...) and names the argument,
what was expected and what came.
"""
from __future__ import annotations

import math

import torch

from kdkernels._validation import FLOAT_DTYPE_NAMES, FLOAT_DTYPES, accumulation_dtype

TARGET_SPLIT_TERMS = 6  # (log p_s[y], log(1 - p_s[y]), log p_t[y], log(1 - p_t[y]), KL(q_t || q_s), H(q_t))
DIST_ROW_MOMENTS = 3  # (S_st, S_ss, S_tt)
DIST_COL_MOMENTS = 5  # (mean_s, mean_t, S_st, S_ss, S_tt)


# ------------------------------------------------------------------------------------------------------------------
# Shared by the ops
# ------------------------------------------------------------------------------------------------------------------

def check_float_tensor(op: str, name: str, x: torch.Tensor) -> None:
    """x is a tensor of a supported floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be {FLOAT_DTYPE_NAMES}, got {x.dtype}")

def check_logits(op: str, name: str, x: torch.Tensor) -> None:
    """2-D [N, V] logits of a supported dtype."""
    check_float_tensor(op, name, x)
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D [N, V] tensor, got shape {tuple(x.shape)}")

def check_temperature(op: str, temperature: float) -> None:
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")

def check_logit_pair(op: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    """Student and teacher logits [N, V] of one shape on one device, fp64 for both or neither; temperature > 0."""
    check_logits(op, "student", student)
    check_logits(op, "teacher", teacher)
    if teacher.shape != student.shape:
        raise ValueError(f"{op}: teacher must have the student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{op}: teacher must be on the student's device {student.device}, got {teacher.device}")
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise TypeError(f"{op}: student and teacher must both be float64 or neither, got {student.dtype} and "
                        f"{teacher.dtype}")
    check_temperature(op, temperature)

def check_index_tensor(op: str, name: str, x: torch.Tensor, shape: tuple, device: torch.device) -> None:
    """An int64 label / index tensor of the given shape on the logits' device."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be an int64 tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{op}: {name} must be on the logits' device {device}, got {x.device}")

def check_row_tensors(op: str, like: torch.Tensor, specs) -> None:
    """Saved per-row tensors and upstream gradients: for each (name, x, shape) a floating tensor of that shape on
    like's device."""
    for name, x, shape in specs:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        if x.device != like.device:
            raise ValueError(f"{op}: {name} must be on the inputs' device {like.device}, got {x.device}")


# ------------------------------------------------------------------------------------------------------------------
# softmax_kl: softmax_kl, softmax_jsd
# ------------------------------------------------------------------------------------------------------------------

def check_kl_backward(op: str, grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature) -> None:
    check_logit_pair(op, student, teacher, temperature)
    N = student.shape[0]
    check_row_tensors(op, student, (("grad_loss", grad_loss, (N,)), ("stats_student", stats_student, (N, 2)),
                                    ("stats_teacher", stats_teacher, (N, 2)), ("loss", loss, (N,))))


def check_jsd_forward(op: str, student, teacher, temperature, beta) -> None:
    check_logit_pair(op, student, teacher, temperature)
    if not 0.0 < beta < 1.0:  # also rejects NaN
        raise ValueError(f"{op}: beta must lie in (0, 1), got {beta}")


def check_jsd_backward(op: str, grad_loss, student, teacher, stats_student, stats_teacher, mixture_kl, temperature,
                       beta) -> None:
    check_jsd_forward(op, student, teacher, temperature, beta)
    N = student.shape[0]
    check_row_tensors(op, student, (("grad_loss", grad_loss, (N,)), ("stats_student", stats_student, (N, 2)),
                                    ("stats_teacher", stats_teacher, (N, 2)), ("mixture_kl", mixture_kl, (N, 2))))


# ------------------------------------------------------------------------------------------------------------------
# target_split, logsoftmax_gather, dist, contrastive
# ------------------------------------------------------------------------------------------------------------------

def check_target_split_forward(op: str, student, teacher, labels, temperature) -> None:
    check_logit_pair(op, student, teacher, temperature)
    check_index_tensor(op, "labels", labels, (student.shape[0],), student.device)


def check_target_split_backward(op: str, grad_terms, student, teacher, labels, stats_student, stats_teacher, terms,
                                temperature) -> None:
    check_target_split_forward(op, student, teacher, labels, temperature)
    N = student.shape[0]
    check_row_tensors(op, student, (("grad_terms", grad_terms, (N, TARGET_SPLIT_TERMS)),
                                    ("stats_student", stats_student, (N, 2)),
                                    ("stats_teacher", stats_teacher, (N, 2)),
                                    ("terms", terms, (N, TARGET_SPLIT_TERMS))))


def check_logsoftmax_gather_forward(op: str, logits, indices, temperature) -> None:
    check_logits(op, "logits", logits)
    if indices.dim() != 2:
        raise ValueError(f"{op}: indices must be a 2-D [N, k] tensor, got shape {tuple(indices.shape)}")
    check_index_tensor(op, "indices", indices, (logits.shape[0], indices.shape[1]), logits.device)
    check_temperature(op, temperature)


def check_logsoftmax_gather_backward(op: str, grad_gathered, logits, indices, stats, temperature) -> None:
    check_logsoftmax_gather_forward(op, logits, indices, temperature)
    check_row_tensors(op, logits, (("grad_gathered", grad_gathered, tuple(indices.shape)),
                                   ("stats", stats, (logits.shape[0], 2))))


def check_dist_backward(op: str, grad_row, grad_col, student, teacher, row_moments, col_moments, stats_student,
                        stats_teacher, temperature) -> None:
    check_logit_pair(op, student, teacher, temperature)
    N, V = student.shape
    check_row_tensors(op, student, (
        ("grad_row", grad_row, (N,)), ("grad_col", grad_col, (V,)), ("row_moments", row_moments, (N, DIST_ROW_MOMENTS)),
        ("col_moments", col_moments, (V, DIST_COL_MOMENTS)), ("stats_student", stats_student, (N, 2)),
        ("stats_teacher", stats_teacher, (N, 2))))


def check_crd_nce_forward(op: str, embed, memory, contrast_indices, log_normalizer, temperature, noise_mass,
                          eps) -> None:
    check_float_tensor(op, "embed", embed)
    check_float_tensor(op, "memory", memory)
    if embed.dim() != 2 or embed.shape[0] < 1 or embed.shape[1] < 1:
        raise ValueError(f"{op}: embed must be a 2-D [B, d] tensor with B, d >= 1, got shape {tuple(embed.shape)}")
    if memory.dim() != 2 or memory.shape[0] < 1 or memory.shape[1] != embed.shape[1]:
        raise ValueError(f"{op}: memory must be a 2-D [N, {embed.shape[1]}] tensor with N >= 1, got shape "
                         f"{tuple(memory.shape)}")
    if (embed.dtype == torch.float64) != (memory.dtype == torch.float64):
        raise TypeError(f"{op}: embed and memory must both be float64 or neither, got {embed.dtype} and "
                        f"{memory.dtype}")
    if contrast_indices.dtype != torch.int64:
        raise TypeError(f"{op}: contrast_indices must be an int64 tensor, got {contrast_indices.dtype}")
    if contrast_indices.dim() != 2 or contrast_indices.shape[0] != embed.shape[0] or contrast_indices.shape[1] < 2:
        raise ValueError(f"{op}: contrast_indices must have shape [{embed.shape[0]}, K+1] with K+1 >= 2, got "
                         f"{tuple(contrast_indices.shape)}")
    acc = accumulation_dtype(embed)
    if log_normalizer.dtype != acc:
        raise TypeError(f"{op}: log_normalizer must be a 0-dim {acc} tensor, got {log_normalizer.dtype}")
    if log_normalizer.dim() != 0:
        raise ValueError(f"{op}: log_normalizer must be a 0-dim {acc} tensor, got shape "
                         f"{tuple(log_normalizer.shape)}")
    for name, x in (("memory", memory), ("contrast_indices", contrast_indices), ("log_normalizer", log_normalizer)):
        if x.device != embed.device:
            raise ValueError(f"{op}: {name} must be on embed's device {embed.device}, got {x.device}")
    check_temperature(op, temperature)
    if not (noise_mass > 0.0 and noise_mass < float("inf")):
        raise ValueError(f"{op}: noise_mass must be finite and > 0 (K / N), got {noise_mass}")
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")


# ------------------------------------------------------------------------------------------------------------------
# pairwise
# ------------------------------------------------------------------------------------------------------------------

PAIRWISE_PARAMETERS = {"rkd_distance": 0, "rkd_angle": 0, "sp": 0, "rkd": 2, "pkt": 1, "cc": 3}


def check_pairwise_forward(op: str, student, teacher, relation: str, params) -> None:
    """Features [B, D_s], [B, D_t] (B >= 2) on one device, float64 with float64 only; a known relation with its
    parameters: rkd (distance_weight, angle_weight), pkt (eps > 0), cc (finite gamma, integer order in [0, 64],
    bilinear)."""
    check_float_tensor(op, "student", student)
    check_float_tensor(op, "teacher", teacher)
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 2 or x.shape[1] < 1:
            raise ValueError(f"{op}: {name} must be 2-D features [B, D] with D >= 1, got shape {tuple(x.shape)}")
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{op}: teacher must have the student's {student.shape[0]} samples, got {teacher.shape[0]}")
    if student.shape[0] < 2:
        raise ValueError(f"{op}: a batch relation needs at least 2 samples, got {student.shape[0]}")
    if teacher.device != student.device:
        raise ValueError(f"{op}: teacher must be on the student's device {student.device}, got {teacher.device}")
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise TypeError(f"{op}: student and teacher must both be float64 or neither, got {student.dtype} and "
                        f"{teacher.dtype}")
    if relation not in PAIRWISE_PARAMETERS:
        raise ValueError(f"{op}: unknown relation {relation!r}; expected one of {', '.join(PAIRWISE_PARAMETERS)}")
    if len(params) != PAIRWISE_PARAMETERS[relation]:
        raise ValueError(f"{op}: relation '{relation}' takes {PAIRWISE_PARAMETERS[relation]} parameters, got "
                         f"{len(params)}")
    if relation == "pkt" and not (params[0] > 0 and math.isfinite(params[0])):
        raise ValueError(f"{op}: pkt eps must be positive, got {params[0]}")
    if relation == "cc":
        gamma, order, _ = params
        if not math.isfinite(gamma):
            raise ValueError(f"{op}: cc gamma must be finite, got {gamma}")
        if not (0 <= order <= 64 and order == math.floor(order)):
            raise ValueError(f"{op}: cc order must be an integer in [0, 64], got {order}")
