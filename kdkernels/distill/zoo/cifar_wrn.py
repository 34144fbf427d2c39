"""The wide ResNets of RepDistiller's ``models/wrn.py`` (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2): pre-activation
blocks (BN-ReLU-conv twice), three groups ``block1..3`` of ``(depth - 4) / 6`` blocks at 32², 16², 8², then BN-ReLU,
8×8 average pooling and ``fc``.

Parameter names follow the official code (``conv1``, ``block<i>.layer.<j>.{bn1,conv1,bn2,conv2,convShortcut}``,
``bn1``, ``fc``). The official stage features are the group outputs (before any BN); with ``preact=True`` they are
passed through the BN that follows them (the next group's first ``bn1``, and the final ``bn1``), exactly as the
official forward does, so in training mode those BNs see that input a second time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.recipe import FeaturePoints
from kdkernels.distill.zoo._features import RepDistillerModel


class PreActBlock(nn.Module):
    """``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``. With a channel change, the 1×1 ``convShortcut`` reads
    the activated input ``relu(bn1(x))``; otherwise the shortcut is ``x`` itself."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.convShortcut = None
        if in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class BlockGroup(nn.Module):
    """``blocks`` pre-activation blocks in ``self.layer``; the first changes channels and carries the stride."""

    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*(PreActBlock(in_channels if j == 0 else out_channels, out_channels,
                                                 stride if j == 0 else 1) for j in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(RepDistillerModel):
    """WRN-``depth``-``widen``: groups of 16·widen, 32·widen and 64·widen channels after a 16-channel stem."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = BlockGroup(blocks, widths[0], widths[1], 1)
        self.block2 = BlockGroup(blocks, widths[1], widths[2], 2)
        self.block3 = BlockGroup(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        self.channels = widths[3]
        self.kd_points = FeaturePoints(stages=["block1", "block2", "block3"], embedding="fc/input", classifier="fc",
                                       pre_activation=["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"])
        self.feat_module_paths = ["conv1", "block1", "block2", "block3"]
        self.bn_before_relu_paths = list(self.kd_points.pre_activation)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.Linear):
                module.bias.data.zero_()

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        features = [self.conv1(x)]
        for group in (self.block1, self.block2, self.block3):
            features.append(group(features[-1]))
        pooled = F.avg_pool2d(self.relu(self.bn1(features[-1])), 8).view(-1, self.channels)
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        if preact:
            following_bns = (self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1)
            features[1:] = [bn(feature) for bn, feature in zip(following_bns, features[1:])]
        return [*features, pooled], logits


def wide_resnet(depth: int, widen: int):
    return lambda num_classes=100: WideResNet(depth, widen, num_classes)


MODELS = {f"wrn_{depth}_{widen}": wide_resnet(depth, widen) for depth, widen in ((16, 1), (16, 2), (40, 1), (40, 2))}
