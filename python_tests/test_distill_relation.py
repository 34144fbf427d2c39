"""Relation-based methods (RKD, SP, CC, IRG, DarkRank): training steps on digits, and each loss term against the
official formula transcribed here in eager PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import build_recipe

RTOL, ATOL = 1e-5, 1e-6


def close(actual, expected):
    torch.testing.assert_close(actual, expected.detach().reshape(()), rtol=RTOL, atol=ATOL)


# ---- official formulas (lenscloth/RKD, RepDistiller, KD-Zoo), written out independently of the library -------------

def pdist(e, squared=False, eps=1e-12):
    e = e.reshape(e.shape[0], -1)
    sq = e.pow(2).sum(dim=1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def official_rkd(s, t, w_d=25.0, w_a=50.0):
    t_d = pdist(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(s)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    td = F.normalize(t.unsqueeze(0) - t.unsqueeze(1), p=2, dim=2)
    sd = F.normalize(s.unsqueeze(0) - s.unsqueeze(1), p=2, dim=2)
    loss_a = F.smooth_l1_loss(torch.bmm(sd, sd.transpose(1, 2)).view(-1), torch.bmm(td, td.transpose(1, 2)).view(-1))
    return w_d * loss_d + w_a * loss_a


def official_sp(s, t):
    gs = F.normalize(s.reshape(s.shape[0], -1) @ s.reshape(s.shape[0], -1).t())
    gt = F.normalize(t.reshape(t.shape[0], -1) @ t.reshape(t.shape[0], -1).t())
    return (gt - gs).pow(2).sum() / s.shape[0] ** 2


def official_cc(s, t, gamma=0.4, order=2):
    def kernel(f):
        f = F.normalize(f, p=2, dim=-1)
        sim = f @ f.t()
        k = torch.zeros_like(sim)
        for p in range(order + 1):
            k = k + torch.exp(torch.tensor(-2 * gamma)) * (2 * gamma) ** p / torch.lgamma(
                torch.tensor(p + 1.0)).exp() * sim.pow(p)
        return k
    return F.mse_loss(kernel(s), kernel(t))


def official_irg(fms_s, fms_t, w_v=0.1, w_e=5.0, w_t=5.0):
    def edge(x):
        d = pdist(x, squared=True)
        return d / d.max()

    def tran(fm1, fm2):
        if fm1.size(2) > fm2.size(2):
            fm1 = F.adaptive_avg_pool2d(fm1, (fm2.size(2), fm2.size(3)))
        if fm1.size(1) < fm2.size(1):
            fm2 = (fm2[:, 0::2, :, :] + fm2[:, 1::2, :, :]) / 2.0
        dist = torch.sum((fm1.reshape(fm1.size(0), -1) - fm2.reshape(fm2.size(0), -1)) ** 2, dim=-1).clamp(min=1e-12)
        return dist / dist.max()

    fm_s1, fm_s2, feat_s, out_s = fms_s
    fm_t1, fm_t2, feat_t, out_t = fms_t
    vert = F.mse_loss(out_s, out_t)
    edges = (F.mse_loss(edge(feat_s), edge(feat_t)) + F.mse_loss(edge(fm_s1), edge(fm_t1)) +
             F.mse_loss(edge(fm_s2), edge(fm_t2))) / 3.0
    trans = F.mse_loss(tran(fm_s1, fm_s2), tran(fm_t1, fm_t2))
    return w_v * vert + w_e * edges + w_t * trans


def official_darkrank(s, t, alpha=3.0, beta=3.0, permute_len=4):
    score_t = -1 * alpha * pdist(t).pow(beta)
    score_s = -1 * alpha * pdist(s).pow(beta)
    idx = score_t.sort(dim=1, descending=True)[1][:, 1:permute_len + 1]
    ordered = torch.gather(score_s, 1, idx)
    log_prob = (ordered - torch.stack([torch.logsumexp(ordered[:, i:], dim=1) for i in range(idx.size(1))],
                                      dim=1)).sum(dim=1)
    return (-1 * log_prob).mean()


# ---- training steps and terms --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rkd", "sp", "cc", "irg", "darkrank"])
def test_relation_method_trains(method):
    history = run_steps(build_recipe(method, digits_setup()))
    assert set(history[0]) == {"ce_student", method}


def test_rkd_terms_match_official():
    _, batch, values, output = first_step(build_recipe("rkd", digits_setup()))
    close(output.terms["rkd"], official_rkd(values["student:fc/input"], values["teacher:fc/input"]))
    close(output.terms["ce_student"], F.cross_entropy(values["student"], batch["target"]))
    assert "kd" not in output.terms


def test_rkd_optional_kd_and_metric_preset():
    recipe = build_recipe("rkd", digits_setup(), preset="metric", kd_weight=0.5)
    assert recipe.hyperparameters["distance_weight"] == 1.0 and recipe.hyperparameters["angle_weight"] == 2.0
    _, _, values, output = first_step(recipe)
    close(output.terms["rkd"], official_rkd(values["student:fc/input"], values["teacher:fc/input"], 1.0, 2.0))
    s, t = values["student"], values["teacher"]
    kl = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    close(output.terms["kd"], 0.5 * kl)


def test_sp_term_matches_official():
    _, _, values, output = first_step(build_recipe("sp", digits_setup()))
    close(output.terms["sp"], 3000.0 * official_sp(values["student:stage3"], values["teacher:stage3"]))


def test_cc_term_matches_official():
    _, _, values, output = first_step(build_recipe("cc", digits_setup()))
    close(output.terms["cc"], 100.0 * official_cc(values["student:fc/input"], values["teacher:fc/input"]))


def test_irg_term_matches_official():
    _, _, values, output = first_step(build_recipe("irg", digits_setup()))
    student = [values[k] for k in ("student:stage2", "student:stage3", "student:fc/input", "student")]
    teacher = [values[k] for k in ("teacher:stage2", "teacher:stage3", "teacher:fc/input", "teacher")]
    close(output.terms["irg"], official_irg(student, teacher))


def test_darkrank_term_matches_official():
    _, _, values, output = first_step(build_recipe("darkrank", digits_setup()))
    close(output.terms["darkrank"], official_darkrank(values["student:fc/input"], values["teacher:fc/input"]))


def test_public_losses_match_official_with_gradients():
    torch.manual_seed(1)
    s = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(12, 9, dtype=torch.float64)
    for ours, theirs in ((kdkernels.darkrank_loss(s, t, 2.0, 3.0, 4), official_darkrank(s, t, 2.0, 3.0, 4)),):
        grad_ours, = torch.autograd.grad(ours, s)
        grad_theirs, = torch.autograd.grad(theirs, s)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(grad_ours, grad_theirs)
    maps_s = [torch.randn(6, 4, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(6, 8, 2, 2,
              dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)]
    maps_t = [torch.randn(6, 16, 4, 4, dtype=torch.float64), torch.randn(6, 32, 2, 2, dtype=torch.float64),
              torch.randn(6, 32, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)]
    ours, theirs = kdkernels.irg_loss(maps_s, maps_t), official_irg(maps_s, maps_t)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, maps_s[0])[0], torch.autograd.grad(theirs, maps_s[0])[0])


def test_darkrank_short_batch_ranks_all_others():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(kdkernels.darkrank_loss(s, t), official_darkrank(s, t))


def test_relation_bad_configuration():
    with pytest.raises(ValueError, match="list_length"):
        kdkernels.darkrank_loss(torch.randn(4, 3), torch.randn(4, 3), list_length=0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kdkernels.darkrank_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(TypeError, match="4 tensors"):
        kdkernels.irg_loss([torch.randn(4, 3)], [torch.randn(4, 3)])
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
    close(output.terms["rkd"], official_rkd(values["student:hidden1"], values["teacher:fc/input"]))
