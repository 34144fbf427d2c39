"""Relation-based methods (RKD, SP, CC, IRG, DarkRank): training steps on digits, taps, presets and configuration
errors, and each term equal to its weight times the public loss on the method's own values (the losses against the
official formulas: test_losses_relation.py, test_losses_ranking.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe


def close(actual, expected):
    """The same computation up to the order of a few float32 operations."""
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-9)


def irg_taps(model):
    return [f"{model}:stage2", f"{model}:stage3", f"{model}:fc/input", model]


# the method's term from its values, with the default hyperparameters and taps
TERMS = {
    "rkd": lambda v: kdkernels.rkd_loss(v["student:fc/input"], v["teacher:fc/input"], 25.0, 50.0),
    "sp": lambda v: 3000.0 * kdkernels.sp_loss(v["student:stage3"], v["teacher:stage3"]),
    "cc": lambda v: 100.0 * kdkernels.cc_loss(v["student:fc/input"], v["teacher:fc/input"], 0.4, 2),
    "irg": lambda v: kdkernels.irg_loss([v[k] for k in irg_taps("student")], [v[k] for k in irg_taps("teacher")],
                                        0.1, 5.0, 5.0),
    "darkrank": lambda v: kdkernels.darkrank_loss(v["student:fc/input"], v["teacher:fc/input"], 3.0, 3.0, 4),
}


@pytest.mark.parametrize("method", list(TERMS))
def test_relation_method_trains_and_its_term_is_the_public_loss(method):
    history = run_steps(build_recipe(method, digits_setup()))
    assert set(history[0]) == {"ce_student", method}
    _, batch, values, output = first_step(build_recipe(method, digits_setup()))
    close(output.terms[method], TERMS[method](values))
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))


def test_rkd_optional_kd_and_metric_preset():
    recipe = build_recipe("rkd", digits_setup(), preset="metric", kd_weight=0.5)
    assert recipe.hyperparameters["distance_weight"] == 1.0 and recipe.hyperparameters["angle_weight"] == 2.0
    _, _, values, output = first_step(recipe)
    close(output.terms["rkd"], kdkernels.rkd_loss(values["student:fc/input"], values["teacher:fc/input"], 1.0, 2.0))
    close(output.terms["kd"], 0.5 * kdkernels.kd_loss(values["student"], values["teacher"], 4.0))


def test_relation_bad_configuration():
    with pytest.raises(ValueError, match="two stages"):
        build_recipe("irg", digits_setup(student="student-mlp"))
    recipe = build_recipe("irg", digits_setup(student="student-mlp"), student_stages=("hidden1", "hidden1"))
    with pytest.raises(ValueError, match="term 'irg'.*transform"):
        first_step(recipe)
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("rkd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        build_recipe("sp", digits_setup(), student_layer="nope")


def test_relation_explicit_taps_on_mlp_student():
    recipe = build_recipe("rkd", digits_setup(student="student-mlp"), student_layer="hidden1")
    _, _, values, output = first_step(recipe)
    close(output.terms["rkd"], kdkernels.rkd_loss(values["student:hidden1"], values["teacher:fc/input"]))


# ------------------------------------------------------------------------------------------------------- REFILLED

from test_losses_relation import official_refilled_stage1, official_refilled_stage2  # noqa: E402
from trainer_testing import QUIET, assert_resume_is_exact  # noqa: E402


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_refilled_embedding_stage_then_local_classifier_stage_are_the_official_steps():
    recipe = build_recipe("refilled", digits_setup())
    assert [s.name for s in recipe.stages] == ["refilled-embedding", "refilled"]
    assert [s.epochs_of(30) for s in recipe.stages] == [15, 15]
    history = run_steps(build_recipe("refilled", digits_setup()))
    assert set(history[0]) == {"refilled_triplet"} and set(history[-1]) == {"ce_student", "refilled_classifier"}
    _, batch, values, output = first_step(build_recipe("refilled", digits_setup()), stage_index=0)
    assert set(output.terms) == {"refilled_triplet"}
    expected = 1000.0 * official_refilled_stage1(values["student:fc/input"].double(),
                                                 values["teacher:fc/input"].double(), batch["target"], 4.0)
    assert expected > 0
    torch.testing.assert_close(output.terms["refilled_triplet"].double(), expected.detach(), rtol=1e-4, atol=1e-7)
    _, batch, values, output = first_step(build_recipe("refilled", digits_setup()), stage_index=1)
    expected = 1000.0 * official_refilled_stage2(values["student"].double(), values["teacher:fc/input"].double(),
                                                 batch["target"], 10, 2.0)
    torch.testing.assert_close(output.terms["refilled_classifier"].double(), expected.detach(), rtol=1e-4,
                               atol=1e-7)
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))


def test_refilled_hyperparameters_and_epoch_count():
    recipe = build_recipe("refilled", digits_setup(), triplet_weight=2.0, triplet_temperature=1.0,
                          classifier_weight=3.0, classifier_temperature=4.0, embedding_epochs=2)
    assert [s.epochs_of(30) for s in recipe.stages] == [2, 30]
    _, batch, values, output = first_step(recipe, stage_index=0)
    close(output.terms["refilled_triplet"], 2.0 * kdkernels.refilled_triplet_loss(
        values["student:fc/input"], values["teacher:fc/input"], batch["target"], 1.0))
    _, batch, values, output = first_step(recipe, stage_index=1)
    close(output.terms["refilled_classifier"], 3.0 * kdkernels.refilled_classifier_loss(
        values["student"], values["teacher:fc/input"], batch["target"], 4.0))


def make_refilled(seed=0):
    return build_recipe("refilled", digits_setup(seed=seed))


def test_refilled_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_refilled, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_refilled_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("refilled", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"refilled: embedding_epochs must be a share of the run in \(0, 1\)"):
        build_recipe("refilled", digits_setup(), embedding_epochs=1.0)
    with pytest.raises(TypeError, match=r"refilled: embedding_epochs must be"):
        build_recipe("refilled", digits_setup(), embedding_epochs="half")
    with pytest.raises(ValueError, match=r"refilled_triplet_loss: temperature"):
        first_step(build_recipe("refilled", digits_setup(), triplet_temperature=0.0), stage_index=0)


# ----------------------------------------------------------------------------------------------------------- CRCD

from distill_testing import batches_for  # noqa: E402
from kdkernels.distill.terms import StepContext  # noqa: E402
from test_losses_contrastive import official_contrast_loss, official_crcd_out  # noqa: E402


def crcd_step(recipe, epoch=1, epochs=30, seed=7):
    """(distiller, batch, values, output, banks before the step) of one training forward at a fixed RNG seed."""
    stage = recipe.stages[-1]
    batch = next(iter(batches_for(stage, 32)))
    distiller = stage.distiller
    distiller.build(batch).activate().train()
    values = distiller.run_models(batch)
    banks = {t.name: (t.memory_student.clone(), t.memory_teacher.clone()) for t in distiller.terms
             if t.name.startswith("crcd")}
    torch.manual_seed(seed)
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=epochs, batch=batch))
    return distiller, batch, values, output, banks


def official_crcd_criterion(term, f_s, f_t, index, contrast, banks, num_data):
    """train_student.py's CRCDLoss on (f_s, f_t): Embed heads, then ContrastMemory + 2 ContrastLoss (first call)."""
    with torch.no_grad():
        v1, v2 = term.embed_student(f_s).double(), term.embed_teacher(f_t).double()
    out_s, out_t, _ = official_crcd_out(v1, v2, index, contrast, banks[0].double(), banks[1].double(), 0.05)
    return official_contrast_loss(out_s, num_data) + official_contrast_loss(out_t, num_data)


def test_crcd_step_is_the_official_feature_and_gradient_relation_loss():
    setup = digits_setup()
    distiller, batch, values, output, banks = crcd_step(build_recipe("crcd", setup, num_negatives=40))
    assert set(output.terms) == {"ce_student", "kd", "crcd", "crcd_grad"}
    torch.manual_seed(7)
    index = batch["index"].long()
    contrast = kdkernels.sample_other_class_indices(index, setup.train_labels, 40)   # one draw for both criteria
    terms = {t.name: t for t in distiller.terms}
    f_s, f_t, labels = values["student:fc/input"], values["teacher:fc/input"], batch["target"]
    feature = official_crcd_criterion(terms["crcd"], f_s, f_t, index, contrast, banks["crcd"], 200)
    # loops.py get_grad_loss: ∂CE/∂f of a linear classifier, (softmax(z) − onehot(y)) W / B, written out
    grads = [(F.softmax(z.double(), 1) - F.one_hot(labels, 10).double()) @ model.fc.weight.double() / len(labels)
             for z, model in ((values["student"], setup.student), (values["teacher"], setup.teachers[0]))]
    gradient = official_crcd_criterion(terms["crcd_grad"], grads[0].float(), grads[1].float(), index, contrast,
                                       banks["crcd_grad"], 200)
    p_t, log_p_s = F.softmax(values["teacher"].double() / 4, 1), F.log_softmax(values["student"].double() / 4, 1)
    kd = 16 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    expected = {"crcd": feature, "crcd_grad": gradient, "kd": 0.9 * kd,
                "ce_student": F.cross_entropy(values["student"].double(), labels)}
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name].double(), value.detach(), rtol=2e-5, atol=1e-6)
    output.loss.backward()          # the gradient relation trains the student through the CE gradient
    assert terms["crcd_grad"].embed_student.linear.weight.grad.abs().sum() > 0
    assert setup.student.fc.weight.grad is not None
    assert not torch.equal(terms["crcd"].memory_student, banks["crcd"][0])     # the banks moved after the step
    assert bool((terms["crcd"].normalizers > 0).all())


def test_crcd_mimic_schedule_and_feature_only_variant():
    assert build_recipe("crcd", digits_setup()).hyperparameters["num_negatives"] == 500
    _, batch, values, output, _ = crcd_step(build_recipe("crcd", digits_setup(), num_negatives=40), epoch=30,
                                            epochs=30)
    assert all(float(output.terms[name]) == 0 for name in ("kd", "crcd", "crcd_grad"))
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))
    _, _, _, output, _ = crcd_step(build_recipe("crcd", digits_setup(), num_negatives=40), epoch=29, epochs=30)
    assert float(output.terms["crcd_grad"]) > 0
    recipe = build_recipe("crcd", digits_setup(student="student-mlp"), gradient=False, kd_weight=0.0,
                          student_layer="hidden1", num_negatives=40)
    history = run_steps(recipe)
    assert set(history[0]) == {"ce_student", "crcd"}


def make_crcd(seed=0):
    return build_recipe("crcd", digits_setup(seed=seed), num_negatives=40)


def test_crcd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_crcd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_crcd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("crcd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"crcd: mimic_until must be a share of the run in \(0, 1\]"):
        build_recipe("crcd", digits_setup(), mimic_until=1.5)
    with pytest.raises(ValueError, match=r"crcd: num_negatives must be a positive int"):
        build_recipe("crcd", digits_setup(), num_negatives=0)
    with pytest.raises(ValueError, match=r"crcd: the gradient relation .* student_layer must be '<classifier"):
        build_recipe("crcd", digits_setup(student="student-mlp"), student_layer="hidden1")
    with pytest.raises(ValueError, match=r"crcd: nce_temperature must be > 0"):
        build_recipe("crcd", digits_setup(), nce_temperature=0.0)
