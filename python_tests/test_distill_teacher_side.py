"""Teacher-side methods of issue 17 (tofd, hkd, prune-student): the losses against the official code transcribed here in float64 (value
and gradients) and their argument errors; each stage's step equal to the official formula on that step's tensors,
which parameters each stage trains, exact resume and configuration errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import batches_for, digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from kdkernels.distill import models as zoo_models
from kdkernels.distill.methods.teacher_prep import (chain_widths, conv_chain, pruned_student_widths, slim_chain_,
                                                    slimmed_teacher_copy)
from kdkernels.distill.terms import StepContext
from losses_testing import assert_equals_official, class_labels, randn
from trainer_testing import QUIET, assert_resume_is_exact


def term(distiller, name):
    return next(t for t in distiller.terms if t.name == name)


# ------------------------------------------------------------------------------------------------------------ TOFD

def official_cross_entropy(outputs, targets, T=3):
    """Task-Oriented-Feature-Distillation ``utils.py`` ``CrossEntropy``."""
    log_softmax_outputs = F.log_softmax(outputs / T, dim=1)
    softmax_targets = F.softmax(targets / T, dim=1)
    return -(log_softmax_outputs * softmax_targets).sum(dim=1).mean()


def official_tofd(student_feature, teacher_feature, outputs, teacher_logits, labels, link_weights, T, alpha=0.05,
                  beta=0.03):
    """``distill.py`` @8fa49d0, the loss of one batch (student features already through ``net.link``)."""
    loss = torch.zeros((), dtype=torch.float64)
    for index in range(len(student_feature)):
        loss = loss + torch.dist(student_feature[index], teacher_feature[index], p=2) * alpha
        loss = loss + F.cross_entropy(outputs[index], labels)
        loss = loss + official_cross_entropy(outputs[index], teacher_logits[index], T)
    for weight in link_weights:
        weight_trans = weight.permute(1, 0)
        ones = torch.eye(weight.size(0), dtype=weight.dtype)
        ones2 = torch.eye(weight.size(1), dtype=weight.dtype)
        loss = loss + torch.dist(torch.mm(weight, weight_trans), ones, p=2) * beta
        loss = loss + torch.dist(torch.mm(weight_trans, weight), ones2, p=2) * beta
    return loss


def tofd_inputs(heads=3, batch=5, dim=4, classes=6, student_dim=3):
    student = [randn(batch, dim, seed=i, grad=True) for i in range(heads)]
    teacher = [randn(batch, dim, seed=10 + i, scale=2.0, grad=True) for i in range(heads)]
    logits = [randn(batch, classes, seed=20 + i, grad=True) for i in range(heads)]
    teacher_logits = [randn(batch, classes, seed=30 + i, scale=3.0) for i in range(heads)]
    weights = [randn(dim, student_dim, seed=40 + i, scale=0.5, grad=True) for i in range(heads)]
    return student, teacher, logits, teacher_logits, class_labels(batch, classes), weights


@pytest.mark.parametrize("temperature, alpha, beta", [(1.012, 0.05, 0.03), (4.0, 0.05, 0.03), (2.5, 0.7, 0.0)])
def test_tofd_loss_is_the_official_formula(temperature, alpha, beta):
    args = tofd_inputs()
    assert_equals_official(
        lambda *a: kdkernels.tofd_loss(*a, temperature=temperature, feature_weight=alpha, orthogonal_weight=beta),
        lambda *a: official_tofd(*a, T=temperature, alpha=alpha, beta=beta), *args, what="tofd_loss")


def test_tofd_loss_without_links_and_in_low_precision():
    student, teacher, logits, teacher_logits, labels, _ = tofd_inputs(heads=2)
    expected = official_tofd(student, teacher, logits, teacher_logits, labels, [], T=4.0)
    torch.testing.assert_close(kdkernels.tofd_loss(student, teacher, logits, teacher_logits, labels), expected)
    low = kdkernels.tofd_loss([s.detach().bfloat16() for s in student], [t.detach().half() for t in teacher],
                              [z.detach().bfloat16() for z in logits], teacher_logits, labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), expected.detach(), rtol=2e-2, atol=2e-2)


TOFD_ARGS = tofd_inputs(heads=2)


def tofd_call(**changes):
    names = ("student_features", "teacher_features", "student_logits", "teacher_logits", "labels", "link_weights")
    return lambda: kdkernels.tofd_loss(**{**dict(zip(names, TOFD_ARGS)), **changes})


@pytest.mark.parametrize("call, error, match", [
    (tofd_call(teacher_features=TOFD_ARGS[1][:1]), ValueError,
     r"^tofd_loss: teacher_features must hold one tensor per head \(2, as student_features\), got 1 tensors$"),
    (tofd_call(teacher_features=[torch.randn(5, 7), TOFD_ARGS[1][1]]), ValueError,
     r"^tofd_loss: student_features\[0\] must have the same shape as teacher_features\[0\] \(5, 7\)"),
    (tofd_call(student_logits=[torch.randn(5, 6), torch.randn(5, 5)]), ValueError,
     r"^tofd_loss: teacher_logits\[1\] must have the same shape as student_logits\[1\]"),
    (tofd_call(student_logits=[torch.randn(4, 6), torch.randn(4, 6)],
               teacher_logits=[torch.randn(4, 6), torch.randn(4, 6)]), ValueError,
     r"^tofd_loss: student_logits\[0\] must have the batch size of student_features\[0\] \(5\)"),
    (tofd_call(labels=torch.tensor([0, 1, 2, 3, 9])), ValueError, r"^tofd_loss: labels must be class indices"),
    (tofd_call(link_weights=[torch.randn(4)]), ValueError, r"^tofd_loss: link_weights\[0\] must have 2 dims"),
    (tofd_call(link_weights=torch.randn(4, 3)), TypeError, r"^tofd_loss: link_weights must be a list or tuple"),
    (tofd_call(feature_weight=-1.0), ValueError, r"^tofd_loss: feature_weight must be >= 0"),
    (tofd_call(orthogonal_weight="0.1"), TypeError, r"^tofd_loss: orthogonal_weight must be a real number"),
    (tofd_call(temperature=0.0), ValueError, r"^tofd_loss: temperature must be positive"),
])
def test_tofd_loss_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_tofd_aux_stage_trains_the_teacher_heads_on_the_frozen_teacher():
    distiller, batch, values, output = first_step(build_recipe("tofd", digits_setup()), stage_index=0)
    assert distiller.trainable == ("teacher_aux",) and not distiller.models["teacher"].training
    heads = distiller.models["teacher_aux"]
    assert len(heads) == 2 and all(isinstance(h.features[0][0], torch.nn.Conv2d) for h in heads)
    assert len(heads[0].features) == 4 and len(heads[1].features) == 3   # two SepConvs / one SepConv, pool, flatten
    with torch.no_grad():
        expected = sum(F.cross_entropy(head(values[f"teacher:stage{i}"])[1].double(), batch["target"])
                       for i, head in enumerate(heads, 1))
    torch.testing.assert_close(output.terms["tofd_aux"].double(), expected, rtol=1e-6, atol=1e-8)
    output.loss.backward()
    assert all(p.grad is None for p in distiller.models["teacher"].parameters())
    assert all(p.grad is not None for p in heads.parameters())


@pytest.mark.parametrize("epoch, epochs", [(1, 250), (3, 10), (10, 10)])
def test_tofd_step_is_the_official_loss(epoch, epochs):
    distiller, batch, values, output = first_step(build_recipe("tofd", digits_setup()))
    tofd = term(distiller, "tofd")
    assert tofd.reads == ("student:stage1", "student:stage2", "student:fc/input", "student", "teacher:stage1",
                          "teacher:stage2", "teacher:fc/input", "teacher", "target")
    assert [tuple(link.weight.shape) for link in tofd.links] == [(128, 16)] * 3
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=epochs, batch=batch))
    student_heads, teacher_heads = distiller.models["student_aux"], distiller.models["teacher_aux"]
    assert student_heads.training and teacher_heads.training and distiller.models["teacher"].training  # as official
    with torch.no_grad():
        s_aux = [head(values[f"student:stage{i}"]) for i, head in enumerate(student_heads, 1)]
        t_aux = [head(values[f"teacher:stage{i}"]) for i, head in enumerate(teacher_heads, 1)]
        s_features = [link(f) for link, f in zip(tofd.links, [f for f, _ in s_aux] + [values["student:fc/input"]])]
    t_features = [f for f, _ in t_aux] + [values["teacher:fc/input"]]
    outputs = [z for _, z in s_aux] + [values["student"]]
    t_logits = [z for _, z in t_aux] + [values["teacher"]]
    temperature = 1 + (3.0 / epochs) * float(epoch)   # the official 1 + (t/250)·(1 + epoch), epoch 0-based
    expected = official_tofd([f.double() for f in s_features], [f.double() for f in t_features],
                             [z.double() for z in outputs], [z.double() for z in t_logits], batch["target"],
                             [link.weight.detach().double() for link in tofd.links], temperature)
    torch.testing.assert_close(output.terms["tofd"].double(), expected, rtol=1e-5, atol=1e-6)


def test_tofd_stages_train_the_teacher_heads_then_the_student_its_heads_and_links():
    recipe = build_recipe("tofd", digits_setup(), aux_epochs=2)
    assert [s.name for s in recipe.stages] == ["tofd-aux", "tofd"] and recipe.stages[0].epochs_of(250) == 2
    assert build_recipe("tofd", digits_setup()).stages[0].epochs_of(250) == 125
    teacher_heads = [p.detach().clone() for p in recipe.stages[0].distiller.models["teacher_aux"].parameters()]
    main = recipe.stages[1].distiller
    assert main.trainable == ("student", "student_aux") and main.evaluate == ("student",)
    history = run_steps(recipe, steps=2)
    assert [set(h) for h in history] == [{"tofd_aux"}] * 2 + [{"tofd"}] * 2
    after = list(main.models["teacher_aux"].parameters())
    assert any(not torch.equal(b, a) for b, a in zip(teacher_heads, after))   # trained in stage 1
    names = {name for name, p in main.named_parameters() if p in set(main.trainable_parameters())}
    assert any(n.startswith("terms.0.links.") for n in names) and any(n.startswith("models.student_aux.") for n in
                                                                      names)
    assert not any(n.startswith("models.teacher_aux.") or n.startswith("models.teacher.") for n in names)


def make_tofd(seed=0):
    return build_recipe("tofd", digits_setup(seed=seed), aux_epochs=1)


def test_tofd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_tofd, dict(epochs=1, batch_size=64, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_tofd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("tofd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"^tofd: feature_weight must be >= 0"):
        build_recipe("tofd", digits_setup(), feature_weight=-1.0)
    with pytest.raises(TypeError, match=r"^tofd: temperature must be a real number"):
        build_recipe("tofd", digits_setup(), temperature="3")
    with pytest.raises(ValueError, match=r"^tofd: aux_epochs must be"):
        build_recipe("tofd", digits_setup(), aux_epochs=1.5)
    with pytest.raises(TypeError, match=r"^tofd: aux_epochs must be an int"):
        build_recipe("tofd", digits_setup(), aux_epochs=None)
    with pytest.raises(ValueError, match=r"tofd puts auxiliary classifiers on every stage but the deepest"):
        build_recipe("tofd", digits_setup(), student_layers="stage3")
    with pytest.raises(ValueError, match=r"tofd pairs the stages one to one, got 2 student and 3 teacher"):
        build_recipe("tofd", digits_setup(), student_layers=["stage2", "stage3"])
    with pytest.raises(ValueError, match=r"tofd cannot tell the channels"):
        build_recipe("tofd", digits_setup(student="student-mlp"), student_layers=["flatten", "hidden1"] * 1 +
                     ["fc"])


# ------------------------------------------------------------------------------------------------------------- HKD

def official_pairwise_distances(a, eps=1e-6):
    """pkth ``nn/pkt_transfer.py`` ``pairwise_distances`` (b = a)."""
    b = a
    aa = torch.sum(a ** 2, dim=1)
    bb = torch.sum(b ** 2, dim=1)
    aa = aa.expand(bb.size(0), aa.size(0)).t()
    bb = bb.expand(aa.size(0), bb.size(0))
    AB = torch.mm(a, b.transpose(0, 1))
    dists = aa + bb - 2 * AB
    dists = torch.clamp(dists, min=0, max=float("inf"))
    return torch.sqrt(dists + eps)


def official_cosine_pairwise_similarities(features, eps=1e-6):
    features_norm = torch.sqrt(torch.sum(features ** 2, dim=1, keepdim=True))
    features = features / (features_norm + eps)
    features = torch.where(features != features, torch.zeros_like(features), features)
    similarities = torch.mm(features, features.transpose(0, 1))
    return (similarities + 1.0) / 2.0


def official_prob_loss(teacher_features, student_features):
    """``prob_loss`` with kernel_parameters {'student': 'combined', 'teacher': 'combined', 'loss': 'combined'}."""
    teacher_s_2 = 1.0 / (1 + official_pairwise_distances(teacher_features) ** 1)
    teacher_s_1 = official_cosine_pairwise_similarities(teacher_features)
    student_s_2 = 1.0 / (1 + official_pairwise_distances(student_features) ** 1)
    student_s_1 = official_cosine_pairwise_similarities(student_features)
    teacher_s_1 = teacher_s_1 / torch.sum(teacher_s_1, dim=1, keepdim=True)
    student_s_1 = student_s_1 / torch.sum(student_s_1, dim=1, keepdim=True)
    teacher_s_2 = teacher_s_2 / torch.sum(teacher_s_2, dim=1, keepdim=True)
    student_s_2 = student_s_2 / torch.sum(student_s_2, dim=1, keepdim=True)
    loss1 = (teacher_s_1 - student_s_1) * (torch.log(teacher_s_1) - torch.log(student_s_1))
    loss2 = (teacher_s_2 - student_s_2) * (torch.log(teacher_s_2) - torch.log(student_s_2))
    return torch.mean(loss1) + torch.mean(loss2)


def official_flow(teacher_feats, student_feats, layer_weights):
    """``prob_transfer``'s loss of one batch: Σ_i weight_i · prob_loss over the (flattened) layer pairs."""
    return sum(w * official_prob_loss(t.flatten(1), s.flatten(1))
               for t, s, w in zip(teacher_feats, student_feats, layer_weights))


def test_hkd_loss_is_the_official_combined_prob_loss():
    student = [randn(6, 5, seed=1, grad=True), randn(6, 3, 2, 2, seed=2, grad=True)]
    teacher = [randn(6, 8, seed=3, scale=2.0, grad=True), randn(6, 4, 3, 3, seed=4, grad=True)]
    # rtol 1e-8: the diagonal distance sqrt(‖a‖² + ‖a‖² − 2a·a + eps) is a rounding residual whose (analytically
    # zero) gradient is amplified by 1/(2·sqrt(eps)) = 500, in the official formula as in ours
    assert_equals_official(lambda s, t: kdkernels.hkd_loss(s, t, [1.0, 70.0]),
                           lambda s, t: official_flow(t, s, [1.0, 70.0]), student, teacher, what="hkd_loss",
                           rtol=1e-8)
    assert_equals_official(kdkernels.hkd_loss, lambda s, t: official_prob_loss(t, s), student[0], teacher[0],
                           what="hkd_loss single pair", rtol=1e-8)
    relu = [randn(5, 7, seed=5).relu().requires_grad_(), randn(5, 7, seed=6).relu()]   # post-ReLU features
    assert_equals_official(kdkernels.hkd_loss, lambda s, t: official_prob_loss(t, s), *relu, what="hkd_loss relu",
                           rtol=1e-8)


def test_hkd_loss_reductions_and_low_precision():
    s, t = randn(6, 5, seed=1), randn(6, 4, seed=2)
    rows = kdkernels.hkd_loss(s, t, reduction="none")
    assert rows.shape == (6,)
    torch.testing.assert_close(rows.sum() / 36, kdkernels.hkd_loss(s, t))
    torch.testing.assert_close(rows.sum() / 6, kdkernels.hkd_loss(s, t, reduction="batchmean"))
    low = kdkernels.hkd_loss(s.bfloat16(), t.half())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), official_prob_loss(t, s), rtol=5e-2, atol=1e-4)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.hkd_loss([torch.randn(4, 3)], [torch.randn(4, 3)] * 2), ValueError,
     r"^hkd_loss: teacher_features must hold one tensor per student tensor \(1\), got 2 tensors$"),
    (lambda: kdkernels.hkd_loss(torch.randn(4, 3), torch.randn(5, 3)), ValueError,
     r"^hkd_loss: teacher_features must have the same batch size as student_features \(4, 3\)"),
    (lambda: kdkernels.hkd_loss([torch.randn(4, 3)], [torch.randn(4, 3)], [1.0, 2.0]), ValueError,
     r"^hkd_loss: layer_weights must hold one weight per layer pair \(1\), got 2 weights$"),
    (lambda: kdkernels.hkd_loss([torch.randn(4, 3)], [torch.randn(4, 3)], 1.0), TypeError,
     r"^hkd_loss: layer_weights must be a sequence of real numbers"),
    (lambda: kdkernels.hkd_loss([torch.randn(4, 3)], [torch.randn(4, 3)], ["a"]), TypeError,
     r"^hkd_loss: layer_weights\[0\] must be a real number"),
    (lambda: kdkernels.hkd_loss(torch.randn(4, 3), torch.randn(4, 3), eps=0.0), ValueError,
     r"^hkd_loss: eps must be positive"),
    (lambda: kdkernels.hkd_loss(torch.randn(4, 3), torch.randn(4, 3), reduction="avg"), ValueError,
     r"^hkd_loss: reduction must be one of"),
])
def test_hkd_loss_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_hkd_auxiliary_teacher_stages_are_ce_then_the_teacher_last_layer_flow():
    recipe = build_recipe("hkd", digits_setup())
    assert [s.name for s in recipe.stages] == ["hkd-aux-ce", "hkd-aux", "hkd"]
    assert [s.epochs_of(50) for s in recipe.stages] == [50, 40, 50]
    distiller, batch, values, output = first_step(recipe, stage_index=0)
    assert distiller.trainable == ("assistant",) and distiller.evaluate == ("assistant",)
    assert sum(p.numel() for p in distiller.models["assistant"].parameters()) > sum(
        p.numel() for p in recipe.stages[-1].distiller.models["student"].parameters())   # the assistant-cnn
    torch.testing.assert_close(output.terms["ce_assistant"], F.cross_entropy(values["assistant"], batch["target"]))
    distiller, batch, values, output = first_step(recipe, stage_index=1)
    assert distiller.trainable == ("assistant",) and not distiller.models["teacher"].training
    assert term(distiller, "hkd_aux").reads == ("assistant:fc/input", "teacher:fc/input")
    expected = official_prob_loss(values["teacher:fc/input"].double(), values["assistant:fc/input"].double())
    torch.testing.assert_close(output.terms["hkd_aux"].double(), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("epoch, epochs", [(1, 50), (2, 50), (4, 10)])
def test_hkd_step_is_the_official_critical_period_flow(epoch, epochs):
    distiller, batch, values, _ = first_step(build_recipe("hkd", digits_setup()))
    assert distiller.trainable == ("student",) and not distiller.models["assistant"].training
    flow = term(distiller, "hkd")
    assert flow.reads == ("student:fc/input", "student:stage3", "student:stage2", "student:stage1",
                          "assistant:fc/input", "assistant:stage3", "assistant:stage2", "assistant:stage1")
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=epochs, batch=batch))
    cur_weight = 100.0
    for _ in range(round((epoch - 1) * 50 / epochs)):   # exp2_proposed.py: cur_weight *= decay after each epoch
        cur_weight = cur_weight * 0.7
    weights = (1, cur_weight, cur_weight, cur_weight)
    expected = official_flow([values[k].double() for k in flow.reads[4:]], [values[k].double() for k in flow.reads[:4]],
                             weights)
    torch.testing.assert_close(output.terms["hkd"].double(), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))


def test_hkd_stages_train_the_assistant_then_the_student():
    recipe = build_recipe("hkd", digits_setup(), ce_weight=0.0, aux_ce_epochs=0)
    assert [s.name for s in recipe.stages] == ["hkd-aux", "hkd"]
    assistant = recipe.stages[0].distiller.models["assistant"]
    assert assistant is recipe.stages[1].distiller.models["assistant"]
    before = [p.detach().clone() for p in assistant.parameters()]
    history = run_steps(recipe, steps=2)
    assert [set(h) for h in history] == [{"hkd_aux"}] * 2 + [{"hkd"}] * 2   # ce_weight 0: the official objective
    assert any(not torch.equal(b, p) for b, p in zip(before, assistant.parameters()))


def make_hkd(seed=0):
    return build_recipe("hkd", digits_setup(seed=seed), aux_ce_epochs=1, aux_epochs=1)


def test_hkd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_hkd, dict(epochs=1, batch_size=64, lr=0.05, **QUIET), tmp_path, pieces=(1, 1, 1))


def test_hkd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("hkd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"^hkd: decay must be in \[0, 1\]"):
        build_recipe("hkd", digits_setup(), decay=1.5)
    with pytest.raises(ValueError, match=r"^hkd: init_weight must be >= 0"):
        build_recipe("hkd", digits_setup(), init_weight=-1.0)
    with pytest.raises(ValueError, match=r"^hkd: aux_epochs must be"):
        build_recipe("hkd", digits_setup(), aux_epochs=2.0)
    with pytest.raises(TypeError, match=r"^hkd: aux_ce_epochs must be an int"):
        build_recipe("hkd", digits_setup(), aux_ce_epochs="1")
    with pytest.raises(ValueError, match=r"hkd pairs the student's and the auxiliary teacher's layers one to one, "
                                         r"got 2 student and 4 assistant"):
        build_recipe("hkd", digits_setup(), student_layers=["fc/input", "stage3"])


# --------------------------------------------------------------------------------------------------- prune-student

ST79 = [40, 49, 'M', 111, 97, 'M', 225, 187, 224, 170, 'M', 356, 233, 220, 99, 'M', 111, 84, 297, 122]  # _plan("19_st_79")


def official_get_student_plan(plan_base, model_type="vgg19"):
    """prune-then-distill ``models/base.py`` ``get_student_plan`` as written (plan_base: (remaining, total) per
    conv/linear layer, in module order)."""
    plans = {'vgg19': [0, 0, 'M', 0, 0, 'M', 0, 0, 0, 0, 'M', 0, 0, 0, 0, 'M', 0, 0, 0, 0]}
    plan = list(plans[model_type])
    plan_base = list(plan_base)
    plan_init = plan_base.pop(0)
    plan[0] = round(plan_init[0] / (9 * 3))
    plan_temp = plan[0]
    for layer_info in enumerate(plan):
        if layer_info[1] == 0:
            plan_data = plan_base.pop(0)
            plan[layer_info[0]] = round(plan_data[0] / (plan_temp * 3))
            plan_temp = plan[layer_info[0]]
    return plan


def masked_vgg19(remaining):
    """The CIFAR zoo's vgg19 with a ``weight_mask`` per conv keeping ``remaining[l]`` weights."""
    model = zoo_models.create("vgg19", num_classes=100)
    for (path, count) in zip(conv_chain(model)[0], remaining):
        conv = model.get_submodule(path)
        mask = torch.zeros(conv.weight.numel())
        mask[:count] = 1
        conv.register_buffer("weight_mask", mask.view_as(conv.weight))
    return model


def test_student_widths_reproduce_the_official_experiment_students():
    widths = [w for w in ST79 if w != 'M']
    remaining = [9 * w * c for w, c in zip(widths, [3] + widths[:-1])]   # the student's own dense weight counts
    assert pruned_student_widths(masked_vgg19(remaining)) == widths
    assert sum(remaining) / sum(m.weight.numel() for m in zoo_models.create("vgg19").modules()
                                if isinstance(m, torch.nn.Conv2d)) == pytest.approx(0.207, abs=0.002)
    # the repository's get_student_plan (÷ 3·c_{l−1} after the first layer) does not give its experiment plan
    assert [w for w in official_get_student_plan([(r, 0) for r in remaining] + [(0, 0)]) if w != 'M'] != widths
    assert official_get_student_plan([(r, 0) for r in remaining] + [(0, 0)])[0] == widths[0]


def test_slimming_keeps_the_chain_and_loads_states_of_other_widths():
    teacher = zoo_models.create("teacher-cnn")
    assert chain_widths(teacher) == [32, 32, 64, 64, 128, 128]
    student = slimmed_teacher_copy(teacher)
    assert chain_widths(student) == chain_widths(teacher) and student is not teacher
    assert not any(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()) if a.dim() > 1)
    slim_chain_(student, [3, 4, 5, 6, 7, 8])
    assert student.stage3[3].weight.shape == (8, 7, 3, 3) and student.stage3[4].num_features == 8
    assert student.fc.in_features == 8 and student(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    other = slimmed_teacher_copy(teacher)
    slim_chain_(other, [2, 2, 3, 3, 4, 4])
    student.load_state_dict(other.state_dict())   # the load pre-hook reshapes the chain first
    assert chain_widths(student) == [2, 2, 3, 3, 4, 4]
    torch.testing.assert_close(student.fc.weight, other.fc.weight)
    vgg = zoo_models.create("vgg8", num_classes=100)
    slim_chain_(vgg, [4, 5, 6, 7, 8])
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name, match", [("resnet8", r"reads \d+ channels, not the \d+ of the conv before it"),
                                         ("student-mlp", r"has 0 conv\(s\)")])
def test_slimming_needs_a_plain_conv_chain(name, match):
    with pytest.raises(ValueError, match=rf"^prune-student slims plain convolution chains.*{match}"):
        conv_chain(zoo_models.create(name))


def test_prune_student_distils_the_pruned_teacher_into_its_slimmed_shape():
    setup = digits_setup()
    recipe = build_recipe("prune-student", setup, pruning_ratio=0.36)
    assert [s.name for s in recipe.stages] == ["prune-1", "prune-2", "distill"]
    teacher, student = setup.teacher, recipe.student
    assert student is not setup.student and chain_widths(student) == [32, 32, 64, 64, 128, 128]
    for stage in recipe.stages[:2]:
        stage.before()
    recipe.stages[2].before()
    assert chain_widths(student) == pruned_student_widths(teacher)
    kept = [float(teacher.get_submodule(p).weight_mask.sum()) for p in conv_chain(teacher)[0]]
    assert sum(kept) / sum(teacher.get_submodule(p).weight.numel() for p in conv_chain(teacher)[0]) < 0.7
    widths = chain_widths(student)
    for index, (count, path) in enumerate(zip(kept, conv_chain(teacher)[0])):   # c_l = round(r_l / (9·c_{l−1}))
        assert widths[index] == max(1, round(count / (9 * (1 if index == 0 else widths[index - 1]))))
    distill = recipe.stages[2].distiller
    batch = next(iter(batches_for(recipe.stages[2])))
    distill.build(batch).activate().train()
    values = distill.run_models(batch)
    output = distill.compute_terms(values, StepContext(batch=batch))
    s, t, y = values["student"].double(), values["teacher"].double(), batch["target"]
    expected_kd = F.kl_div(F.log_softmax(s / 10, dim=1), F.softmax(t / 10, dim=1), reduction="batchmean") * 100
    torch.testing.assert_close(output.loss.double(), 0.95 * expected_kd + 0.05 * F.cross_entropy(s, y),
                               rtol=1e-5, atol=1e-7)   # kd_vanilla.py loss_fn_kd (α 0.95, T 10)
    assert values["student"].shape == (32, 10)


def test_prune_student_trains_one_shot_and_with_rounds():
    run_steps(build_recipe("prune-student", digits_setup(), finetune_epochs=0, pruning_ratio=0.5), steps=2)
    history = run_steps(build_recipe("prune-student", digits_setup(), pruning_ratio=0.2), steps=2)
    assert [set(h) for h in history] == [{"ce_teacher"}] * 2 + [{"ce_student", "kd"}] * 2


def make_prune_student(seed=0):
    return build_recipe("prune-student", digits_setup(seed=seed), pruning_ratio=0.2)


def test_prune_student_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_prune_student, dict(epochs=2, batch_size=64, lr=0.05, **QUIET), tmp_path,
                           pieces=(1, 1, 1))   # the last resume is inside the distill stage


def test_prune_student_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("prune-student", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"pruning_ratio must be a fraction in \[0, 1\)"):
        build_recipe("prune-student", digits_setup(), pruning_ratio=1.0)
    with pytest.raises(ValueError, match=r"^prune-student slims plain convolution chains"):
        build_recipe("prune-student", digits_setup(teacher="student-mlp"))
