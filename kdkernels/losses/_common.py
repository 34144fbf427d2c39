"""Tensor helpers shared by several loss modules: row views, reductions, accumulation, pooling and distances."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCE_CLAMP = 1e-12  # lenscloth/RKD pdist's clamp of squared distances


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with a unit-stride last dim (copies only when the input's last dim is strided)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, logits.shape[-1])


def accumulate(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in its accumulation dtype: float64 stays, everything else becomes float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def reduce_rows(rows: torch.Tensor, reduction: str, *, leading_shape: torch.Size | None = None, elements: int = 1,
                keep: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Reduces per-sample losses [N] (each the sum over `elements` terms), scaled by `scale`.

    "none": the per-sample values, shaped `leading_shape`; "sum"; "batchmean": sum / counted samples; "mean": sum /
    (counted samples * elements). `keep` [N] (bool) marks the counted samples: the others give exactly 0. The count
    stays on the device (no host synchronisation); nothing counted gives 0.
    """
    if reduction == "batchmean" and keep is None:
        total = rows.mean()
        return total * scale if scale != 1.0 else total
    count = rows.shape[0]
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        count = keep.sum().clamp_min(1)
    if reduction == "none":
        rows = rows * scale if scale != 1.0 else rows
        return rows.reshape(leading_shape) if leading_shape is not None else rows
    divisor = {"sum": 1, "batchmean": count, "mean": count * elements}[reduction]
    if isinstance(divisor, torch.Tensor):
        return rows.sum() * scale / divisor
    return rows.sum() * (scale / divisor)


def soft_cross_entropy_rows(targets: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-row ``-sum_c targets * log_probs`` over the last dim."""
    return -(targets * log_probs).sum(dim=-1)


def pool_to_smaller(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's rule for maps of different sizes: adaptive-average-pool the larger map to the smaller one's
    spatial size."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size[0] > t_size[0]:
        student = F.adaptive_avg_pool2d(student, tuple(t_size))
    elif s_size[0] < t_size[0]:
        teacher = F.adaptive_avg_pool2d(teacher, tuple(s_size))
    return student, teacher


def pairwise_distances(x: torch.Tensor, squared: bool) -> torch.Tensor:
    """lenscloth/RKD ``pdist``: ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` clamped at 1e-12, square-rooted unless `squared`,
    diagonal set to 0. ``x`` is flattened per sample."""
    x = x.reshape(x.shape[0], -1)
    norms = x.pow(2).sum(dim=1)
    distances = (norms.unsqueeze(1) + norms.unsqueeze(0) - 2.0 * x @ x.t()).clamp(min=DISTANCE_CLAMP)
    if not squared:
        distances = distances.sqrt()
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return distances * off_diagonal
