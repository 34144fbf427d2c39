"""``torch.nn.Module`` wrappers of the functional losses."""
from __future__ import annotations

import torch

from kdkernels import losses


class KDLoss(torch.nn.Module):
    """Hinton KD loss module: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (or the reverse or symmetric KL); see
    :func:`kdkernels.kd_loss`.

    Example::

        criterion = kdkernels.nn.KDLoss(temperature=4.0)
        loss = criterion(student(x), teacher(x).detach())
    """

    def __init__(self, temperature: float = 1.0, *, reduction: str = "batchmean", scale_by_t2: bool = True,
                 ignore_index: int = -100, divergence: str = "forward", beta: float = 0.5,
                 backend: str = "auto") -> None:
        super().__init__()
        self.temperature = losses._check_temperature(temperature)
        if reduction not in losses.REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(losses.REDUCTIONS)}; got {reduction!r}")
        self.reduction = reduction
        if divergence not in losses.DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(losses.DIVERGENCES)}; got {divergence!r}")
        self.divergence = divergence
        self.beta = beta
        self.scale_by_t2 = scale_by_t2
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return losses.kd_loss(student_logits, teacher_logits, self.temperature, reduction=self.reduction,
                              scale_by_t2=self.scale_by_t2, labels=labels, ignore_index=self.ignore_index,
                              divergence=self.divergence, beta=self.beta, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, divergence={self.divergence!r}, "
                f"backend={self.backend!r}")
