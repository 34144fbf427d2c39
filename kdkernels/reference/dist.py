"""Pure-PyTorch reference for the ``dist`` op: the executable specification of DIST's Pearson terms.

DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022; hunto/image_classification_sota
``lib/models/losses/dist_kd.py``) compares the softmax probabilities ``y_s = softmax(s / T)`` and
``y_t = softmax(t / T)`` of a batch [N, V] by Pearson correlation, twice::

    cos(a, b)      = sum(a * b) / (||a||_2 * ||b||_2 + 1e-8)
    pearson(a, b)  = cos(a - mean(a), b - mean(b))
    row_pearson[n] = pearson(y_s[n, :], y_t[n, :])      # inter-class relation, one per sample
    col_pearson[c] = pearson(y_s[:, c], y_t[:, c])      # intra-class relation, one per class, across the batch

and the loss is ``beta T^2 (1 - mean(row_pearson)) + gamma T^2 (1 - mean(col_pearson))``. The op returns the two
Pearson vectors; the loss is assembled by kdkernels.losses.dist_loss.

Gradients: for r = S_ab / D with S_ab = sum(a b), S_aa = sum(a^2), S_bb = sum(b^2), D = sqrt(S_aa) sqrt(S_bb) + eps,
``dr/da = b / D - S_ab sqrt(S_bb) / (sqrt(S_aa) D^2) a`` (0 for the second term when S_aa = 0, as torch's norm
backward), then the softmax backward ``d/ds = 1/T y_s (g - sum(g y_s))`` per row. Here they come from autograd.
Accumulation is float64 for float64 inputs, else float32.
"""

from __future__ import annotations

import torch

from kdkernels._validation import accumulation_dtype

EPS = 1e-8


def _centred_cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + EPS)


def dist_pearson(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """(row_pearson [N], col_pearson [V]) of 2-D logits [N, V]; differentiable with respect to both inputs."""
    acc = accumulation_dtype(student, teacher)
    y_s = torch.softmax(student.to(acc) / temperature, dim=-1)
    y_t = torch.softmax(teacher.to(acc) / temperature, dim=-1)
    return _centred_cosine(y_s, y_t, dim=1), _centred_cosine(y_s, y_t, dim=0)


def eager_dist(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
               temperature: float = 1.0) -> torch.Tensor:
    """DIST as DIST_KD's ``dist_kd.py`` writes it, in the inputs' dtype: the baseline of the benchmarks."""
    y_s = (student / temperature).softmax(dim=1)
    y_t = (teacher / temperature).softmax(dim=1)
    inter = 1 - _centred_cosine(y_s, y_t, dim=1).mean()
    intra = 1 - _centred_cosine(y_s.transpose(0, 1), y_t.transpose(0, 1), dim=1).mean()
    return beta * temperature ** 2 * inter + gamma * temperature ** 2 * intra
