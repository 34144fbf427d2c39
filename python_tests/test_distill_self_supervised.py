"""Self-supervised and consistency strategies (mean teacher, BYOL): one step equal to the official formulas
transcribed here on the method's own values (CuriousAI/mean-teacher; deepmind-research byol: two views, the EMA
target), the ramp-up and the target's cosine momentum, the moving average over a real run, BYOL's stop-gradient
classifier and linear-probe evaluation, exact resume and configuration errors (the losses against the official code:
test_losses_self_supervised.py; the mechanisms: test_trainer_views.py, test_trainer_updates.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_testing import batches_for, digits_setup
from kdkernels.distill import build_recipe
from kdkernels.distill.methods.self_supervised import sigmoid_rampup
from kdkernels.distill.terms import StepContext
from kdkernels.distill.updates import StepClock
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


# ------------------------------------------------------------------------------------ BYOL (deepmind-research/byol)

def official_l2_normalize(x, axis=-1, epsilon=1e-12):
    """``byol/utils/helpers.py`` ``l2_normalize``."""
    square_sum = torch.sum(x * x, dim=axis, keepdim=True)
    return x * torch.rsqrt(torch.clamp(square_sum, min=epsilon))


def official_regression_loss(x, y):
    """``byol/utils/helpers.py`` ``regression_loss``."""
    normed_x, normed_y = official_l2_normalize(x, axis=-1), official_l2_normalize(y, axis=-1)
    return torch.sum((normed_x - normed_y) ** 2, dim=-1)


def official_target_ema(global_step, base_ema, max_steps):
    """``byol/utils/schedules.py`` ``target_ema`` with ``_cosine_decay(global_step, max_steps, 1.)``."""
    global_step = min(global_step, max_steps)
    decay = 0.5 * (1 + np.cos(np.pi * global_step / max_steps))
    return 1.0 - (1.0 - base_ema) * decay


def official_byol_losses(online_out, target_out, labels):
    """``byol/byol_experiment.py`` ``loss_fn``: the symmetrised representation loss and the classifier's CE on view
    1 (``helpers.softmax_cross_entropy`` with the default mean)."""
    repr_loss = official_regression_loss(online_out["prediction_view1"], target_out["projection_view2"].detach())
    repr_loss = repr_loss + official_regression_loss(online_out["prediction_view2"],
                                                     target_out["projection_view1"].detach())
    classif_loss = -(F.one_hot(labels, 10) * F.log_softmax(online_out["logits_view1"], dim=-1)).sum(-1)
    return repr_loss.mean(), classif_loss.mean()


def cnn_embedding(model, images):
    """DigitsCNN's pooled feature (the input of its ``fc``), computed layer by layer."""
    return model.flatten(model.pool(model.stage3(model.stage2(model.stage1(images)))))


def official_forward(network, views):
    """``_forward``'s ``apply_once_fn`` per view on a BYOLNetwork's modules (DigitsCNN encoder)."""
    outputs = {}
    for suffix, images in zip(("_view1", "_view2"), views):
        embedding = cnn_embedding(network.encoder, images)
        projection = network.projector(embedding)
        outputs["projection" + suffix] = projection
        outputs["prediction" + suffix] = network.predictor(projection)
        outputs["logits" + suffix] = network.encoder.fc(embedding.detach())
    return outputs


def byol_step(epoch=1, step=2, **overrides):
    recipe = build_recipe("byol", digits_setup(teacher=None), preset="digits", **overrides)
    distiller = recipe.stages[0].distiller
    batch = next(iter(batches_for(recipe.stages[0], batch_size=16)))
    distiller.build(batch).activate().train()
    viewed = distiller.apply_views(batch, seed=0, epoch=epoch, step=step)
    values = distiller.run_models(viewed)
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=10, step=step, batch=viewed))
    return distiller, viewed, output


@pytest.mark.parametrize("epoch", [1, 4])
def test_a_byol_step_is_the_official_loss(epoch):
    distiller, viewed, output = byol_step(epoch=epoch)
    online, target = distiller.models["online"], distiller.models["target_network"]
    assert target.training, "the target runs with is_training=True: its batch norm uses the batch statistics"
    assert not torch.equal(viewed["input"], viewed["input_view2"]), "two independent augmentations"
    views = (viewed["input"], viewed["input_view2"])
    with torch.no_grad():
        online_out, target_out = official_forward(online, views), official_forward(target, views)
    repr_loss, classif_loss = official_byol_losses(online_out, target_out, viewed["target"])
    torch.testing.assert_close(output.terms["byol"], repr_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.terms["ce_classifier"], classif_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss.detach(), repr_loss + classif_loss, rtol=1e-5, atol=1e-6)
    assert 0 < output.terms["byol"] < 8


def test_the_classifier_trains_on_the_stop_gradient_embedding():
    distiller, _, output = byol_step()
    student = distiller.models["student"]
    assert distiller.models["online"].encoder is student, "the online encoder is the exported student"
    output.term_losses["ce_classifier"].backward(retain_graph=True)
    encoder = {name: p for name, p in student.named_parameters() if not name.startswith("fc.")}
    assert all(p.grad is None for p in encoder.values()), "the labels' gradient must not reach the encoder"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.fc.parameters())
    student.zero_grad(set_to_none=True)
    output.term_losses["byol"].backward()
    assert all(p.grad is None for p in student.fc.parameters()), "the BYOL loss does not read the classifier"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.values())
    assert all(p.grad is None for p in distiller.models["target_network"].parameters())


@pytest.mark.parametrize("base_ema", [0.996, 0.97])
def test_the_target_momentum_is_the_official_cosine_schedule(base_ema):
    distiller, _, _ = byol_step(base_ema=base_ema)
    update = distiller.updates["target_network"]
    assert (update.source, update.schedule, update.warmup, update.buffers) == ("online", "cosine", False, "own")
    total = 150
    for step in (0, 1, 37, 75, 149, 150, 200):
        assert update.momentum_at(step, total, step + 1) == pytest.approx(
            official_target_ema(step, base_ema, total), rel=1e-15, abs=1e-15)
    online, target = distiller.models["online"], distiller.models["target_network"]
    with torch.no_grad():
        for parameter in online.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = {name: p.clone() for name, p in target.named_parameters()}
    buffers = {name: b.clone() for name, b in target.named_buffers()}
    distiller.updates.after_step(distiller.models, StepClock(step=37, steps_per_epoch=5, total_steps=total))
    tau = official_target_ema(37, base_ema, total)
    for name, y in online.named_parameters():    # _update_fn: target + (1 − tau)(online − target)
        x = before[name]
        torch.testing.assert_close(dict(target.named_parameters())[name], x + (1 - tau) * (y.detach() - x),
                                   rtol=1e-6, atol=1e-6)
    for name, value in target.named_buffers():
        assert torch.equal(value, buffers[name]), f"the target's batch-norm statistics are its own ({name})"


def test_a_byol_run_moves_the_target_and_reports_the_linear_probe():
    recipe = build_recipe("byol", digits_setup(student="student-mlp", teacher=None), preset="digits")
    assert recipe.metrics == ("linear_probe",)
    distiller = recipe.stages[0].distiller
    online, target = distiller.models["online"], distiller.models["target_network"]
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert not any(id(p) in trainable for p in target.parameters())
    assert all(id(p) in trainable for p in online.parameters())
    result = Trainer(TrainConfig(epochs=1, batch_size=16, lr=0.05, **QUIET)).fit(recipe, small_split().train,
                                                                                 small_split().test)
    assert set(result.accuracies) == {"student"} and result.student is distiller.models["student"]
    assert 0.0 <= result.evaluation["test_probe_acc_student"] <= 100.0, "the method's metric joins the default ones"
    assert "test_nll_student" in result.evaluation
    assert result.history[-1]["byol"] > 0 and result.history[-1]["ce_classifier"] > 0
    for t, o in zip(target.parameters(), online.parameters()):
        assert t.grad is None and not torch.equal(t, o.detach())


def test_byol_resume_is_exact(tmp_path):
    def make(seed):
        recipe = build_recipe("byol", digits_setup(student="student-mlp", teacher=None, seed=seed), preset="digits")
        recipe.metrics = ()   # the training state is what resumes; the probe (seconds per evaluation) is tested above
        return recipe

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


def test_byol_defaults_are_the_official_configuration():
    recipe = build_recipe("byol", digits_setup(teacher=None))
    assert recipe.hyperparameters == {"projector_hidden": 4096, "projection": 256, "predictor_hidden": 4096,
                                      "base_ema": 0.996, "translate": 4, "flip": True, "noise": 0.0}
    online = recipe.stages[0].distiller.models["online"]
    layers = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None))
              for m in online.projector]
    assert layers == [("Linear", 16, 4096), ("BatchNorm1d", None, None), ("ReLU", None, None),
                      ("Linear", 4096, 256)]
    assert online.projector[3].bias is None and online.predictor[0].in_features == 256
    assert online.predictor[3].out_features == 256
    assert recipe.stages[0].distiller.updates["target_network"].momentum == 0.996


@pytest.mark.parametrize("overrides, error, match", [
    ({"projection": 0}, ValueError, r"byol: projection must be an int >= 1, got 0"),
    ({"projector_hidden": 2.5}, TypeError, r"byol: projector_hidden must be an int"),
    ({"base_ema": 1.5}, ValueError, r"byol: base_ema must be in \[0, 1\], got 1.5"),
    ({"translate": -1}, ValueError, r"byol: translate must be an int >= 0, got -1"),
    ({"flip": "no"}, TypeError, r"byol: flip must be a bool"),
    ({"noise": -0.1}, ValueError, r"byol: noise must be >= 0"),
])
def test_byol_bad_configuration_names_the_problem(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("byol", digits_setup(teacher=None), **overrides)
