"""The CIFAR ResNets of RepDistiller's ``models/resnet.py`` (resnet8 … resnet110, resnet8x4, resnet32x4): a 3×3 stem,
three stages of basic blocks at 32², 16² and 8², 8×8 average pooling and ``fc``.

Parameter names follow the official code (``conv1``, ``bn1``, ``layer<i>.<j>.{conv1,bn1,conv2,bn2}``,
``layer<i>.0.downsample.{0,1}``, ``fc``). Each block's ``preact`` (an ``nn.Identity``, no state) outputs the residual
sum before the last ReLU: the pre-activation feature of the official ``preact=True`` path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.recipe import FeaturePoints
from kdkernels.distill.zoo._features import RepDistillerModel, feature_forward


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut projects (1×1 conv, BN) when the shape
    changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(channels))
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.preact(out + shortcut))


class CifarResNet(RepDistillerModel):
    """``depth = 6n + 2``: ``n`` basic blocks per stage; ``widths`` = (stem, stage 1, stage 2, stage 3) channels."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3], num_classes)
        stages = ["layer1", "layer2", "layer3"]
        self.kd_points = FeaturePoints(stages=stages, embedding="fc/input", classifier="fc",
                                       pre_activation=[f"{stage}.{blocks - 1}.preact" for stage in stages])
        self.feat_module_paths = ["conv1", "bn1", "relu", *stages]
        self.bn_before_relu_paths = [f"{stage}.{blocks - 1}.bn2" for stage in stages]
        self.kd_points.margin_norms = list(self.bn_before_relu_paths)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_channels, channels, stride),
                             *(BasicBlock(channels, channels) for _ in range(blocks - 1)))

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = [self.relu(self.bn1(self.conv1(x)))]
        for stage in (self.layer1, self.layer2, self.layer3):
            features.append(stage(features[-1]))
        features.append(torch.flatten(self.avgpool(features[-1]), 1))
        return features, self.fc(features[-1])

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        return feature_forward(self, self._run, x, is_feat, preact)


def resnet(depth: int, widths: tuple[int, int, int, int]):
    return lambda num_classes=100: CifarResNet(depth, widths, num_classes)


NARROW, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
MODELS = {
    **{f"resnet{depth}": resnet(depth, NARROW) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": resnet(8, WIDE),
    "resnet32x4": resnet(32, WIDE),
}
