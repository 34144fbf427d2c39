"""The ``crd_nce`` op: CRD's NCE loss rows of embeddings against rows of a memory bank.

``crd_nce_forward(embed, memory, contrast_indices, log_normalizer, T, noise_mass, eps, embed_grad) -> (loss_rows [B],
score_lse [B], grad_embed)``: the kernel computes d sum(loss_rows) / d embed in the same pass (each gathered memory
row is read once and never stored), so the autograd backward is ``grad_loss_rows[:, None] * grad_embed``. The memory
bank is a constant (no gradient); score_lse (for RepDistiller's Z) is not differentiable.
Spec: kdkernels/reference/contrastive.py.
"""
from __future__ import annotations

import torch

from kdkernels.ops._checks import check_crd_nce_forward
from kdkernels.ops._registration import OpSpec, accumulation_dtype, empty_gradient_like, forward_op, register
from kdkernels.reference import contrastive as reference

OP = "crd_nce"


def _fake_forward(op, embed, memory, contrast_indices, log_normalizer, temperature, noise_mass, eps, embed_grad):
    check_crd_nce_forward(op, embed, memory, contrast_indices, log_normalizer, temperature, noise_mass, eps)
    acc = accumulation_dtype(embed)
    batch = embed.shape[0]
    return (embed.new_empty((batch,), dtype=acc), embed.new_empty((batch,), dtype=acc),
            empty_gradient_like(embed, embed_grad))


def _setup_context(ctx, inputs, output):
    _loss_rows, score_lse, grad_embed = output
    ctx.save_for_backward(grad_embed)
    ctx.mark_non_differentiable(score_lse, grad_embed)


def _backward(ctx, grad_loss_rows, _grad_score_lse, _grad_grad_embed):
    (grad_embed,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        if grad_embed.dim() != 2:
            raise RuntimeError("crd_nce_forward was called with embed_grad=False, so it has no gradient for embed; "
                               "call it with embed_grad=True when embed requires grad")
        grad = (grad_loss_rows[:, None] * grad_embed).to(grad_embed.dtype)
    return grad, None, None, None, None, None, None, None


register(OpSpec(OP, _fake_forward, _setup_context, lambda _no_backward_op: _backward))


def crd_nce(embed: torch.Tensor, memory: torch.Tensor, contrast_indices: torch.Tensor, log_normalizer: torch.Tensor,
            temperature: float, noise_mass: float, eps: float, backend: str):
    """(loss_rows [B], score_lse [B]) on the named backend; loss_rows is differentiable w.r.t. embed.

    ``log_normalizer`` is log Z (any float dtype; taken in the accumulation dtype)."""
    log_normalizer = log_normalizer.to(accumulation_dtype(embed))
    if backend == "reference":
        return reference.crd_nce(embed, memory, contrast_indices, log_normalizer, temperature, noise_mass, eps)
    embed_grad = embed.requires_grad and torch.is_grad_enabled()
    loss_rows, score_lse, _ = forward_op(OP, backend)(embed, memory, contrast_indices, log_normalizer,
                                                          temperature, noise_mass, eps, embed_grad)
    return loss_rows, score_lse
