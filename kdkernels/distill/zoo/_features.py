"""RepDistiller's model contract, shared by the zoo. The forward: ``model(x)`` gives the logits,
``model(x, is_feat=True)`` gives ``([stem, stage outputs…, pooled embedding], logits)``, and ``preact=True`` swaps the
stage outputs for the pre-activation ones, read through the taps that the model's ``kd_points.pre_activation``
declare (so the two never disagree). The module accessors: ``get_feat_modules()`` and ``get_bn_before_relu()``."""
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


class RepDistillerModel(nn.Module):
    """RepDistiller's module accessors, from the paths a model sets in ``__init__``: ``feat_module_paths`` (what
    ``get_feat_modules`` returns: the modules up to the last stage, which its init stages train) and
    ``bn_before_relu_paths`` (the BNs before the stage ReLUs, OFD's margins; ``None`` where the official model
    raises NotImplementedError)."""

    feat_module_paths: list[str]
    bn_before_relu_paths: list[str] | None

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList(self.get_submodule(path) for path in self.feat_module_paths)

    def get_bn_before_relu(self) -> list[nn.Module]:
        if self.bn_before_relu_paths is None:
            raise NotImplementedError(f"{type(self).__name__} has no BN before its stage ReLUs (as the official "
                                      "model, it is not supported as an OFD teacher)")
        return [self.get_submodule(path) for path in self.bn_before_relu_paths]
