"""The VGGs with batch norm of RepDistiller's ``models/vgg.py`` (vgg8, vgg11, vgg13, vgg16, vgg19 are its
``vgg*_bn``): five conv groups ``block0..4`` (3×3 conv with bias, BN, ReLU; the group's last ReLU is applied
outside it), max-pooling ``pool0..2`` between the first four groups, adaptive average pooling and ``classifier``.

On 32×32 inputs the official forward skips ``pool3`` (it pools there only for 64×64 inputs), so ``block3`` and
``block4`` both run at 4×4. A group ends in its last BN, whose output is the pre-activation feature (the BN OFD
takes its margins from); ``relu0..4`` (no state) apply the ReLUs after the groups, so their outputs are the stage
features.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kdkernels.distill.recipe import FeaturePoints
from kdkernels.distill.zoo._features import RepDistillerModel

CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def conv_group(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """(conv, BN, ReLU) per width, without the final ReLU."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class CifarVGG(RepDistillerModel):
    """A VGG of five conv groups of ``config`` widths for 32×32 (or 64×64) inputs."""

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int = 100):
        super().__init__()
        in_channels = 3
        for index, widths in enumerate(config):
            setattr(self, f"block{index}", conv_group(in_channels, widths))
            in_channels = widths[-1]
        for index in range(4):
            setattr(self, f"pool{index}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        for index in range(5):
            setattr(self, f"relu{index}", nn.ReLU())
        last_bn = [f"block{i}.{len(config[i]) * 3 - 2}" for i in range(1, 5)]
        self.kd_points = FeaturePoints(stages=[f"relu{i}" for i in range(1, 5)], embedding="classifier/input",
                                       classifier="classifier", pre_activation=last_bn)
        self.feat_module_paths = [path for i in range(5) for path in (f"block{i}", f"pool{i}")]
        self.bn_before_relu_paths = list(last_bn)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
                module.bias.data.zero_()
            elif isinstance(module, nn.Linear):
                module.weight.data.normal_(0, 0.01)
                module.bias.data.zero_()

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        pools_before = (None, self.pool0, self.pool1, self.pool2, self.pool3 if x.shape[2] == 64 else None)
        blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
        relus = (self.relu0, self.relu1, self.relu2, self.relu3, self.relu4)
        pre_activations, features = [], []
        out = x
        for pool, block, relu in zip(pools_before, blocks, relus):
            out = block(out if pool is None else pool(out))
            pre_activations.append(out)
            out = relu(out)
            features.append(out)
        pooled = torch.flatten(self.pool4(out), 1)
        logits = self.classifier(pooled)
        if not is_feat:
            return logits
        stages = pre_activations[1:] if preact else features[1:]
        return [features[0], *stages, pooled], logits


def vgg(config: tuple[tuple[int, ...], ...]):
    return lambda num_classes=100: CifarVGG(config, num_classes)


MODELS = {name: vgg(config) for name, config in CONFIGS.items()}
