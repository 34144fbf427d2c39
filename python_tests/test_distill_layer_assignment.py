"""Layer-assignment strategies (SemCKD, AFD, L2T-ww): a training step on digits equal to the official formula written
out here in float64 from the terms' own parameters, exact resume, and configuration errors (the losses against the
official code: test_losses_layer_assignment.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from trainer_testing import QUIET, assert_resume_is_exact

STAGES = ["stage1", "stage2", "stage3"]


def term(distiller, name):
    return next(t for t in distiller.terms if t.name == name)


def maps(values, model):
    return [values[f"{model}:{key}"].double() for key in STAGES]


def batch_norm(x, bn):
    """Train-mode batch norm (batch statistics) with ``bn``'s affine parameters, float64."""
    return F.batch_norm(x, None, None, bn.weight.double(), bn.bias.double(), training=True, eps=bn.eps)


# -------------------------------------------------------------------------------------------------------- SemCKD

def official_mlp_embed(x, embed):
    """SemCKD ``MLPEmbed``: linear1, ReLU, linear2, ``Normalize(2)`` (x / ‖x‖₂)."""
    x = x.view(x.shape[0], -1)
    x = F.relu(F.linear(x, embed.linear1.weight.double(), embed.linear1.bias.double()))
    x = F.linear(x, embed.linear2.weight.double(), embed.linear2.bias.double())
    norm = x.pow(2).sum(1, keepdim=True).pow(1. / 2)
    return x.div(norm)


def official_aa_embed(x, regressor):
    """SemCKD ``AAEmbed``: conv1x1, BN, ReLU, conv3x3 (padding 1), BN, ReLU, conv1x1 (no bias), train-mode BN."""
    conv1, bn1, _, conv2, bn2, _, conv3 = regressor
    x = F.relu(batch_norm(F.conv2d(x, conv1.weight.double()), bn1))
    x = F.relu(batch_norm(F.conv2d(x, conv2.weight.double(), padding=1), bn2))
    return F.conv2d(x, conv3.weight.double())


def official_semckd_step(values, semckd):
    """SemCKD ``SelfA.forward`` + ``SemCKDLoss`` + ``helper/loops.py`` (``-r 1 -a 1 -b 400``, KD T 4), float64."""
    feat_s, feat_t = maps(values, "student"), maps(values, "teacher")
    bsz = feat_s[0].shape[0]
    sim_t = [f.reshape(bsz, -1) @ f.reshape(bsz, -1).t() for f in feat_t]
    sim_s = [f.reshape(bsz, -1) @ f.reshape(bsz, -1).t() for f in feat_s]
    proj_key = torch.cat([official_mlp_embed(s, k)[:, :, None] for s, k in zip(sim_t, semckd.keys)], 2)
    proj_query = torch.cat([official_mlp_embed(s, q)[:, None, :] for s, q in zip(sim_s, semckd.queries)], 1)
    attention = F.softmax(torch.bmm(proj_query, proj_key), dim=-1)
    ind_loss = torch.zeros(bsz, len(feat_s), len(feat_t), dtype=torch.float64)
    for i in range(len(feat_s)):
        for j in range(len(feat_t)):
            s_H, t_H = feat_s[i].shape[2], feat_t[j].shape[2]
            regressor = semckd.regressors[i * len(feat_t) + j]
            if s_H > t_H:
                value = official_aa_embed(F.adaptive_avg_pool2d(feat_s[i], (t_H, t_H)), regressor)
                target = feat_t[j]
            else:
                value = official_aa_embed(feat_s[i], regressor)
                target = F.adaptive_avg_pool2d(feat_t[j], (s_H, s_H))
            ind_loss[:, i, j] = F.mse_loss(value, target, reduction="none").reshape(bsz, -1).mean(-1)
    semckd_loss = (attention * ind_loss).sum() / (1.0 * bsz * len(feat_s))
    student, teacher = values["student"].double(), values["teacher"].double()
    kd = F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="sum") * 16 / bsz
    return {"semckd": 400 * semckd_loss, "kd": kd}, attention


def test_semckd_step_is_the_official_selfa_and_semckd_loss():
    distiller, batch, values, output = first_step(build_recipe("semckd", digits_setup()))
    semckd = term(distiller, "semckd")
    assert semckd.reads == tuple(f"{m}:{s}" for m in ("student", "teacher") for s in STAGES)
    assert semckd.batch_size == 32 and semckd.keys[0].linear2.out_features == 8      # factor 4
    expected, attention = official_semckd_step(values, semckd)
    assert set(output.terms) == {"ce_student", "kd", "semckd"}
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name].double(), value, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))
    assert not torch.allclose(attention, torch.full_like(attention, 1 / 3), atol=1e-3)   # a non-trivial attention


def test_semckd_trains_its_attention_and_a_short_batch_gives_zero():
    recipe = build_recipe("semckd", digits_setup())
    history = run_steps(recipe)
    assert all(step["semckd"] > 0 for step in history)
    distiller = recipe.stages[0].distiller
    semckd = term(distiller, "semckd")
    short = {f"{m}:{s}": torch.randn(5, 4, 4, 4) for m in ("student", "teacher") for s in STAGES}
    assert float(semckd(short, None)) == 0.0


def make_semckd(seed=0):
    return build_recipe("semckd", digits_setup(seed=seed))


def test_semckd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_semckd, dict(epochs=2, batch_size=32, lr=0.05, drop_last=True, **QUIET), tmp_path,
                           pieces=(1, 1))


def test_semckd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("semckd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"semckd: factor must be an int >= 1"):
        build_recipe("semckd", digits_setup(), factor=0)
    with pytest.raises(ValueError, match=r"semckd: weight must be >= 0"):
        build_recipe("semckd", digits_setup(), weight=-1.0)
    with pytest.raises(ValueError, match=r"term 'semckd' embeds the batch similarity matrices.*factor 64"):
        first_step(build_recipe("semckd", digits_setup(), factor=64))
    with pytest.raises(ValueError, match=r"term 'semckd' reads \[B, C, H, W\] maps.*student:hidden1 \(32, \d+\)"):
        first_step(build_recipe("semckd", digits_setup(student="student-mlp")))


# ----------------------------------------------------------------------------------------------------------- AFD

def official_nn_bn_relu(x, layer, relu):
    """AFD ``nn_bn_relu.forward``: linear, BatchNorm1d (train mode), ReLU when ``relu``."""
    linear, bn = layer
    x = batch_norm(F.linear(x, linear.weight.double(), linear.bias.double()), bn)
    return F.relu(x) if relu else x


def official_afd_step(values, afd):
    """AFD ``Attention.forward`` (with ``LinearTransformTeacher``/``Student``, ``Sample``) + ``utils.train_kl``
    (``CE + 0.9·KL + 200·AFD``, KL T 4), float64, the teacher layers' shapes all distinct here."""
    g_s, g_t = maps(values, "student"), maps(values, "teacher")
    bs, qk_dim = g_s[0].size(0), afd.qk_dim
    query = torch.stack([official_nn_bn_relu(f_t.mean(3).mean(2), layer, relu=False)
                         for f_t, layer in zip(g_t, afd.query_layers)], dim=1)
    h_t_all = [F.normalize(f_t.pow(2).mean(1).view(bs, -1), dim=1) for f_t in g_t]
    key = torch.stack([official_nn_bn_relu(f_s.mean(3).mean(2), layer, relu=True)
                       for layer, f_s in zip(afd.key_layers, g_s)], dim=1).view(bs * len(g_s), -1)
    bilinear_key = official_nn_bn_relu(key, afd.bilinear, relu=False).view(bs, len(g_s), len(g_t), -1)
    h_hat_s_all = [F.normalize(torch.stack([F.adaptive_avg_pool2d(f_s.pow(2).mean(1, keepdim=True), f_t.shape[2:])
                                            .view(bs, -1) for f_s in g_s], dim=1), dim=2) for f_t in g_t]
    p_logit = torch.matmul(afd.p_t.double(), afd.p_s.double().t())
    logit = torch.add(torch.einsum('bstq,btq->bts', bilinear_key, query), p_logit) / qk_dim ** 0.5
    atts = F.softmax(logit, dim=2)
    loss = 0
    for i, (h_hat_s, h_t) in enumerate(zip(h_hat_s_all, h_t_all)):
        diff = (h_hat_s - h_t.unsqueeze(1)).pow(2).mean(2)
        loss = loss + torch.mul(diff, atts[:, i]).sum(1).mean()
    student, teacher = values["student"].double(), values["teacher"].double()
    kl = F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="sum") * 16 / bs
    return {"afd": 200 * loss, "kd": 0.9 * kl}, atts


def test_afd_step_is_the_official_attention_and_loss():
    distiller, batch, values, output = first_step(build_recipe("afd", digits_setup()))
    afd = term(distiller, "afd")
    assert afd.reads == tuple(f"{m}:{s}" for m in ("student", "teacher") for s in STAGES)
    assert afd.p_t.shape == (3, 128) and afd.bilinear[0].out_features == 3 * 128
    expected, attention = official_afd_step(values, afd)
    assert set(output.terms) == {"ce_student", "kd", "afd"}
    for name, value in expected.items():
        torch.testing.assert_close(output.terms[name].double(), value, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))
    assert not torch.allclose(attention, torch.full_like(attention, 1 / 3), atol=1e-3)


def test_afd_trains_its_meta_network():
    recipe = build_recipe("afd", digits_setup(), qk_dim=16)
    afd = term(recipe.stages[0].distiller, "afd")
    before = afd.p_s.detach().clone()
    run_steps(recipe)
    assert not torch.equal(before, afd.p_s.detach())


def make_afd(seed=0):
    return build_recipe("afd", digits_setup(seed=seed), qk_dim=16)


def test_afd_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_afd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_afd_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("afd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"afd: qk_dim must be an int >= 1"):
        build_recipe("afd", digits_setup(), qk_dim=0)
    with pytest.raises(ValueError, match=r"afd: weight must be >= 0"):
        build_recipe("afd", digits_setup(), weight=float("nan"))
    with pytest.raises(ValueError, match=r"term 'afd' reads \[B, C, H, W\] maps.*student:hidden1 \(32, \d+\)"):
        first_step(build_recipe("afd", digits_setup(student="student-mlp")))
