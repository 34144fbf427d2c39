"""Feature-based strategies: training steps on digits, their stages, presets, connectors and configuration errors,
and each term equal to its weight times the public loss on the method's own values (the losses against the official
formulas: test_losses_feature.py, test_losses_attention.py, test_losses_relation.py, test_losses_contrastive.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import batches_for, digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from kdkernels.distill.connectors import ConvReg
from kdkernels.distill.terms import StepContext
from kdkernels.losses._common import pool_to_smaller
from trainer_testing import QUIET, assert_resume_is_exact


def close(actual, expected):
    """The same computation up to the order of a few float32 operations."""
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-9)


def term(distiller, name):
    return next(t for t in distiller.terms if t.name == name)


STAGES = ["stage1", "stage2", "stage3"]


def stage_pairs(values):
    return [(values[f"student:{key}"], values[f"teacher:{key}"]) for key in STAGES]


# ------------------------------------------------------------------------------------------------------- FitNet

def test_fitnet_trains_and_its_hint_is_the_regressed_fitnet_loss():
    run_steps(build_recipe("fitnet", digits_setup()))
    distiller, _, values, output = first_step(build_recipe("fitnet", digits_setup()))
    hint = term(distiller, "hint")
    assert hint.reads == ("student:stage2", "teacher:stage2")
    with torch.no_grad():
        regressed = hint.connectors[0](values["student:stage2"])
    close(output.terms["hint"], 100 * kdkernels.fitnet_loss(regressed, values["teacher:stage2"]))
    assert set(output.terms) == {"ce_student", "hint"}


def test_fitnet_two_stage_preset():
    recipe = build_recipe("fitnet", digits_setup(), preset="two-stage")
    assert [stage.name for stage in recipe.stages] == ["fitnet-hint", "fitnet"]
    assert recipe.stages[0].epochs == pytest.approx(30 / 240)
    assert [t.name for t in recipe.stages[0].distiller.terms] == ["hint"]
    assert [t.name for t in recipe.stages[1].distiller.terms] == ["ce_student", "kd"]
    run_steps(recipe, steps=2)


def test_conv_reg_shape_rules():
    assert ConvReg((2, 3, 8, 8), (2, 5, 4, 4)).conv.stride == (2, 2)
    assert isinstance(ConvReg((2, 3, 4, 4), (2, 5, 8, 8)).conv, torch.nn.ConvTranspose2d)
    assert ConvReg((2, 3, 6, 6), (2, 5, 4, 4)).conv.kernel_size == (3, 3)
    assert ConvReg((2, 3, 6, 6), (2, 5, 4, 4))(torch.randn(2, 3, 6, 6)).shape == (2, 5, 4, 4)
    with pytest.raises(ValueError, match="larger teacher map"):
        ConvReg((2, 3, 2, 2), (2, 5, 5, 5))


def test_fitnet_without_regressor_needs_equal_shapes():
    recipe = build_recipe("fitnet", digits_setup(), regressor=False)
    shapes = r"term 'hint'.*student:stage2 \(32, 8, 4, 4\).*teacher:stage2 \(32, 64, 4, 4\)"
    with pytest.raises(ValueError, match=shapes):
        first_step(recipe)


# ---------------------------------------------------------------------------------------------- AT, NST, PKT

@pytest.mark.parametrize("method, loss, weight", [("at", kdkernels.at_loss, 1000.0),
                                                 ("nst", kdkernels.nst_loss, 50.0)])
def test_stagewise_method_trains_and_sums_its_loss_over_the_stages(method, loss, weight):
    run_steps(build_recipe(method, digits_setup()))
    _, _, values, output = first_step(build_recipe(method, digits_setup()))
    close(output.terms[method], weight * sum(loss(s, t) for s, t in stage_pairs(values)))


def test_at_pairs_student_and_teacher_stages():
    with pytest.raises(ValueError, match="pairs student and teacher taps"):
        build_recipe("at", digits_setup(), student_layers=["stage1", "stage2"])


def test_pkt_trains_on_the_pooled_embeddings():
    run_steps(build_recipe("pkt", digits_setup()))
    _, _, values, output = first_step(build_recipe("pkt", digits_setup()))
    close(output.terms["pkt"], 30000 * kdkernels.pkt_loss(values["student:fc/input"], values["teacher:fc/input"]))


# -------------------------------------------------------------------------------------------------------- FSP

def test_fsp_init_stage_then_ce():
    setup = lambda: digits_setup("assistant-cnn", "assistant-cnn")  # noqa: E731  FSP needs equal channels
    recipe = build_recipe("fsp", setup())
    assert [s.name for s in recipe.stages] == ["fsp-init", "fsp"]
    assert [t.name for t in recipe.stages[1].distiller.terms] == ["ce_student"]
    run_steps(recipe, steps=2)
    _, _, values, output = first_step(build_recipe("fsp", setup()), stage_index=0)
    student, teacher = zip(*stage_pairs(values))
    close(output.terms["fsp"], kdkernels.fsp_loss(student, teacher))


def test_fsp_rejects_unequal_channels():
    with pytest.raises(ValueError, match=r"term 'fsp'.*FSP needs equal channel counts"):
        first_step(build_recipe("fsp", digits_setup()), stage_index=0)


# -------------------------------------------------------------------------------------------------------- OFD

# (student connector input, teacher BN before ReLU): the pre-activation taps of OFD and AB
PRE_ACTIVATION = [("stage1.1", "stage1.4"), ("stage2.1", "stage2.4"), ("stage3.1", "stage3.4")]


def test_ofd_trains_with_margins_from_the_teachers_bns_and_stage_weights():
    setup = digits_setup()
    teacher = setup.teacher
    for bn in (teacher.stage1[4], teacher.stage2[4], teacher.stage3[4]):  # varied margins, both branches
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-5, 1)
    recipe = build_recipe("ofd", setup)
    distiller, _, values, output = first_step(recipe)
    assert teacher.training, "OFD keeps the teacher in train mode"
    ofd = term(distiller, "ofd")
    total = 0.0
    for i, (s_tap, t_tap) in enumerate(PRE_ACTIVATION):
        with torch.no_grad():
            source = ofd.connectors[i](values[f"student:{s_tap}"])
        bn = teacher.get_submodule(t_tap)
        margin = kdkernels.ofd_margins(bn.weight, bn.bias)
        total = total + kdkernels.ofd_loss(source, values[f"teacher:{t_tap}"], margin, "batchmean") / 2 ** (2 - i)
    close(output.terms["ofd"], total / 1000)
    assert build_recipe("ofd", digits_setup(), preset="imagenet").hyperparameters["normalizer"] == 10000.0
    run_steps(build_recipe("ofd", digits_setup()))


def test_ofd_connector_init_and_margin_source():
    distiller, *_ = first_step(build_recipe("ofd", digits_setup()))
    conv, bn = term(distiller, "ofd").connectors[2]
    assert conv.bias is None and torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert abs(conv.weight.std().item() - math.sqrt(2 / 128)) < 0.03
    with pytest.raises(ValueError, match="BN before ReLU.*'stage1'"):
        build_recipe("ofd", digits_setup(), teacher_layers=["stage1", "stage2", "stage3"])


# -------------------------------------------------------------------------------------------------------- VID

def test_vid_trains_its_regressors_and_variances():
    history = run_steps(build_recipe("vid", digits_setup()))
    assert len(history) == 3
    distiller, _, values, output = first_step(build_recipe("vid", digits_setup()))
    vid = term(distiller, "vid")
    expected = 0.0
    for i, key in enumerate(STAGES):
        regressor = vid.connectors[i]
        assert any(p is regressor.log_scale for p in distiller.trainable_parameters())
        close(F.softplus(regressor.log_scale) + 1e-5, torch.full_like(regressor.log_scale, 5.0))
        s, t = pool_to_smaller(values[f"student:{key}"], values[f"teacher:{key}"])
        with torch.no_grad():
            mean = regressor(s)
        expected = expected + kdkernels.vid_loss(mean, t, regressor.log_scale)
    close(output.terms["vid"], expected)
    with pytest.raises(ValueError, match="init_var"):
        build_recipe("vid", digits_setup(), init_var=0.0)


# --------------------------------------------------------------------------------------------------------- AB

def test_ab_init_stage_with_stage_weights_then_ce():
    recipe = build_recipe("ab", digits_setup())
    assert [s.name for s in recipe.stages] == ["ab-init", "ab"]
    assert [t.name for t in recipe.stages[1].distiller.terms] == ["ce_student"]
    run_steps(recipe, steps=2)
    distiller, _, values, output = first_step(build_recipe("ab", digits_setup()), stage_index=0)
    ab = term(distiller, "ab")
    expected = 0.0
    for i, (s_tap, t_tap) in enumerate(PRE_ACTIVATION):
        with torch.no_grad():
            source = ab.connectors[i](values[f"student:{s_tap}"])
        expected = expected + 2 ** (i - 2) * kdkernels.ab_loss(source, values[f"teacher:{t_tap}"], 1.0, "batchmean")
    close(output.terms["ab"], 3 / 1000 * expected)
    with_kd = build_recipe("ab", digits_setup(), kd_weight=1.0)
    assert [t.name for t in with_kd.stages[1].distiller.terms] == ["ce_student", "kd"]


def test_ab_identity_connector_when_shapes_agree():
    distiller, *_ = first_step(build_recipe("ab", digits_setup("assistant-cnn", "assistant-cnn")), stage_index=0)
    assert all(isinstance(c, torch.nn.Identity) for c in term(distiller, "ab").connectors)


# -------------------------------------------------------------------------------------------------------- CRD

def crd_step(setup, seed):
    """One training-mode CRD step with the torch RNG at ``seed``: (distiller, batch, output, both banks as they were
    before the step, both embeddings)."""
    recipe = build_recipe("crd", setup)
    distiller = recipe.stages[0].distiller
    crd = term(distiller, "crd")
    batch = next(iter(batches_for(recipe.stages[0])))
    distiller.build(batch).activate().train()
    values = distiller.run_models(batch)
    banks = crd.criterion.memory_student.clone(), crd.criterion.memory_teacher.clone()
    torch.manual_seed(seed)
    output = distiller.compute_terms(values, StepContext(batch=batch))
    with torch.no_grad():
        embeddings = crd.embed_student(values["student:fc/input"]), crd.embed_teacher(values["teacher:fc/input"])
    return distiller, batch, output, banks, embeddings


def test_crd_sets_the_normalizers_and_updates_the_banks():
    setup = digits_setup()
    setup.train_labels = None  # uniform negatives over the bank (RepDistiller's fallback sampler)
    distiller, batch, output, banks, (v1, v2) = crd_step(setup, seed=7)
    crd, num_data = term(distiller, "crd"), setup.num_train
    assert crd.criterion.num_negatives == num_data - 1, "K is clamped to the data set"
    index = batch["index"]
    torch.manual_seed(7)
    contrast = kdkernels.sample_contrast_indices(index, num_data, num_data - 1)
    normalizers = kdkernels.crd_normalizers(v1, v2, contrast, *banks)
    close(crd.criterion.normalizers, normalizers)
    close(output.terms["crd"], 0.8 * kdkernels.crd_loss(v1, v2, index, contrast, *banks, normalizers))
    close(crd.criterion.memory_student, kdkernels.crd_update_memory_(banks[0].clone(), v1, index, 0.5))
    close(crd.criterion.memory_teacher, kdkernels.crd_update_memory_(banks[1].clone(), v2, index, 0.5))
    assert {"terms.1.criterion.memory_student", "terms.1.criterion.normalizers"} <= set(distiller.state_dict())
    assert set(output.terms) == {"ce_student", "crd"}


def test_other_class_negatives_never_share_the_anchor_class():
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 3])
    index = torch.tensor([0, 3, 6, 8, 1])
    contrast = kdkernels.sample_other_class_indices(index, labels, 4000, generator=torch.Generator().manual_seed(0))
    assert contrast.shape == (5, 4001) and torch.equal(contrast[:, 0], index)
    for row, anchor in zip(contrast, index):
        negatives = row[1:]
        assert not (labels[negatives] == labels[anchor]).any()
        others = torch.nonzero(labels != labels[anchor]).flatten()
        counts = torch.bincount(negatives, minlength=labels.numel())[others].float()
        assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()  # uniform over others
    with pytest.raises(TypeError, match="bank_labels must be an integer tensor"):
        kdkernels.sample_other_class_indices(index, labels.float(), 3)


def test_crd_exact_mode_draws_negatives_from_other_classes():
    setup = digits_setup()
    distiller, batch, output, banks, (v1, v2) = crd_step(setup, seed=3)
    negatives = term(distiller, "crd").criterion.num_negatives
    assert negatives == 16384, "with labels, K keeps its official value (drawn with replacement)"
    torch.manual_seed(3)
    contrast = kdkernels.sample_other_class_indices(batch["index"], setup.train_labels, 16384)
    assert not (setup.train_labels[contrast[:, 1:]] == batch["target"].unsqueeze(1)).any()
    normalizers = kdkernels.crd_normalizers(v1, v2, contrast, *banks)
    close(output.terms["crd"], 0.8 * kdkernels.crd_loss(v1, v2, batch["index"], contrast, *banks, normalizers))


def test_crd_training_presets_and_errors():
    run_steps(build_recipe("crd", digits_setup()), steps=2)
    with_kd = build_recipe("crd", digits_setup(), preset="crd+kd")
    assert [t.name for t in with_kd.stages[0].distiller.terms] == ["ce_student", "kd", "crd"]
    setup = digits_setup()
    setup.num_train = None
    with pytest.raises(ValueError, match="num_train"):
        build_recipe("crd", setup)
    setup = digits_setup()
    setup.train_labels = setup.train_labels[:5]
    with pytest.raises(ValueError, match="one label per training sample"):
        build_recipe("crd", setup)


# --------------------------------------------------------------------------------------------------------- FT

def test_ft_paraphraser_stage_then_factor_transfer():
    recipe = build_recipe("ft", digits_setup())
    assert [s.name for s in recipe.stages] == ["ft-paraphraser", "ft"]
    paraphraser = term(recipe.stages[0].distiller, "paraphraser").paraphraser
    before = [p.detach().clone() for p in paraphraser.parameters()]
    run_steps(recipe, steps=2)
    assert any(not torch.equal(b, p) for b, p in zip(before, paraphraser.parameters()))
    trainable = {id(p) for p in recipe.stages[1].distiller.trainable_parameters()}
    assert not any(id(p) in trainable for p in paraphraser.parameters()), "the paraphraser is frozen in stage 2"

    recipe = build_recipe("ft", digits_setup())
    _, _, values, output = first_step(recipe, stage_index=0)
    t = values["teacher:stage3"]
    with torch.no_grad():
        reconstruction = term(recipe.stages[0].distiller, "paraphraser").paraphraser(t)
    close(output.terms["paraphraser"], (reconstruction - t).abs().mean())
    recipe.stages[1].before()
    distiller, _, values, output = first_step(recipe)
    ft = term(distiller, "ft")
    assert not ft.paraphraser.training
    with torch.no_grad():
        factor_s = ft.translator(values["student:stage3"])
        factor_t = ft.paraphraser.encoder(values["teacher:stage3"])
    assert factor_t.shape[1] == 64, "paraphrase rate 0.5 of the teacher's 128 channels"

    close(output.terms["ft"], 500 * kdkernels.ft_loss(factor_s, factor_t))


# ------------------------------------------------------------------------------------------------------------ CWD

def official_cwd(student_map, teacher_map, temperature):
    """TorchDistiller ``CriterionCWD('channel', 'kl', τ)`` written out in float64: Σ KL(p_t ‖ p_s) / (n·c) · τ²."""
    n, c = student_map.shape[:2]
    p_s = (student_map.double() / temperature).reshape(n, c, -1).softmax(-1)
    p_t = (teacher_map.double() / temperature).reshape(n, c, -1).softmax(-1)
    return (p_t * (p_t.log() - p_s.log())).sum() / (n * c) * temperature ** 2


def test_cwd_step_is_the_official_loss_on_the_connected_last_stage():
    run_steps(build_recipe("cwd", digits_setup()))
    distiller, batch, values, output = first_step(build_recipe("cwd", digits_setup()))
    cwd = term(distiller, "cwd")
    assert cwd.reads == ("student:stage3", "teacher:stage3")
    connector = cwd.connectors[0]
    assert isinstance(connector[0], torch.nn.Conv2d) and connector[0].kernel_size == (1, 1)
    assert connector[0].out_channels == values["teacher:stage3"].shape[1]
    with torch.no_grad():
        connected = connector(values["student:stage3"])
    expected = 3.0 * official_cwd(connected, values["teacher:stage3"], 4.0)
    torch.testing.assert_close(output.terms["cwd"].double(), expected, rtol=1e-5, atol=1e-8)
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))
    assert set(output.terms) == {"ce_student", "cwd"}


def test_cwd_needs_no_connector_for_equal_channels_and_takes_the_mmrazor_preset():
    setup = digits_setup("assistant-cnn", "assistant-cnn")
    distiller, _, values, output = first_step(build_recipe("cwd", setup, "mmrazor", kd_weight=0.5))
    assert isinstance(term(distiller, "cwd").connectors[0], torch.nn.Identity)
    close(output.terms["cwd"], 5.0 * kdkernels.cwd_loss(values["student:stage3"], values["teacher:stage3"], 1.0))
    close(output.terms["kd"], 0.5 * kdkernels.kd_loss(values["student"], values["teacher"], 4.0))


def make_cwd(seed=0):
    return build_recipe("cwd", digits_setup(seed=seed))


def test_cwd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_cwd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_cwd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match=r"term 'cwd' compares .*one spatial size.*student_layer / teacher_layer"):
        first_step(build_recipe("cwd", digits_setup(), student_layer="stage2"))
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("cwd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match="temperature must be positive"):
        first_step(build_recipe("cwd", digits_setup(), temperature=-1.0))
    with pytest.raises(ValueError, match=r"compares \[B, C, H, W\] maps.*student:hidden1 \(32, \d+\)"):
        first_step(build_recipe("cwd", digits_setup(student="student-mlp")))


# ------------------------------------------------------------------------------------------------------------- CD

def official_cd_step(values, connectors, batch, epoch, epochs):
    """cifar_config.py with adjust_loss_alpha (lrdv2) on the run's length, written out in float64: CE and GKD off
    while epoch ≤ 0.3·epochs; CD (6·0.9^k, k milestones 0.3 and 0.8 reached) = Σ_stages MSE of the pooled channels."""
    keys = ("stage1", "stage2", "stage3")
    with torch.no_grad():
        students = [connector(values[f"student:{key}"]).double() for connector, key in zip(connectors, keys)]
    teachers = [values[f"teacher:{key}"].double() for key in keys]
    cd = sum(((s.mean((2, 3)) - t.mean((2, 3))) ** 2).mean() for s, t in zip(students, teachers))
    exponent = (epoch >= 0.3 * epochs) + (epoch >= 0.8 * epochs)
    delayed = 0.0 if epoch <= 0.3 * epochs else 1.0
    student, teacher, labels = values["student"].double(), values["teacher"].double(), batch["target"]
    mask = teacher.argmax(1) == labels
    p_t, log_p_s = F.softmax(teacher, 1), F.log_softmax(student, 1)
    gkd = (p_t * (p_t.log() - log_p_s))[mask].sum() / mask.sum()
    return {"cd": 6.0 * 0.9 ** exponent * cd, "gkd": delayed * 0.1 * gkd,
            "ce_student": delayed * F.cross_entropy(student, labels)}


@pytest.mark.parametrize("epoch", [1, 3, 8, 24], ids=["edt-off-phase", "edt-ce-on", "edt-decay-1", "edt-decay-2"])
def test_cd_step_is_the_official_cd_gkd_edt(epoch):
    distiller, batch, values, _ = first_step(build_recipe("cd", digits_setup()))
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=30, batch=batch))
    cd = term(distiller, "cd")
    assert cd.reads == ("student:stage1", "student:stage2", "student:stage3",
                        "teacher:stage1", "teacher:stage2", "teacher:stage3")
    assert all(isinstance(c[0], torch.nn.Conv2d) and isinstance(c[2], torch.nn.ReLU) for c in cd.connectors)
    expected = official_cd_step(values, cd.connectors, batch, epoch, 30)
    assert set(output.terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name].double(), value, rtol=1e-5, atol=1e-8)


def test_cd_trains_and_takes_the_imagenet_preset_and_no_edt():
    run_steps(build_recipe("cd", digits_setup()))
    distiller, batch, values, _ = first_step(build_recipe("cd", digits_setup(), "imagenet", edt=False))
    output = distiller.compute_terms(values, StepContext(epoch=1, epochs=30, batch=batch))
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))
    guided = torch.where(values["teacher"].argmax(1) == batch["target"], batch["target"], -100)
    close(output.terms["gkd"], kdkernels.kd_loss(values["student"], values["teacher"], 1.0, labels=guided))
    connected = [c(values[f"student:stage{i}"]) for i, c in enumerate(term(distiller, "cd").connectors, 1)]
    close(output.terms["cd"], 6.0 * kdkernels.cd_loss(connected, [values[f"teacher:stage{i}"] for i in (1, 2, 3)]))
    assert build_recipe("cd", digits_setup(), "no-edt").hyperparameters["edt"] is False


def make_cd(seed=0):
    return build_recipe("cd", digits_setup(seed=seed))


def test_cd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_cd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_cd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("cd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"cd pairs the stages one to one, got 1 student and 3 teacher"):
        build_recipe("cd", digits_setup(), student_layers="stage3")
    with pytest.raises(ValueError, match=r"cd: edt_milestones must be increasing fractions"):
        build_recipe("cd", digits_setup(), edt_milestones=(0.8, 0.3))
    with pytest.raises(ValueError, match=r"term 'cd' pools \[B, C, H, W\] maps.*student:hidden1"):
        first_step(build_recipe("cd", digits_setup(student="student-mlp"), student_layers=["hidden1"] * 3))


# ------------------------------------------------------------------------------------------------------------ PAD

def official_pad_stage2(e_s, e_t, linear_weight, linear_bias, bn_weight, bn_bias, connector=None, eps=1e-6):
    """torchdistill ``VarianceBranch4PAD.var_estimator`` (Linear + BatchNorm1d in train mode: batch statistics, biased
    variance, BN eps 1e-5) on the student's embedding, then ``PADL2Loss`` (mean), in float64; ``connector`` (W, b)
    maps the student's embedding to the teacher's width when they differ (ours)."""
    x = e_s @ linear_weight.T + linear_bias
    log_variances = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5) * bn_weight + bn_bias
    student = e_s if connector is None else e_s @ connector[0].T + connector[1]
    return torch.mean(torch.mean((e_t - student) ** 2 / (eps + torch.exp(log_variances)) + log_variances, dim=1))


def float64_leaf(tensor):
    return tensor.detach().double().requires_grad_()


def test_pad_first_stage_is_ce_plus_the_official_l2_of_the_embeddings():
    recipe = build_recipe("pad", digits_setup())
    assert [stage.name for stage in recipe.stages] == ["pad-l2", "pad"]
    assert [stage.epochs_of(30) for stage in recipe.stages] == [15, 15]
    distiller, batch, values, output = first_step(recipe, stage_index=0)
    linear = distiller.models["pad_connector"].linear
    assert (linear.in_features, linear.out_features) == (16, 128)
    e_s, e_t = values["student:fc/input"].double(), values["teacher:fc/input"].double()
    l2 = torch.nn.MSELoss()(e_s @ linear.weight.double().T + linear.bias.double(), e_t)
    assert set(output.terms) == {"ce_student", "l2"}
    torch.testing.assert_close(output.terms["l2"].double(), l2, rtol=1e-5, atol=1e-8)
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))


@pytest.mark.parametrize("teacher", ["teacher-cnn", "student-cnn"], ids=["connector", "equal-widths"])
def test_pad_second_stage_is_the_official_padl2_with_the_variance_branch(teacher):
    recipe = build_recipe("pad", digits_setup(teacher=teacher), pad_weight=2.0)
    distiller, batch, values, output = first_step(recipe, stage_index=-1)
    assert distiller is recipe.stages[1].distiller
    connector = distiller.models["pad_connector"]
    assert (connector.linear is None) == (teacher == "student-cnn")
    assert connector is recipe.stages[0].distiller.models["pad_connector"]
    pad = term(distiller, "pad")
    linear, bn = pad.variance_branch
    assert (linear.in_features, linear.out_features) == (16, values["teacher:fc/input"].shape[1])
    torch.nn.init.normal_(bn.weight)     # non-trivial BN affine parameters
    torch.nn.init.normal_(bn.bias)
    output = distiller.compute_terms(values, StepContext(epoch=1, epochs=1, batch=batch))
    e_s = float64_leaf(values["student:fc/input"])
    params = [p.double() for p in (linear.weight, linear.bias, bn.weight, bn.bias)]
    mapped = None if connector.linear is None else (connector.linear.weight.double(), connector.linear.bias.double())
    expected = 2.0 * official_pad_stage2(e_s, values["teacher:fc/input"].double(), *params, connector=mapped)
    torch.testing.assert_close(output.terms["pad"].double(), expected.detach(), rtol=1e-5, atol=1e-8)
    # the variance branch reads the student's embedding in the graph: the gradient takes both paths, as torchdistill
    grad = torch.autograd.grad(output.term_losses["pad"], values["student:fc/input"])[0]
    expected_grad = torch.autograd.grad(expected, e_s)[0]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5 * float(expected_grad.abs().max()))
    assert set(output.terms) == {"ce_student", "pad"}


def test_pad_trains_both_stages_and_can_skip_the_first():
    history = run_steps(build_recipe("pad", digits_setup(), first_stage_share=0.25))
    assert [set(row) for row in history] == [{"ce_student", "l2"}] * 3 + [{"ce_student", "pad"}] * 3
    recipe = build_recipe("pad", digits_setup(), first_stage_share=0.25)
    assert [stage.epochs_of(20) for stage in recipe.stages] == [5, 15]
    single = build_recipe("pad", digits_setup(), first_stage_share=0.0)
    assert [stage.name for stage in single.stages] == ["pad"] and single.stages[0].epochs_of(20) == 20
    run_steps(single)


def make_pad(seed=0):
    return build_recipe("pad", digits_setup(seed=seed))


def test_pad_resume_is_bit_exact_across_the_stage_boundary(tmp_path):
    # 4 epochs: 2 of stage 1, 2 of stage 2; resumed at the stage boundary (the connector must come back from the
    # checkpoint) and in the middle of stage 2 (the variance branch too)
    assert_resume_is_exact(make_pad, dict(epochs=4, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(2, 1, 1))


def test_pad_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("pad", digits_setup(teacher=None))
    for share in (1.0, -0.1, "half"):
        with pytest.raises(ValueError, match=r"pad: first_stage_share must be a share of the epochs in \[0, 1\)"):
            build_recipe("pad", digits_setup(), first_stage_share=share)
    with pytest.raises(ValueError, match=r"pad: eps must be a number ≥ 0, got -1.0"):
        build_recipe("pad", digits_setup(), eps=-1.0)
    with pytest.raises(ValueError, match=r"teacher \(DigitsCNN\) has no submodule 'nope'"):
        build_recipe("pad", digits_setup(), teacher_layer="nope")


@pytest.mark.parametrize("pieces", [(1, 3), (2, 2)], ids=["at-the-stage-boundary", "inside-stage-2"])
def test_ft_resume_is_exact_at_and_after_the_stage_boundary(tmp_path, pieces):
    """The paraphraser is a term's module trained in stage 1 and used in stage 2: a run resumed right after
    stage 1 must rebuild it from the checkpoint, not start stage 2 from a fresh one."""
    def make(seed=0):
        return build_recipe("ft", digits_setup(seed=seed), paraphraser_epochs=1)

    assert_resume_is_exact(make, dict(epochs=3, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=pieces)


# ----------------------------------------------------------------------------------------------------------- TTKD

def official_tat_step(values, term_, batch):
    """The TaT ImageNet config in float64: 0.1·CE (KDLoss alpha 0.1, beta 0) + 0.2·MaskedFM, MaskedFM with heads 1:
    out = softmax_j(q_i·t_j) v, MSE(out, t), q and v the conv 3×3 + BN embeddings of the student's layer4."""
    with torch.no_grad():
        q = term_.query(values["student:stage3"]).double()
        v = term_.value(values["student:stage3"]).double()
    t = values["teacher:stage3"].double()
    b, c, h, w = t.shape
    q, v, k = (x.reshape(b, c, h * w).transpose(1, 2) for x in (q, v, t))
    out = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    tat = ((out.transpose(1, 2).reshape(b, c, h, w) - t) ** 2).mean()
    return {"ttkd": 0.2 * tat, "ce_student": 0.1 * F.cross_entropy(values["student"].double(), batch["target"])}


def test_ttkd_step_is_the_official_target_aware_transformer():
    distiller, batch, values, output = first_step(build_recipe("ttkd", digits_setup()))
    tat = term(distiller, "ttkd")
    assert tat.reads == ("student:stage3", "teacher:stage3")
    for embed in (tat.query, tat.value):
        assert isinstance(embed[0], torch.nn.Conv2d) and embed[0].kernel_size == (3, 3) and embed[0].bias is None
        assert isinstance(embed[1], torch.nn.BatchNorm2d) and embed[0].out_channels == 128
    expected = official_tat_step(values, tat, batch)
    assert set(output.terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name].double(), value, rtol=1e-5, atol=1e-8)


def test_ttkd_trains_its_embeddings_and_takes_heads_and_kd():
    history = run_steps(build_recipe("ttkd", digits_setup()))
    assert all(step["ttkd"] > 0 for step in history)
    distiller, batch, values, output = first_step(build_recipe("ttkd", digits_setup(), heads=4, kd_weight=0.9))
    tat = term(distiller, "ttkd")
    assert any(p is tat.query[0].weight for p in distiller.trainable_parameters())
    s = values["student:stage3"]
    close(output.terms["ttkd"], 0.2 * kdkernels.ttkd_loss(tat.query(s), tat.value(s), values["teacher:stage3"], heads=4))
    close(output.terms["kd"], 0.9 * kdkernels.kd_loss(values["student"], values["teacher"], 1.0))
    _, batch, values, output = first_step(build_recipe("ttkd", digits_setup(), "scratch"))
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))


def make_ttkd(seed=0):
    return build_recipe("ttkd", digits_setup(seed=seed))


def test_ttkd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_ttkd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_ttkd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("ttkd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"ttkd: heads must be an int >= 1, got 0"):
        build_recipe("ttkd", digits_setup(), heads=0)
    with pytest.raises(ValueError, match=r"ttkd: heads must divide the teacher's channels \(128 at teacher:stage3\)"):
        first_step(build_recipe("ttkd", digits_setup(), heads=3))
    with pytest.raises(ValueError, match=r"term 'ttkd' attends between \[B, C, H, W\] maps of one spatial size.*"
                                         r"student:stage2 \(32, 8, 4, 4\)"):
        first_step(build_recipe("ttkd", digits_setup(), student_layer="stage2"))
    with pytest.raises(ValueError, match=r"term 'ttkd' attends between .*student:hidden1 \(32, 32\)"):
        first_step(build_recipe("ttkd", digits_setup(student="student-mlp")))


# -------------------------------------------------------------------------------------------------------- KD-SVD

def official_kd_svd_gradients(distiller, batch, epoch):
    """KD_methods_with_TF ``op_util.Optimizer_w_Distillation`` for KD-SVD, on this step: per student variable
    ``g_ce + clip_by_norm(g_dist, ‖g_ce‖·sigmoid(epoch − 1, 0))`` (``tf.clip_by_norm``: t·c / max(‖t‖, c)), g_dist of
    the transcribed ``KD_SVD`` (test_losses_feature.official_kd_svd) on the connected student maps."""
    from test_losses_feature import official_kd_svd
    values = distiller.run_models(batch)
    svd = term(distiller, "kd_svd")
    students = [c(values[f"student:{key}"]) for c, key in zip(svd.connectors, STAGES)]
    dist = official_kd_svd(students, [values[f"teacher:{key}"] for key in STAGES])
    ce = F.cross_entropy(values["student"], batch["target"])
    params = list(distiller.models["student"].parameters())
    g_dist = torch.autograd.grad(dist, params, retain_graph=True, allow_unused=True)
    dist = dist.detach()
    g_ce = torch.autograd.grad(ce, params, allow_unused=True)
    scale = 1 / (1 + math.exp(-(epoch - 1)))
    expected = []
    for gd, gc in zip(g_dist, g_ce):
        gc = torch.zeros_like(gd) if gc is None else gc
        if gd is None or not gd.any():
            expected.append(gc)
            continue
        clip = gc.norm() * scale
        expected.append(gc + gd * clip / torch.maximum(gd.norm(), clip))
    return dist, expected, [0.0 if gd is None else gd.norm() for gd in g_dist]


@pytest.mark.parametrize("epoch", [1, 3])
def test_kd_svd_step_is_the_official_loss_and_clipped_gradients(epoch):
    distiller, batch, values, _ = first_step(build_recipe("kd-svd", digits_setup()))
    svd = term(distiller, "kd_svd")
    assert svd.reads == ("student:stage1", "student:stage2", "student:stage3",
                         "teacher:stage1", "teacher:stage2", "teacher:stage3", "student", "target")
    assert all(isinstance(c[0], torch.nn.Conv2d) and c[0].kernel_size == (1, 1) for c in svd.connectors)
    distiller.eval().double()   # eval: both forwards below see the same batch-norm statistics; float64 SVDs
    batch = {**batch, "input": batch["input"].double()}
    dist, expected, unclipped = official_kd_svd_gradients(distiller, batch, epoch)
    output = distiller.compute_terms(distiller.run_models(batch), StepContext(epoch=epoch, epochs=30, batch=batch))
    torch.testing.assert_close(output.terms["kd_svd"], dist, rtol=1e-10, atol=0)
    params = list(distiller.models["student"].parameters())
    grads = torch.autograd.grad(output.loss, params, retain_graph=True)
    for index, (grad, want) in enumerate(zip(grads, expected)):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-12, msg=lambda m: f"parameter {index}: {m}")
    clipped = [g.norm() for g in torch.autograd.grad(output.term_losses["kd_svd"], params, materialize_grads=True)]
    assert any(c < 0.99 * u for c, u in zip(clipped, unclipped)), "the clipping must shrink some gradient"


def test_kd_svd_trains_and_without_clipping_is_ce_plus_the_loss():
    run_steps(build_recipe("kd-svd", digits_setup()))
    distiller, batch, values, output = first_step(build_recipe("kd-svd", digits_setup(), clip_gradients=False, k=2))
    svd = term(distiller, "kd_svd")
    assert svd.reads[-1] == "teacher:stage3"
    connected = [c(values[f"student:{key}"]) for c, key in zip(svd.connectors, STAGES)]
    close(output.terms["kd_svd"], kdkernels.kd_svd_loss(connected, [values[f"teacher:{k}"] for k in STAGES], k=2))


def make_kd_svd(seed=0):
    return build_recipe("kd-svd", digits_setup(seed=seed))


def test_kd_svd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_kd_svd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_kd_svd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("kd-svd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"kd-svd pairs at least two stages one to one, got 1 student and 3 teacher"):
        build_recipe("kd-svd", digits_setup(), student_layers="stage3")
    with pytest.raises(ValueError, match=r"kd-svd: k must be an int >= 1, got 0"):
        build_recipe("kd-svd", digits_setup(), k=0)
    with pytest.raises(TypeError, match=r"kd-svd: clip_gradients must be a bool"):
        build_recipe("kd-svd", digits_setup(), clip_gradients="yes")
    with pytest.raises(ValueError, match=r"term 'kd_svd' decomposes \[B, C, H, W\] maps.*student:hidden1"):
        first_step(build_recipe("kd-svd", digits_setup(student="student-mlp"), student_layers=["hidden1"] * 3))


# ------------------------------------------------------------------------------------------------------ Jacobian

def viewed_step(recipe, batch_size=32):
    """first_step with the distiller's views applied (the trainer applies them; run_models takes the batch as given)."""
    stage = recipe.stages[-1]
    distiller = stage.distiller
    batch = next(iter(batches_for(stage, batch_size)))
    distiller.build(batch).activate().train()
    viewed = distiller.apply_views(batch, seed=0, epoch=1, step=0)
    values = distiller.run_models(viewed)
    output = distiller.compute_terms(values, StepContext(epoch=1, epochs=1, batch=viewed))
    return distiller, viewed, values, output


def kdzoo_sobolev(out_s, out_t, img, target):
    """AberHu/Knowledge-Distillation-Zoo ``kd_losses/sobolev.py`` ``Sobolev.forward``, transcribed."""
    target_out_s = torch.gather(out_s, 1, target.view(-1, 1))
    grad_s = torch.autograd.grad(outputs=target_out_s, inputs=img, grad_outputs=torch.ones_like(target_out_s),
                                 create_graph=True, retain_graph=True, only_inputs=True)[0]
    norm_grad_s = F.normalize(grad_s.view(grad_s.size(0), -1), p=2, dim=1)
    target_out_t = torch.gather(out_t, 1, target.view(-1, 1))
    grad_t = torch.autograd.grad(outputs=target_out_t, inputs=img, grad_outputs=torch.ones_like(target_out_t),
                                 create_graph=True, retain_graph=True, only_inputs=True)[0]
    norm_grad_t = F.normalize(grad_t.view(grad_t.size(0), -1), p=2, dim=1)
    return F.mse_loss(norm_grad_s, norm_grad_t.detach())


def test_jacobian_step_is_ce_kd_and_the_reference_sobolev_with_its_double_backward():
    distiller, batch, values, output = viewed_step(build_recipe("jacobian", digits_setup()))
    image, labels = batch["input"], batch["target"]
    assert image.requires_grad and image.is_leaf
    student, teacher = values["student"], values["teacher"]
    sobolev = kdzoo_sobolev(student, teacher, image, labels)
    p_t = F.softmax(teacher.detach().double() / 4, 1)
    kd = 16 * (p_t * (p_t.log() - F.log_softmax(student.double() / 4, 1))).sum(1).mean()
    expected = {"jacobian": 20.0 * sobolev, "kd": 0.9 * kd,
                "ce_student": 0.1 * F.cross_entropy(student.double(), labels)}
    assert set(output.terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name].double(), value.double(), rtol=1e-5, atol=1e-8)
    params = [p for p in distiller.models["student"].parameters()]
    ours = torch.autograd.grad(output.term_losses["jacobian"], params, retain_graph=True, allow_unused=True)
    reference = torch.autograd.grad(20.0 * sobolev, params, retain_graph=True, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in ours if g is not None) > 0
    for index, (a, b) in enumerate(zip(ours, reference)):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda m: f"parameter {index}: {m}")
    assert all(not p.requires_grad for p in distiller.models["teacher"].parameters())


def test_jacobian_takes_the_teacher_class_and_no_kd():
    distiller, batch, values, output = viewed_step(build_recipe("jacobian", digits_setup(), classes="teacher",
                                                                kd_weight=0.0, ce_weight=1.0, weight=5.0))
    assert set(output.terms) == {"ce_student", "jacobian"}
    image, student, teacher = batch["input"], values["student"], values["teacher"]
    top = teacher.detach().argmax(1)
    assert not torch.equal(top, batch["target"])  # untrained teacher: the choice matters
    close(output.terms["jacobian"], 5.0 * kdzoo_sobolev(student, teacher, image, top))


def test_jacobian_trains_through_the_trainer_and_resumes_exactly(tmp_path):
    assert_resume_is_exact(lambda seed=0: build_recipe("jacobian", digits_setup(seed=seed)),
                           dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_jacobian_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("jacobian", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"jacobian: classes must be one of 'target', 'teacher', got 'top'"):
        build_recipe("jacobian", digits_setup(), classes="top")
    with pytest.raises(ValueError, match=r"jacobian: temperature must be positive"):
        build_recipe("jacobian", digits_setup(), temperature=0.0)
    with pytest.raises(ValueError, match=r"term 'jacobian' differentiates the outputs with respect to 'input', which "
                                         r"does not require grad here: the method's RequiresGrad view"):
        first_step(build_recipe("jacobian", digits_setup()))   # run_models without the views


def test_ttkd_patch_group_and_anchor_point_options():
    from test_losses_attention import tat_seg_anchorpoint, tat_seg_patchgroup
    recipe = build_recipe("ttkd", digits_setup(), student_layer="stage2", teacher_layer="stage2", patches=(2, 2),
                          heads=4, anchors=(2, 1), anchor_weight=0.4)
    distiller, batch, values, output = first_step(recipe)
    tat = term(distiller, "ttkd")
    with torch.no_grad():
        s = values["student:stage2"]
        q, v = tat.query(s).double(), tat.value(s).double()
    t = values["teacher:stage2"].double()
    expected = 0.2 * tat_seg_patchgroup(q, t, v, t, 2, 2, 4) + 0.4 * tat_seg_anchorpoint(q, t, v, t, 2, 1)
    torch.testing.assert_close(output.terms["ttkd"].double(), expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"ttkd: anchors must be a pair \(rows, columns\) when anchor_weight > 0"):
        build_recipe("ttkd", digits_setup(), anchor_weight=0.4)
    with pytest.raises(TypeError, match=r"ttkd: patches must be a pair of ints \(rows, columns\) or None, got 4"):
        build_recipe("ttkd", digits_setup(), patches=4)
    with pytest.raises(ValueError, match=r"ttkd: anchors\[1\] must be an int >= 1, got 0"):
        build_recipe("ttkd", digits_setup(), anchors=(2, 0))
    with pytest.raises(ValueError, match=r"term 'ttkd' cannot compare .*patches\[0\] must be an int in \[1, 2\], got 3"):
        first_step(build_recipe("ttkd", digits_setup(), patches=(3, 1)))
