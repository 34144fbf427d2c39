"""Hinton KD and its relatives on the fused ``softmax_kl`` family: forward and reverse KL, their symmetric mean, the
generalised JSD, and KD against a sparse (top-k) teacher on the fused ``logsoftmax_gather`` op.

The top-k teacher is given as log-probabilities ``lp`` [N, k] (at temperature 1, as ``log_softmax`` then ``topk``
gives them) at class indices [N, k], distinct within a row, the form in which LLM teacher outputs are stored offline.
The student's full-row log-softmax is gathered at those indices in one pass (the backward spreads the gradient over
the whole row). Two conventions:

* ``"renormalize"``: the teacher renormalised over its top-k support at temperature T, ``q = softmax(lp / T)`` over
  the k entries (exact: ``lp / T`` differs from the tempered teacher logits by a per-row constant), and
  ``loss = sum_k q (log q - log p_s)`` with ``p_s = softmax(s / T)`` over all V classes: ``KL(q || p_s restricted)
  >= 0``, which also pushes the student's mass into the support.
* ``"tail"``: the k teacher probabilities as given plus one tail bucket ``1 - sum exp(lp)``, matched against the
  student's mass outside the support, ``1 - sum_k p_s``: a (k+1)-bin KL. The tail mass at another temperature cannot
  be recovered from top-k log-probabilities, so this convention needs ``T = 1``.

With k = V (every class, in any order) both equal the dense forward KL. Tail masses are formed in log space,
``log(1 - S) = log(-expm1(logsumexp))``; a student tail that rounds to zero is clamped to the dtype's smallest
normal number instead of giving ``log 0``.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

from kdkernels import backends
from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import as_rows, reduce_rows
from kdkernels.losses._log_space import kl_from_log_probs, topk_teacher_kl
from kdkernels.ops.logsoftmax_gather import logsoftmax_gather
from kdkernels.ops.softmax_kl import softmax_jsd_rows, softmax_kl_rows

Divergence = Literal["forward", "reverse", "symmetric", "jsd"]
TopkConvention = Literal["renormalize", "tail"]
DIVERGENCES = get_args(Divergence)
TOPK_CONVENTIONS = get_args(TopkConvention)


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, divergence: str,
                    backend: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence of 2-D logits on one backend: forward KL(p_t || p_s), reverse KL(p_s || p_t) (the same
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


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma-style logit soft-capping ``cap * tanh(logits / cap)``, in the logits' dtype."""
    return torch.tanh(logits / cap) * cap


def topk_kl_rows(student: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor,
                 temperature: float, convention: str, backend: str) -> torch.Tensor:
    """Per-row KL of 2-D student logits [N, V] against a top-k teacher [N, k] -> [N] (see the module docstring)."""
    log_p_student = logsoftmax_gather(student, topk_indices, temperature, backend)
    return topk_teacher_kl(log_p_student, topk_logprobs, temperature, convention)


def _check_topk_teacher(check: Checks, student_logits: torch.Tensor, teacher_logits, logprobs, indices) -> None:
    """A top-k teacher: both tensors, no dense teacher, shapes [..., k] with the student's leading shape,
    1 <= k <= V, float log-probabilities and integer indices in [0, V) (checked on the host outside torch.compile)."""
    if teacher_logits is not None:
        check.value_error("teacher_logits", "must be None when a top-k teacher is given (pass either teacher_logits "
                          "or teacher_topk_logprobs / teacher_topk_indices, not both)", "a tensor")
    if logprobs is None or indices is None:
        check.value_error("teacher_topk_logprobs, teacher_topk_indices",
                          "must both be given for a top-k teacher", "only one")
    check.floating("teacher_topk_logprobs", logprobs)
    check.integers("teacher_topk_indices", indices)
    for name, tensor in (("teacher_topk_logprobs", logprobs), ("teacher_topk_indices", indices)):
        check.same_device(name, tensor, "student_logits", student_logits)
    check.same_shape("teacher_topk_indices", indices, "teacher_topk_logprobs", logprobs)
    classes = student_logits.shape[-1]
    if indices.dim() != student_logits.dim() or indices.shape[:-1] != student_logits.shape[:-1]:
        check.value_error("teacher_topk_indices", "must have shape [..., k] with the student's leading shape "
                          f"{tuple(student_logits.shape[:-1])}", f"shape {tuple(indices.shape)}")
    if not 1 <= indices.shape[-1] <= classes:
        check.value_error("teacher_topk_indices", f"must hold 1 <= k <= {classes} indices per row",
                          f"{indices.shape[-1]}")
    if not torch.compiler.is_compiling():
        bad = (indices < 0) | (indices >= classes)
        if bool(bad.any()):
            check.value_error("teacher_topk_indices", f"must be in [0, {classes})", f"{indices[bad][0].item()}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, temperature: float = 1.0, *,
            reduction: Reduction = "batchmean", scale_by_t2: bool = True, labels: torch.Tensor | None = None,
            ignore_index: int = -100, divergence: Divergence = "forward", beta: float = 0.5,
            teacher_topk_logprobs: torch.Tensor | None = None, teacher_topk_indices: torch.Tensor | None = None,
            topk_convention: TopkConvention = "renormalize", logit_softcap: float | None = None,
            backend: str = "auto") -> torch.Tensor:
    """Hinton knowledge-distillation loss, fused: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the last dim.

    Equals ``F.kl_div(F.log_softmax(s/T, -1), F.log_softmax(t/T, -1), log_target=True, reduction=...) * T**2``
    (the mdistiller / RepDistiller convention for ``batchmean``) without materialising any probability tensor.
    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015); mdistiller ``distillers/KD.py``.

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
            the student's whole row. See the module docstring.
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
    check = Checks("kd_loss")
    check.logits("student_logits", student_logits)
    sparse = teacher_topk_logprobs is not None or teacher_topk_indices is not None
    if sparse:
        _check_topk_teacher(check, student_logits, teacher_logits, teacher_topk_logprobs, teacher_topk_indices)
    elif teacher_logits is None:
        check.type_error("teacher_logits", "a torch.Tensor (kd_loss needs teacher_logits, or teacher_topk_logprobs "
                         "and teacher_topk_indices)", None)
    else:
        check.logits_pair(student_logits, teacher_logits)
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction)
    divergence = check.choice("divergence", divergence, DIVERGENCES)
    beta = check.probability("beta", beta)
    check.flag("scale_by_t2", scale_by_t2)
    if sparse:
        if divergence != "forward":
            check.value_error("divergence", "must be 'forward' with a top-k teacher (divergence='forward' only)",
                              divergence)
        topk_convention = check.choice("topk_convention", topk_convention, TOPK_CONVENTIONS)
        if topk_convention == "tail" and temperature != 1.0:
            check.value_error("temperature", "must be 1 with topk_convention='tail' (the tail mass at another "
                              "temperature cannot be recovered from top-k log-probabilities; it needs temperature=1)",
                              temperature)
    leading_shape = student_logits.shape[:-1]
    if labels is not None:
        check.labels(labels, leading_shape, student_logits.device, ignore_index)
    if logit_softcap is not None:
        cap = check.real("logit_softcap", logit_softcap, positive=True)
        student_logits = soft_cap(student_logits, cap)
        if not sparse:
            teacher_logits = soft_cap(teacher_logits, cap)
    student = as_rows(student_logits)
    if sparse:
        indices = teacher_topk_indices.reshape(-1, teacher_topk_indices.shape[-1]).long()
        name = backends.select_backend(backend, student, required_ops=("logsoftmax_gather",))
        rows = topk_kl_rows(student, teacher_topk_logprobs.reshape(indices.shape), indices, temperature,
                            topk_convention, name)
    else:
        teacher = as_rows(teacher_logits)
        needs_jsd_kernel = divergence == "jsd" and 0.0 < beta < 1.0
        name = backends.select_backend(backend, student, teacher,
                                       required_ops=("softmax_jsd",) if needs_jsd_kernel else ("softmax_kl",))
        rows = divergence_rows(student, teacher, temperature, divergence, name, beta)
    keep = labels.reshape(-1) != ignore_index if labels is not None else None
    return reduce_rows(rows, reduction, leading_shape=leading_shape, elements=student_logits.shape[-1], keep=keep,
                       scale=temperature * temperature if scale_by_t2 else 1.0)
