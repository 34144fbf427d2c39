"""Layer-assignment strategies (SemCKD, AFD, L2T-ww): a training step on digits equal to the official formula written
out here in float64 from the terms' own parameters, exact resume, and configuration errors (the losses against the
official code: test_losses_layer_assignment.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe
from test_losses_layer_assignment import official_feature_matching
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
    return build_recipe("semckd", digits_setup(seed=seed, teacher="student-cnn"))


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


def test_afd_digits_preset_scales_beta_down():
    distiller, _, values, output = first_step(build_recipe("afd", digits_setup(), "digits"))
    afd = term(distiller, "afd")
    assert afd.weight == 20.0
    torch.testing.assert_close(output.terms["afd"].double(), official_afd_step(values, afd)[0]["afd"] / 10,
                               rtol=1e-5, atol=1e-8)


def test_afd_trains_its_meta_network():
    recipe = build_recipe("afd", digits_setup(), qk_dim=16)
    afd = term(recipe.stages[0].distiller, "afd")
    before = afd.p_s.detach().clone()
    run_steps(recipe)
    assert not torch.equal(before, afd.p_s.detach())


def make_afd(seed=0):
    return build_recipe("afd", digits_setup(seed=seed, teacher="student-cnn"), qk_dim=16)


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


# -------------------------------------------------------------------------------------------------------- L2T-ww

def official_meta_networks(term, source_features):
    """``WeightNetwork.forward`` (softmax of a linear map of the pooled source map) and ``LossWeightNetwork.forward``
    (``relu6``), with the term's parameters."""
    weights, loss_weights = [], []
    for i, (idx, _) in enumerate(term.pairs):
        f = source_features[idx]
        f = F.avg_pool2d(f, f.size(2)).view(-1, f.size(1))
        weights.append(F.softmax(term.channel_weights[i](f), 1))
        loss_weights.append(F.relu6(term.pair_weights[i](f)))
    return weights, loss_weights


def stage_features(model, params, buffers, x, train):
    """(output, [stage maps]) of ``functional_call(model, params)`` captured by hooks of the test's own."""
    captured = {}
    handles = [getattr(model, key).register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out))
               for key in STAGES]
    mode = model.training
    model.train(train)
    try:
        out = torch.func.functional_call(model, {**params, **buffers}, (x,))
    finally:
        model.train(mode)
        for handle in handles:
            handle.remove()
    return out, [captured[key] for key in STAGES]


def test_l2t_ww_step_is_ce_plus_the_official_feature_matching():
    distiller, batch, values, output = first_step(build_recipe("l2t-ww", digits_setup()))
    l2t = term(distiller, "l2t_ww")
    assert l2t.pairs == [(i, j) for i in range(3) for j in range(3)]
    source, target = maps(values, "teacher"), maps(values, "student")
    l2t.double()
    weights, loss_weights = official_meta_networks(l2t, source)
    assert all(torch.allclose(w, torch.full_like(w, 1 / w.shape[1])) for w in weights)   # zero init: uniform
    expected = official_feature_matching(list(l2t.connectors), l2t.pairs, source, target, weights, [0.5] * 9,
                                         loss_weights)
    torch.testing.assert_close(output.terms["l2t_ww"].double(), expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))


def test_l2t_ww_meta_step_is_the_held_out_gradient_through_the_matching_look_ahead():
    """One meta-step (plain SGD, lr 1, float64): Δφ = −∂CE(f(x_h; θ − η∇_θ L_match(θ, φ; x)), y_h)/∂φ for the
    meta-networks' parameters φ, computed here by hand with hooks of the test's own."""
    import types
    from torch.utils.data import Subset
    from distill_testing import digits_split
    from kdkernels.distill.data import TensorDictDataset
    from kdkernels.distill.environment import Environment
    from kdkernels.distill.meta_steps import MetaStep, MetaStepRun

    recipe = build_recipe("l2t-ww", digits_setup(), pairs=[(0, 0), (1, 2), (2, 1)])
    stage = recipe.stages[0]
    distiller = stage.distiller
    split = digits_split()
    batch = {"input": split.train.inputs[:12], "target": split.train.targets[:12], "index": torch.arange(12)}
    distiller.build(batch).double().activate().train()     # the connectors exist after build
    batch["input"] = batch["input"].double()
    held_out_set = Subset(TensorDictDataset(split.train.inputs.double(), split.train.targets), list(range(40, 64)))
    spec = MetaStep(hyperparameters=stage.meta_step.hyperparameters, terms=stage.meta_step.terms, optimiser="sgd",
                    lr=1.0)
    assert stage.meta_step.terms == ("l2t_ww",) and stage.meta_step.lr == 1e-4 and stage.meta_step.optimiser == "adam"
    meta_run = MetaStepRun("l2t-ww", spec, distiller, held_out_set)
    assert len(meta_run.parameters) == 12          # 3 pairs × (W, b of the channel weights, W, b of the pair weights)
    eta = 0.3
    run = types.SimpleNamespace(distiller=distiller, offset=0, step=0, epochs=1, optimizer=torch.optim.SGD(
        meta_run.without_hyperparameters(distiller.trainable_parameters()), lr=eta))
    env, config = Environment(torch.device("cpu"), 0, 1), types.SimpleNamespace(seed=0, batch_size=8)
    held = meta_run.held_out_batch(0, 1, 0, 8, env)
    student, teacher, l2t = distiller.models["student"], distiller.models["teacher"], term(distiller, "l2t_ww")
    phi = list(meta_run.parameters.values())
    before = [p.detach().clone() for p in phi]

    params = {name: p.detach().clone().requires_grad_(True) for name, p in student.named_parameters()}
    buffers = {name: b.clone() for name, b in student.named_buffers()}
    with torch.no_grad():
        _, source = stage_features(teacher, dict(teacher.named_parameters()), dict(teacher.named_buffers()),
                                   batch["input"], train=False)
    _, target = stage_features(student, params, buffers, batch["input"], train=True)
    weights, loss_weights = official_meta_networks(l2t, source)
    inner = official_feature_matching(list(l2t.connectors), l2t.pairs, source, target, weights, [0.5] * 3,
                                      loss_weights)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
    fast = {name: p if g is None else p - eta * g for (name, p), g in zip(params.items(), grads)}   # fc: unused
    out, _ = stage_features(student, fast, buffers, held["input"], train=False)
    expected = torch.autograd.grad(F.cross_entropy(out, held["target"]), phi)

    meta_run.step(run, [batch], epoch=1, config=config, env=env)
    for name, b, p, e in zip(meta_run.parameters, before, phi, expected):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-6, atol=1e-6 * e.abs().max().item(), msg=name)
    assert sum(e.abs().sum() for e in expected) > 0


def test_l2t_ww_trains_with_its_meta_step():
    from distill_testing import digits_split
    from kdkernels.distill.trainer import TrainConfig, Trainer
    recipe = build_recipe("l2t-ww", digits_setup(), pairs=[(0, 0), (2, 2)], meta_lr=1e-2)
    l2t = term(recipe.stages[0].distiller, "l2t_ww")
    before = l2t.channel_weights[0].weight.detach().clone()
    split = digits_split(64)
    Trainer(TrainConfig(epochs=1, batch_size=16, lr=0.05, **QUIET)).fit(recipe, split.train, split.test)
    assert not torch.equal(before, l2t.channel_weights[0].weight.detach())   # the meta-step moved the meta-network


def make_l2t_ww(seed=0):
    return build_recipe("l2t-ww", digits_setup(seed=seed, teacher="student-cnn"), pairs=[(0, 0), (1, 1), (2, 2)])


def test_l2t_ww_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(make_l2t_ww, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))


def test_l2t_ww_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("l2t-ww", digits_setup(teacher=None))
    with pytest.raises(ValueError, match=r"l2t-ww: beta must be >= 0"):
        build_recipe("l2t-ww", digits_setup(), beta=-0.5)
    with pytest.raises(ValueError, match=r"l2t-ww: pairs must be \(teacher index < 3, student index < 3\) pairs, "
                                         r"got \[\(3, 0\)\]"):
        build_recipe("l2t-ww", digits_setup(), pairs=[(0, 0), (3, 0)])
    with pytest.raises(ValueError, match=r"l2t-ww: teacher_channels must give one count per teacher tap \(3\)"):
        build_recipe("l2t-ww", digits_setup(), teacher_channels=[8])
    with pytest.raises(ValueError, match=r"term 'l2t_ww': teacher:stage1 has \d+ channels, but its meta-networks "
                                         r"were sized for 5: pass teacher_channels"):
        first_step(build_recipe("l2t-ww", digits_setup(), teacher_channels=[5, 5, 5]))
    with pytest.raises(ValueError, match=r"MetaStep: held_out as a share must be in \(0, 1\)"):
        build_recipe("l2t-ww", digits_setup(), held_out=1.5)
    with pytest.raises(ValueError, match=r"term 'l2t_ww' reads \[B, C, H, W\] maps.*student:hidden1 \(32, \d+\)"):
        first_step(build_recipe("l2t-ww", digits_setup(student="student-mlp"), teacher_layers=["stage3"]))
