"""Triton backend of the ``contrastive`` family: CRD's NCE over a memory bank (spec:
kdkernels/reference/contrastive.py)::

    s_bk = memory[idx_bk] . embed_b / T,   u = s - log Z,   log c = log(noise_mass + eps)
    loss_rows[b] = softplus(log c - u_b0) + sum_{k>=1} (softplus(u_bk - log c) + log c - log noise_mass)
    score_lse[b] = logsumexp_k s_bk
    grad_embed[b] = sum_k w_bk memory[idx_bk] / T,  w_b0 = -sigmoid(log c - u_b0),  w_bk = sigmoid(u_bk - log c)

Custom op ``kdkernels::triton_crd_nce_forward`` with the schema of the C++ op in csrc/kdkernels.cpp; autograd is
registered by kdkernels/ops/contrastive.py. One program per (row, block of BLOCK_K contrasts) gathers its memory rows
once into registers and writes partial sums (loss, the logsumexp's (max, sum), the gradient [d]) to a workspace
[B, chunks, ...]; the partials are then added in chunk order (deterministic, no atomics). No B x (K+1) x d tensor.
Out-of-range indices are clamped into [0, N) (no out-of-bounds read) and make their row's loss NaN.
"""

import math

import torch
import triton
import triton.language as tl

from kdkernels.ops._checks import check_crd_nce_forward
from kdkernels.triton._launch import _acc_dtype, _launch_guard, _unit_last_stride

__all__ = ["crd_nce_forward"]

_OP = "triton_crd_nce_forward"
_TILE_ELEMENTS = 8192  # BLOCK_K x BLOCK_D of the gathered tile held by one program


@triton.jit
def _log1p_positive(e):
    """log(1 + e) for 0 <= e <= 1, accurate for tiny e: log(w) e / (w - 1) with w = 1 + e rounded (w - 1 is
    exact), e itself when w rounds to 1."""
    w = 1.0 + e
    return tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))


@triton.jit
def _crd_nce_chunk_kernel(
    embed_ptr,  # [B, d], unit last stride
    memory_ptr,  # [N, d], unit last stride
    index_ptr,  # [B, K+1] contiguous int64
    log_z_ptr,  # 0-dim, ACC
    constants_ptr,  # [3] ACC: (1 / T, log c, log c - log noise_mass)
    loss_ptr,  # [B, chunks] ACC partials
    max_ptr,
    sum_ptr,
    grad_ptr,  # [B, chunks, d] ACC partials (written only when GRAD)
    D,
    contrasts,
    bank,
    chunks,
    stride_e,
    stride_m,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    inv_t = tl.load(constants_ptr).to(ACC)
    log_c = tl.load(constants_ptr + 1).to(ACC)
    negative_shift = tl.load(constants_ptr + 2).to(ACC)
    log_z = tl.load(log_z_ptr).to(ACC)

    ks = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < contrasts
    index = tl.load(index_ptr + row * contrasts + ks, mask=k_mask, other=0)
    bad = k_mask & ((index < 0) | (index >= bank))
    index = tl.minimum(tl.maximum(index, 0), bank - 1)
    ds = tl.arange(0, BLOCK_D)
    d_mask = ds < D
    v = tl.load(embed_ptr + row * stride_e + ds, mask=d_mask, other=0.0).to(ACC)
    rows = tl.load(memory_ptr + index[:, None] * stride_m + ds[None, :], mask=k_mask[:, None] & d_mask[None, :],
                   other=0.0).to(ACC)
    s = tl.sum(rows * v[None, :], axis=1) * inv_t

    positive = ks == 0
    u = s - log_z
    z = tl.where(positive, log_c - u, u - log_c)
    e = tl.exp(-tl.abs(z))
    softplus = tl.maximum(z, 0.0) + _log1p_positive(e)
    sigmoid = tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
    terms = tl.where(k_mask, softplus + tl.where(positive, 0.0, negative_shift), 0.0)
    loss = tl.sum(terms, axis=0)
    loss = tl.where(tl.sum(bad.to(tl.int32), axis=0) > 0, float("nan"), loss)

    masked_s = tl.where(k_mask, s, float("-inf"))
    s_max = tl.max(masked_s, axis=0)
    shift = tl.where(s_max == float("-inf"), 0.0, s_max)
    s_sum = tl.sum(tl.where(k_mask, tl.exp(masked_s - shift), 0.0), axis=0)

    out = row * chunks + chunk
    tl.store(loss_ptr + out, loss)
    tl.store(max_ptr + out, s_max)
    tl.store(sum_ptr + out, s_sum)
    if GRAD:
        w = tl.where(k_mask, tl.where(positive, -sigmoid, sigmoid), 0.0) * inv_t
        grad = tl.sum(w[:, None] * rows, axis=0)
        tl.store(grad_ptr + out * D + ds, grad, mask=d_mask)


def _outputs(embed: torch.Tensor, embed_grad: bool):
    acc = _acc_dtype(embed)
    batch = embed.shape[0]
    grad = torch.empty(embed.shape if embed_grad else (0,), dtype=embed.dtype, device=embed.device)
    return (torch.empty(batch, dtype=acc, device=embed.device), torch.empty(batch, dtype=acc, device=embed.device),
            grad)


def _blocks(features: int, contrasts: int):
    block_d = triton.next_power_of_2(features)
    block_k = max(16, min(triton.next_power_of_2(contrasts), _TILE_ELEMENTS // block_d))
    return block_k, block_d


def _combine_logsumexp(maxima: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Row logsumexp [B] from the chunks' (max, sum exp(s - max)) [B, chunks]."""
    row_max = maxima.amax(dim=1)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    return shift + torch.log((sums * torch.exp(maxima - shift[:, None])).sum(dim=1))


@torch.library.custom_op("kdkernels::triton_crd_nce_forward", mutates_args=())
def crd_nce_forward(
    embed: torch.Tensor,
    memory: torch.Tensor,
    contrast_indices: torch.Tensor,
    log_normalizer: torch.Tensor,
    temperature: float,
    noise_mass: float,
    eps: float,
    embed_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: (loss_rows [B], score_lse [B]) in the accumulation dtype and grad_embed (embed's dtype, or
    empty [0] when not requested)."""
    check_crd_nce_forward(_OP, embed, memory, contrast_indices, log_normalizer, temperature, noise_mass, eps)
    acc = _acc_dtype(embed)
    batch, features = embed.shape
    contrasts = contrast_indices.shape[1]
    block_k, block_d = _blocks(features, contrasts)
    chunks = triton.cdiv(contrasts, block_k)
    new = dict(dtype=acc, device=embed.device)
    loss_part, max_part, sum_part = (torch.empty((batch, chunks), **new) for _ in range(3))
    grad_part = torch.empty((batch, chunks, features) if embed_grad else (1,), **new)
    log_c = math.log(noise_mass + eps)
    constants = torch.tensor([1.0 / temperature, log_c, log_c - math.log(noise_mass)], **new)
    embed_rows, memory_rows = _unit_last_stride(embed), _unit_last_stride(memory)
    with _launch_guard(embed):
        _crd_nce_chunk_kernel[(batch, chunks)](
            embed_rows, memory_rows, contrast_indices.contiguous(), log_normalizer, constants,
            loss_part, max_part, sum_part, grad_part,
            features, contrasts, memory.shape[0], chunks, embed_rows.stride(0), memory_rows.stride(0),
            BLOCK_K=block_k, BLOCK_D=block_d, ACC=tl.float64 if acc == torch.float64 else tl.float32,
            GRAD=bool(embed_grad), num_warps=4,
        )
    _, _, grad = _outputs(embed, embed_grad)
    if embed_grad:
        grad = grad_part.sum(dim=1).to(embed.dtype)
    return loss_part.sum(dim=1), _combine_logsumexp(max_part, sum_part), grad


