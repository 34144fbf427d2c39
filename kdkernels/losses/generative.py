"""Losses of distillation with a generator or a discriminator, composing torch ops: the non-saturating GAN losses of
adversarial distillation and DAFL's data-free generator objective.

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the code or paper
named in its docstring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks
from kdkernels.losses._common import accumulate


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean −log σ(D(fake))``: the non-saturating generator (or student) loss of Goodfellow et al. (2014), as
    PyTorch's DCGAN example writes it (``BCELoss`` of ``D(G(z))`` against real labels), on discriminator logits
    (``binary_cross_entropy_with_logits``: stable for large logits)."""
    fake_logits = Checks("gan_generator_loss").floating("fake_logits", fake_logits)
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean −log σ(D(real)) + mean −log(1 − σ(D(fake)))``: the discriminator loss of Goodfellow et al. (2014),
    PyTorch's DCGAN example (``errD_real + errD_fake``), on logits. Detach the fake samples for the discriminator's
    step."""
    check = Checks("gan_discriminator_loss")
    real_logits, fake_logits = check.floating("real_logits", real_logits), check.floating("fake_logits", fake_logits)
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def dafl_generator_loss(teacher_logits: torch.Tensor, teacher_features: torch.Tensor, one_hot_weight: float = 1.0,
                        information_entropy_weight: float = 5.0, activation_weight: float = 0.1, *,
                        return_parts: bool = False):
    """DAFL's generator objective on the teacher's outputs for generated images (Chen et al., ICCV 2019;
    huawei-noah/Efficient-Computing ``Data-Efficient-Model-Compression/DAFL/DAFL-train.py``)::

        one_hot = CE(z_t, argmax z_t)                  # the teacher confident on generated images
        ie      = Σ_c p̄_c · log10 p̄_c,  p̄ = mean_b softmax(z_t)   # balanced classes (minus the entropy, base 10)
        act     = −mean |f_t|                          # strong teacher features
        loss    = one_hot_weight·one_hot + information_entropy_weight·ie + activation_weight·act

    Defaults are the official MNIST weights (``--oh 1 --ie 5 --a 0.1``). ``return_parts=True`` returns the
    unweighted ``(one_hot, ie, act)``. Gradients reach the generator through the (frozen) teacher.
    """
    check = Checks("dafl_generator_loss")
    teacher_logits = check.logits("teacher_logits", teacher_logits, dims=(2,))
    teacher_features = check.floating("teacher_features", teacher_features)
    weights = [check.real(name, value, minimum=0.0) for name, value in (
        ("one_hot_weight", one_hot_weight), ("information_entropy_weight", information_entropy_weight),
        ("activation_weight", activation_weight))]
    check.flag("return_parts", return_parts)
    one_hot = F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))
    mean = F.softmax(accumulate(teacher_logits), dim=1).mean(dim=0)
    information_entropy = (mean * torch.log10(mean)).sum()
    activation = -teacher_features.abs().mean()
    parts = (one_hot, information_entropy, activation)
    if return_parts:
        return parts
    return sum(weight * part for weight, part in zip(weights, parts))
