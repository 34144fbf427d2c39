"""MobileNetV2 of RepDistiller's ``models/mobilenetv2.py`` (its ``mobile_half``: expansion 6, width 0.5): a stride-2
3×3 stem, seven groups ``blocks.0..6`` of inverted residuals at 16², 16², 8², 4², 4², 2², 2², a 1×1 conv to 1280
channels, 2×2 average pooling and ``classifier.0``.

Parameter names follow the official code (``conv1.{0,1}``, ``blocks.<g>.<j>.conv.{0,1,3,4,6,7}``, ``conv2.{0,1}``,
``classifier.0``). The blocks end in a BN without ReLU, so the stage features are already pre-activation: the
official forward returns the same features with or without ``preact``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kdkernels.distill.recipe import FeaturePoints
from kdkernels.distill.zoo._features import RepDistillerModel

# (expansion, output channels before width, blocks, first stride) per group; expansion None is the model's
GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2),
          (None, 320, 1, 1))
STAGE_GROUPS = (1, 2, 4, 6)
LAST_CHANNELS = 1280


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class InvertedResidual(nn.Module):
    """1×1 expand (BN, ReLU), 3×3 depthwise (BN, ReLU), 1×1 linear projection (BN); plus the input when the shape
    is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(RepDistillerModel):
    """MobileNetV2 with ``expansion`` and ``width`` multipliers for ``input_size``² inputs (a multiple of 32)."""

    def __init__(self, expansion: int, width: float, num_classes: int = 100, input_size: int = 32):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for group_expansion, out_channels, count, stride in GROUPS:
            out_channels = int(out_channels * width)
            layers = []
            for j in range(count):
                layers.append(InvertedResidual(channels, out_channels, stride if j == 0 else 1,
                                               expansion if group_expansion is None else group_expansion))
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        last_channels = int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        self.conv2 = conv_bn_relu(channels, last_channels, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        stages = [f"blocks.{g}" for g in STAGE_GROUPS]
        self.kd_points = FeaturePoints(stages=stages, embedding="classifier.0/input", classifier="classifier.0",
                                       pre_activation=list(stages))
        self.feat_module_paths = ["conv1", "blocks"]
        # the projection BN of each stage's last block (before the residual sum)
        self.bn_before_relu_paths = [f"blocks.{g}.{len(self.blocks[g]) - 1}.conv.7" for g in STAGE_GROUPS]
        self.kd_points.margin_norms = list(self.bn_before_relu_paths)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.Linear):
                module.weight.data.normal_(0, 0.01)
                module.bias.data.zero_()

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        features = [self.conv1(x)]
        out = features[0]
        for index, group in enumerate(self.blocks):
            out = group(out)
            if index in STAGE_GROUPS:
                features.append(out)
        pooled = torch.flatten(self.avgpool(self.conv2(out)), 1)
        logits = self.classifier(pooled)
        if not is_feat:
            return logits
        return [*features, pooled], logits


MODELS = {"MobileNetV2": lambda num_classes=100: CifarMobileNetV2(expansion=6, width=0.5, num_classes=num_classes)}
