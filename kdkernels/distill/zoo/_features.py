"""RepDistiller's forward contract, shared by the zoo: ``model(x)`` gives the logits, ``model(x, is_feat=True)``
gives ``([stem, stage outputs…, pooled embedding], logits)``, and ``preact=True`` swaps the stage outputs for the
pre-activation ones, read through the taps that the model's ``kd_points.pre_activation`` declare (so the two never
disagree)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kdkernels.distill.hooks import FeatureTaps

Run = Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


def feature_forward(model: nn.Module, run: Run, x: torch.Tensor, is_feat: bool, preact: bool):
    """The official return value, from ``run(x) -> ([stem, stage outputs…, embedding], logits)``."""
    if not is_feat:
        return run(x)[1]
    if not preact:
        return run(x)
    taps = model.kd_points.pre_activation
    hooks = FeatureTaps(model, taps, type(model).__name__)
    try:
        features, logits = run(x)
        values = hooks.pop()
    finally:
        hooks.remove()
    return [features[0], *(values[tap] for tap in taps), features[-1]], logits
