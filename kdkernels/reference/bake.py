"""BAKE's official ``knowledge_ensemble`` and ``KDLoss`` (yxgeee/BAKE ``small_scale/train.py``; methods.md §1.14),
as the reference repository writes them: an explicit ``torch.inverse`` and a ``-1e9`` self-affinity mask, in the
inputs' dtype. The baselines of kdkernels/bake.py's tests and benchmarks::

    W = softmax_row(f f^T - 1e9 I),   W = (1 - omega) inverse(I - omega W),   Q = W softmax(z / T)
    loss = kl_div(log_softmax(z / T), Q, "sum") * T^2 / B
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def eager_bake_targets(features: torch.Tensor, logits: torch.Tensor, temperature: float = 4.0,
                       omega: float = 0.5) -> torch.Tensor:
    batch_size = logits.size(0)
    masks = torch.eye(batch_size, dtype=logits.dtype, device=logits.device)
    feats = F.normalize(features.reshape(batch_size, -1), p=2, dim=1)
    probs = F.softmax(logits / temperature, dim=1)
    W = torch.matmul(feats, feats.permute(1, 0)) - masks * 1e9
    W = F.softmax(W, dim=1)
    W = (1 - omega) * torch.inverse(torch.eye(batch_size, dtype=logits.dtype, device=logits.device) - omega * W)
    return torch.matmul(W, probs)


def eager_bake_loss(logits: torch.Tensor, features: torch.Tensor, temperature: float = 4.0,
                    omega: float = 0.5) -> torch.Tensor:
    with torch.no_grad():
        targets = eager_bake_targets(features.detach(), logits.detach(), temperature, omega)
    log_p = torch.log_softmax(logits / temperature, dim=1)
    return F.kl_div(log_p, targets, reduction="sum") * (temperature ** 2) / logits.size(0)
