"""Trainable connectors of the feature methods, sized from example feature shapes.

They map a student feature onto the teacher's (FitNet/AB regressors, OFD connectors, VID regressors, FT
translators), embed pooled features (CRD) or encode teacher features (FT paraphraser). Each reproduces the module
of the official code named in its docstring; the methods create them in ``Term.build``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvReg(nn.Module):
    """FitNet's regressor, RepDistiller/mdistiller ``ConvReg`` shape rules on [B, C, H, W]: student H = 2·teacher H:
    conv 3×3 stride 2; 2·student H = teacher H: transposed conv 4×4 stride 2; student H ≥ teacher H: conv of kernel
    (1 + s_H − t_H, 1 + s_W − t_W); then BN and (``use_relu``) ReLU. [B, D] features get a Linear layer."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        self.use_relu = use_relu
        if len(student_shape) == 2 and len(teacher_shape) == 2:
            self.conv, self.bn = nn.Linear(student_shape[1], teacher_shape[1]), nn.BatchNorm1d(teacher_shape[1])
            return
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ValueError(f"ConvReg maps [B, C, H, W] (or [B, D]) features: student {tuple(student_shape)}, "
                             f"teacher {tuple(teacher_shape)}")
        _, s_c, s_h, s_w = student_shape
        _, t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"ConvReg cannot map a student map of size {s_h}×{s_w} to a larger teacher map "
                             f"{t_h}×{t_w}")
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def ab_connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """RepDistiller ``Connector`` (AB): identity when channels and size agree, else ``ConvReg(use_relu=False)``."""
    if tuple(student_shape[1:3]) == tuple(teacher_shape[1:3]):
        return nn.Identity()
    return ConvReg(student_shape, teacher_shape, use_relu=False)


def ofd_connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """overhaul-distillation ``build_feature_connector``: conv 1×1 (no bias, init N(0, √(2/(k²·out)))) then BN
    (γ = 1, β = 0)."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * teacher_channels)))
    bn = nn.BatchNorm2d(teacher_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


def cwd_connector(student_channels: int, teacher_channels: int) -> nn.Module:
    """TorchDistiller ``SemSeg-distill/networks/kd_model.py`` (``--cwd-feat``): conv 1×1 (no bias) then batch norm and
    ReLU (its ``InPlaceABNSync`` leaky ReLU followed by a ReLU is a ReLU), default init; identity when the channel
    counts agree (the logits-map setting, where both maps have one channel per class)."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
                         nn.BatchNorm2d(teacher_channels), nn.ReLU())


def cd_connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """zhouzaida/channel-distillation ``models/channel_distillation.py`` (``conv1x1_bn``): conv 1×1 (no bias), batch
    norm, ReLU, default init; applied to every student stage, equal channel counts included (as the official code)."""
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
                         nn.BatchNorm2d(teacher_channels), nn.ReLU())


def ttkd_embedding(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """sihaoevery/TaT ``torchdistill/models/special.py`` (``Embed``, the student's query and value embeddings of
    ``AttnEmbed``): conv 3×3 (stride 1, padding 1, no bias) then batch norm, default init, C_s → C_t; used for equal
    channel counts too (the official ResNet-18 ← ResNet-34 setting has 512 → 512)."""
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1, bias=False),
                         nn.BatchNorm2d(teacher_channels))


class VIDRegressor(nn.Module):
    """VID's mean regressor and learned variance (RepDistiller ``VIDLoss``): conv1×1–ReLU–conv1×1–ReLU–conv1×1 (no
    bias, mid = teacher channels) and ``log_scale`` [C_t], a registered parameter initialised so that
    ``softplus(log_scale) + eps = init_var`` (mdistiller keeps it in a plain list, so there it never learns)."""

    def __init__(self, student_channels: int, teacher_channels: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        mid = teacher_channels
        self.mean = nn.Sequential(nn.Conv2d(student_channels, mid, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(mid, teacher_channels, 1, bias=False))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), math.log(math.expm1(init_var - eps))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean(x)


class Embed(nn.Module):
    """CRD's embedding head (RepDistiller ``crd/criterion.py::Embed``): flatten, Linear(d_in, dim), L2-normalise."""

    def __init__(self, in_features: int, dim: int = 128):
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


def _conv_stack(channels: Sequence[int], transposed: bool, batch_norm: bool) -> nn.Sequential:
    """3×3 stride-1 (transposed) convs through ``channels``, each followed by BN (optional) and LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(conv(c_in, c_out, 3, 1, 1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's teacher-side autoencoder (Factor-Transfer-pytorch / RepDistiller ``Paraphraser``): encoder
    C→C→kC→kC and decoder kC→kC→C→C, 3×3 convs with BN and LeakyReLU(0.1); k = the paraphrase rate."""

    def __init__(self, channels: int, rate: float = 0.5, batch_norm: bool = True):
        super().__init__()
        factor = factor_channels(channels, rate)
        self.encoder = _conv_stack([channels, channels, factor, factor], False, batch_norm)
        self.decoder = _conv_stack([factor, factor, channels, channels], True, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """FT's student-side encoder (RepDistiller ``Translator``): C_s→C_s→kC_t→kC_t, 3×3 convs, BN, LeakyReLU(0.1)."""

    def __init__(self, student_channels: int, teacher_channels: int, rate: float = 0.5):
        super().__init__()
        factor = factor_channels(teacher_channels, rate)
        self.encoder = _conv_stack([student_channels, student_channels, factor, factor], False, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def factor_channels(channels: int, rate: float) -> int:
    """``int(C·k)``, at least 1."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"the paraphrase rate must be in (0, 1], got {rate}")
    return max(1, int(channels * rate))


def output_channels(module: nn.Module) -> int | None:
    """The channel count a module produces: that of its last conv (``out_channels``) or BN (``num_features``)."""
    channels = None
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.ConvTranspose2d)):
            channels = sub.out_channels
        elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
            channels = sub.num_features
    return channels
