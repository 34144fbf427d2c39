"""The token-chunked algorithm of ``linear_kd_loss``: the ``[N, V]`` logits are never held, only one ``[chunk, V]``
tile per side.

For each tile of token rows (ignored rows were dropped before, so they cost no GEMM)::

    z_s = x_s[tile] @ W_s[:V]^T + b_s          z_t = x_t[tile] @ W_t[:V]^T + b_t     (float32 tiles, ATen GEMMs)
    rows = soft_weight · D(z_s, z_t) (· T²) + hard_weight · CE(z_s)                 (the fused row kernels)
    dz_s = ∂ Σ_i w_i rows_i / ∂ z_s                                                  (the row kernels' backward)
    ∂x_s[tile] = dz_s @ W_s[:V]      ∂W_s[:V] += dz_s^T @ x_s[tile]      ∂b_s[:V] += Σ_rows dz_s

and the same for the teacher when it requires grad: the four GEMMs the work cannot avoid (two forward, two for the
gradients) and no more. ``D`` runs on the fused ``softmax_kl`` kernels for forward, reverse, symmetric and JSD, and
on ``logsoftmax_gather`` for a top-k teacher (on the backend the caller picks: C++ on CPU, CUDA, Triton); skew KL,
TVD, the soft cap and the hard cross-entropy are torch ops on the tile (``kdkernels.reference.linear_kd``).

With a scalar reduction the weights ``w`` are known in the forward (1, or 1 / the divisor), so the gradients are
formed there, tile by tile, and the backward only scales them by the upstream scalar (as Liger-Kernel's fused
linear losses do). With ``reduction="none"`` the upstream gradient is per token: the forward computes the rows only
and the backward recomputes each tile's logits (two extra GEMMs) with ``w`` = the upstream gradient; so does a
second backward through a retained graph.

The row math runs ``ROW_SLICE`` rows at a time and writes each slice's logits gradient over its logits, so a tile's
gradient needs no buffer of its own. Memory beyond the returned gradients: one tile per side, ``TILE_ELEMENTS``
float32 elements each, the row math's temporaries of ``ROW_SLICE`` rows, plus float32 copies of the weights when they are float16/bfloat16 (the tiles are
formed in float32, never rounded to the input precision before the softmax) and a float32 accumulator of a
low-precision weight's gradient.
"""
from __future__ import annotations

import dataclasses

import torch

from kdkernels import backends
from kdkernels.losses.kd import divergence_rows as fused_divergence_rows
from kdkernels.losses.kd import soft_cap, topk_kl_rows
from kdkernels.reference import linear_kd as reference

# float32 elements of one [chunk, V] logits tile: 2^22 = 16 MiB, so chunk = 2^22 // V rows (131 at V = 32000)
TILE_ELEMENTS = 1 << 22
# rows of a tile whose row math (and its autograd temporaries) runs at a time; their gradients overwrite the logits
ROW_SLICE = 16
FUSED_DIVERGENCES = ("forward", "reverse", "jsd", "symmetric")


@dataclasses.dataclass(frozen=True)
class Options:
    """The loss's validated scalars, as linear_kd_loss passes them."""
    temperature: float
    divergence: str
    beta: float
    skew_alpha: float
    hard_weight: float
    soft_weight: float
    scale_by_t2: bool
    logit_softcap: float | None
    topk_convention: str
    backend: str           # the row kernels' backend ("cpu", "cuda", "triton", "reference"; "torch": torch ops)


def chunk_rows(vocabulary: int) -> int:
    return max(1, TILE_ELEMENTS // max(vocabulary, 1))


def row_backend(requested: str, divergence: str, beta: float, sparse: bool, probe: torch.Tensor) -> str:
    """The backend of the row kernels (``"torch"`` for the divergences they do not have), checked on ``probe``, an
    empty tile of the logits' dtype and device, before any GEMM runs."""
    if sparse:
        return backends.select_backend(requested, probe, required_ops=("logsoftmax_gather",))
    if divergence not in FUSED_DIVERGENCES:
        return "torch"
    needs_jsd = divergence == "jsd" and 0.0 < beta < 1.0
    return backends.select_backend(requested, probe, probe,
                                   required_ops=("softmax_jsd",) if needs_jsd else ("softmax_kl",))


def tile_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, topk: tuple | None,
              labels: torch.Tensor | None, options: Options) -> torch.Tensor:
    """The per-token loss of one tile of logits (differentiable), ``rows`` of the module docstring."""
    cap = options.logit_softcap
    student = student_logits if cap is None else soft_cap(student_logits, cap)
    if topk is not None:
        logprobs, indices = topk
        soft = topk_kl_rows(student, logprobs, indices, options.temperature, options.topk_convention,
                           options.backend)
    else:
        teacher = teacher_logits if cap is None else soft_cap(teacher_logits, cap)
        if options.backend == "torch":
            soft = reference.divergence_rows(reference.log_probabilities(student, options.temperature),
                                             reference.log_probabilities(teacher, options.temperature),
                                             options.divergence, options.beta, options.skew_alpha)
        else:
            soft = fused_divergence_rows(student, teacher, options.temperature, options.divergence,
                                         options.backend, options.beta)
    factor = options.soft_weight * (options.temperature ** 2 if options.scale_by_t2 else 1.0)
    rows = soft * factor if factor != 1.0 else soft
    if options.hard_weight != 0.0:
        keep = torch.ones_like(labels, dtype=torch.bool)
        rows = rows + options.hard_weight * reference.cross_entropy_rows(student, labels, keep)
    return rows


class _Side:
    """One model's projection: hidden [n, H], weight [V_w, H] (rows >= V unused), bias, and where its gradients
    accumulate."""

    def __init__(self, hidden, weight, bias, vocabulary: int, dtype: torch.dtype, grads: bool):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.used_weight = weight[:vocabulary].to(dtype)
        self.used_bias = None if bias is None else bias[:vocabulary].to(dtype)
        self.dtype, self.vocabulary = dtype, vocabulary
        self.wants = grads and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        if self.wants:
            self.grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
            self.grad_weight = (torch.zeros(vocabulary, weight.shape[1], dtype=dtype, device=weight.device)
                                if weight.requires_grad else None)
            self.grad_bias = (torch.zeros(vocabulary, dtype=dtype, device=weight.device)
                              if bias is not None and bias.requires_grad else None)

    def logits(self, tile: slice) -> torch.Tensor:
        return torch.nn.functional.linear(self.hidden[tile].to(self.dtype), self.used_weight, self.used_bias)

    def accumulate(self, tile: slice, grad_logits: torch.Tensor) -> None:
        if self.grad_hidden is not None:
            self.grad_hidden[tile] = (grad_logits @ self.used_weight).to(self.hidden.dtype)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(grad_logits.t(), self.hidden[tile].to(self.dtype))
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(0)

    def gradients(self) -> tuple:
        """(hidden, weight, bias) gradients in the inputs' dtypes; padded weight rows get exact zeros."""
        if not self.wants:
            return None, None, None

        def full(grad, tensor):
            if grad is None:
                return None
            if tensor.shape[0] == self.vocabulary:
                return grad.to(tensor.dtype)
            padded = torch.zeros_like(tensor)
            padded[:self.vocabulary] = grad
            return padded

        return self.grad_hidden, full(self.grad_weight, self.weight), full(self.grad_bias, self.bias)


def chunked_pass(tensors: dict, options: Options, vocabulary: int, dtype: torch.dtype,
                 row_weights: torch.Tensor | None):
    """Rows [n] (no grad) and, when ``row_weights`` (a scalar or [n]) is given, the gradients of
    ``Σ row_weights · rows`` for every input that requires grad: (student (hidden, weight, bias), teacher (...))."""
    grads = row_weights is not None
    student = _Side(tensors["student_hidden"], tensors["student_weight"], tensors["student_bias"], vocabulary, dtype,
                    grads)
    sparse = tensors["topk_logprobs"] is not None
    teacher = None if sparse else _Side(tensors["teacher_hidden"], tensors["teacher_weight"],
                                        tensors["teacher_bias"], vocabulary, dtype, grads)
    labels = tensors["labels"]
    n = student.hidden.shape[0]
    rows_out = torch.empty(n, dtype=dtype, device=student.hidden.device)
    step = chunk_rows(vocabulary)
    wants = (student.wants, teacher is not None and teacher.wants)
    for start in range(0, n, step):
        tile = slice(start, min(start + step, n))
        z_s = student.logits(tile)
        z_t = None if sparse else teacher.logits(tile)
        for first in range(0, tile.stop - start, ROW_SLICE):
            rows = slice(first, min(first + ROW_SLICE, tile.stop - start))
            tokens = slice(start + rows.start, start + rows.stop)
            topk = None if not sparse else (tensors["topk_logprobs"][tokens], tensors["topk_indices"][tokens])
            weights = None
            if row_weights is not None:
                weights = row_weights if row_weights.dim() == 0 else row_weights[tokens]
            rows_out[tokens] = _slice_rows(z_s, z_t, rows, topk, None if labels is None else labels[tokens],
                                           options, wants, weights)
        if student.wants:
            student.accumulate(tile, z_s)
        if wants[1]:
            teacher.accumulate(tile, z_t)
    teacher_grads = (None, None, None) if teacher is None else teacher.gradients()
    return rows_out, student.gradients() + teacher_grads


def _slice_rows(z_s, z_t, rows: slice, topk, labels, options: Options, wants: tuple[bool, bool], weights):
    """The losses of ``rows`` of a tile; with ``weights``, their logits' gradients written over the logits in place
    (the tile's logits are read once, so each side's tile buffer holds its gradient afterwards)."""
    wants = wants if weights is not None else (False, False)
    student = z_s[rows].detach().requires_grad_(wants[0])
    teacher = None if z_t is None else z_t[rows].detach().requires_grad_(wants[1])
    leaves = [leaf for leaf, wanted in ((student, wants[0]), (teacher, wants[1])) if wanted]
    with torch.set_grad_enabled(bool(leaves)):
        values = tile_rows(student, teacher, topk, labels, options)
        if leaves:
            grads = iter(torch.autograd.grad(values, leaves, weights.to(values.dtype).expand_as(values)))
    if wants[0]:
        z_s[rows] = next(grads)
    if wants[1]:
        z_t[rows] = next(grads)
    return values.detach()


GRADIENT_INPUTS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                   "teacher_bias")


class TokenChunkedLinearKD(torch.autograd.Function):
    """``Σ w · rows`` (``row_weight`` a 0-dim tensor: the scalar reductions) or the rows (``row_weight`` None), by
    ``run_pass``: :func:`chunked_pass`, or the vocabulary-streaming algorithm's pass with the same contract."""

    @staticmethod
    def forward(ctx, row_weight, run_pass, options, vocabulary, dtype, student_hidden, student_weight, student_bias,
                teacher_hidden, teacher_weight, teacher_bias, topk_logprobs, topk_indices, labels):
        tensors = dict(zip(GRADIENT_INPUTS, (student_hidden, student_weight, student_bias, teacher_hidden,
                                             teacher_weight, teacher_bias)),
                       topk_logprobs=topk_logprobs, topk_indices=topk_indices, labels=labels)
        ctx.run_pass, ctx.options, ctx.vocabulary, ctx.dtype = run_pass, options, vocabulary, dtype
        ctx.requires = [t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias,
                                                                    teacher_hidden, teacher_weight, teacher_bias)]
        wants_grads = any(ctx.requires)
        ctx.tensors, ctx.row_weight, ctx.gradients = (tensors if wants_grads else None), row_weight, None
        if row_weight is None:
            rows, _ = run_pass(tensors, options, vocabulary, dtype, None)
            return rows
        rows, ctx.gradients = run_pass(tensors, options, vocabulary, dtype, row_weight if wants_grads else None)
        return (rows * row_weight).sum()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.gradients is not None:
            # the first backward scales the gradients formed in the forward in place (they are this call's own
            # buffers); a second backward through a retained graph recomputes them
            gradients = tuple(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.gradients)
            ctx.gradients = None
        else:
            weights = grad_output if ctx.row_weight is None else ctx.row_weight * grad_output
            _, gradients = ctx.run_pass(ctx.tensors, ctx.options, ctx.vocabulary, ctx.dtype, weights)
        gradients = tuple(g if wanted else None for g, wanted in zip(gradients, ctx.requires))
        return (None, None, None, None, None) + gradients + (None, None, None)
