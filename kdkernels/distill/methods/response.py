"""Response-based methods: losses on the logits (../shared/reference/methods.md §1)."""
from __future__ import annotations

import kdkernels
from kdkernels.distill.methods._common import offline
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm


@register("kd", category="response",
          paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015",
          presets={"imagenet": {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5}})
def kd(setup: Setup, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> Recipe:
    """Hinton KD: ``ce_weight·CE + kd_weight·T²·KL(p_t ‖ p_s)`` (batchmean), mdistiller ``KD.py`` defaults."""
    terms = [CrossEntropyTerm("student", ce_weight),
             FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), kd_weight, temperature=temperature)]
    return offline("kd", setup, terms)
