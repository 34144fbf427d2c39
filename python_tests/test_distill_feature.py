"""Feature-based strategies: training steps on digits, and each loss term against the official formula transcribed
here in eager PyTorch (RepDistiller / official repositories), plus edge cases and configuration errors."""
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

RTOL, ATOL = 1e-5, 1e-6


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected).float(), rtol=RTOL, atol=ATOL)


def term(distiller, name):
    return next(t for t in distiller.terms if t.name == name)


def pool_larger(s, t):
    """RepDistiller: adaptive-avg-pool the larger map to the smaller H."""
    if s.shape[2] > t.shape[2]:
        s = F.adaptive_avg_pool2d(s, (t.shape[2], t.shape[2]))
    elif s.shape[2] < t.shape[2]:
        t = F.adaptive_avg_pool2d(t, (s.shape[2], s.shape[2]))
    return s, t


STAGES = ["stage1", "stage2", "stage3"]


# ------------------------------------------------------------------------------------------------------- FitNet

def test_fitnet_trains_and_matches_hint_mse():
    run_steps(build_recipe("fitnet", digits_setup()))
    distiller, _, values, output = first_step(build_recipe("fitnet", digits_setup()))
    hint = term(distiller, "hint")
    assert hint.reads == ("student:stage2", "teacher:stage2")
    with torch.no_grad():
        regressed = hint.connectors[0](values["student:stage2"])
    close(output.terms["hint"], 100 * ((regressed - values["teacher:stage2"]) ** 2).mean())
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

def test_at_matches_repdistiller():
    run_steps(build_recipe("at", digits_setup()))
    _, _, values, output = first_step(build_recipe("at", digits_setup()))

    def at(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    expected = sum((at(s) - at(t)).pow(2).mean() for s, t in
                   (pool_larger(values[f"student:{k}"], values[f"teacher:{k}"]) for k in STAGES))
    close(output.terms["at"], 1000 * expected)


def test_at_pools_the_larger_map_and_checks_stage_counts():
    s, t = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)
    a_t = F.normalize(t.pow(2).mean(1).view(3, -1))
    a_s = F.normalize(F.adaptive_avg_pool2d(s, (4, 4)).pow(2).mean(1).view(3, -1))
    close(kdkernels.at_loss(s, t), (a_s - a_t).pow(2).mean())
    with pytest.raises(ValueError, match="pairs student and teacher taps"):
        build_recipe("at", digits_setup(), student_layers=["stage1", "stage2"])
    with pytest.raises(ValueError, match="p must be positive"):
        kdkernels.at_loss(s, t, p=0)


def test_nst_matches_repdistiller_broadcast_form():
    run_steps(build_recipe("nst", digits_setup()))
    _, _, values, output = first_step(build_recipe("nst", digits_setup()))

    def poly_kernel(a, b):  # RepDistiller NST.poly_kernel (the B×C×C×HW broadcast)
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    expected = 0.0
    for key in STAGES:
        s, t = pool_larger(values[f"student:{key}"], values[f"teacher:{key}"])
        s = F.normalize(s.view(s.shape[0], s.shape[1], -1), dim=2)
        t = F.normalize(t.view(t.shape[0], t.shape[1], -1), dim=2)
        expected = expected + poly_kernel(t, t).mean() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()
    close(output.terms["nst"], 50 * expected)


def test_pkt_matches_probabilistic_kt():
    run_steps(build_recipe("pkt", digits_setup()))
    _, _, values, output = first_step(build_recipe("pkt", digits_setup()))

    def similarity(x, eps=1e-7):
        x = x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)
        x[x != x] = 0
        s = (torch.mm(x, x.transpose(0, 1)) + 1.0) / 2.0
        return s / torch.sum(s, dim=1, keepdim=True)

    # float64: at the 30000 scale float32 cancellation in the eager formula alone exceeds 1e-5
    s, t = similarity(values["student:fc/input"].double()), similarity(values["teacher:fc/input"].double())
    close(output.terms["pkt"], 30000 * torch.mean(t * torch.log((t + 1e-7) / (s + 1e-7))))


# -------------------------------------------------------------------------------------------------------- FSP

def _fsp_repdistiller(features):
    matrices = []
    for bot, top in zip(features[:-1], features[1:]):
        bot, top = pool_larger(bot, top)
        bot = bot.unsqueeze(1).flatten(3)
        top = top.unsqueeze(2).flatten(3)
        matrices.append((bot * top).mean(-1))
    return matrices


def test_fsp_init_stage_matches_repdistiller_then_ce():
    setup = lambda: digits_setup("assistant-cnn", "assistant-cnn")  # noqa: E731  FSP needs equal channels
    recipe = build_recipe("fsp", setup())
    assert [s.name for s in recipe.stages] == ["fsp-init", "fsp"]
    assert [t.name for t in recipe.stages[1].distiller.terms] == ["ce_student"]
    run_steps(recipe, steps=2)
    _, _, values, output = first_step(build_recipe("fsp", setup()), stage_index=0)
    g_s = _fsp_repdistiller([values[f"student:{k}"] for k in STAGES])
    g_t = _fsp_repdistiller([values[f"teacher:{k}"] for k in STAGES])
    close(output.terms["fsp"], sum((s - t).pow(2).mean() for s, t in zip(g_s, g_t)))


def test_fsp_rejects_unequal_channels():
    with pytest.raises(ValueError, match=r"term 'fsp'.*FSP needs equal channel counts"):
        first_step(build_recipe("fsp", digits_setup()), stage_index=0)


# -------------------------------------------------------------------------------------------------------- OFD

def _official_margin(bn):
    def cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    margins = []
    for s, m in zip(bn.weight.data, bn.bias.data):
        s, m = abs(s.item()), m.item()
        if cdf(-m / s) > 0.001:
            margins.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf(-m / s) + m)
        else:
            margins.append(-3 * s)
    return torch.tensor(margins).view(1, -1, 1, 1)


def test_ofd_matches_overhaul_distillation():
    setup = digits_setup()
    teacher = setup.teacher
    for bn in (teacher.stage1[4], teacher.stage2[4], teacher.stage3[4]):  # varied margins, both branches
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-5, 1)
    recipe = build_recipe("ofd", setup)
    distiller, batch, values, output = first_step(recipe)
    assert teacher.training, "OFD keeps the teacher in train mode"
    ofd = term(distiller, "ofd")
    total = 0.0
    taps = [("stage1.1", "stage1.4"), ("stage2.1", "stage2.4"), ("stage3.1", "stage3.4")]
    for i, (s_tap, t_tap) in enumerate(taps):
        with torch.no_grad():
            source = ofd.connectors[i](values[f"student:{s_tap}"])
        target = torch.max(values[f"teacher:{t_tap}"], _official_margin(teacher.get_submodule(t_tap)))
        loss = F.mse_loss(source, target, reduction="none") * ((source > target) | (target > 0)).float()
        total = total + loss.sum() / 2 ** (len(taps) - i - 1)
    close(output.terms["ofd"], total / batch["input"].shape[0] / 1000)
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

def test_vid_matches_repdistiller_and_learns_the_variance():
    history = run_steps(build_recipe("vid", digits_setup()))
    assert len(history) == 3
    distiller, _, values, output = first_step(build_recipe("vid", digits_setup()))
    vid = term(distiller, "vid")
    expected = 0.0
    for i, key in enumerate(STAGES):
        regressor = vid.connectors[i]
        assert any(p is regressor.log_scale for p in distiller.trainable_parameters())
        close(F.softplus(regressor.log_scale) + 1e-5, torch.full_like(regressor.log_scale, 5.0))
        s, t = pool_larger(values[f"student:{key}"], values[f"teacher:{key}"])
        with torch.no_grad():
            mean = regressor(s)
        var = (torch.log(1.0 + torch.exp(regressor.log_scale)) + 1e-5).view(1, -1, 1, 1)
        expected = expected + torch.mean(0.5 * ((mean - t) ** 2 / var + torch.log(var)))
    close(output.terms["vid"], expected)
    with pytest.raises(ValueError, match="init_var"):
        build_recipe("vid", digits_setup(), init_var=0.0)


# --------------------------------------------------------------------------------------------------------- AB

def test_ab_init_stage_matches_repdistiller():
    recipe = build_recipe("ab", digits_setup())
    assert [s.name for s in recipe.stages] == ["ab-init", "ab"]
    assert [t.name for t in recipe.stages[1].distiller.terms] == ["ce_student"]
    run_steps(recipe, steps=2)
    distiller, batch, values, output = first_step(build_recipe("ab", digits_setup()), stage_index=0)
    ab = term(distiller, "ab")
    taps = [("stage1.1", "stage1.4"), ("stage2.1", "stage2.4"), ("stage3.1", "stage3.4")]
    expected, batch_size = 0.0, batch["input"].shape[0]
    for i, (s_tap, t_tap) in enumerate(taps):
        with torch.no_grad():
            source = ab.connectors[i](values[f"student:{s_tap}"])
        target = values[f"teacher:{t_tap}"]
        loss = ((source + 1.0) ** 2 * ((source > -1.0) & (target <= 0)).float()
                + (source - 1.0) ** 2 * ((source <= 1.0) & (target > 0)).float())
        expected = expected + 2 ** (i - 3 + 1) * torch.abs(loss).sum() / batch_size / 1000 * 3
    close(output.terms["ab"], expected)
    with_kd = build_recipe("ab", digits_setup(), kd_weight=1.0)
    assert [t.name for t in with_kd.stages[1].distiller.terms] == ["ce_student", "kd"]


def test_ab_identity_connector_when_shapes_agree():
    distiller, *_ = first_step(build_recipe("ab", digits_setup("assistant-cnn", "assistant-cnn")), stage_index=0)
    assert all(isinstance(c, torch.nn.Identity) for c in term(distiller, "ab").connectors)


# -------------------------------------------------------------------------------------------------------- CRD

def _contrast_loss(x, num_data):
    """RepDistiller crd/criterion.py ContrastLoss."""
    bsz, m, pn = x.shape[0], x.size(1) - 1, 1.0 / num_data
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + 1e-7)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + 1e-7)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def test_crd_matches_repdistiller_and_updates_memory():
    setup = digits_setup()
    setup.train_labels = None  # uniform negatives over the bank (RepDistiller's fallback sampler)
    recipe = build_recipe("crd", setup)
    distiller = recipe.stages[0].distiller
    crd = term(distiller, "crd")
    num_data = setup.num_train
    assert crd.criterion.num_negatives == num_data - 1, "K is clamped to the data set"
    batch = next(iter(batches_for(recipe.stages[0])))
    distiller.build(batch).activate().train()
    values = distiller.run_models(batch)
    memory_student = crd.criterion.memory_student.clone()
    memory_teacher = crd.criterion.memory_teacher.clone()
    torch.manual_seed(7)
    output = distiller.compute_terms(values, StepContext(batch=batch))
    torch.manual_seed(7)
    index = batch["index"]
    contrast = torch.cat([index.view(-1, 1), torch.randint(0, num_data, (index.shape[0], num_data - 1))], 1)
    with torch.no_grad():
        v1 = crd.embed_student(values["student:fc/input"])
        v2 = crd.embed_teacher(values["teacher:fc/input"])
    out_v2 = torch.exp(torch.bmm(memory_student[contrast], v2.unsqueeze(2)).squeeze(2) / 0.07)
    out_v1 = torch.exp(torch.bmm(memory_teacher[contrast], v1.unsqueeze(2)).squeeze(2) / 0.07)
    z_v1, z_v2 = out_v1.mean() * num_data, out_v2.mean() * num_data
    close(crd.criterion.normalizers, torch.stack([z_v1, z_v2]))
    out_v1, out_v2 = out_v1 / z_v1, out_v2 / z_v2
    close(output.terms["crd"], 0.8 * (_contrast_loss(out_v1, num_data) + _contrast_loss(out_v2, num_data))[0])
    updated = F.normalize(memory_student[index] * 0.5 + v1 * 0.5, dim=1)
    close(crd.criterion.memory_student[index], updated)
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
    recipe = build_recipe("crd", setup)
    distiller = recipe.stages[0].distiller
    crd = term(distiller, "crd")
    assert crd.criterion.num_negatives == 16384, "with labels, K keeps its official value (drawn with replacement)"
    batch = next(iter(batches_for(recipe.stages[0])))
    distiller.build(batch).activate().train()
    values = distiller.run_models(batch)
    memory_student, memory_teacher = crd.criterion.memory_student.clone(), crd.criterion.memory_teacher.clone()
    torch.manual_seed(3)
    output = distiller.compute_terms(values, StepContext(batch=batch))
    torch.manual_seed(3)
    contrast = kdkernels.sample_other_class_indices(batch["index"], setup.train_labels, 16384)
    assert not (setup.train_labels[contrast[:, 1:]] == batch["target"].unsqueeze(1)).any()
    with torch.no_grad():
        v1 = crd.embed_student(values["student:fc/input"])
        v2 = crd.embed_teacher(values["teacher:fc/input"])
    num_data = setup.num_train
    out_v2 = torch.exp(torch.bmm(memory_student[contrast], v2.unsqueeze(2)).squeeze(2) / 0.07)
    out_v1 = torch.exp(torch.bmm(memory_teacher[contrast], v1.unsqueeze(2)).squeeze(2) / 0.07)
    out_v1, out_v2 = out_v1 / (out_v1.mean() * num_data), out_v2 / (out_v2.mean() * num_data)
    close(output.terms["crd"], 0.8 * (_contrast_loss(out_v1, num_data) + _contrast_loss(out_v2, num_data))[0])


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

    def factor(x):
        return F.normalize(x.view(x.size(0), -1))

    close(output.terms["ft"], 500 * torch.nn.L1Loss()(factor(factor_s), factor(factor_t)))


# -------------------------------------------------------------------------------------------- public losses

def test_public_feature_losses_validate_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="student_hint must have the same shape as teacher_hint"):
        kdkernels.fitnet_loss(x, torch.randn(2, 5, 4, 4))
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        kdkernels.at_loss([1.0], x)
    with pytest.raises(ValueError, match="same batch size"):
        kdkernels.nst_loss(x, torch.randn(3, 3, 4, 4))
    with pytest.raises(ValueError, match="margin must be a tensor of 3"):
        kdkernels.ofd_loss(x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        kdkernels.ab_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="log_scale must be a \\[3\\]"):
        kdkernels.vid_loss(x, x, torch.zeros(2))
    with pytest.raises(ValueError, match=r"student_features must hold at least 2 tensor\(s\), got 1"):
        kdkernels.fsp_loss([x], [x])
    with pytest.raises(ValueError, match="teacher_features must hold the same number of maps"):
        kdkernels.fsp_loss([x, x], [x, x, x])
    margins = kdkernels.ofd_margins(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 20.0]))
    close(margins, torch.tensor([-1 / math.sqrt(2 * math.pi) / 0.5, -6.0]))
