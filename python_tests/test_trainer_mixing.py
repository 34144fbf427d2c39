"""MixUp in the trainer (kdkernels.distill.mixing): every model sees the same mixed input, and a cached teacher
(outputs for unmixed inputs) is refused."""
import pytest
import torch

from kdkernels.distill.cache import cache_teacher
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Setup
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, recording_recipe, small_split


def record_inputs(module, store):
    return module.register_forward_pre_hook(lambda _m, inputs: store.append(inputs[0].detach().clone()))


def test_mixup_feeds_the_same_mixed_input_to_student_and_teacher():
    split = small_split()
    recipe, term = recording_recipe()
    student_inputs, teacher_inputs = [], []
    handles = [record_inputs(recipe.student, student_inputs),
               record_inputs(recipe.stages[0].distiller.models["teacher"], teacher_inputs)]
    try:
        Trainer(TrainConfig(epochs=2, batch_size=32, mixup_alpha=0.4, **QUIET)).fit(recipe, split.train)
    finally:
        for handle in handles:
            handle.remove()
    # Distiller.build runs the models once on the first (unmixed) batch before training.
    student_inputs, teacher_inputs = student_inputs[1:], teacher_inputs[1:]
    assert len(term.records) == len(student_inputs) == len(teacher_inputs) == 4
    for record, student_x, teacher_x in zip(term.records, student_inputs, teacher_inputs):
        lam, permutation = record["mixup"].lam, record["mixup"].permutation
        clean = split.train.inputs[record["index"]]
        assert 0.0 < lam < 1.0 and sorted(permutation.tolist()) == list(range(len(clean)))
        torch.testing.assert_close(student_x, lam * clean + (1 - lam) * clean[permutation], rtol=0, atol=0)
        assert torch.equal(student_x, teacher_x) and torch.equal(student_x, record["input"])
    assert [(r["epoch"], r["epochs"], r["step"]) for r in term.records] == [(1, 2, 0), (1, 2, 1), (2, 2, 2),
                                                                             (2, 2, 3)]


def test_mixup_with_a_cached_teacher_is_refused():
    split = small_split()
    torch.manual_seed(0)
    cached = cache_teacher(digits_model("student-mlp"), split.train)
    recipe = build_recipe("kd", Setup(student=digits_model("student-mlp"), teacher=cached, num_classes=10))
    with pytest.raises(ValueError, match="cached teacher"):
        Trainer(TrainConfig(epochs=1, mixup_alpha=0.2, **QUIET)).fit(recipe, split.train)
