"""Self-supervised and consistency strategies (mean teacher): one step equal to CuriousAI/mean-teacher's formulas
transcribed here on the method's own values (two views, the EMA teacher), the ramp-up, the moving average over a
real run, exact resume and configuration errors (the loss against the official code: test_losses_self_supervised.py;
the mechanisms: test_trainer_views.py, test_trainer_updates.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_testing import batches_for, digits_setup
from kdkernels.distill import build_recipe
from kdkernels.distill.methods.self_supervised import sigmoid_rampup
from kdkernels.distill.terms import StepContext
from trainer_testing import QUIET, assert_resume_is_exact, small_split
from kdkernels.distill.trainer import TrainConfig, Trainer


# --------------------------------------------------------------------------------- official formulas (transcribed)

def official_sigmoid_rampup(current, rampup_length):
    """CuriousAI/mean-teacher ``pytorch/mean_teacher/ramps.py``."""
    if rampup_length == 0:
        return 1.0
    current = np.clip(current, 0.0, rampup_length)
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


def official_softmax_mse_loss(input_logits, target_logits):
    """CuriousAI/mean-teacher ``pytorch/mean_teacher/losses.py`` (a sum over the minibatch)."""
    input_softmax = F.softmax(input_logits, dim=1)
    target_softmax = F.softmax(target_logits, dim=1)
    num_classes = input_logits.size()[1]
    return F.mse_loss(input_softmax, target_softmax, reduction="sum") / num_classes


def official_losses(class_logit, ema_logit, target, epoch0, consistency=100.0, rampup=5):
    """``pytorch/main.py`` ``train``: class and consistency losses of one minibatch (every sample labelled)."""
    minibatch_size = len(target)
    class_loss = F.cross_entropy(class_logit, target, reduction="sum") / minibatch_size
    consistency_weight = consistency * official_sigmoid_rampup(epoch0, rampup)
    consistency_loss = consistency_weight * official_softmax_mse_loss(class_logit, ema_logit.detach()) / minibatch_size
    return class_loss, consistency_loss


# ------------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("epoch", [0.0, 1.0, 2.5, 5.0, 9.0])
@pytest.mark.parametrize("rampup", [0.0, 5.0, 30.0])
def test_ramp_up_is_the_official_sigmoid(epoch, rampup):
    assert sigmoid_rampup(epoch, rampup) == pytest.approx(official_sigmoid_rampup(epoch, rampup), rel=1e-15)


@pytest.mark.parametrize("epoch", [1, 3, 6])
def test_a_step_is_the_official_class_and_consistency_cost(epoch):
    recipe = build_recipe("mean-teacher", digits_setup(teacher=None), preset="digits")
    distiller = recipe.stages[0].distiller
    batch = next(iter(batches_for(recipe.stages[0], batch_size=16)))
    distiller.build(batch).activate().train()
    viewed = distiller.apply_views(batch, seed=0, epoch=epoch, step=2)
    assert not torch.equal(viewed["input"], viewed["input_teacher"]), "two independent augmentations"
    assert not torch.equal(viewed["input"], batch["input"])
    values = distiller.run_models(viewed)
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=10, step=2, batch=viewed))
    student = distiller.models["student"]
    teacher = distiller.models["teacher"]
    assert teacher.training, "the EMA teacher runs in train mode, as ema_model.train() in pytorch/main.py"
    with torch.no_grad():
        class_logit = student(viewed["input"])
    ema_logit = values["teacher"]
    torch.testing.assert_close(values["student"].detach(), class_logit, rtol=0, atol=0)
    class_loss, consistency_loss = official_losses(class_logit, ema_logit, viewed["target"], epoch - 1)
    torch.testing.assert_close(output.terms["ce_student"], class_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(output.terms["consistency"], consistency_loss, rtol=1e-6, atol=1e-12)
    assert output.terms["consistency"] > 0


def test_the_teacher_is_the_students_moving_average_and_gets_no_gradient():
    recipe = build_recipe("mean-teacher", digits_setup(teacher=None), preset="digits", ema_decay=0.9)
    distiller = recipe.stages[0].distiller
    update = distiller.updates["teacher"]
    assert (update.source, update.momentum, update.warmup, update.buffers) == ("student", 0.9, True, "own")
    assert distiller.inputs["teacher"] == "input_teacher" and "teacher" in distiller.frozen_train_mode
    student, teacher = distiller.models["student"], distiller.models["teacher"]
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert not any(id(p) in trainable for p in teacher.parameters())
    initial = [p.detach().clone() for p in student.parameters()]
    result = Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.05, **QUIET)).fit(recipe, small_split().train,
                                                                                 small_split().test)
    assert result.history[-1]["consistency"] > 0
    assert set(result.accuracies) == {"student", "teacher"}
    for t, s, s0 in zip(teacher.parameters(), student.parameters(), initial):
        assert t.grad is None and not torch.equal(t, s0) and not torch.equal(t, s.detach())


def test_resume_is_exact(tmp_path):
    def make(seed):
        return build_recipe("mean-teacher", digits_setup(student="student-mlp", teacher=None, seed=seed),
                            preset="digits", rampup=1.0)

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


def test_defaults_are_the_official_cifar_configuration():
    recipe = build_recipe("mean-teacher", digits_setup(teacher=None))
    assert recipe.hyperparameters == {"consistency": 100.0, "rampup": 5.0, "ema_decay": 0.999, "translate": 4,
                                      "flip": True}
    assert math.isclose(recipe.stages[0].distiller.terms[1].weight, 100.0)


@pytest.mark.parametrize("overrides, error, match", [
    ({"translate": -1}, ValueError, r"mean-teacher: translate must be an int >= 0, got -1"),
    ({"translate": 1.5}, TypeError, r"mean-teacher: translate must be an int"),
    ({"flip": "yes"}, TypeError, r"mean-teacher: flip must be a bool"),
    ({"consistency": -1.0}, ValueError, r"mean-teacher: consistency must be >= 0 and finite, got -1.0"),
    ({"rampup": float("nan")}, ValueError, r"mean-teacher: rampup must be >= 0 and finite, got nan"),
    ({"ema_decay": 1.5}, ValueError, r"mean-teacher: ema_decay must be in \[0, 1\], got 1.5"),
])
def test_bad_configuration_names_the_problem(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("mean-teacher", digits_setup(teacher=None), **overrides)
