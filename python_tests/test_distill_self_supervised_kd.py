"""Self-supervised-task KD (sskd): the rotation wrapper, each stage's step equal to the official formula on that
step's tensors, which parameters each stage trains, exact resume and configuration errors (the losses against the
official code: test_losses_self_supervised.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_testing import batches_for, digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from kdkernels.distill.methods.self_supervised_kd import Rotations
from test_losses_self_supervised import (official_hsakd_student, official_hsakd_teacher, official_sskd,
                                         official_sskd_head, official_sskd_similarity)
from trainer_testing import QUIET, assert_resume_is_exact


def term(distiller, name):
    return next(t for t in distiller.terms if t.name == name)


# ---------------------------------------------------------------------------------------------------------- SSKD

def test_rotations_stack_the_four_quarter_turns_per_image():
    x = torch.randn(3, 2, 5, 5)
    rows = Rotations(nn.Flatten())(x)
    assert rows.shape == (12, 50)
    for n in range(3):
        for k in range(4):
            assert torch.equal(rows[4 * n + k], torch.rot90(x[n], k, dims=(-2, -1)).flatten())
    with pytest.raises(ValueError, match=r"sskd rotates the input by quarter turns: it needs square images"):
        Rotations(nn.Flatten())(torch.randn(2, 1, 4, 5))


def test_sskd_head_stage_is_the_official_ssp_head_loss():
    distiller, batch, values, output = first_step(build_recipe("sskd", digits_setup()), stage_index=0)
    head = term(distiller, "sskd_head").head
    teacher = distiller.models["teacher"]
    assert not teacher.training and distiller.trainable == ()
    with torch.no_grad():
        copies = torch.stack([torch.rot90(batch["input"], k, dims=(-2, -1)) for k in range(4)], 1).flatten(0, 1)
        torch.testing.assert_close(values["teacher_rot"], teacher(copies))
        rep = head(values["teacher_rot:model.fc/input"]).double()
    torch.testing.assert_close(output.terms["sskd_head"].double(), official_sskd_head(rep), rtol=1e-5, atol=1e-7)


def unbiased_heads(recipe):
    """The recipe with its heads' biases zeroed: the untrained teacher's embeddings are tiny (~1e-3), so the
    default biases would make every head output nearly the same vector and the ranking of the similarities float32
    noise; without biases the heads are positively homogeneous and the similarities those of the embeddings."""
    stage = recipe.stages[1]
    stage.distiller.build(next(iter(batches_for(stage))))
    sskd = term(stage.distiller, "sskd")
    with torch.no_grad():
        for head in (sskd.student_head, sskd.teacher_head):
            for layer in (head[0], head[2]):
                layer.bias.zero_()
    return recipe


def test_sskd_step_is_the_official_student_loss():
    distiller, batch, values, output = first_step(unbiased_heads(build_recipe("sskd", digits_setup())))
    sskd = term(distiller, "sskd")
    assert sskd.reads == ("student_rot", "teacher_rot", "student_rot:model.fc/input", "teacher_rot:model.fc/input",
                          "target")
    with torch.no_grad():
        s_feat = sskd.student_head(values["student_rot:model.fc/input"]).double()
        t_feat = sskd.teacher_head(values["teacher_rot:model.fc/input"]).double()
    expected = official_sskd(values["student_rot"].double(), values["teacher_rot"].double(), s_feat, t_feat,
                             batch["target"])
    torch.testing.assert_close(output.terms["sskd"].double(), expected, rtol=1e-5, atol=1e-7)
    assert set(output.terms) == {"sskd"}
    spread = official_sskd_similarity(t_feat, batch["target"].shape[0]).std(dim=1)
    assert spread.min() > 1e-3, "the teacher's similarities must be ranked by more than rounding noise"


def test_sskd_stages_train_the_teacher_head_then_the_student_and_its_head():
    recipe = build_recipe("sskd", digits_setup())
    teacher_head = term(recipe.stages[1].distiller, "sskd").teacher_head
    assert teacher_head is term(recipe.stages[0].distiller, "sskd_head").head
    teacher = recipe.stages[0].distiller.models["teacher"]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    head_before = [p.detach().clone() for p in teacher_head.parameters()]
    run_steps(recipe, steps=2, lr=0.5)
    assert all(torch.equal(b, p) for b, p in zip(teacher_before, teacher.parameters()))
    moved = [not torch.equal(b, p) for b, p in zip(head_before, teacher_head.parameters())]
    assert all(moved)
    assert not any(p.requires_grad for p in teacher_head.parameters())   # frozen in the student stage
    student_params = {id(p) for p in recipe.stages[1].distiller.trainable_parameters()}
    assert {id(p) for p in recipe.student.parameters()} <= student_params
    assert not {id(p) for p in teacher_head.parameters()} & student_params


def test_sskd_stage_lengths_and_options():
    recipe = build_recipe("sskd", digits_setup(), head_epochs=3, ss_ratio=0.5)
    assert [s.name for s in recipe.stages] == ["sskd-head", "sskd"]
    assert recipe.stages[0].epochs_of(40) == 3 and recipe.stages[1].epochs_of(40) == 40
    assert build_recipe("sskd", digits_setup()).stages[0].epochs_of(40) == 10
    assert term(recipe.stages[1].distiller, "sskd").weights["ss_ratio"] == 0.5


def make_sskd(seed=0):
    return build_recipe("sskd", digits_setup(seed=seed), head_epochs=1)


def test_sskd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_sskd, dict(epochs=1, batch_size=128, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_sskd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("sskd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"^sskd: ss_ratio must be"):
        build_recipe("sskd", digits_setup(), ss_ratio=2.0)
    with pytest.raises(ValueError, match=r"^sskd: kd_temperature must be"):
        build_recipe("sskd", digits_setup(), kd_temperature=0)
    with pytest.raises(TypeError, match=r"^sskd: tf_weight must be a real number"):
        build_recipe("sskd", digits_setup(), tf_weight="2.7")
    with pytest.raises(ValueError, match=r"^sskd: head_epochs must be"):
        build_recipe("sskd", digits_setup(), head_epochs=1.5)
    with pytest.raises(TypeError, match=r"^sskd: head_epochs must be an int"):
        build_recipe("sskd", digits_setup(), head_epochs="1")


# --------------------------------------------------------------------------------------------------------- HSAKD

def rotations_of(x):
    return torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)], 1).flatten(0, 1)


def test_hsakd_aux_stage_is_the_official_frozen_teacher_objective():
    distiller, batch, values, output = first_step(build_recipe("hsakd", digits_setup()), stage_index=0)
    teacher, aux = distiller.models["teacher"], distiller.models["teacher_aux"]
    assert not teacher.training and aux.training and distiller.trainable == ("teacher_aux",)
    assert len(aux) == 3 and all(head[-1].out_features == 40 for head in aux)
    with torch.no_grad():
        torch.testing.assert_close(values["teacher_rot"], teacher(rotations_of(batch["input"])))
        ss_logits = [head(values[f"teacher_rot:model.stage{i}"]).double() for i, head in enumerate(aux, 1)]
    torch.testing.assert_close(output.terms["hsakd_aux"].double(), official_hsakd_teacher(ss_logits, batch["target"]),
                               rtol=1e-5, atol=1e-7)


def test_hsakd_step_is_the_official_student_loss():
    distiller, batch, values, output = first_step(build_recipe("hsakd", digits_setup()))
    hsakd = term(distiller, "hsakd")
    assert hsakd.reads == ("student_rot", "teacher_rot", "student_rot:model.stage1", "student_rot:model.stage2",
                           "student_rot:model.stage3", "teacher_rot:model.stage1", "teacher_rot:model.stage2",
                           "teacher_rot:model.stage3", "target")
    teacher_aux, student_aux = distiller.models["teacher_aux"], distiller.models["student_aux"]
    assert not teacher_aux.training and student_aux.training
    with torch.no_grad():
        ss = [head(values[f"student_rot:model.stage{i}"]).double() for i, head in enumerate(student_aux, 1)]
        t_ss = [head(values[f"teacher_rot:model.stage{i}"]).double() for i, head in enumerate(teacher_aux, 1)]
    expected = official_hsakd_student(values["student_rot"].double(), values["teacher_rot"].double(), ss, t_ss,
                                      batch["target"], T=3.0)
    torch.testing.assert_close(output.terms["hsakd"].double(), expected, rtol=1e-5, atol=1e-7)


def test_hsakd_stages_train_the_teacher_classifiers_then_the_student_and_its_classifiers():
    recipe = build_recipe("hsakd", digits_setup(), aux_epochs=2)
    assert [s.name for s in recipe.stages] == ["hsakd-aux", "hsakd"] and recipe.stages[0].epochs_of(240) == 2
    assert build_recipe("hsakd", digits_setup()).stages[0].epochs_of(240) == 100
    main = recipe.stages[1].distiller
    teacher, teacher_aux = main.models["teacher"], main.models["teacher_aux"]
    assert teacher_aux is recipe.stages[0].distiller.models["teacher_aux"]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    aux_before = [p.detach().clone() for p in teacher_aux.parameters()]
    history = run_steps(recipe, steps=2, lr=0.5)
    assert [set(h) for h in history] == [{"hsakd_aux"}] * 2 + [{"hsakd"}] * 2
    assert all(torch.equal(b, p) for b, p in zip(teacher_before, teacher.parameters()))
    assert any(not torch.equal(b, p) for b, p in zip(aux_before, teacher_aux.parameters()))
    trained = {id(p) for p in main.trainable_parameters()}
    assert {id(p) for p in main.models["student_aux"].parameters()} <= trained
    assert not {id(p) for p in teacher_aux.parameters()} & trained


def make_hsakd(seed=0):
    return build_recipe("hsakd", digits_setup(seed=seed), aux_epochs=1)


def test_hsakd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_hsakd, dict(epochs=1, batch_size=128, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_hsakd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("hsakd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"^hsakd: temperature must be"):
        build_recipe("hsakd", digits_setup(), temperature=-3.0)
    with pytest.raises(ValueError, match=r"^hsakd: aux_epochs must be"):
        build_recipe("hsakd", digits_setup(), aux_epochs=0)
    with pytest.raises(TypeError, match=r"^hsakd: aux_epochs must be an int"):
        build_recipe("hsakd", digits_setup(), aux_epochs=None)
    with pytest.raises(ValueError, match=r"hsakd pairs the stages one to one, got 1 student and 3 teacher"):
        build_recipe("hsakd", digits_setup(), student_layers="stage3")
