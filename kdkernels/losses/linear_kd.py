"""Knowledge distillation for language models from hidden states and lm_head weights (``linear_kd``): every
divergence LLM distillation uses, a dense or top-k teacher, an optional hard-label cross-entropy, token masking and
gradient-accumulation-correct normalisation.

Two algorithms: the token-chunked one (:mod:`kdkernels.losses.linear_kd_chunked`), which never holds the ``[N, V]``
logits, only a ``[chunk, V]`` tile per side, with the row math on the fused kernels of the chosen backend; and the
reference (``backend="reference"``, :mod:`kdkernels.reference.linear_kd`), which materialises the logits and is the
specification the other is tested against.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal, get_args

import torch

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, SampleReduction, accumulation_dtype
from kdkernels.losses import linear_kd_chunked as chunked
from kdkernels.losses import linear_kd_streaming as streaming
from kdkernels.losses.kd import TOPK_CONVENTIONS, TopkConvention
from kdkernels.reference import linear_kd as reference

LinearDivergence = Literal["forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd", "symmetric"]
LINEAR_DIVERGENCES = get_args(LinearDivergence)
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
ALGORITHMS = ("auto", "token-chunked", "vocab-streaming")
# algorithm="auto" streams the vocabulary when a token-chunked tile (TILE_ELEMENTS elements) would hold fewer rows
STREAMING_BELOW_ROWS = 8


def _check_projection(check: Checks, side: str, hidden, weight, bias, device: torch.device,
                      leading_shape: torch.Size | None = None) -> None:
    """One side's hidden states [N, H] or [B, T, H], weight [V, H] of the hidden states' dtype, bias [V]."""
    hidden_name, weight_name, bias_name = f"{side}_hidden", f"{side}_weight", f"{side}_bias"
    check.floating(hidden_name, hidden, dims=(2, 3))
    check.floating(weight_name, weight, dims=(2,))
    for name, tensor in ((hidden_name, hidden), (weight_name, weight)):
        if tensor.device != device:
            check.value_error(name, f"must be on student_hidden's device {device}", f"a tensor on {tensor.device}")
    if leading_shape is not None and hidden.shape[:-1] != leading_shape:
        check.value_error(hidden_name, f"must have student_hidden's token shape {tuple(leading_shape)} "
                          "(one row per student token)", f"shape {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        check.type_error(weight_name, f"{hidden_name}'s dtype {hidden.dtype}", weight.dtype)
    if weight.shape[1] != hidden.shape[-1]:
        check.value_error(weight_name, f"must have shape [V, {hidden.shape[-1]}] ({hidden_name}'s hidden size)",
                          f"shape {tuple(weight.shape)}")
    if bias is not None:
        check.floating(bias_name, bias, dims=(1,))
        if bias.dtype != weight.dtype:
            check.type_error(bias_name, f"{weight_name}'s dtype {weight.dtype}", bias.dtype)
        if bias.shape[0] != weight.shape[0]:
            check.value_error(bias_name, f"must have shape [{weight.shape[0]}] (one entry per row of {weight_name})",
                              f"shape {tuple(bias.shape)}")
        if bias.device != device:
            check.value_error(bias_name, f"must be on student_hidden's device {device}", f"a tensor on {bias.device}")


def _check_topk_teacher(check: Checks, logprobs, indices, leading_shape: torch.Size, vocabulary: int,
                        device: torch.device) -> None:
    """Both top-k tensors, [*tokens, k] with 1 <= k <= V, float log-probabilities, integer indices in [0, V)."""
    if logprobs is None or indices is None:
        check.value_error("teacher_topk_logprobs, teacher_topk_indices", "must both be given for a top-k teacher",
                          "only one")
    check.floating("teacher_topk_logprobs", logprobs)
    check.integers("teacher_topk_indices", indices)
    for name, tensor in (("teacher_topk_logprobs", logprobs), ("teacher_topk_indices", indices)):
        if tensor.device != device:
            check.value_error(name, f"must be on student_hidden's device {device}", f"a tensor on {tensor.device}")
        if tensor.dim() != len(leading_shape) + 1 or tensor.shape[:-1] != leading_shape:
            check.value_error(name, f"must have shape [{', '.join(map(str, leading_shape))}, k] (student_hidden's "
                              "token shape, then k)", f"shape {tuple(tensor.shape)}")
    check.same_shape("teacher_topk_indices", indices, "teacher_topk_logprobs", logprobs)
    if not 1 <= indices.shape[-1] <= vocabulary:
        check.value_error("teacher_topk_indices", f"must hold 1 <= k <= {vocabulary} indices per token",
                          f"{indices.shape[-1]}")
    if not torch.compiler.is_compiling():
        bad = (indices < 0) | (indices >= vocabulary)
        if bool(bad.any()):
            check.value_error("teacher_topk_indices", f"must be in [0, {vocabulary}) (the student's vocabulary)",
                              f"{indices[bad][0].item()}")


def _check_num_items(check: Checks, num_items, reduction: str, device: torch.device):
    if num_items is None:
        return None
    if reduction != "batchmean":
        check.value_error("num_items", "must be None unless reduction='batchmean' (it is the batchmean divisor)",
                          f"{num_items!r} with reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.dtype == torch.bool or num_items.dtype.is_complex:
            check.type_error("num_items", "a positive int or a 0-dim real tensor", num_items)
        if num_items.device != device:
            check.value_error("num_items", f"must be on student_hidden's device {device}",
                              f"a tensor on {num_items.device}")
        return num_items
    return check.integer("num_items", num_items, minimum=1)


def linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None, *,
                   student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                   teacher_topk_logprobs: torch.Tensor | None = None,
                   teacher_topk_indices: torch.Tensor | None = None, topk_convention: TopkConvention = "renormalize",
                   labels: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                   divergence: LinearDivergence = "forward", beta: float = 0.5, skew_alpha: float = 0.1,
                   hard_weight: float = 0.0, soft_weight: float = 1.0, reduction: SampleReduction = "batchmean",
                   scale_by_t2: bool = False, logit_softcap: float | None = None,
                   num_items: int | torch.Tensor | None = None, backend: str = "auto",
                   algorithm: str = "auto") -> torch.Tensor:
    """Distillation loss of a language model from hidden states and lm_head weights:
    ``soft_weight · D(p_t, p_s) (· T²) + hard_weight · CE(z_s, labels)`` per token, ``p = softmax(z / T)``,
    ``z = hidden @ weight.T + bias``.

    The logits are formed in float32 (float64 when an input is float64), so bf16/fp16 inputs are never rounded
    before the softmax; ``kdkernels.reference.linear_kd`` is the formula. Every backend but ``"reference"`` runs
    one of two algorithms that never hold the ``[N, V]`` logits; both drop tokens labelled ``ignore_index`` before
    the GEMMs (one host synchronisation to count them). The token-chunked one
    (:mod:`kdkernels.losses.linear_kd_chunked`) holds a ``[chunk, V]`` tile per side and runs one forward GEMM per
    side; the vocabulary-streaming one (:mod:`kdkernels.losses.linear_kd_streaming`) holds ``[rows, V_tile]`` tiles,
    memory independent of V, at three forward GEMMs per side. Under ``torch.compile`` the reference formula is traced
    instead (the algorithms' data-dependent row count and per-tile autograd do not trace), so a compiled call holds
    the logits.

    Args:
        student_hidden: ``[N, H_s]`` or ``[B, T, H_s]`` final hidden states (flattened to tokens).
        student_weight: ``[V, H_s]`` (``lm_head.weight``), in student_hidden's dtype; ``student_bias``: ``[V]``.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's, with the student's token shape, any hidden size
            ``H_t`` and ``V_t >= V`` rows; rows beyond the student's V (a padded vocabulary) are dropped and get
            exactly zero gradient.
        teacher_topk_logprobs, teacher_topk_indices: instead of the dense teacher, its top-k log-probabilities at
            temperature 1 (``[*tokens, k]``) at distinct student-vocabulary indices, as ``kd_loss`` takes them;
            ``divergence="forward"`` only. ``topk_convention``: ``"renormalize"`` or ``"tail"`` (needs T = 1), as in
            ``kd_loss``.
        labels, ignore_index: ``[*tokens]``; tokens labelled ``ignore_index`` contribute 0 and are not counted.
            Needed when ``hard_weight > 0`` (then the others must be in ``[0, V)``).
        temperature: ``T > 0`` of the soft part (the cross-entropy is at T = 1).
        divergence: ``"forward"`` KL(p_t ‖ p_s); ``"reverse"`` KL(p_s ‖ p_t); ``"jsd"``
            ``β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)``, ``m = β p_t + (1 − β) p_s`` (β = 0 is forward, β = 1 reverse KL,
            as ``kd_loss``); ``"skew_forward"`` KL(p_t ‖ α p_t + (1 − α) p_s) and ``"skew_reverse"``
            KL(p_s ‖ α p_s + (1 − α) p_t) (DistiLLM, α = ``skew_alpha``); ``"tvd"`` ½ Σ |p_t − p_s|;
            ``"symmetric"`` (forward + reverse) / 2. Mixtures are formed in log space: no NaN when both
            probabilities underflow.
        beta, skew_alpha: in [0, 1].
        hard_weight, soft_weight: ``>= 0`` weights of the cross-entropy and the divergence.
        reduction: ``"batchmean"`` (sum / counted tokens, or sum / ``num_items``), ``"sum"``, ``"none"`` (per token,
            the token shape, 0 at ignored tokens). An all-ignored batch gives 0 with zero gradients.
        scale_by_t2: multiply the soft part by ``T²``.
        logit_softcap: ``c > 0``: ``z = c · tanh(z / c)`` on both sides (the student's only for a top-k teacher),
            before the temperature and the cross-entropy.
        num_items: the batchmean divisor (an int >= 1 or a 0-dim tensor): the counted tokens of the whole
            gradient-accumulation step, so that summing the micro-batches' losses gives the full batch's.
        backend: the row kernels of the token-chunked algorithm, ``"auto"`` (the device's best), ``"cpu"``,
            ``"cuda"`` or ``"triton"``; or ``"reference"``: the materialising reference.
        algorithm: ``"token-chunked"``, ``"vocab-streaming"``, or ``"auto"``: token-chunked unless a
            ``[chunk, V]`` tile would hold fewer than ``STREAMING_BELOW_ROWS`` rows (V beyond 2^21 / that).
            The streaming algorithm runs the divergences as torch ops (``backend`` picks the token-chunked
            algorithm's row kernels). Ignored with ``backend="reference"``.

    Gradients reach every input that requires grad (the teacher's too), in its dtype. The result is float32
    (float64 when an input is float64), under ``torch.autocast`` too (the loss turns it off for its GEMMs).
    """
    check = Checks("linear_kd_loss")
    check.floating("student_hidden", student_hidden, dims=(2, 3))
    device, leading_shape = student_hidden.device, student_hidden.shape[:-1]
    _check_projection(check, "student", student_hidden, student_weight, student_bias, device)
    vocabulary = student_weight.shape[0]
    sparse = teacher_topk_logprobs is not None or teacher_topk_indices is not None
    if sparse:
        for name, value in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                            ("teacher_bias", teacher_bias)):
            if value is not None:
                check.value_error(name, "must be None with a top-k teacher (pass teacher_hidden and teacher_weight "
                                  "or teacher_topk_logprobs and teacher_topk_indices, not both)", "a tensor")
        _check_topk_teacher(check, teacher_topk_logprobs, teacher_topk_indices, leading_shape, vocabulary, device)
    else:
        if teacher_hidden is None:
            check.type_error("teacher_hidden", "a torch.Tensor (linear_kd_loss needs teacher_hidden and "
                             "teacher_weight, or teacher_topk_logprobs and teacher_topk_indices)", None)
        if teacher_weight is None:
            check.type_error("teacher_weight", "a torch.Tensor (the teacher's lm_head weight [V_t, H_t] for "
                             "teacher_hidden)", None)
        _check_projection(check, "teacher", teacher_hidden, teacher_weight, teacher_bias, device, leading_shape)
        if teacher_weight.shape[0] < vocabulary:
            check.value_error("teacher_weight", f"must have at least the student's {vocabulary} rows (a teacher "
                              "vocabulary may be padded beyond the student's, not shorter)",
                              f"shape {tuple(teacher_weight.shape)}")
    temperature = check.temperature(temperature)
    divergence = check.choice("divergence", divergence, LINEAR_DIVERGENCES)
    beta = check.probability("beta", beta)
    skew_alpha = check.probability("skew_alpha", skew_alpha)
    hard_weight = check.real("hard_weight", hard_weight, nonnegative=True)
    soft_weight = check.real("soft_weight", soft_weight, nonnegative=True)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    check.flag("scale_by_t2", scale_by_t2)
    if logit_softcap is not None:
        logit_softcap = check.real("logit_softcap", logit_softcap, positive=True)
    num_items = _check_num_items(check, num_items, reduction, device)
    ignore_index = check.integer("ignore_index", ignore_index)
    if sparse:
        if divergence != "forward":
            check.value_error("divergence", "must be 'forward' with a top-k teacher", repr(divergence))
        topk_convention = check.choice("topk_convention", topk_convention, TOPK_CONVENTIONS)
        if topk_convention == "tail" and temperature != 1.0:
            check.value_error("temperature", "must be 1 with topk_convention='tail' (the tail mass at another "
                              "temperature cannot be recovered from top-k log-probabilities)", temperature)
    if labels is not None:
        check.integers("labels", labels)
        if labels.shape != leading_shape:
            check.value_error("labels", f"must have student_hidden's token shape {tuple(leading_shape)}",
                              f"shape {tuple(labels.shape)}")
        if labels.device != device:
            check.value_error("labels", f"must be on student_hidden's device {device}", f"a tensor on {labels.device}")
    elif hard_weight > 0:
        check.value_error("labels", "must be given when hard_weight > 0 (the cross-entropy needs them)", "None")
    if hard_weight > 0 and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocabulary))
        if bool(bad.any()):
            check.value_error("labels", f"must be in [0, {vocabulary}) or ignore_index ({ignore_index}) when "
                              "hard_weight > 0", f"{labels[bad][0].item()}")
    backend = check.choice("backend", backend, BACKENDS)
    algorithm = check.choice("algorithm", algorithm, ALGORITHMS)

    def tokens(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.reshape(-1, tensor.shape[-1])

    # autocast would round the GEMMs (the logits) to bf16/fp16: the loss forms them in float32 whatever the context
    no_autocast = (torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type)
                   else contextlib.nullcontext())
    with no_autocast:
        if backend != "reference" and not torch.compiler.is_compiling():
            options = chunked.Options(temperature, divergence, beta, skew_alpha, hard_weight, soft_weight,
                                      scale_by_t2, logit_softcap, topk_convention, backend)
            loss = _token_chunked(tokens(student_hidden), student_weight, student_bias, tokens(teacher_hidden),
                                  teacher_weight, teacher_bias, tokens(teacher_topk_logprobs),
                                  tokens(teacher_topk_indices), None if labels is None else labels.reshape(-1),
                                  ignore_index, options, reduction, num_items, algorithm)
        else:
            rows, keep = reference.linear_kd_rows(
                tokens(student_hidden), student_weight, tokens(teacher_hidden), teacher_weight,
                student_bias=student_bias, teacher_bias=teacher_bias,
                teacher_topk_logprobs=tokens(teacher_topk_logprobs),
                teacher_topk_indices=tokens(teacher_topk_indices), topk_convention=topk_convention,
                labels=None if labels is None else labels.reshape(-1), ignore_index=ignore_index,
                temperature=temperature, divergence=divergence, beta=beta, skew_alpha=skew_alpha,
                hard_weight=hard_weight, soft_weight=soft_weight, scale_by_t2=scale_by_t2,
                logit_softcap=logit_softcap)
            loss = reference.reduce_tokens(rows, keep, reduction, num_items)
    return loss.reshape(leading_shape) if reduction == "none" else loss


def _token_chunked(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                   topk_logprobs, topk_indices, labels, ignore_index: int, options, reduction: str, num_items,
                   algorithm: str):
    """The loss of 2-D inputs without the logits: ignored tokens dropped (a differentiable row gather), then
    :class:`~kdkernels.losses.linear_kd_chunked.TokenChunkedLinearKD` with the algorithm's pass; ``"none"``
    scatters the rows back."""
    floats = [t for t in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          topk_logprobs) if t is not None]
    dtype = accumulation_dtype(*floats)
    probe = student_hidden.new_empty((0, student_weight.shape[0]), dtype=dtype)
    options = dataclasses.replace(options, backend=chunked.row_backend(
        options.backend, options.divergence, options.beta, topk_logprobs is not None, probe))
    tokens = student_hidden.shape[0]
    kept = None
    if labels is not None:
        kept = (labels != ignore_index).nonzero().squeeze(1)
        if kept.numel() == tokens:
            kept = None

    def rows_of(tensor):
        return tensor if tensor is None or kept is None else tensor.index_select(0, kept)

    counted = tokens if kept is None else kept.numel()
    if reduction == "none":
        row_weight = None
    elif reduction == "sum":
        row_weight = torch.ones((), dtype=dtype, device=student_hidden.device)
    elif num_items is not None:
        row_weight = torch.as_tensor(num_items, device=student_hidden.device).to(dtype).reciprocal()
    else:
        row_weight = torch.full((), 1.0 / max(counted, 1), dtype=dtype, device=student_hidden.device)
    if algorithm == "auto":
        streams = chunked.chunk_rows(student_weight.shape[0]) < STREAMING_BELOW_ROWS
        algorithm = "vocab-streaming" if streams else "token-chunked"
    run_pass = streaming.streaming_pass if algorithm == "vocab-streaming" else chunked.chunked_pass
    result = chunked.TokenChunkedLinearKD.apply(
        row_weight, run_pass, options, student_weight.shape[0], dtype, rows_of(student_hidden), student_weight, student_bias,
        rows_of(teacher_hidden), teacher_weight, teacher_bias, rows_of(topk_logprobs), rows_of(topk_indices),
        rows_of(labels))
    if reduction == "none" and kept is not None:
        result = result.new_zeros(tokens).index_copy(0, kept, result)
    return result
