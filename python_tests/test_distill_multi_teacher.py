"""Multi-teacher, teacher-assistant and teacher-preparation strategies (ensemble, CA-MKD, TAKD, DGKD, prune-kd,
PrUE): training steps on digits, stages, guides, pruning and configuration errors, CA-MKD's adapters and PrUE's masks
against the official code, and each term equal to its weight times the public loss on the method's own values (the
losses against the official formulas: test_losses_kd.py, test_losses_ensemble.py)."""
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



def close(actual, expected):
    """The same computation up to the order of a few float32 operations."""
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-9)


def check_kd_and_ce(recipe, kd_weight, ce_weight, temperature, reduction="batchmean", stage_index=-1):
    """One step of an offline-KD stage: ``kd_weight·kd_loss(s, t, T, reduction) + ce_weight·CE``."""
    _, batch, values, output = first_step(recipe, stage_index)
    s, t = values["student"], values["teacher"]
    close(output.terms["kd"], kd_weight * kdkernels.kd_loss(s, t, temperature, reduction=reduction))
    close(output.terms["ce_student"], ce_weight * F.cross_entropy(s, batch["target"]))


# -------------------------------------------------------------------------------------------------------- ensemble

def test_ensemble_trains_and_averages_the_teachers():
    run_steps(build_recipe("ensemble", digits_setup(teachers=3)))
    _, batch, values, output = first_step(build_recipe("ensemble", digits_setup(teachers=3)))
    s, teachers = values["student"], [values[f"teacher{k}"] for k in (1, 2, 3)]
    close(output.terms["kd"], 0.9 * kdkernels.ensemble_kd_loss(s, teachers, 4.0))
    close(output.terms["ce_student"], 0.1 * F.cross_entropy(s, batch["target"]))


def test_ensemble_of_one_teacher_is_kd_and_needs_a_teacher():
    recipe = build_recipe("ensemble", digits_setup())
    assert list(recipe.stages[0].distiller.models) == ["student", "teacher1"]
    _, _, values, output = first_step(recipe)
    s, t = values["student"], values["teacher1"]
    close(output.terms["kd"], 0.9 * kdkernels.ensemble_kd_loss(s, [t], 4.0))
    kd_term = first_step(build_recipe("kd", digits_setup()))[3].terms["kd"]  # the same models and batch
    torch.testing.assert_close(output.terms["kd"], kd_term, rtol=1e-5, atol=0)  # fp32 through T·log(mean softmax)
    with pytest.raises(ValueError, match="at least 1 trained teacher"):
        build_recipe("ensemble", digits_setup(teacher=None))


# ---------------------------------------------------------------------------------------------------------- CA-MKD

def ca_mkd_calweight(feat_s, mid_feat_t_list, embeds, teacher_fcs):
    """Rorozhl/CA-MKD ``models/util.py::CalWeight``: the student map resized to each teacher's (pooled down,
    bilinear up), adapted by that teacher's embed, and the teacher's last layer on it (global-average-pooled).
    Returns (adapted student maps, teacher logits on them)."""
    trans_feat_s_list, output_feat_t_list = [], []
    for embed, fc, mid_feat_t in zip(embeds, teacher_fcs, mid_feat_t_list):
        t_h = mid_feat_t.shape[2]
        source = F.adaptive_avg_pool2d(feat_s, (t_h, t_h)) if feat_s.shape[2] >= t_h else \
            F.interpolate(feat_s, size=(t_h, t_h), mode="bilinear")
        trans = embed(source)
        trans_feat_s_list.append(trans)
        output_feat_t_list.append(fc(F.adaptive_avg_pool2d(trans, 1).flatten(1)))
    return trans_feat_s_list, output_feat_t_list


def test_ca_mkd_trains_and_adapts_the_student_to_each_teacher():
    run_steps(build_recipe("ca-mkd", digits_setup(teachers=3)))
    setup = digits_setup(teachers=3)
    recipe = build_recipe("ca-mkd", setup, student_layer="stage2")   # 4×4 student map pooled to the teachers' 2×2
    distiller, batch, values, output = first_step(recipe, epoch=2)
    s, y, names = values["student"], batch["target"], ["teacher1", "teacher2", "teacher3"]
    close(output.terms["kd"], kdkernels.camkd_loss(s, [values[n] for n in names], y, 4.0))
    inter = distiller.terms[2]
    teacher_maps = [values[f"{n}:stage3"] for n in names]
    adapted, logits = ca_mkd_calweight(values["student:stage2"], teacher_maps, inter.adapters,
                                       [t.fc for t in setup.teachers])
    close(output.terms["inter"], 50.0 * kdkernels.camkd_feature_loss(adapted, teacher_maps, logits, y))
    close(output.terms["ce_student"], F.cross_entropy(s, y))
    assert inter.weight_at(StepContext(epoch=1)) == 0.0, "the intermediate term is skipped in epoch 1, as coded"
    assert not any(id(p) in {id(q) for q in inter.parameters()} for p in setup.teachers[0].parameters())


def test_ca_mkd_bad_configuration():
    with pytest.raises(ValueError, match="at least 2 trained teachers"):
        build_recipe("ca-mkd", digits_setup(teachers=1))
    with pytest.raises(ValueError, match="'inter'.*feature maps"):
        run_steps(build_recipe("ca-mkd", digits_setup(student="student-mlp", teachers=2)))


# ------------------------------------------------------------------------------------------------------------ TAKD

def test_takd_chain_trains_with_the_element_mean_kl():
    setup = digits_setup()
    recipe = build_recipe("takd", setup, lam=0.7, temperature=2.0)
    assert [stage.name for stage in recipe.stages] == ["assistant1", "student"]
    assistant = recipe.stages[0].distiller.models["student"]
    assert recipe.stages[0].distiller.models["teacher"] is setup.teacher
    assert recipe.stages[1].distiller.models["teacher"] is assistant and recipe.student is setup.student
    check_kd_and_ce(recipe, 0.7, 0.3, 2.0, reduction="mean", stage_index=0)
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

def test_dgkd_dense_guides_with_dropping():
    recipe = build_recipe("dgkd", digits_setup(), lam=0.6, temperature=3.0)
    guides = [sorted(name for name in stage.distiller.models if name != "student") for stage in recipe.stages]
    assert guides == [["teacher"], ["assistant1", "teacher"], ["assistant1", "assistant2", "teacher"]]
    assert recipe.stages[2].distiller.models["assistant2"] is recipe.stages[1].distiller.models["student"]
    distiller, batch, values, output = first_step(recipe)
    term = distiller.terms[1]
    kept = term.kept(StepContext(epoch=1, step=0))
    assert len(kept) == 2, "one of the three guides dropped"
    s = values["student"]
    expected = sum(kdkernels.kd_loss(s, values[term.reads[1 + index]], 3.0, reduction="mean") for index in kept)
    close(output.terms["kd"], 0.6 * expected)
    close(output.terms["ce_student"], 0.4 * F.cross_entropy(s, batch["target"]))


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

def test_prune_kd_rounds_prune_smallest_weights_then_distil():
    assert [pruning_rounds(r) for r in (0.2, 0.5, 0.8)] == [1, 3, 7]
    assert len(build_recipe("prune-kd", digits_setup()).stages) == 8, "7 prune rounds (79%) then distillation"
    setup = digits_setup()
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
    check_kd_and_ce(recipe, 0.95, 0.05, 10.0)


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


def test_prue_mask_matches_official_criterion_then_distils():
    setup = digits_setup()
    dense = copy.deepcopy(setup.teacher)
    recipe = build_recipe("prue", setup)
    assert [stage.name for stage in recipe.stages] == ["sparsify", "distill"]
    _, batch, values, output = first_step(recipe, stage_index=0)
    expected = official_prue_masks(dense, batch["input"], batch["target"], 0.5)
    convs = [m for m in setup.teacher.modules() if isinstance(m, nn.Conv2d)]
    for module, mask in zip(convs, expected):
        assert torch.equal(module.weight_mask.bool(), mask)
    assert weight_sparsity(setup.teacher, (nn.Conv2d,)) == pytest.approx(0.5, abs=1e-3)
    close(output.terms["ce_teacher"], F.cross_entropy(values["teacher"], batch["target"]))
    check_kd_and_ce(recipe, 0.1, 0.9, 4.0)


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
