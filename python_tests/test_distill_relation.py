"""Relation-based methods (RKD, SP, CC, IRG, DarkRank, category structure, MHGD): training steps on digits, taps,
presets and configuration errors, and each term equal to its weight times the public loss on the method's own values
(the losses against the official formulas: test_losses_relation.py, test_losses_ranking.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import batches_for, digits_setup, first_step, run_steps
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


# ------------------------------------------------------------------------------------------------------------ MHGD

def official_bn(x, bn, training):
    """tf.contrib.layers.batch_norm (scale, center, eps 1e-5) on [B, F]: batch statistics in training, else the
    moving ones."""
    if training:
        mean, var = x.mean(0), x.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (x - mean) / torch.sqrt(var + 1e-5) * bn.weight + bn.bias


def official_attention_head(K, Q, net, num_head, training):
    """KD_methods_with_TF ``Attention_head(K, Q, D, num_head)``: bias-free fully connected + batch norm on sender K
    and receiver Q, reshaped [B, D, num_head], transposed to [H, B, D] and [H, D, B], multiplied."""
    B = K.shape[0]
    X_sender = official_bn(K @ net.sender[0].weight.t(), net.sender[1], training).reshape(B, -1, num_head)
    X_receiver = official_bn(Q @ net.receiver[0].weight.t(), net.receiver[1], training).reshape(B, -1, num_head)
    return torch.matmul(X_sender.permute(2, 0, 1), X_receiver.permute(2, 1, 0))


def official_estimator(X, G, net, num_head, noise):
    """KD_methods_with_TF ``Estimator(X, G, Dy, num_head)`` with ``drop_head``'s normal noise given."""
    B = G.shape[1]
    G = torch.softmax(G, -1)
    G = G * torch.where(noise - noise.mean(0, keepdim=True) > 0, torch.ones_like(noise), torch.zeros_like(noise))
    G = G.reshape(num_head * B, B)
    X = torch.relu(official_bn(X @ net.hidden[0].weight.t(), net.hidden[1], True))
    D = X.shape[1]
    X = torch.matmul(G, X).reshape(num_head, B, D).permute(1, 0, 2).reshape(B, D * num_head)
    X = X @ net.output.weight.t() + net.output.bias
    return F.normalize(X, dim=-1)


def mhgd_parts(distiller, name):
    term = next(t for t in distiller.terms if t.name == name)
    return term, term.graphs


def embed(x):
    return F.normalize(x.mean(dim=(2, 3)), dim=-1)


def test_mhgd_stages_train_the_attention_on_the_teacher_then_freeze_it():
    recipe = build_recipe("mhgd", digits_setup())
    assert [s.name for s in recipe.stages] == ["mhgd-attention", "mhgd"]
    assert recipe.stages[0].epochs == 0.4
    _, graphs = mhgd_parts(recipe.stages[0].distiller, "mhgd_attention")
    assert len(graphs.pairs) == 2 and graphs.widths == [32, 64, 128]
    assert graphs.pairs[0].attention_width == 48 and graphs.pairs[0].num_heads == 8
    teacher = recipe.stages[0].distiller.models["teacher"]
    before = [p.detach().clone() for p in graphs.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    history = run_steps(recipe, steps=2)
    assert set(history[0]) == {"mhgd_attention"} and set(history[-1]) == {"ce_student", "mhgd"}
    assert any(not torch.equal(b, p) for b, p in zip(before, graphs.parameters()))
    assert all(torch.equal(b, p) for b, p in zip(teacher_before, teacher.parameters()))
    trainable = {id(p) for p in recipe.stages[1].distiller.trainable_parameters()}
    assert not any(id(p) in trainable for p in graphs.parameters()), "the attention networks are frozen in stage 2"
    assert not graphs.training


def test_mhgd_attention_stage_is_the_official_reconstruction():
    """Stage 1: ``Σ_pairs mean(1 − <Estimator(V_Tb, Attention_head(V_T, V_Tb)), V_T>)`` (``MHA_loss``), the same
    head-drop noise drawn."""
    recipe = build_recipe("mhgd", digits_setup())
    distiller = recipe.stages[0].distiller
    batch = next(iter(batches_for(recipe.stages[0])))
    distiller.build(batch).activate().train()
    values = distiller.run_models(batch)
    term, graphs = mhgd_parts(distiller, "mhgd_attention")
    torch.manual_seed(5)
    ours = term.loss(*(values[k] for k in term.reads), context=None)
    torch.manual_seed(5)
    V = [embed(values[f"teacher:stage{i}"]) for i in (1, 2, 3)]
    expected = 0.0
    for index, net in enumerate(graphs.pairs):
        V_Tb, V_T = V[index], V[index + 1]
        G_T = official_attention_head(V_T, V_Tb, net, 8, training=True)
        noise = torch.randn(8, V_T.shape[0], 1)
        V_T_ = official_estimator(V_Tb, G_T, net, 8, noise)
        expected = expected + torch.mean(1 - torch.sum(V_T_ * V_T, -1))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_mhgd_graph_term_is_the_official_kld_with_clipped_student_gradients():
    """Stage 2: ``Σ_pairs kld_loss(tanh G_S, tanh G_T)`` with the attention's batch norms on moving statistics, and
    each student parameter's graph gradient clipped to ``sigmoid(0)·‖∇ CE‖`` in the stage's first epoch."""
    recipe = build_recipe("mhgd", digits_setup())
    distiller, batch, values, output = first_step(recipe)
    term, graphs = mhgd_parts(distiller, "mhgd")
    assert [type(c).__name__ for c in term.connectors] == ["Linear", "Linear", "Linear"]
    V_T = [embed(values[f"teacher:stage{i}"]) for i in (1, 2, 3)]
    V_S = [F.normalize(c(values[f"student:stage{i}"].mean(dim=(2, 3))), dim=-1)
           for c, i in zip(term.connectors, (1, 2, 3))]
    expected = 0.0
    for index, net in enumerate(graphs.pairs):
        G_T = torch.tanh(official_attention_head(V_T[index + 1], V_T[index], net, 8, training=False))
        G_S = torch.tanh(official_attention_head(V_S[index + 1], V_S[index], net, 8, training=False))
        expected = expected + torch.sum(torch.softmax(G_S, -1) * (torch.log_softmax(G_S, -1) -
                                                                  torch.log_softmax(G_T, -1)))
    close(output.terms["mhgd"], expected)
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))

    student = distiller.models["student"]
    params = [p for p in student.parameters()]
    graph_grads = torch.autograd.grad(expected, params, retain_graph=True, allow_unused=True)
    ce_grads = torch.autograd.grad(F.cross_entropy(values["student"], batch["target"]), params, retain_graph=True,
                                   allow_unused=True)
    totals = torch.autograd.grad(output.loss, params, retain_graph=True, allow_unused=True)   # CE + graph term
    clipped_any = False
    for graph_grad, ce_grad, total in zip(graph_grads, ce_grads, totals):
        if graph_grad is None:
            torch.testing.assert_close(total, ce_grad)
            continue
        norm = 0.5 * ce_grad.norm()
        want = graph_grad * norm / torch.maximum(graph_grad.norm(), norm)   # tf.clip_by_norm
        slack = 1e-5 * float(ce_grad.abs().max())   # float32 rounding of the CE part of the total
        torch.testing.assert_close(total, ce_grad + want, rtol=1e-5, atol=slack)
        clipped_any |= bool((graph_grad - want).abs().max() > 100 * slack)
    assert clipped_any, "some student gradient is clipped by far more than the tolerance"
    connector_grad = torch.autograd.grad(output.loss, term.connectors[2].weight, retain_graph=True)[0]
    torch.testing.assert_close(connector_grad, torch.autograd.grad(expected, term.connectors[2].weight)[0])


def test_mhgd_equal_widths_need_no_connector_and_clipping_can_be_off():
    setup = digits_setup("assistant-cnn", "assistant-cnn")
    distiller, _, values, output = first_step(build_recipe("mhgd", setup, clip_gradients=False, weight=2.0))
    term, _ = mhgd_parts(distiller, "mhgd")
    assert all(isinstance(c, torch.nn.Identity) for c in term.connectors)
    graph = term.graph_loss([values[f"student:stage{i}"] for i in (1, 2, 3)],
                            [values[f"teacher:stage{i}"] for i in (1, 2, 3)])
    close(output.terms["mhgd"], 2.0 * graph)
    first = next(distiller.models["student"].parameters())
    ce = F.cross_entropy(values["student"], next(iter(batches_for(build_recipe("mhgd", setup).stages[1])))["target"])
    torch.testing.assert_close(torch.autograd.grad(output.loss, first, retain_graph=True)[0],
                               torch.autograd.grad(ce + 2.0 * graph, first)[0])


def test_mhgd_bad_configuration():
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        build_recipe("mhgd", digits_setup(), num_heads=0)
    with pytest.raises(TypeError, match="clip_gradients must be a bool"):
        build_recipe("mhgd", digits_setup(), clip_gradients=1)
    with pytest.raises(ValueError, match="at least two consecutive stages"):
        build_recipe("mhgd", digits_setup(), student_layers=["stage3"], teacher_layers=["stage3"])
    with pytest.raises(ValueError, match="teacher_widths must give one width per teacher stage"):
        build_recipe("mhgd", digits_setup(), teacher_widths=[32, 64])
    with pytest.raises(ValueError, match=r"the attention networks were sized for \[32, 64, 100\]"):
        first_step(build_recipe("mhgd", digits_setup(), teacher_widths=[32, 64, 100]), stage_index=0)
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("mhgd", digits_setup(teacher=None))


def make_mhgd(seed=0):
    return build_recipe("mhgd", digits_setup(seed=seed), attention_epochs=1)


def test_mhgd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_mhgd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1, 1))


# ------------------------------------------------------------------------------------------------------- REFILLED

from test_losses_relation import official_refilled_stage1, official_refilled_stage2  # noqa: E402


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


# ------------------------------------------------------------------------------------------ manifold distillation

def official_mf_layer(F_s, F_t, K):
    """Hao840/manifold-distillation @1096b82 ``losses.py`` ``layer_mf_loss`` (float64 here): patch, sample, random."""
    F_s, F_t = F.normalize(F_s, dim=-1), F.normalize(F_t, dim=-1)
    patch = ((F_t.bmm(F_t.transpose(-1, -2)) - F_s.bmm(F_s.transpose(-1, -2))) ** 2).mean()
    f_s, f_t = F_s.permute(1, 0, 2), F_t.permute(1, 0, 2)
    sample = ((f_t.bmm(f_t.transpose(-1, -2)) - f_s.bmm(f_s.transpose(-1, -2))) ** 2).mean()
    bsz, patch_num, _ = F_s.shape
    sampler = torch.randperm(bsz * patch_num)[:K]
    f_s, f_t = F_s.reshape(bsz * patch_num, -1)[sampler], F_t.reshape(bsz * patch_num, -1)[sampler]
    random = ((f_t.mm(f_t.T) - f_s.mm(f_s.T)) ** 2).mean()
    return patch, sample, random


def official_manifold_step(values, labels, s_taps, t_taps, *, drop_student, drop_teacher, alpha=1.0, tau=1.0,
                           kind="soft", K=192, weights=(0.1, 4.0, 0.2), beta=1.0, heads=("student", "student")):
    """``DistillationLoss.forward`` + ``mf_loss`` on the step's values: (base, distillation, manifold) terms."""
    outputs, outputs_kd = values[heads[0]].double(), values[heads[1]].double()
    teacher_outputs = values["teacher"].double()
    base = (1 - alpha) * F.cross_entropy(outputs, labels)
    if kind == "soft":
        distillation = F.kl_div(F.log_softmax(outputs_kd / tau, dim=1), F.log_softmax(teacher_outputs / tau, dim=1),
                                reduction="batchmean", log_target=True) * (tau * tau)
    else:
        distillation = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    parts = [[], [], []]
    for s_tap, t_tap in zip(s_taps, t_taps):
        patch, sample, random = official_mf_layer(values[s_tap].double()[:, drop_student:],
                                                  values[t_tap].double()[:, drop_teacher:], K)
        parts[0].append(weights[0] * sample)
        parts[1].append(weights[1] * patch)
        parts[2].append(weights[2] * random)
    return base, alpha * distillation, beta * sum(sum(part) / len(part) for part in parts)


def manifold_setup(student="student-vit", seed=0):
    return digits_setup(student=student, teacher="teacher-vit", seed=seed)


def seeded_terms(distiller, values, batch, seed=11):
    """The step's terms with the global RNG (manifold's random rows) at ``seed``."""
    from kdkernels.distill.terms import StepContext

    torch.manual_seed(seed)
    return distiller.compute_terms(values, StepContext(epoch=1, epochs=1, batch=batch)).terms


def assert_manifold_step(output_terms, official):
    base, distillation, relation = official
    for name, expected in (("kd", distillation), ("manifold", relation)):
        torch.testing.assert_close(output_terms[name].double(), expected.detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(next(v for k, v in output_terms.items() if k.startswith("ce_")).double(),
                               base.detach(), rtol=2e-5, atol=1e-7)


def test_manifold_step_is_the_official_loss_on_the_paired_blocks():
    """Every student block (2) with the teacher's first and last (0, 3 of 4), the class tokens dropped; the defaults
    of the official README command (soft KD, α 1: no label CE, β 1, 0.1 / 4 / 0.2, K 192)."""
    run_steps(build_recipe("manifold", manifold_setup()))
    distiller, batch, values, _ = first_step(build_recipe("manifold", manifold_setup()))
    terms = seeded_terms(distiller, values, batch)
    assert set(terms) == {"ce_student", "kd", "manifold"} and float(terms["ce_student"]) == 0.0
    torch.manual_seed(11)
    official = official_manifold_step(values, batch["target"], ["student:blocks.0", "student:blocks.1"],
                                      ["teacher:blocks.0", "teacher:blocks.3"], drop_student=1, drop_teacher=1)
    assert_manifold_step(terms, official)


def test_manifold_hard_preset_options_and_a_distilled_student():
    """The distilled student's class head takes the CE, its distillation head the KD; other weights and K; the
    official token rule (only the student's extra tokens dropped: its distillation token, the class tokens kept)."""
    options = dict(alpha=0.4, beta=2.0, samples=50, sample_weight=1.0, patch_weight=0.5, random_weight=3.0,
                   patch_tokens_only=False)
    distiller, batch, values, _ = first_step(build_recipe("manifold", manifold_setup("student-vit-distilled"), "hard",
                                                          **options))
    terms = seeded_terms(distiller, values, batch, seed=3)
    assert set(terms) == {"ce_student:head", "kd", "manifold"}
    torch.manual_seed(3)
    official = official_manifold_step(values, batch["target"], ["student:blocks.0", "student:blocks.1"],
                                      ["teacher:blocks.0", "teacher:blocks.3"], drop_student=1, drop_teacher=0,
                                      alpha=0.4, kind="hard", K=50, weights=(1.0, 0.5, 3.0), beta=2.0,
                                      heads=("student:head", "student:head_dist"))
    assert_manifold_step(terms, official)


def test_manifold_takes_explicit_layers():
    distiller, batch, values, _ = first_step(build_recipe(
        "manifold", manifold_setup(), student_layers=["blocks.1"], teacher_layers=["blocks.2"]))
    terms = seeded_terms(distiller, values, batch)
    torch.manual_seed(11)
    official = official_manifold_step(values, batch["target"], ["student:blocks.1"], ["teacher:blocks.2"],
                                      drop_student=1, drop_teacher=1)
    assert_manifold_step(terms, official)


def test_manifold_default_pairs_follow_the_official_rule():
    from kdkernels.distill.methods.relation import default_block_pairs

    assert default_block_pairs(12, 24) == (list(range(12)), [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23])
    assert default_block_pairs(2, 4) == ([0, 1], [0, 3])
    assert default_block_pairs(3, 4) == ([0, 1, 2], [0, 1, 3])


def make_manifold(seed=0):
    return build_recipe("manifold", manifold_setup(seed=seed), alpha=0.5, samples=20)


def test_manifold_resume_is_bit_exact(tmp_path):
    """The random rows come from the global RNG, which the checkpoint restores."""
    assert_resume_is_exact(make_manifold, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


@pytest.mark.parametrize("setup, options, error, match", [
    (lambda: digits_setup(student="student-cnn", teacher="teacher-vit"), {}, ValueError,
     r"method 'manifold' distils vision transformers .* got a DigitsCNN student: pass --student student-vit"),
    (lambda: digits_setup(student="student-vit", teacher="teacher-cnn"), {}, ValueError,
     r"got a DigitsCNN teacher: pass --student student-vit --teacher teacher-vit"),
    (lambda: manifold_setup(), {"student_layers": ["blocks.0"]}, ValueError,
     r"manifold: student_layers and teacher_layers must pair up, got 1 student and 2 teacher"),
    (lambda: manifold_setup(), {"alpha": 2.0}, ValueError, r"^manifold: alpha must be in \[0, 1\]"),
    (lambda: manifold_setup(), {"samples": 0}, ValueError, r"^manifold: samples must be an int >= 1"),
    (lambda: manifold_setup(), {"distillation_type": "none"}, ValueError,
     r"^manifold: distillation_type must be one of 'soft', 'hard'"),
    (lambda: manifold_setup(), {"patch_weight": -1.0}, ValueError, r"^manifold: patch_weight must be >= 0"),
    (lambda: manifold_setup(), {"patch_tokens_only": 1}, TypeError, r"^manifold: patch_tokens_only must be a bool"),
])
def test_manifold_bad_configuration_names_the_argument(setup, options, error, match):
    with pytest.raises(error, match=match):
        build_recipe("manifold", setup(), **options)


def test_manifold_refuses_pairs_of_different_patch_counts():
    from kdkernels.distill.zoo.vit import VisionTransformer

    setup = manifold_setup()
    setup.teacher = setup.teachers[0] = VisionTransformer(patch_size=4, dim=64, depth=4, heads=4)   # 2×2 patches
    with pytest.raises(ValueError, match=r"term 'manifold': the student and the teacher must have as many patch "
                                         r"tokens, got 16 and 4"):
        first_step(build_recipe("manifold", setup))


def test_the_distill_command_picks_the_vit_pair_for_manifold_and_the_distilled_vit_for_deit(tmp_path):
    """Method.default_student / default_teacher: what ``kdkernels distill`` uses when --student / --teacher are not
    given (an explicit --teacher still wins)."""
    import json

    from kdkernels import cli

    for method, extra, student, teacher in (("manifold", [], "student-vit", "teacher-vit"),
                                            ("deit", [], "student-vit-distilled", "teacher-cnn"),
                                            ("manifold", ["--teacher", "student-vit"], "student-vit", "student-vit")):
        out = tmp_path / f"{method}-{len(extra)}.json"
        assert cli.main(["distill", "--method", method, "--epochs", "1", "--teacher-epochs", "1", "--train-size",
                         "30", "--batch-size", "16", "--no-progress", "--json", str(out), *extra]) == 0
        experiment = json.loads(out.read_text())["experiment"]
        assert (experiment["student"], experiment["teacher"]) == (student, teacher)
