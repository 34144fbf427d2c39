"""Pure-PyTorch reference for the ``logsoftmax_gather`` op: the student side of sparse (top-k) teachers.

For 2-D logits ``x`` [N, V], indices [N, k] and temperature T::

    gathered[n, j] = log_softmax(x[n] / T)[indices[n, j]]

Gradient (``g`` [N, k] upstream): ``d/dx[n, c] = 1/T (sum_j g[n, j] [indices[n, j] == c] - p[n, c] sum_j g[n, j])``
with ``p = softmax(x / T)``; a repeated index receives the sum of its upstream gradients. A row that is entirely
``-inf`` gathers ``-inf`` and gets a zero gradient. Accumulation: float64 for float64 logits, else float32.
"""

from __future__ import annotations

import torch

from kdkernels._validation import accumulation_dtype


def logsoftmax_gather(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) gathered at ``indices`` -> [N, k]; differentiable with respect to the logits."""
    x = logits.to(accumulation_dtype(logits)) / temperature
    empty = torch.isneginf(x).all(dim=-1, keepdim=True)
    x = torch.where(empty, torch.zeros_like(x), x)
    gathered = torch.log_softmax(x, dim=-1).gather(-1, indices.long())
    return torch.where(empty, torch.full_like(gathered, float("-inf")), gathered)
