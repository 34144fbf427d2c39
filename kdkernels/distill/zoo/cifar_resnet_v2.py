"""ResNet50 of RepDistiller's ``models/resnetv2.py``: the ImageNet bottleneck ResNet ([3, 4, 6, 3] blocks, widths 64
… 512, expansion 4) with a 3×3 stride-1 stem and no max-pool, so the stages run at 32², 16², 8² and 4²; adaptive
average pooling and ``linear``.

Parameter names follow the official code (``conv1``, ``bn1``, ``layer<i>.<j>.{conv1..3,bn1..3}``,
``layer<i>.<j>.shortcut.{0,1}``, ``linear``); each block's ``preact`` (``nn.Identity``) outputs the residual sum
before the last ReLU. As in the official forward, ``preact=True`` returns a list ``[features, logits]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.recipe import FeaturePoints
from kdkernels.distill.zoo._features import RepDistillerModel, feature_forward

EXPANSION = 4


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand, each with BN; the shortcut is empty (identity) or a 1×1
    projection with BN."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = EXPANSION * channels
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class CifarResNetV2(RepDistillerModel):
    """A bottleneck ResNet of ``blocks`` per stage for 32×32 inputs."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for index, (count, channels) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            stride = 1 if index == 1 else 2
            layers = [Bottleneck(in_channels if j == 0 else EXPANSION * channels, channels, stride if j == 0 else 1)
                      for j in range(count)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            in_channels = EXPANSION * channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(in_channels, num_classes)
        stages = [f"layer{i}" for i in range(1, 5)]
        self.kd_points = FeaturePoints(stages=stages, embedding="linear/input", classifier="linear",
                                       pre_activation=[f"{stage}.{count - 1}.preact"
                                                       for stage, count in zip(stages, blocks)])
        self.feat_module_paths = ["conv1", "bn1", *stages]
        self.bn_before_relu_paths = [f"{stage}.{count - 1}.bn3" for stage, count in zip(stages, blocks)]
        self.kd_points.margin_norms = list(self.bn_before_relu_paths)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = [F.relu(self.bn1(self.conv1(x)))]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            features.append(stage(features[-1]))
        features.append(torch.flatten(self.avgpool(features[-1]), 1))
        return features, self.linear(features[-1])

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        result = feature_forward(self, self._run, x, is_feat, preact)
        return list(result) if is_feat and preact else result


MODELS = {"ResNet50": lambda num_classes=100: CifarResNetV2((3, 4, 6, 3), num_classes)}
