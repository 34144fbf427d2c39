"""The ShuffleNets of RepDistiller's ``models/ShuffleNetv1.py`` (ShuffleV1: groups 3, widths 240/480/960, [4, 8, 4]
blocks) and ``models/ShuffleNetv2.py`` (ShuffleV2: net size 1, widths 116/232/464, [3, 7, 3] blocks, 1024-channel
head): a 1×1 stem at 32², three stages that each halve the resolution (16², 8², 4²), 4×4 average pooling and
``linear``.

Parameter names follow the official code. Each stage's last block has a ``preact`` (``nn.Identity``) whose output
is the official pre-activation feature: ShuffleV1's concatenation or sum before the ReLU; ShuffleV2's
``cat(kept half, bn3 output)`` before the ReLU and the channel shuffle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.recipe import FeaturePoints
from kdkernels.distill.zoo._features import RepDistillerModel, feature_forward


class ChannelShuffle(nn.Module):
    """``[N, g·c, H, W]`` -> interleave the ``g`` groups' channels."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1×1 (BN, ReLU), channel shuffle, depthwise 3×3 (BN, ReLU), grouped 1×1 (BN); stride 2 concatenates a
    3×3 average-pooled shortcut, stride 1 adds the input; then ReLU. The first 1×1 of the 24-channel stem's block is
    not grouped."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        middle = out_channels // 4
        first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, middle, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(middle)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(middle, middle, 3, stride=stride, padding=1, groups=middle, bias=False)
        self.bn2 = nn.BatchNorm2d(middle)
        self.conv3 = nn.Conv2d(middle, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        return F.relu(self.preact(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut))


class ShuffleNet(RepDistillerModel):
    """What both ShuffleNets share: the 24-channel 1×1 stem (``conv1``, ``bn1``), three stages ``layer1..3`` (built
    by the subclass, in order, so the state dict keeps the official key order), an optional ``head`` before the 4×4
    average pooling, and ``linear``."""

    STAGES = ["layer1", "layer2", "layer3"]

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)

    def declare_points(self, pre_activation: list[str]) -> None:
        """The feature taps (stage outputs, the last block's ``preact`` of each stage) and RepDistiller's accessors
        (no BN before the stage ReLUs: not an OFD teacher, as officially)."""
        self.kd_points = FeaturePoints(stages=list(self.STAGES), embedding="linear/input", classifier="linear",
                                       pre_activation=pre_activation)
        self.feat_module_paths = ["conv1", "bn1", *self.STAGES]
        self.bn_before_relu_paths = None

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = [F.relu(self.bn1(self.conv1(x)))]
        for stage in (self.layer1, self.layer2, self.layer3):
            features.append(stage(features[-1]))
        features.append(torch.flatten(F.avg_pool2d(self.head(features[-1]), 4), 1))
        return features, self.linear(features[-1])

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        return feature_forward(self, self._run, x, is_feat, preact)


class ShuffleNetV1(ShuffleNet):
    def __init__(self, widths: tuple[int, int, int], blocks: tuple[int, int, int], groups: int,
                 num_classes: int = 100):
        super().__init__()
        in_channels = 24
        for index, (width, count) in enumerate(zip(widths, blocks), start=1):
            # the first block concatenates its input, so it computes only the missing channels
            layers = [ShuffleV1Block(in_channels, width - in_channels, 2, groups)]
            layers += [ShuffleV1Block(width, width, 1, groups) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            in_channels = width
        self.linear = nn.Linear(widths[-1], num_classes)
        self.declare_points([f"{s}.{n - 1}.preact" for s, n in zip(self.STAGES, blocks)])


class ShuffleV2Block(nn.Module):
    """Keeps half the channels; the other half goes through 1×1 (BN, ReLU), depthwise 3×3 (BN), 1×1 (BN, ReLU);
    the halves are concatenated and shuffled."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, x = x.split(x.shape[1] // 2, dim=1)
        out = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))
        self.preact(torch.cat([kept, out], 1))   # only read by taps (the official block builds it too)
        return self.shuffle(torch.cat([kept, F.relu(out)], 1))


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches of ``out_channels / 2`` each (left: depthwise 3×3 BN, 1×1 BN ReLU; right: 1×1 BN ReLU,
    depthwise 3×3 BN, 1×1 BN ReLU), concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        middle = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, middle, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(middle)
        self.conv3 = nn.Conv2d(in_channels, middle, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(middle)
        self.conv4 = nn.Conv2d(middle, middle, 3, stride=2, padding=1, groups=middle, bias=False)
        self.bn4 = nn.BatchNorm2d(middle)
        self.conv5 = nn.Conv2d(middle, middle, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(middle)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(ShuffleNet):
    def __init__(self, widths: tuple[int, int, int, int], blocks: tuple[int, int, int], num_classes: int = 100):
        super().__init__()
        in_channels = 24
        for index, (width, count) in enumerate(zip(widths, blocks), start=1):
            layers = [ShuffleV2DownBlock(in_channels, width), *(ShuffleV2Block(width) for _ in range(count))]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            in_channels = width
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        # a stage is a down block then ``count`` basic blocks
        self.declare_points([f"{s}.{n}.preact" for s, n in zip(self.STAGES, blocks)])

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(x)))


MODELS = {
    "ShuffleV1": lambda num_classes=100: ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes),
    "ShuffleV2": lambda num_classes=100: ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes),
}
