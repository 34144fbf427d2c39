"""Self-distillation strategies (BAKE, CS-KD, BYOT, BAN): training steps on digits, and each loss term against the
official code's formula transcribed here in eager PyTorch (../shared/reference/methods.md §1.14–1.15)."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from kdkernels.distill.methods.self_distillation import AnchorCrossEntropyTerm, class_consistency_loss
from kdkernels.distill.terms import StepContext

TOL = dict(rtol=1e-5, atol=1e-7)


def spread_logits(setup, scale=30.0):
    """Scales the untrained student's classifier so that its predictions are far from uniform: the losses of
    near-uniform logits are tiny differences of large terms, and float32 rounding would dominate the comparison."""
    with torch.no_grad():
        setup.student.fc.weight.mul_(scale)
    return setup


# ------------------------------------------------------------------------------------------------------------ BAKE

def official_bake(logits, features, temperature, omega):
    """yxgeee/BAKE ``knowledge_ensemble`` + ``KDLoss`` (torch.inverse, -1e9 diagonal mask)."""
    z, f = logits.detach(), F.normalize(features.detach().flatten(1), p=2, dim=1)
    batch = z.shape[0]
    masks = torch.eye(batch)
    affinity = torch.softmax(f @ f.t() - masks * 1e9, dim=1)
    weights = (1 - omega) * torch.inverse(masks - omega * affinity)
    targets = weights @ torch.softmax(z / temperature, dim=1)
    return F.kl_div(torch.log_softmax(logits / temperature, dim=1), targets, reduction="sum") * temperature ** 2 / batch


def test_bake_trains_and_matches_official_formula():
    run_steps(build_recipe("bake", digits_setup()))
    recipe = build_recipe("bake", spread_logits(digits_setup()), temperature=3.0, omega=0.6)
    _, batch, values, output = first_step(recipe)
    z, y = values["student"], batch["target"]
    torch.testing.assert_close(output.terms["bake"], official_bake(z, values["student:fc/input"], 3.0, 0.6), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(z, y).detach(), **TOL)
    assert (y[0::2] == y[1::2]).all(), "class-aware batches: each anchor followed by a sample of its class"


def test_bake_presets_and_batching():
    stage = build_recipe("bake", digits_setup()).stages[0]
    assert stage.batching == "class_aware" and stage.batching_options == {"intra": 1}
    assert build_recipe("bake", digits_setup(), preset="cifar").stages[0].batching_options == {"intra": 3}
    assert build_recipe("bake", digits_setup(), preset="tinyimagenet").hyperparameters["omega"] == 0.9
    with pytest.raises(ValueError, match="intra"):
        build_recipe("bake", digits_setup(), intra=0)


# ----------------------------------------------------------------------------------------------------------- CS-KD

def test_cs_kd_trains_and_matches_official_formula():
    run_steps(build_recipe("cs-kd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("cs-kd", spread_logits(digits_setup()), kd_weight=3.0),
                                         batch_size=16)
    z, y = values["student"], batch["target"]
    assert z.shape[0] == 32 and (y[:16] == y[16:]).all(), "pairs: 16 anchors then 16 same-class partners"
    anchors, partners = z[:16], z[16:].detach()
    kd = F.kl_div(torch.log_softmax(anchors / 4, dim=1), torch.softmax(partners / 4, dim=1), reduction="sum")
    kd = kd * 4 ** 2 / 16
    torch.testing.assert_close(output.terms["cls"], 3.0 * kd.detach(), **TOL)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(anchors, y[:16]).detach(), **TOL)


def test_cs_kd_gradient_skips_partners_and_odd_batches_fail():
    logits = torch.randn(6, 10, requires_grad=True)
    class_consistency_loss(logits, 4.0).backward()
    assert logits.grad[3:].abs().sum() == 0 and logits.grad[:3].abs().sum() > 0
    with pytest.raises(ValueError, match="odd number of rows"):
        class_consistency_loss(torch.randn(5, 10), 4.0)
    term = AnchorCrossEntropyTerm("student")
    with pytest.raises(ValueError, match="ce_student"):
        term.loss(torch.randn(5, 10), torch.zeros(5, dtype=torch.long), context=StepContext())


# ------------------------------------------------------------------------------------------------------------ BYOT

def official_byot(final, heads, target, final_feature, head_features, temperature, alpha, beta):
    """luanyunteng/pytorch-be-your-own-teacher ``train.py`` total loss."""
    teacher = torch.softmax(final / temperature, dim=1).detach()

    def kd_loss_function(output):
        return -torch.mean(torch.sum(torch.log_softmax(output / temperature, dim=1) * teacher, dim=1))

    def feature_loss_function(fea, target_fea):
        return torch.abs((fea - target_fea) ** 2 * ((fea > 0) | (target_fea > 0)).float()).sum()

    ce = F.cross_entropy(final, target) + sum(F.cross_entropy(h, target) for h in heads)
    kd = sum(kd_loss_function(h) * temperature ** 2 for h in heads)
    feature = sum(feature_loss_function(f, final_feature.detach()) for f in head_features)
    return (1 - alpha) * ce + alpha * kd + beta * feature


def test_byot_trains_and_matches_official_formula():
    run_steps(build_recipe("byot", digits_setup()))
    recipe = build_recipe("byot", digits_setup(), alpha=0.3, beta=1e-3)
    distiller, batch, values, output = first_step(recipe)
    heads = distiller.terms[0].heads
    assert len(heads) == 2, "auxiliary heads on stage1 and stage2 (stage3 feeds the network's own classifier)"
    assert heads[0].bottleneck[3].stride == (4, 4) and heads[1].bottleneck[3].stride == (2, 2)
    outputs = [head(values[f"student:stage{i}"]) for i, head in zip((1, 2), heads)]
    expected = official_byot(values["student"], [o[1] for o in outputs], batch["target"], values["student:fc/input"],
                             [o[0] for o in outputs], 3.0, 0.3, 1e-3)
    torch.testing.assert_close(output.terms["byot"], expected.detach(), **TOL)


def test_byot_heads_are_trained_and_bad_models_fail():
    recipe = build_recipe("byot", digits_setup())
    run_steps(recipe)
    distiller = recipe.stages[0].distiller
    head_parameters = {id(p) for p in distiller.terms[0].heads.parameters()}
    assert head_parameters <= {id(p) for p in distiller.trainable_parameters()}
    with pytest.raises(ValueError, match="byot.*convolutional stage maps"):
        run_steps(build_recipe("byot", digits_setup(student="student-mlp"), stages=["hidden1", "fc"]))
    with pytest.raises(ValueError, match="at least two stages"):
        build_recipe("byot", digits_setup(), stages=["stage3"], embedding="fc/input")


# ------------------------------------------------------------------------------------------------------------- BAN

def test_ban_generations_chain_and_pure_kd_loss():
    setup = digits_setup()
    recipe = build_recipe("ban", setup)
    assert [stage.name for stage in recipe.stages] == ["generation-1", "generation-2", "generation-3"]
    models = [stage.distiller.models for stage in recipe.stages]
    assert models[0]["teacher"] is setup.teacher and models[-1]["student"] is setup.student
    assert models[1]["teacher"] is models[0]["student"] and models[2]["teacher"] is models[1]["student"]
    run_steps(recipe, steps=2)
    distiller, batch, values, output = first_step(recipe, stage_index=1)
    assert not any(p.requires_grad for p in distiller.models["teacher"].parameters())
    assert not distiller.models["teacher"].training
    soft_ce = -(torch.softmax(values["teacher"], 1) * torch.log_softmax(values["student"], 1)).sum(1).mean()
    torch.testing.assert_close(output.terms["ban"], soft_ce.detach(), **TOL)
    assert set(output.terms) == {"ban"}, "the paper's BAN has no label term"


def test_ban_with_labels_preset_and_bad_configuration():
    recipe = build_recipe("ban", digits_setup(), preset="with-labels", generations=1)
    _, batch, values, output = first_step(recipe)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]).detach(),
                               **TOL)
    with pytest.raises(ValueError, match="generations"):
        build_recipe("ban", digits_setup(), generations=0)
    setup = digits_setup()
    setup.new_student = None
    with pytest.raises(ValueError, match="new_student"):
        build_recipe("ban", setup)
    with pytest.raises(ValueError, match="teacher"):
        build_recipe("ban", digits_setup(teacher=None))


def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    entropy = -(torch.softmax(t / 2, 1) * torch.log_softmax(t / 2, 1)).sum(1).mean()
    expected = kdkernels.kd_loss(s, t, 2.0, scale_by_t2=False) + entropy
    torch.testing.assert_close(kdkernels.soft_cross_entropy_loss(s, t, 2.0), expected, **TOL)
    with pytest.raises(ValueError, match="same shape"):
        kdkernels.soft_cross_entropy_loss(s, t[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.soft_cross_entropy_loss(s, t, 0.0)
