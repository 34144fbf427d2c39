"""MixUp for any method: the mixed input goes to every model that reads ``"input"`` (all, unless the distiller's
``inputs`` say otherwise), so teachers see what the student sees. It runs after the distiller's views and mixes
``"input"`` only; :class:`~kdkernels.distill.views.MixUp` mixes any view, with one ``lam`` per sample.

    input ← lam·input + (1 − lam)·input[perm],   lam ~ Beta(alpha, alpha)

drawn per (seed, epoch, rank), and the label terms (``CrossEntropyTerm``) mix their targets with the same ``lam``
and permutation (:class:`~kdkernels.distill.terms.MixupBatch`).
"""
from __future__ import annotations

import numpy as np
import torch

from kdkernels.distill.cache import CachedTeacher
from kdkernels.distill.environment import MIXUP_STREAM
from kdkernels.distill.recipe import Recipe
from kdkernels.distill.terms import MixupBatch


def mixup_generator(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The MixUp draws of one epoch (``epoch`` counts across stages) on one rank."""
    return np.random.default_rng([seed, MIXUP_STREAM, epoch, rank])


def mix_batch(batch: dict, alpha: float, rng: np.random.Generator) -> tuple[dict, MixupBatch]:
    """``input ← lam·input + (1 − lam)·input[perm]`` with ``lam ~ Beta(alpha, alpha)``, and the MixupBatch that
    tells the label terms (``CrossEntropyTerm``) to mix their targets the same way."""
    inputs = batch["input"]
    lam = float(rng.beta(alpha, alpha))
    permutation = torch.from_numpy(rng.permutation(inputs.shape[0])).to(inputs.device)
    mixed = dict(batch, input=lam * inputs + (1.0 - lam) * inputs[permutation])
    return mixed, MixupBatch(lam, permutation)


def check_mixup(mixup_alpha: float, recipe: Recipe) -> None:
    """A ValueError when MixUp is on and a stage reads a cached teacher (its outputs are for unmixed inputs)."""
    if mixup_alpha <= 0:
        return
    for stage in recipe.stages:
        for name, model in stage.distiller.models.items():
            if isinstance(model, CachedTeacher):
                raise ValueError(f"mixup_alpha > 0 with a cached teacher ({stage.name!r}: model {name!r}): the cache "
                                 "holds outputs for unmixed inputs; use the live teacher with MixUp")
