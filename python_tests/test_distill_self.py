"""Self-distillation strategies (BAKE, CS-KD, BYOT, BAN): training steps on digits, batching, heads, generations and
configuration errors, and each term equal to its weight times the public loss on the method's own values (the
losses against the official formulas: test_losses_bake.py, test_losses_self_distillation.py,
test_losses_response.py)."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps, viewed_step
from trainer_testing import QUIET, assert_resume_is_exact
from kdkernels.distill import build_recipe
from kdkernels.distill.methods.self_distillation import AnchorCrossEntropyTerm, class_consistency_loss
from kdkernels.distill.terms import StepContext



def close(actual, expected):
    """The same computation up to the order of a few float32 operations."""
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------------------ BAKE

def test_bake_trains_on_class_aware_batches():
    run_steps(build_recipe("bake", digits_setup()))
    recipe = build_recipe("bake", digits_setup(), temperature=3.0, omega=0.6)
    _, batch, values, output = first_step(recipe)
    z, y = values["student"], batch["target"]
    close(output.terms["bake"], kdkernels.bake_loss(z, values["student:fc/input"], 3.0, 0.6))
    close(output.terms["ce_student"], F.cross_entropy(z, y))
    assert (y[0::2] == y[1::2]).all(), "class-aware batches: each anchor followed by a sample of its class"


def test_bake_presets_and_batching():
    stage = build_recipe("bake", digits_setup()).stages[0]
    assert stage.batching == "class_aware" and stage.batching_options == {"intra": 1}
    assert build_recipe("bake", digits_setup(), preset="cifar").stages[0].batching_options == {"intra": 3}
    assert build_recipe("bake", digits_setup(), preset="tinyimagenet").hyperparameters["omega"] == 0.9
    with pytest.raises(ValueError, match="intra"):
        build_recipe("bake", digits_setup(), intra=0)


# ----------------------------------------------------------------------------------------------------------- CS-KD

def test_cs_kd_trains_on_pairs_towards_the_partners():
    run_steps(build_recipe("cs-kd", digits_setup()))
    _, batch, values, output = first_step(build_recipe("cs-kd", digits_setup(), kd_weight=3.0), batch_size=16)
    z, y = values["student"], batch["target"]
    assert z.shape[0] == 32 and (y[:16] == y[16:]).all(), "pairs: 16 anchors then 16 same-class partners"
    close(output.terms["cls"], 3.0 * kdkernels.kd_loss(z[:16], z[16:], 4.0))
    close(output.terms["ce_student"], F.cross_entropy(z[:16], y[:16]))


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

def test_byot_trains_its_heads_on_the_shallow_stages():
    run_steps(build_recipe("byot", digits_setup()))
    recipe = build_recipe("byot", digits_setup(), alpha=0.3, beta=1e-3)
    distiller, batch, values, output = first_step(recipe)
    heads = distiller.terms[0].heads
    assert len(heads) == 2, "auxiliary heads on stage1 and stage2 (stage3 feeds the network's own classifier)"
    assert heads[0].bottleneck[3].stride == (4, 4) and heads[1].bottleneck[3].stride == (2, 2)
    outputs = [head(values[f"student:stage{i}"]) for i, head in zip((1, 2), heads)]
    expected = kdkernels.byot_loss(values["student"], [o[1] for o in outputs], batch["target"],
                                   values["student:fc/input"], [o[0] for o in outputs], 3.0, 0.3, 1e-3)
    close(output.terms["byot"], expected)


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
    close(output.terms["ban"], kdkernels.soft_cross_entropy_loss(values["student"], values["teacher"], 1.0))
    assert set(output.terms) == {"ban"}, "the paper's BAN has no label term"


def test_ban_with_labels_preset_and_bad_configuration():
    recipe = build_recipe("ban", digits_setup(), preset="with-labels", generations=1)
    _, batch, values, output = first_step(recipe)
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))
    with pytest.raises(ValueError, match="generations"):
        build_recipe("ban", digits_setup(), generations=0)
    setup = digits_setup()
    setup.new_student = None
    with pytest.raises(ValueError, match="new_student"):
        build_recipe("ban", setup)
    with pytest.raises(ValueError, match="teacher"):
        build_recipe("ban", digits_setup(teacher=None))



# ------------------------------------------------------------------------------------------------------------- SAD

def official_sad_step(values, batch, weight):
    """CE + weight · Σ at_gen(stage_m, stage_{m+1}) (ENet-SAD_Pytorch), the deeper map detached."""
    maps = [values[f"student:stage{i}"].double() for i in (1, 2, 3)]
    total = 0.0
    for x1, x2 in zip(maps[:-1], maps[1:]):
        a1 = torch.softmax(x1.pow(2).sum(1).flatten(1), dim=-1)
        a2 = F.interpolate(x2.detach().pow(2).sum(1, keepdim=True), size=x1.shape[-2:], mode="bilinear",
                           align_corners=False)
        total = total + F.mse_loss(a1, torch.softmax(a2.flatten(1), dim=-1))
    return F.cross_entropy(values["student"], batch["target"]), weight * total


def test_sad_step_is_the_official_formula_after_the_start():
    run_steps(build_recipe("sad", digits_setup()))
    recipe = build_recipe("sad", digits_setup(), sad_weight=0.5, start=0.5)
    distiller, batch, values, output = first_step(recipe, epoch=2)
    ce, distill = official_sad_step(values, batch, 0.5)
    close(output.terms["ce_student"], ce)
    torch.testing.assert_close(output.terms["sad"].double(), distill.detach(), rtol=1e-5, atol=1e-9)
    assert distill > 0
    _, _, _, early = first_step(build_recipe("sad", digits_setup(), start=0.5), epoch=1)
    assert early.terms["sad"] == 0, "SAD is off before the share `start` of the epochs"
    context = StepContext(epoch=21, epochs=30)
    assert recipe.stages[0].distiller.terms[1].weight_at(StepContext(epoch=15, epochs=30)) == 0.0
    assert build_recipe("sad", digits_setup()).stages[0].distiller.terms[1].weight_at(context) == 0.1


def make_sad(seed=0):
    return build_recipe("sad", digits_setup(seed=seed), start=0.5)


def test_sad_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_sad, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_sad_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="sad: start"):
        build_recipe("sad", digits_setup(), start=1.0)
    with pytest.raises(ValueError, match="sad: sad_weight"):
        build_recipe("sad", digits_setup(), sad_weight=-1.0)
    with pytest.raises(ValueError, match="sad: p must"):
        build_recipe("sad", digits_setup(), p=0)
    with pytest.raises(TypeError, match="sad: detach_target"):
        build_recipe("sad", digits_setup(), detach_target="yes")
    with pytest.raises(ValueError, match="at least two stages"):
        build_recipe("sad", digits_setup(), stages=["stage3"])
    with pytest.raises(ValueError, match="sad.*convolutional stage maps"):
        run_steps(build_recipe("sad", digits_setup(student="student-mlp"), stages=["hidden1", "fc"]))


# ------------------------------------------------------------------------------------------------------------- DKS

def official_dks(outputs, targets):
    """sundw2014/DKS ``wrn_DKS/main.py`` ``h``: CE on every output, KL_divergence(o2.detach(), o) for every pair."""

    def kl_divergence(logits_p, logits_q):
        p, q = F.softmax(logits_p, dim=1), F.softmax(logits_q, dim=1)
        _p, _q = (p + 1e-8) / (1.0 + p.shape[1] * 1e-8), (q + 1e-8) / (1.0 + q.shape[1] * 1e-8)
        return torch.mean(torch.sum(_p * torch.log(_p / _q), 1))

    return sum(F.cross_entropy(o, targets) + sum(kl_divergence(o2.detach(), o) for o2 in outputs if o2 is not o)
               for o in outputs)


def test_dks_step_is_the_official_loss_over_its_branches():
    recipe = build_recipe("dks", digits_setup())
    run_steps(recipe)
    distiller, batch, values, output = first_step(build_recipe("dks", digits_setup()))
    heads = distiller.terms[0].heads
    assert len(heads) == 2, "branches on stage1 and stage2 (stage3 feeds the network's own classifier)"
    assert heads[0].bottleneck[3].stride == (4, 4) and heads[1].bottleneck[3].stride == (2, 2)
    branches = [head(values[f"student:stage{i}"])[1] for i, head in zip((1, 2), heads)]
    outputs = [z.double() for z in (*branches, values["student"])]
    torch.testing.assert_close(output.terms["dks"].double(), official_dks(outputs, batch["target"]).detach(),
                               rtol=1e-5, atol=1e-7)
    trained = recipe.stages[0].distiller
    assert {id(p) for p in trained.terms[0].heads.parameters()} <= {id(p) for p in trained.trainable_parameters()}
    assert recipe.student is trained.models["student"], "the evaluated model is the main classifier"


def make_dks(seed=0):
    return build_recipe("dks", digits_setup(seed=seed))


def test_dks_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_dks, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_dks_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="dks: epsilon"):
        build_recipe("dks", digits_setup(), epsilon=-1.0)
    with pytest.raises(ValueError, match="dks: stages must hold at least two"):
        build_recipe("dks", digits_setup(), stages=["stage3"])
    with pytest.raises(ValueError, match="dks.*convolutional stage maps"):
        run_steps(build_recipe("dks", digits_setup(student="student-mlp"), stages=["hidden1", "fc"]))


# ----------------------------------------------------------------------------------------------------------- DDGSD

def ddgsd_step(step=2, **overrides):
    recipe = build_recipe("ddgsd", digits_setup(teacher=None), **overrides)
    return (recipe, *viewed_step(recipe, step))


def test_ddgsd_step_is_the_paper_loss_on_two_distorted_views():
    recipe, viewed, output = ddgsd_step(kl_weight=0.5, mmd_weight=2.0)
    assert not torch.equal(viewed["input"], viewed["input_view2"]), "two independent distortions"
    student = recipe.stages[0].distiller.models["student"]
    assert recipe.stages[0].distiller.models["ddgsd"].network is student
    features = {}
    handle = student.fc.register_forward_pre_hook(lambda _m, inputs: features.setdefault(len(features), inputs[0]))
    with torch.no_grad():
        za, zb = student(viewed["input"]).double(), student(viewed["input_view2"]).double()
    handle.remove()
    fa, fb = features[0].double(), features[1].double()
    pa, pb = F.softmax(za, 1), F.softmax(zb, 1)
    kl = (pa * torch.log(pa / pb)).sum(1).mean() + (pb * torch.log(pb / pa)).sum(1).mean()
    expected = (F.cross_entropy(za, viewed["target"]) + F.cross_entropy(zb, viewed["target"]) + 0.5 * kl
                + 2.0 * ((fa.mean(0) - fb.mean(0)) ** 2).sum())
    torch.testing.assert_close(output.terms["ddgsd"].double(), expected, rtol=1e-5, atol=1e-7)
    assert kl > 0


def make_ddgsd(seed=0):
    return build_recipe("ddgsd", digits_setup(seed=seed, teacher=None))


def test_ddgsd_resume_is_bit_exact_and_evaluates_the_network(tmp_path):
    assert_resume_is_exact(make_ddgsd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))
    assert recipe_evaluates_student(make_ddgsd())


def recipe_evaluates_student(recipe):
    distiller = recipe.stages[0].distiller
    return distiller.evaluate == ("student",) and recipe.student is distiller.models["student"]


def test_ddgsd_presets_and_bad_configuration():
    assert build_recipe("ddgsd", digits_setup(), preset="cifar").hyperparameters["translate"] == 4
    with pytest.raises(ValueError, match="ddgsd: kl_weight"):
        build_recipe("ddgsd", digits_setup(), kl_weight=-1.0)
    with pytest.raises(ValueError, match="ddgsd: translate"):
        build_recipe("ddgsd", digits_setup(), translate=-1)
    with pytest.raises(TypeError, match="ddgsd: flip"):
        build_recipe("ddgsd", digits_setup(), flip="no")
    with pytest.raises(ValueError, match="ddgsd's network.*no submodule 'head9'"):
        build_recipe("ddgsd", digits_setup(), embedding="head9/input")
