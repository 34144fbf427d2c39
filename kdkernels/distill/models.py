"""The model zoos by name: :func:`create` builds a model of the CIFAR zoo (RepDistiller's names, parameter names and
forward: :mod:`kdkernels.distill.zoo`) or of the digits zoo below; :func:`names` lists both.

The digits zoo is small, for the built-in ``digits`` data (1×8×8 images, 10 classes): teacher, assistant and student
CNNs, an MLP student, and tiny ViTs (:mod:`kdkernels.distill.zoo.vit`: ``student-vit``, ``student-vit-distilled``
with DeiT's distillation token, ``teacher-vit``; their ``-cifar`` twins take 3×32×32 CIFAR images in 4×4 patches).
Every model carries ``kd_points`` (:class:`FeaturePoints`) so that feature methods know where to hook; nothing in the
distillation code depends on these classes.

CNN layout: three stages ``stage1``..``stage3`` (8×8, 4×4, 2×2), each ``Sequential(conv, bn, relu[, conv, bn,
relu])`` so that the last BN output (``stage<i>.<k>``) is the pre-activation feature; then ``pool`` (global
average), ``flatten`` and ``fc``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kdkernels.distill import zoo
from kdkernels.distill.zoo import vit
from kdkernels.distill.recipe import FeaturePoints

NUM_CLASSES = 10


def _stage(in_channels: int, out_channels: int, stride: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(depth):
        layers += [nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3,
                             stride=stride if index == 0 else 1, padding=1, bias=False),
                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=False)]
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Three conv stages of ``widths`` channels (``depth`` conv-BN-ReLU blocks each), global pooling and a linear
    classifier."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), depth: int = 1,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stage1 = _stage(1, widths[0], 1, depth)
        self.stage2 = _stage(widths[0], widths[1], 2, depth)
        self.stage3 = _stage(widths[1], widths[2], 2, depth)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[2], num_classes)
        last_bn = str(3 * depth - 2)
        self.kd_points = FeaturePoints(stages=["stage1", "stage2", "stage3"], embedding="fc/input", classifier="fc",
                                       pre_activation=[f"stage{i}.{last_bn}" for i in (1, 2, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.flatten(self.pool(x)))


class DigitsMLP(nn.Module):
    """Flatten (``in_features`` values: 64 for an 8×8 digit), ``hidden`` ReLU layers (``hidden1``, ``hidden2``, …),
    and a linear classifier ``fc``."""

    def __init__(self, hidden: tuple[int, ...] = (32,), num_classes: int = NUM_CLASSES, in_features: int = 64):
        super().__init__()
        self.flatten = nn.Flatten()
        width = in_features
        names = []
        for index, size in enumerate(hidden, start=1):
            setattr(self, f"hidden{index}", nn.Sequential(nn.Linear(width, size), nn.ReLU()))
            names.append(f"hidden{index}")
            width = size
        self._hidden = names
        self.fc = nn.Linear(width, num_classes)
        self.kd_points = FeaturePoints(stages=list(names), embedding="fc/input", classifier="fc",
                                       pre_activation=[f"{name}.0" for name in names])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for name in self._hidden:
            x = getattr(self, name)(x)
        return self.fc(x)


MODEL_ZOO: dict[str, Callable[..., nn.Module]] = {   # name -> builder(num_classes=10)
    "teacher-cnn": lambda num_classes=NUM_CLASSES: DigitsCNN((32, 64, 128), depth=2, num_classes=num_classes),
    "assistant-cnn": lambda num_classes=NUM_CLASSES: DigitsCNN((16, 32, 64), depth=1, num_classes=num_classes),
    "student-cnn": lambda num_classes=NUM_CLASSES: DigitsCNN((4, 8, 16), depth=1, num_classes=num_classes),
    # the student's widths, twice the depth
    "student-cnn-deep": lambda num_classes=NUM_CLASSES: DigitsCNN((4, 8, 16), depth=2, num_classes=num_classes),
    "student-mlp": lambda num_classes=NUM_CLASSES: DigitsMLP(hidden=(32,), num_classes=num_classes),
    # reads a digit's 16-value modalities (kdkernels.distill.modalities: row+column profiles, random projection)
    "modal-mlp": lambda num_classes=NUM_CLASSES: DigitsMLP(hidden=(32, 32), num_classes=num_classes, in_features=16),
    # tiny ViTs (student dim 32 × 2 blocks, teacher dim 64 × 4 blocks): 2×2 patches of the digits, or, with the
    # "-cifar" suffix, 4×4 patches of 3×32×32 images
    **{name: (lambda build: lambda num_classes=NUM_CLASSES: build(num_classes))(build)
       for name, build in vit.MODELS.items()},
}


def digits_model(name: str) -> nn.Module:
    """A fresh model of the digits zoo (see ``MODEL_ZOO``)."""
    if name not in MODEL_ZOO:
        raise ValueError(f"unknown digits model {name!r}; the zoo has {sorted(MODEL_ZOO)}")
    return MODEL_ZOO[name]()


def names() -> list[str]:
    """Every name :func:`create` knows: the CIFAR zoo's (RepDistiller's ``model_dict`` order), then the digits
    zoo's."""
    return [*zoo.names(), *MODEL_ZOO]


def create(name: str, num_classes: int | None = None) -> nn.Module:
    """A fresh, untrained model by name: a CIFAR zoo model (``num_classes`` defaults to 100; a checkpoint published
    for it loads with ``load_state_dict(..., strict=True)``), a digits zoo model (``num_classes`` defaults to 10),
    or ``"torchvision:NAME"`` / ``"timm:NAME"`` (:func:`~kdkernels.distill.hub_models.hub_model`, no pretrained
    weights; ``num_classes`` defaults to 1000). An unknown name raises a ValueError listing the close matches and
    every name."""
    if ":" in name:
        from kdkernels.distill.hub_models import hub_model

        return hub_model(name, 1000 if num_classes is None else num_classes)
    if name in MODEL_ZOO:
        return MODEL_ZOO[name](NUM_CLASSES if num_classes is None else num_classes)
    if name not in zoo.CIFAR_MODELS:
        raise zoo.unknown_name(name, names(), "model zoos (CIFAR and digits)")
    return zoo.create(name, zoo.CIFAR_NUM_CLASSES if num_classes is None else num_classes)
