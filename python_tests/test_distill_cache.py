"""The offline teacher (kdkernels.distill.cache): cached outputs give the live teacher's losses, training never
runs the teacher, and a top-k cache rebuilds logits equal to the sparse KD loss."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels import distill
from distill_testing import digits_split, first_step
from kdkernels.distill.cache import CachedTeacher, cache_teacher
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Setup
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, small_split


def test_cached_teacher_gives_the_live_teachers_kd_losses():
    torch.manual_seed(0)
    teacher = digits_model("assistant-cnn").eval()
    cached = cache_teacher(teacher, digits_split().train, batch_size=64)
    assert isinstance(cached, CachedTeacher) and cached.distill_input == distill.BATCH and len(cached) == len(digits_split().train)
    losses = {}
    for name, model in (("live", teacher), ("cached", cached)):
        torch.manual_seed(1)
        recipe = build_recipe("kd", Setup(student=digits_model("student-cnn"), teacher=model, num_classes=10))
        _, _, values, output = first_step(recipe)
        losses[name] = output.terms
    assert set(losses["live"]) == set(losses["cached"]) == {"ce_student", "kd"}
    for term in losses["live"]:
        torch.testing.assert_close(losses["cached"][term], losses["live"][term], rtol=1e-5, atol=1e-7)


def test_training_with_a_cached_teacher_never_runs_the_teacher():
    split = small_split()
    torch.manual_seed(0)
    teacher = digits_model("student-cnn")
    cached = cache_teacher(teacher, split.train)
    calls = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        recipe = build_recipe("kd", Setup(student=digits_model("student-mlp"), teacher=cached, num_classes=10))
        result = Trainer(TrainConfig(epochs=2, batch_size=32, **QUIET)).fit(recipe, split.train, split.test)
    finally:
        handle.remove()
    assert not calls and result.history[-1]["kd"] > 0


def test_topk_cache_rebuilds_minus_inf_logits_equal_to_the_sparse_kd_loss():
    split = small_split()
    torch.manual_seed(0)
    teacher = digits_model("student-cnn").eval()
    cached = cache_teacher(teacher, split.train, topk=3)
    batch = {"index": torch.tensor([5, 0, 17, 63])}
    dense = cached(batch)
    with torch.no_grad():
        log_p = F.log_softmax(teacher(split.train.inputs[batch["index"]]), dim=1)
    top_values, top_indices = log_p.topk(3, dim=1)
    assert dense.shape == (4, 10) and bool((torch.isfinite(dense).sum(dim=1) == 3).all())
    torch.testing.assert_close(dense.gather(1, top_indices), top_values, rtol=1e-5, atol=1e-6)
    logprobs, indices = cached.topk(batch)
    student = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
    temperature = 4.0
    # The official renormalised top-k KD, transcribed: q = softmax(lp / T) over the support, T² · KL(q ‖ p_s).
    q = F.softmax(top_values / temperature, dim=1)
    log_p_s = F.log_softmax(student / temperature, dim=1).gather(1, top_indices)
    expected = temperature ** 2 * (q * (q.log() - log_p_s)).sum() / 4
    from_dense = kdkernels.kd_loss(student, dense, temperature)
    from_sparse = kdkernels.kd_loss(student, temperature=temperature, teacher_topk_logprobs=logprobs,
                                    teacher_topk_indices=indices)
    torch.testing.assert_close(from_dense, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_sparse, expected, rtol=1e-5, atol=1e-6)
    recipe = build_recipe("kd", Setup(student=digits_model("student-mlp"), teacher=cached, num_classes=10))
    result = Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(recipe, split.train)
    assert math.isfinite(result.history[0]["kd"])


def test_cache_errors():
    split = small_split()
    teacher = digits_model("student-mlp")
    with pytest.raises(ValueError, match="topk"):
        cache_teacher(teacher, split.train, topk=11)
    with pytest.raises(ValueError, match="index"):
        cache_teacher(teacher, split.train)({"input": split.train.inputs[:2]})
    with pytest.raises(ValueError, match="dense logits"):
        cache_teacher(teacher, split.train).topk({"index": torch.tensor([0])})
