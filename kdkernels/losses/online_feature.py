"""Losses of online feature-map distillation, composing torch ops: the least-squares adversarial losses with which
AFD (Chung, Park, Kim, Kwak, "Feature-map-level Online Adversarial Knowledge Distillation", ICML 2020) trains each
network's feature-map discriminator and the network that tries to fool it.

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the paper named in its
docstring.
"""
from __future__ import annotations

import torch

from kdkernels._validation import Checks
from kdkernels.losses._common import accumulate


def _scores(check: Checks, name: str, value) -> torch.Tensor:
    """Discriminator outputs ``[B, ...]``: float, at least one dimension, not empty."""
    return check.floating(name, value, min_dim=1)


def lsgan_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """``mean (1 − D(real))² + mean D(fake)²``: the least-squares discriminator loss (Mao et al., LSGAN, labels
    1 for real, 0 for fake) as AFD writes it for network k's discriminator (Chung et al., ICML 2020, eq. of
    ``L_D``)::

        L_{D_k} = [1 − D_k(T_j(G_j(x)))]² + [D_k(T_k(G_k(x)))]²       # the peer's map real, the own map fake

    ``real_scores`` / ``fake_scores``: the discriminator's outputs (probabilities after its sigmoid), ``[B, ...]``
    (one score per sample or a map of patch scores); each mean runs over all of its elements. Detach the feature maps
    for the discriminator's step. fp16/bf16 scores are computed in fp32; the result is an fp32 (fp64 for fp64) scalar.
    """
    check = Checks("lsgan_discriminator_loss")
    real_scores, fake_scores = _scores(check, "real_scores", real_scores), _scores(check, "fake_scores", fake_scores)
    check.same_device("fake_scores", fake_scores, "real_scores", real_scores)
    real, fake = accumulate(real_scores), accumulate(fake_scores)
    return (1.0 - real).square().mean() + fake.square().mean()


def lsgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """``mean (1 − D(fake))²``: the least-squares loss of the network that tries to make its discriminator take its
    own feature map for the peer's (AFD, Chung et al., ICML 2020, ``L_{G_k} = [1 − D_k(T_k(G_k(x)))]²``).

    ``fake_scores``: the discriminator's outputs (probabilities) on the network's own map, ``[B, ...]``, mean over
    all elements; the gradient reaches the network through the discriminator. fp32 (fp64 for fp64) scalar.
    """
    check = Checks("lsgan_generator_loss")
    fake = accumulate(_scores(check, "fake_scores", fake_scores))
    return (1.0 - fake).square().mean()
