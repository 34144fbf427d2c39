"""Small log-space helpers shared by the losses assembled from per-row terms."""
from __future__ import annotations

import torch


def kl_from_log_probs(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum q (log q - log p) over the last dim, from log-probabilities; a zero-probability q entry adds
    exactly 0, and safe operands keep the backward of the discarded branch free of 0 * inf."""
    q = log_q.exp()
    present = q > 0
    zero = torch.zeros_like(q)
    ratio = torch.where(present, log_q, zero) - torch.where(present, log_p, zero)
    return torch.where(present, q * ratio, zero).sum(dim=-1)
