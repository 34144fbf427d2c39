"""Relation-based methods (RKD, SP, CC, IRG, DarkRank, category structure): training steps on digits, taps, presets and configuration
errors, and each term equal to its weight times the public loss on the method's own values (the losses against the
official formulas: test_losses_relation.py, test_losses_ranking.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from trainer_testing import QUIET, assert_resume_is_exact


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


# ------------------------------------------------------------------------------------------- category structure

def test_category_structure_step_is_the_official_total():
    """``0.9·CE + category_structure(branch(f_s), f_t, y, z_s, z_t) + 1e-6·mse(z_s, z_t)`` (CSKD train_cifar.py), the
    student's last stage through a bias-free 1×1 convolution to the teacher's width."""
    history = run_steps(build_recipe("category-structure", digits_setup()))
    assert set(history[0]) == {"ce_student", "category_structure", "logit_mse"}
    distiller, batch, values, output = first_step(build_recipe("category-structure", digits_setup()))
    term = next(t for t in distiller.terms if t.name == "category_structure")
    assert isinstance(term.connector, torch.nn.Conv2d) and term.connector.bias is None
    assert term.connector.kernel_size == (1, 1) and term.connector.out_channels == 128
    mapped = term.connector(values["student:stage3"])
    close(output.terms["category_structure"], kdkernels.category_structure_loss(
        mapped, values["teacher:stage3"], batch["target"], values["student"], values["teacher"], 0.002, 0.04, 0.1))
    close(output.terms["ce_student"], 0.9 * F.cross_entropy(values["student"], batch["target"]))
    close(output.terms["logit_mse"], 1e-6 * F.mse_loss(values["student"], values["teacher"]))
    assert output.terms["category_structure"] > 0


def test_category_structure_options_and_mlp_student():
    recipe = build_recipe("category-structure", digits_setup(student="student-mlp"), student_layer="hidden1",
                          teacher_layer="fc/input", mse_weight=0.0, filter_correct=False, weight=2.0)
    distiller, batch, values, output = first_step(recipe)
    assert "logit_mse" not in output.terms
    term = next(t for t in distiller.terms if t.name == "category_structure")
    assert isinstance(term.connector, torch.nn.Linear) and term.connector.bias is None
    close(output.terms["category_structure"], 2.0 * kdkernels.category_structure_loss(
        term.connector(values["student:hidden1"]), values["teacher:fc/input"], batch["target"], values["student"],
        values["teacher"], filter_correct=False))


def test_category_structure_bad_configuration():
    with pytest.raises(ValueError, match="mse_weight must be >= 0"):
        build_recipe("category-structure", digits_setup(), mse_weight=-1.0)
    with pytest.raises(ValueError, match="intra_weight must be finite"):
        build_recipe("category-structure", digits_setup(), intra_weight=float("inf"))
    with pytest.raises(TypeError, match="filter_correct must be a bool"):
        build_recipe("category-structure", digits_setup(), filter_correct="yes")
    with pytest.raises(ValueError, match="term 'category_structure' needs"):
        first_step(build_recipe("category-structure", digits_setup(), student_layer="stage2"))
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("category-structure", digits_setup(teacher=None))


def make_category_structure(seed=0):
    return build_recipe("category-structure", digits_setup(seed=seed))


def test_category_structure_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_category_structure, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path,
                           pieces=(1, 1))
