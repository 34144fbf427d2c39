"""Multi-teacher, teacher-assistant and teacher-preparation strategies (ensemble, CA-MKD, TAKD, DGKD, prune-kd,
PrUE): training steps on digits, and each loss term against the official code's formula transcribed here in eager
PyTorch (../shared/reference/methods.md §1.12–1.13, §4)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from kdkernels.distill.methods.teacher_prep import pruning_rounds, weight_sparsity
from kdkernels.distill.terms import StepContext

TOL = dict(rtol=1e-5, atol=1e-7)


def spread(model, scale=20.0):
    """Scales a model's classifier so that its softmax is far from uniform (untrained logits make the losses tiny
    differences of large terms, where float32 rounding would dominate the comparison)."""
    with torch.no_grad():
        model.fc.weight.mul_(scale)
    return model


def spread_setup(**options):
    setup = digits_setup(**options)
    for model in [setup.student, *setup.teachers]:
        spread(model)
    return setup


def kl_batchmean(student, teacher, temperature):
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                    reduction="sum") * temperature ** 2 / student.shape[0]


def kl_element_mean(student, teacher, temperature):
    """TAKD/DGKD: ``nn.KLDivLoss()(log_softmax(s/T), softmax(t/T))`` (mean over B·C), then ×T²."""
    pointwise = F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                         reduction="none")
    return pointwise.mean() * temperature ** 2


# -------------------------------------------------------------------------------------------------------- ensemble

def test_ensemble_trains_and_matches_averaged_probabilities():
    run_steps(build_recipe("ensemble", digits_setup(teachers=3)))
    _, batch, values, output = first_step(build_recipe("ensemble", spread_setup(teachers=3)))
    s, T = values["student"], 4.0
    mean = torch.stack([F.softmax(values[f"teacher{k}"] / T, dim=1) for k in (1, 2, 3)]).mean(0)
    kd = F.kl_div(F.log_softmax(s / T, dim=1), mean, reduction="sum") * T ** 2 / s.shape[0]
    torch.testing.assert_close(output.terms["kd"], 0.9 * kd.detach(), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], 0.1 * F.cross_entropy(s, batch["target"]).detach(), **TOL)


def test_ensemble_of_one_teacher_is_kd_and_needs_a_teacher():
    setup = spread_setup()
    _, _, values, output = first_step(build_recipe("ensemble", setup))
    torch.testing.assert_close(output.terms["kd"], 0.9 * kl_batchmean(values["student"], values["teacher1"], 4.0),
                               **TOL)
    with pytest.raises(ValueError, match="at least 1 trained teacher"):
        build_recipe("ensemble", digits_setup(teacher=None))
    with pytest.raises(TypeError, match="teacher_logits"):
        kdkernels.ensemble_kd_loss(torch.randn(4, 10), torch.randn(4, 10))


# ---------------------------------------------------------------------------------------------------------- CA-MKD

def official_camkd_div(logit_s, logit_t_list, target, T):
    """Rorozhl/CA-MKD loops.py, ensemble_method == 'CAMKD', with DistillKL(is_ca=True)."""
    loss_t = torch.stack([nn.CrossEntropyLoss(reduction="none")(t, target) for t in logit_t_list], dim=0)
    attention = (1.0 - F.softmax(loss_t, dim=0)) / (len(logit_t_list) - 1)
    loss_div = torch.stack([(nn.KLDivLoss(reduction="none")(F.log_softmax(logit_s / T, dim=1),
                                                              F.softmax(t / T, dim=1)) * T ** 2).sum(-1)
                            for t in logit_t_list], dim=0)
    return torch.mul(attention, loss_div).sum() / (1.0 * loss_div.shape[1] * len(logit_t_list))


def official_camkd_inter(feat_s, mid_feat_t_list, embeds, teacher_fcs, target):
    """Rorozhl/CA-MKD models/util.py CalWeight (resize, embed, teacher's last layer) + distiller_zoo/CAMKD.py."""
    trans_feat_s_list, output_feat_t_list = [], []
    for embed, fc, mid_feat_t in zip(embeds, teacher_fcs, mid_feat_t_list):
        t_h = mid_feat_t.shape[2]
        source = F.adaptive_avg_pool2d(feat_s, (t_h, t_h)) if feat_s.shape[2] >= t_h else \
            F.interpolate(feat_s, size=(t_h, t_h), mode="bilinear")
        trans = embed(source)
        trans_feat_s_list.append(trans)
        output_feat_t_list.append(fc(F.adaptive_avg_pool2d(trans, 1).flatten(1)))
    bsz, num_teacher = target.shape[0], len(trans_feat_s_list)
    loss_t = torch.stack([nn.CrossEntropyLoss(reduction="none")(o, target) for o in output_feat_t_list], dim=0)
    weight = (1.0 - F.softmax(loss_t, dim=0)) / (num_teacher - 1)
    loss_st = torch.stack([nn.MSELoss(reduction="none")(s, t).reshape(bsz, -1).mean(-1)
                           for s, t in zip(trans_feat_s_list, mid_feat_t_list)], dim=0)
    return torch.mul(weight, loss_st).sum() / (1.0 * bsz * num_teacher)


def test_ca_mkd_trains_and_matches_official_formulas():
    run_steps(build_recipe("ca-mkd", digits_setup(teachers=3)))
    setup = spread_setup(teachers=3)
    recipe = build_recipe("ca-mkd", setup, student_layer="stage2")   # 4×4 student map pooled to the teachers' 2×2
    distiller, batch, values, output = first_step(recipe, epoch=2)
    s, y, names = values["student"], batch["target"], ["teacher1", "teacher2", "teacher3"]
    expected_div = official_camkd_div(s, [values[n] for n in names], y, 4.0)
    torch.testing.assert_close(output.terms["kd"], expected_div.detach(), **TOL)
    inter = distiller.terms[2]
    expected_inter = official_camkd_inter(values["student:stage2"], [values[f"{n}:stage3"] for n in names],
                                          inter.adapters, [t.fc for t in setup.teachers], y)
    torch.testing.assert_close(output.terms["inter"], 50.0 * expected_inter.detach(), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(s, y).detach(), **TOL)
    assert inter.weight_at(StepContext(epoch=1)) == 0.0, "the intermediate term is skipped in epoch 1, as coded"
    assert not any(id(p) in {id(q) for q in inter.parameters()} for p in setup.teachers[0].parameters())


def test_ca_mkd_intermediate_weights_carry_gradient_and_bad_configuration():
    logits = [torch.randn(4, 10, requires_grad=True) for _ in range(2)]
    features = [torch.randn(4, 3, 2, 2) for _ in range(2)]
    adapted = [f + 0.5 * (k + 1) for k, f in enumerate(features)]   # unequal errors: the weights matter
    kdkernels.camkd_feature_loss(adapted, features, logits, torch.tensor([0, 1, 2, 3])).backward()
    assert logits[0].grad.abs().sum() > 0, "CA-MKD's intermediate weights are not detached"
    with pytest.raises(ValueError, match="at least 2 trained teachers"):
        build_recipe("ca-mkd", digits_setup(teachers=1))
    with pytest.raises(ValueError, match="'inter'.*feature maps"):
        run_steps(build_recipe("ca-mkd", digits_setup(student="student-mlp", teachers=2)))
    with pytest.raises(ValueError, match="at least 2"):
        kdkernels.camkd_weights([torch.randn(4, 10)], torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------------ TAKD

def test_takd_chain_trains_and_matches_official_formula():
    setup = spread_setup()
    recipe = build_recipe("takd", setup, lam=0.7, temperature=2.0)
    assert [stage.name for stage in recipe.stages] == ["assistant1", "student"]
    assistant = recipe.stages[0].distiller.models["student"]
    assert recipe.stages[0].distiller.models["teacher"] is setup.teacher
    assert recipe.stages[1].distiller.models["teacher"] is assistant and recipe.student is setup.student
    _, batch, values, output = first_step(recipe, stage_index=0)
    s, t = values["student"], values["teacher"]
    torch.testing.assert_close(output.terms["kd"], 0.7 * kl_element_mean(s, t, 2.0).detach(), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], 0.3 * F.cross_entropy(s, batch["target"]).detach(), **TOL)
    run_steps(recipe)
    assert not any(p.requires_grad for p in assistant.parameters()), "the trained assistant is frozen in stage 2"


def test_takd_assistants_and_bad_configuration():
    assert len(build_recipe("takd", digits_setup(), assistants=2).stages) == 3
    setup = digits_setup()
    setup.new_assistant = setup.new_student = None
    with pytest.raises(ValueError, match="new_assistant"):
        build_recipe("takd", setup)
    with pytest.raises(ValueError, match="assistants"):
        build_recipe("takd", digits_setup(), assistants=0)


# ------------------------------------------------------------------------------------------------------------ DGKD

def test_dgkd_dense_guides_and_formula_with_dropping():
    setup = spread_setup()
    recipe = build_recipe("dgkd", setup, lam=0.6, temperature=3.0)
    guides = [sorted(name for name in stage.distiller.models if name != "student") for stage in recipe.stages]
    assert guides == [["teacher"], ["assistant1", "teacher"], ["assistant1", "assistant2", "teacher"]]
    assert recipe.stages[2].distiller.models["assistant2"] is recipe.stages[1].distiller.models["student"]
    distiller, batch, values, output = first_step(recipe)
    term = distiller.terms[1]
    kept = term.kept(StepContext(epoch=1, step=0))
    assert len(kept) == 2, "one of the three guides dropped"
    s = values["student"]
    expected = sum(kl_element_mean(s, values[term.reads[1 + index]], 3.0) for index in kept)
    torch.testing.assert_close(output.terms["kd"], 0.6 * expected.detach(), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], 0.4 * F.cross_entropy(s, batch["target"]).detach(), **TOL)


def test_dgkd_dropping_is_random_per_step_deterministic_and_never_empty():
    recipe = build_recipe("dgkd", digits_setup())
    term, single = recipe.stages[2].distiller.terms[0], recipe.stages[0].distiller.terms[0]
    draws = [tuple(term.kept(StepContext(epoch=1, step=step))) for step in range(30)]
    assert all(len(d) == 2 for d in draws) and len(set(draws)) == 3, "each guide dropped on some steps"
    assert draws == [tuple(term.kept(StepContext(epoch=1, step=step))) for step in range(30)]
    assert single.kept(StepContext(step=3)) == [0], "a stage with a single guide keeps it"
    assert term.kept(StepContext(training=False)) == [0, 1, 2]
    assert [type(t).__name__ for t in recipe.stages[2].distiller.terms] == ["DenseGuidanceTerm"], "λ 1: no CE term"
    run_steps(recipe, steps=2)


# ---------------------------------------------------------------------------------------------- prune-then-distill

def test_prune_kd_rounds_prune_smallest_weights_and_kd_formula():
    assert [pruning_rounds(r) for r in (0.2, 0.5, 0.8)] == [1, 3, 7]
    assert len(build_recipe("prune-kd", digits_setup()).stages) == 8, "7 prune rounds (79%) then distillation"
    setup = spread_setup()
    recipe = build_recipe("prune-kd", setup, pruning_ratio=0.36)
    assert [stage.name for stage in recipe.stages] == ["prune-1", "prune-2", "distill"]
    layers = [m for m in setup.teacher.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    recipe.stages[0].before()
    kept = torch.cat([m.weight_mask.flatten() for m in layers]).bool()
    assert (~kept).sum() == round(0.2 * magnitudes.numel())
    assert magnitudes[kept].min() >= magnitudes[~kept].max(), "global magnitude pruning"
    recipe.stages[1].before()
    assert weight_sparsity(setup.teacher) == pytest.approx(0.36, abs=1e-3)
    _, batch, values, output = first_step(recipe)
    s, t = values["student"], values["teacher"]
    torch.testing.assert_close(output.terms["kd"], 0.95 * kl_batchmean(s, t, 10.0).detach(), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], 0.05 * F.cross_entropy(s, batch["target"]).detach(), **TOL)


def test_prune_kd_trains_and_one_shot_mode():
    setup = digits_setup()
    run_steps(build_recipe("prune-kd", setup, pruning_ratio=0.2), steps=2)
    assert weight_sparsity(setup.teacher) == pytest.approx(0.2, abs=1e-3)
    setup = digits_setup()
    recipe = build_recipe("prune-kd", setup, finetune_epochs=0, pruning_ratio=0.5)
    assert [stage.name for stage in recipe.stages] == ["distill"]
    recipe.stages[0].before()
    assert weight_sparsity(setup.teacher) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="pruning_ratio"):
        build_recipe("prune-kd", digits_setup(), pruning_ratio=1.0)


# ------------------------------------------------------------------------------------------------------------ PrUE

def official_prue_masks(model, inputs, targets, sparsity):
    """wangshaopu/prue pruner.prue on one batch: mask gradients of Σ ||mean_pred[y] − p[y]||, global kthvalue."""
    convs = tuple((m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d))
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0)
    model.eval()
    masks = [m.weight_mask for m, _ in convs]
    for mask in masks:
        mask.requires_grad = True
    with torch.no_grad():
        p = F.softmax(model(inputs), dim=1)
        predict = [p[targets == c, c].mean() for c in range(int(targets.max()) + 1)]
    softmax_p = F.softmax(model(inputs), dim=1)
    all_std = 0
    for t, index in zip(softmax_p, targets):
        all_std += torch.norm(predict[index] - t[index])
    all_std.backward()
    global_score = torch.cat([mask.grad.view(-1).abs() for mask in masks])
    threshold, _ = torch.kthvalue(global_score, int(sparsity * global_score.numel()))
    return [mask.grad.abs().gt(threshold) for mask in masks]


def test_prue_mask_matches_official_criterion_and_kd_formula():
    setup = spread_setup()
    dense = copy.deepcopy(setup.teacher)
    recipe = build_recipe("prue", setup)
    assert [stage.name for stage in recipe.stages] == ["sparsify", "distill"]
    _, batch, values, output = first_step(recipe, stage_index=0)
    expected = official_prue_masks(dense, batch["input"], batch["target"], 0.5)
    convs = [m for m in setup.teacher.modules() if isinstance(m, nn.Conv2d)]
    for module, mask in zip(convs, expected):
        assert torch.equal(module.weight_mask.bool(), mask)
    assert weight_sparsity(setup.teacher, (nn.Conv2d,)) == pytest.approx(0.5, abs=1e-3)
    torch.testing.assert_close(output.terms["ce_teacher"], F.cross_entropy(values["teacher"], batch["target"]).detach(),
                               **TOL)
    _, batch, values, output = first_step(recipe)
    s, t = values["student"], values["teacher"]
    torch.testing.assert_close(output.terms["kd"], 0.1 * kl_batchmean(s, t, 4.0).detach(), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], 0.9 * F.cross_entropy(s, batch["target"]).detach(), **TOL)


def test_prue_trains_and_bad_configuration():
    setup = digits_setup()
    run_steps(build_recipe("prue", setup, pruning_ratio=0.3), steps=2)
    assert weight_sparsity(setup.teacher, (nn.Conv2d,)) == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(ValueError, match="finetune_epochs"):
        build_recipe("prue", digits_setup(), finetune_epochs=0)
    with pytest.raises(ValueError, match="teacher"):
        build_recipe("prue", digits_setup(teacher=None))
    from kdkernels.distill import get_method
    assert get_method("prue").approximation.startswith("approximation of PrUE")
