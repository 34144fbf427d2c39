"""The vocabulary-streaming algorithm of ``linear_kd_loss``: memory independent of V (Cut Cross-Entropy's idea
applied to two distributions). A block of token rows (``STREAM_ROWS``) meets the vocabulary one ``[rows, V_tile]``
float32 tile at a time, the logits recomputed in each pass instead of kept::

    pass 1   lse = logsumexp_v(z_v / T) per side, online over the tiles (and logsumexp_v z_v for the hard CE)
    pass 2   rows = Σ_tiles D(z_s/T − lse_s, z_t/T − lse_t)                 (D is a sum of elementwise terms)
             S = Σ_v ∂D/∂(log p_v) per side                                  (the normaliser's share of the gradient)
    pass 3   ∂rows/∂a_v = ∂D/∂(log p_v) − p_v · S, a = z/T, then the soft cap's and the GEMMs' chain rule:
             ∂x[block] += dz @ W[tile]      ∂W[tile] += dz^T @ x[block]      ∂b[tile] += Σ_rows dz

Pass 3 runs autograd on a surrogate per tile, ``D(a − lse) − S · Σ_v exp(a_v − lse)`` with ``lse`` and ``S``
constants, whose gradient is exactly the one above. The classes a row reads individually (a top-k teacher's indices,
the hard CE's label) are projected once per block from the gathered weight rows (``x · W[idx]``), outside the tiles:
the top-k KL needs only ``log p_s`` there, and the CE's ``−z[label]``. Ignored rows are dropped before any GEMM, as in
the token-chunked algorithm.

Cost: the forward GEMM of each side runs three times (passes 1–3) against once in the token-chunked algorithm, so
this is the choice where a ``[chunk, V]`` tile would hold too few rows for efficient GEMMs (very large V); see
``linear_kd_loss``'s ``algorithm``. Memory beyond the returned gradients: a few ``TILE_ELEMENTS`` tiles and
``[n]`` row statistics, whatever V is.
"""
from __future__ import annotations

import torch

from kdkernels.losses import linear_kd_chunked as chunked
from kdkernels.losses._log_space import topk_teacher_kl
from kdkernels.losses.kd import soft_cap
from kdkernels.reference import linear_kd as reference

# token rows per block: the GEMMs' M dimension; the vocabulary tile is TILE_ELEMENTS // rows columns
STREAM_ROWS = 1024


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else soft_cap(logits, cap)


class _StreamSide(chunked._Side):
    """One model's projection, read a [rows, V_tile] tile (or the gathered classes of each row) at a time."""

    def tile_logits(self, block: slice, columns: slice) -> torch.Tensor:
        bias = None if self.used_bias is None else self.used_bias[columns]
        return torch.nn.functional.linear(self.hidden[block].to(self.dtype), self.used_weight[columns], bias)

    def gathered_logits(self, block: slice, indices: torch.Tensor) -> torch.Tensor:
        """``z[r, j] = x[r] · W[indices[r, j]] + b[indices[r, j]]`` for [rows, k] indices."""
        logits = torch.einsum("rh,rkh->rk", self.hidden[block].to(self.dtype), self.used_weight[indices])
        return logits if self.used_bias is None else logits + self.used_bias[indices]

    def accumulate_tile(self, block: slice, columns: slice, grad_logits: torch.Tensor, first: bool) -> None:
        if self.grad_hidden is not None:
            update = grad_logits @ self.used_weight[columns]
            if first:
                self.block_grad = update
            else:
                self.block_grad += update
        if self.grad_weight is not None:
            self.grad_weight[columns].addmm_(grad_logits.t(), self.hidden[block].to(self.dtype))
        if self.grad_bias is not None:
            self.grad_bias[columns] += grad_logits.sum(0)

    def accumulate_gathered(self, block: slice, indices: torch.Tensor, grad_logits: torch.Tensor) -> None:
        """The gradient of [rows, k] gathered logits into the block's hidden rows and the weight rows they read."""
        if self.grad_hidden is not None:
            self.block_grad += torch.einsum("rk,rkh->rh", grad_logits, self.used_weight[indices])
        flat = indices.reshape(-1)
        if self.grad_weight is not None:
            hidden = self.hidden[block].to(self.dtype)
            contributions = (grad_logits.unsqueeze(-1) * hidden.unsqueeze(1)).reshape(-1, hidden.shape[1])
            self.grad_weight.index_add_(0, flat, contributions)
        if self.grad_bias is not None:
            self.grad_bias.index_add_(0, flat, grad_logits.reshape(-1))

    def finish_block(self, block: slice) -> None:
        if self.grad_hidden is not None:
            self.grad_hidden[block] = self.block_grad.to(self.hidden.dtype)


def _tiles(vocabulary: int, rows: int):
    width = max(1, chunked.TILE_ELEMENTS // max(rows, 1))
    return [slice(start, min(start + width, vocabulary)) for start in range(0, vocabulary, width)]


def _log_sum_exp(side: _StreamSide, block: slice, tiles, scale: float, cap, at_unit: bool):
    """Pass 1: logsumexp over the vocabulary of the capped logits / T (and of the capped logits, for the CE)."""
    lse = unit = None
    for columns in tiles:
        capped = _capped(side.tile_logits(block, columns), cap)
        part = torch.logsumexp(capped * scale, dim=-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
        if at_unit:
            part = torch.logsumexp(capped, dim=-1)
            unit = part if unit is None else torch.logaddexp(unit, part)
    return lse, unit


def streaming_pass(tensors: dict, options: chunked.Options, vocabulary: int, dtype: torch.dtype,
                   row_weights: torch.Tensor | None):
    """:func:`~kdkernels.losses.linear_kd_chunked.chunked_pass`'s contract, by vocabulary streaming: rows [n] and,
    with ``row_weights``, the gradients of ``Σ row_weights · rows``."""
    grads = row_weights is not None
    student = _StreamSide(tensors["student_hidden"], tensors["student_weight"], tensors["student_bias"], vocabulary,
                          dtype, grads)
    sparse = tensors["topk_logprobs"] is not None
    teacher = None if sparse else _StreamSide(tensors["teacher_hidden"], tensors["teacher_weight"],
                                              tensors["teacher_bias"], vocabulary, dtype, grads)
    labels = tensors["labels"]
    hard = options.hard_weight != 0.0
    scale, cap = 1.0 / options.temperature, options.logit_softcap
    factor = options.soft_weight * (options.temperature ** 2 if options.scale_by_t2 else 1.0)
    n = student.hidden.shape[0]
    rows_out = torch.empty(n, dtype=dtype, device=student.hidden.device)
    block_rows = max(1, min(n, STREAM_ROWS))
    tiles = _tiles(vocabulary, block_rows)
    for start in range(0, n, block_rows):
        block = slice(start, min(start + block_rows, n))
        lse_s, lse_unit = _log_sum_exp(student, block, tiles, scale, cap, hard)
        lse_t = None if sparse else _log_sum_exp(teacher, block, tiles, scale, cap, False)[0]
        soft, sums = _divergence_pass(student, teacher, block, tiles, lse_s, lse_t, options, sparse, tensors)
        rows = factor * soft
        if hard:
            label = labels[block].long().unsqueeze(-1)
            label_logit = _capped(student.gathered_logits(block, label), cap).squeeze(-1)
            rows = rows + options.hard_weight * (lse_unit - label_logit)
        rows_out[block] = rows
        if grads:
            weights = row_weights if row_weights.dim() == 0 else row_weights[block]
            weights = weights.to(dtype).expand(rows.shape)
            _gradient_pass(student, teacher, block, tiles, (lse_s, lse_t, lse_unit), sums, weights, factor,
                           options, sparse, tensors)
    teacher_grads = (None, None, None) if teacher is None else teacher.gradients()
    return rows_out, student.gradients() + teacher_grads


def _topk_rows(log_p_student_topk: torch.Tensor, block: slice, options: chunked.Options, tensors: dict):
    return topk_teacher_kl(log_p_student_topk, tensors["topk_logprobs"][block], options.temperature,
                           options.topk_convention)


def _divergence_pass(student, teacher, block, tiles, lse_s, lse_t, options, sparse, tensors):
    """Pass 2: the soft rows and ``S = Σ_v ∂D/∂log p_v`` of each side (``None`` for a side without gradients)."""
    scale, cap = 1.0 / options.temperature, options.logit_softcap
    if sparse:
        indices = tensors["topk_indices"][block].long()
        log_p = (_capped(student.gathered_logits(block, indices), cap) * scale - lse_s.unsqueeze(-1))
        if not student.wants:
            return _topk_rows(log_p, block, options, tensors), (None, None)
        with torch.enable_grad():
            log_p.requires_grad_(True)
            soft = _topk_rows(log_p, block, options, tensors)
            (partial,) = torch.autograd.grad(soft.sum(), log_p)
        return soft.detach(), (partial.sum(-1), None)
    soft = torch.zeros_like(lse_s)
    sum_s = torch.zeros_like(lse_s) if student.wants else None
    sum_t = torch.zeros_like(lse_t) if teacher.wants else None
    for columns in tiles:
        log_p_s = _capped(student.tile_logits(block, columns), cap) * scale - lse_s.unsqueeze(-1)
        log_p_t = _capped(teacher.tile_logits(block, columns), cap) * scale - lse_t.unsqueeze(-1)
        leaves = [t.requires_grad_(True) for t, wanted in ((log_p_s, student.wants), (log_p_t, teacher.wants))
                  if wanted]
        with torch.set_grad_enabled(bool(leaves)):
            part = reference.divergence_rows(log_p_s, log_p_t, options.divergence, options.beta, options.skew_alpha)
            partials = iter(torch.autograd.grad(part.sum(), leaves)) if leaves else None
        soft += part.detach()
        if leaves:
            if student.wants:
                sum_s += next(partials).sum(-1)
            if teacher.wants:
                sum_t += next(partials).sum(-1)
    return soft, (sum_s, sum_t)


def _gradient_pass(student, teacher, block, tiles, lses, sums, weights, factor, options, sparse, tensors):
    """Pass 3: the gradients of ``Σ weights · rows`` of one block into every side that wants them."""
    lse_s, lse_t, lse_unit = lses
    sum_s, sum_t = sums
    scale, cap = 1.0 / options.temperature, options.logit_softcap
    hard = options.hard_weight != 0.0
    soft_weights = weights * factor
    for index, columns in enumerate(tiles):
        z_s = student.tile_logits(block, columns) if student.wants else None
        z_t = teacher.tile_logits(block, columns) if teacher is not None and teacher.wants else None
        if z_s is None and z_t is None:
            break
        with torch.enable_grad():
            leaves = [z for z in (z_s, z_t) if z is not None]
            for z in leaves:
                z.requires_grad_(True)
            surrogate = 0.0
            log_p_s = None
            if z_s is not None:
                capped_s = _capped(z_s, cap)
                log_p_s = capped_s * scale - lse_s.unsqueeze(-1)
                surrogate = -(soft_weights * sum_s * log_p_s.exp().sum(-1)).sum()
                if hard:
                    surrogate = surrogate + (weights * options.hard_weight
                                             * (capped_s - lse_unit.unsqueeze(-1)).exp().sum(-1)).sum()
            if not sparse:
                log_p_t = _capped(teacher.tile_logits(block, columns) if z_t is None else z_t, cap) * scale
                log_p_t = log_p_t - lse_t.unsqueeze(-1)
                if log_p_s is None:
                    log_p_s = (_capped(student.tile_logits(block, columns), cap) * scale - lse_s.unsqueeze(-1))
                divergence = reference.divergence_rows(log_p_s, log_p_t, options.divergence, options.beta,
                                                       options.skew_alpha)
                surrogate = surrogate + (soft_weights * divergence).sum()
                if z_t is not None:
                    surrogate = surrogate - (soft_weights * sum_t * log_p_t.exp().sum(-1)).sum()
            tile_grads = iter(torch.autograd.grad(surrogate, leaves))
        if z_s is not None:
            student.accumulate_tile(block, columns, next(tile_grads), index == 0)
        if z_t is not None:
            teacher.accumulate_tile(block, columns, next(tile_grads), index == 0)
    if student.wants:
        gathered = []
        if sparse:
            gathered.append(tensors["topk_indices"][block].long())
        if options.hard_weight != 0.0:
            gathered.append(tensors["labels"][block].long().unsqueeze(-1))
        if gathered:
            indices = torch.cat(gathered, dim=-1)
            z = student.gathered_logits(block, indices)
            with torch.enable_grad():
                z.requires_grad_(True)
                capped = _capped(z, cap)
                surrogate = 0.0
                if sparse:
                    k = gathered[0].shape[-1]
                    log_p = capped[:, :k] * scale - lse_s.unsqueeze(-1)
                    surrogate = (soft_weights * _topk_rows(log_p, block, options, tensors)).sum()
                if hard:
                    surrogate = surrogate - (weights * options.hard_weight * capped[:, -1]).sum()
                (grad,) = torch.autograd.grad(surrogate, z)
            student.accumulate_gathered(block, indices, grad)
        student.finish_block(block)
    if teacher is not None and teacher.wants:
        teacher.finish_block(block)
