"""The CIFAR model zoo of RepDistiller's ``models/`` package (the zoo behind mdistiller's CIFAR results), under its
``model_dict`` names: the same parameter names, shapes and forward, so that the teachers those projects publish load
with ``strict=True`` and, under the same parameters, give the official models' logits.

``model(x)`` returns the logits; ``model(x, is_feat=True, preact=False)`` returns ``(features, logits)`` with
features ``[stem, stage outputs…, pooled embedding]`` (``preact=True``: the stage outputs before their last ReLU,
where the official model has them); ``get_feat_modules()`` and ``get_bn_before_relu()`` return the official modules.
Every model carries ``kd_points`` (:class:`~kdkernels.distill.FeaturePoints`): its stage outputs, pre-activation
stage outputs, pooled embedding and classifier as tap paths.
"""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from kdkernels.distill.zoo import (cifar_mobilenet, cifar_resnet, cifar_resnet_v2, cifar_shufflenet, cifar_vgg,
                                   cifar_wrn)

CIFAR_NUM_CLASSES = 100

# in the order of RepDistiller's model_dict
CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    **cifar_resnet.MODELS,
    **cifar_resnet_v2.MODELS,
    **cifar_wrn.MODELS,
    **cifar_vgg.MODELS,
    **cifar_mobilenet.MODELS,
    **cifar_shufflenet.MODELS,
}


def names() -> list[str]:
    """The zoo's model names, in the order of RepDistiller's ``model_dict``."""
    return list(CIFAR_MODELS)


def unknown_name(name: str, known: list[str], zoo: str = "model zoo") -> ValueError:
    """A ValueError naming ``name``, its closest known names and every known name."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown model {name!r} in the {zoo}{hint} Known models: {', '.join(known)}")


def create(name: str, num_classes: int = CIFAR_NUM_CLASSES) -> nn.Module:
    """A freshly initialised zoo model (``num_classes`` outputs)."""
    if name not in CIFAR_MODELS:
        raise unknown_name(name, names(), "CIFAR model zoo")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return CIFAR_MODELS[name](num_classes)
