"""The baseline: the student trained on labels alone (also how the demo trains its teacher)."""
from __future__ import annotations

from kdkernels.distill.distiller import Distiller
from kdkernels.distill.methods._common import single_stage
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm


@register("ce", category="baseline", paper="(no distillation: cross-entropy on the labels)", needs_teacher=False)
def cross_entropy(setup: Setup, label_smoothing: float = 0.0) -> Recipe:
    """Cross-entropy on the labels only: the baseline every distilled student is compared with."""
    terms = [CrossEntropyTerm("student", 1.0, label_smoothing=label_smoothing)]
    return single_stage("ce", Distiller({"student": setup.student}, terms))
