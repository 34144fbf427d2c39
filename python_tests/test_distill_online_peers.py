"""Online methods with peers (PCL, MCL, SwitOKD's three-network topologies): one training step on digits equal to the
objective transcribed from the reference / official code (PCL's views, ensemble classifier and temporal mean; MCL's
heads, contrastive terms, batches and logit distillation; SwitOKD's 2T1S / 1T2S switches), exact resume and
configuration errors (the losses against their formulas: test_losses_online.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from distill_testing import batches_for, digits_setup, first_step
from kdkernels.distill import build_recipe, digits_model
from kdkernels.distill.methods.online import GlobalStepEMA, PeerCollaborativeNetwork
from kdkernels.distill.terms import StepContext
from kdkernels.distill.trainer import TrainConfig, Trainer
from test_losses_online import sup_mcl_official
from trainer_testing import QUIET, assert_resume_is_exact, small_split


def gradients(loss, module):
    parameters = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


def viewed_step(recipe, epoch=1, batch_size=16):
    """(distiller, viewed batch, values, output) of one training forward with the views applied."""
    distiller = recipe.stages[0].distiller
    batch = next(iter(batches_for(recipe.stages[0], batch_size=batch_size)))
    distiller.build(batch).activate().train()
    viewed = distiller.apply_views(batch, seed=0, epoch=epoch, step=0)
    values = distiller.run_models(viewed)
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=max(epoch, 2), step=0, batch=viewed))
    return distiller, viewed, values, output


# ---- PCL -----------------------------------------------------------------------------------------------------------

def sigmoid_rampup(current, rampup_length):
    """ONE's ``utils/ramps.py`` (what the reproduction's ``compute_rampup_weight`` intends over 80 epochs)."""
    if rampup_length == 0:
        return 1.0
    current = min(max(current, 0.0), rampup_length)
    return float(math.exp(-5.0 * (1.0 - current / rampup_length) ** 2))


def kd(pred, target, temperature=3.0):
    return F.kl_div(F.log_softmax(pred / temperature, dim=1), F.softmax(target / temperature, dim=1),
                    reduction="batchmean") * temperature * temperature


def pcl_official(peers, en_output, means, label, rampup_weight):
    """shaoeric/... ``LossWrapper.forward``: CE(z_e) + Σ_i [CE(z_i) + w·KD(z_i, z_e.detach()) + w·PM(z_i, rest)]."""
    loss = F.cross_entropy(en_output, label)
    for i, pred in enumerate(peers):
        others = [mean.detach() for j, mean in enumerate(means) if j != i]
        loss = loss + (F.cross_entropy(pred, label) + kd(pred, en_output.detach()) * rampup_weight
                       + sum(kd(pred, o) for o in others) / len(others) * rampup_weight)
    return loss


def official_forward(net: PeerCollaborativeNetwork, views):
    """The reproduction's ``ResNet.forward(x1, x2, x3)``: ``extract`` (the shared layers) per view, ``branch_i``
    (stages, average pooling, fc) giving (logits, pooled feature), ``en_fc(cat(features))``."""
    trunk = net.network.trunk
    outs, feats = [], []
    for x, branch in zip(views, net.network.branches):
        shared = trunk.stage2(trunk.stage1(x))
        stage3, _, fc = branch
        feat = F.adaptive_avg_pool2d(stage3(shared), 1).flatten(1)
        feats.append(feat)
        outs.append(fc(feat))
    return torch.stack(outs), net.ensemble_classifier(torch.cat(feats, dim=1))


@pytest.mark.parametrize("epoch", [1, 6])
def test_pcl_step_is_the_reference_objective(epoch):
    recipe = build_recipe("pcl", digits_setup(teacher=None), preset="digits")
    distiller, viewed, values, output = viewed_step(recipe, epoch)
    net, ema = distiller.models["student"], distiller.models["student_ema"]
    assert isinstance(net, PeerCollaborativeNetwork) and recipe.student is ema
    assert distiller.evaluate == ("student_ema", "student") and ema.training, "the mean model runs in train mode"
    keys = ("input_peer0", "input_peer1", "input_peer2")
    assert all(not torch.equal(viewed[a], viewed[b]) for a, b in ((keys[0], keys[1]), (keys[1], keys[2]))), \
        "each peer reads its own augmentation"
    peers, ensemble, means = (values["student:peer_logits"], values["student:ensemble_logits"],
                              values["student_ema:peer_logits"])
    assert peers.shape == means.shape == (3, 16, 10) and ensemble.shape == (16, 10)
    torch.testing.assert_close(values["student"], peers[0], rtol=0, atol=0)
    # recomputed on copies in train mode (batch statistics), leaving the models' running statistics alone
    expected_peers, expected_ensemble = official_forward(copy.deepcopy(net).train(), [viewed[k] for k in keys])
    torch.testing.assert_close(peers, expected_peers, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble, expected_ensemble, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expected_means, _ = official_forward(copy.deepcopy(ema).train(), [viewed[k] for k in keys])
    torch.testing.assert_close(means, expected_means, rtol=1e-5, atol=1e-6)
    weight = sigmoid_rampup(epoch - 1, 8.0)
    expected = pcl_official(list(peers), ensemble, list(means), viewed["target"], weight)
    torch.testing.assert_close(output.terms["pcl"], expected.detach(), rtol=1e-6, atol=1e-7)
    ours = gradients(output.loss, net)
    for a, b in zip(ours, gradients(expected, net)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # every peer, the shared layers and the ensemble classifier learn; the mean model gets nothing
    for module in (*net.network.branches, net.ensemble_classifier, net.network.trunk.stage1):
        assert any(g.abs().sum() > 0 for g in gradients(output.loss, module))
    assert all(not p.requires_grad for p in ema.parameters())
    assert net.network.gate is None


def test_pcl_trains_and_the_mean_network_is_the_reference_ema():
    recipe = build_recipe("pcl", digits_setup(teacher=None), preset="digits", peers=2)
    distiller = recipe.stages[0].distiller
    update = distiller.updates["student_ema"]
    assert isinstance(update, GlobalStepEMA) and update.momentum == 0.9 and update.buffers == "own"
    net = distiller.models["student"]
    initial = [p.detach().clone() for p in net.parameters()]
    result = Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.05, **QUIET)).fit(recipe, small_split().train,
                                                                                 small_split().test)
    assert set(result.accuracies) == {"student_ema", "student"}
    ema = distiller.models["student_ema"]
    for e, p, p0 in zip(ema.parameters(), net.parameters(), initial):
        assert e.grad is None and not torch.equal(p.detach(), p0) and not torch.equal(e, p.detach())


def test_pcl_network_single_peer_and_plain_input():
    net = PeerCollaborativeNetwork(digits_model("student-cnn"), 3, views=("a", "b", "c"),
                                   new_backbone=lambda: digits_model("student-cnn"))
    x = torch.randn(5, 1, 8, 8)
    net.train()
    net({"a": x, "b": x.flip(-1), "c": x})
    net.eval()
    for index in range(3):
        deployed = net.single_peer(index).eval()
        taps = {}
        handle = net.peer_logits.register_forward_hook(lambda m, i, o: taps.__setitem__("z", o))
        out = net(x)                                           # a plain tensor: every peer reads it
        handle.remove()
        torch.testing.assert_close(deployed(x), taps["z"][index], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, taps["z"][0])
    assert net.ensemble_classifier.in_features == 3 * net.network.branches[0][-1].in_features
    with pytest.raises(ValueError, match=r"PeerCollaborativeNetwork: views must name one batch key per peer \(3\)"):
        PeerCollaborativeNetwork(digits_model("student-cnn"), 3, views=("a", "b"))


def test_pcl_resume_is_exact(tmp_path):
    def make(seed):
        return build_recipe("pcl", digits_setup(teacher=None, seed=seed), preset="digits", peers=2, rampup=1.0)

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


@pytest.mark.parametrize("overrides, error, match", [
    ({"peers": 1}, ValueError, r"pcl: peers must be an int >= 2, got 1"),
    ({"temperature": 0.0}, ValueError, r"pcl: temperature must be positive and finite, got 0.0"),
    ({"rampup": -1.0}, ValueError, r"pcl: rampup must be >= 0 and finite, got -1.0"),
    ({"consistency": float("inf")}, ValueError, r"pcl: consistency must be >= 0 and finite, got inf"),
    ({"ema_decay": 1.5}, ValueError, r"pcl: ema_decay must be in \[0, 1\], got 1.5"),
    ({"translate": -1}, ValueError, r"pcl: translate must be an int >= 0, got -1"),
    ({"flip": "yes"}, TypeError, r"pcl: flip must be a bool"),
    ({"branch_from": 3}, TypeError, r"pcl: branch_from must be a stage path"),
    ({"branch_from": "stage3"}, ValueError, r"pcl: branch_from must be one of the student's stages before the last "
                                            r"\['stage1', 'stage2'\], got 'stage3'"),
])
def test_pcl_bad_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("pcl", digits_setup(teacher=None), **overrides)


# ---- MCL -----------------------------------------------------------------------------------------------------------

def embed_official(head, x):
    """winycg/MCL ``Embed.forward``: ``proj_head`` then ``Normalize(2)``."""
    x = head(x)
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


@pytest.mark.parametrize("networks", [2, 3])
def test_mcl_step_is_the_official_loss(networks):
    recipe = build_recipe("mcl", digits_setup(teacher=None), networks=networks)
    stage = recipe.stages[0]
    assert stage.batching == "class_aware"
    distiller, batch, values, output = first_step(recipe)
    names = ("student", "peer1", "peer2")[:networks]
    assert distiller.trainable == distiller.evaluate == names and recipe.student is distiller.models["student"]
    y = batch["target"]
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    assert bool(same.any(1).all()), "every anchor has a same-class partner (MPerClassSampler's guarantee)"
    term = next(t for t in distiller.terms if t.name == "mcl")
    assert [h[0].in_features for h in term.heads] == [16] * networks and term.heads[0][2].out_features == 128
    embeddings = [embed_official(head, values[f"{name}:fc/input"]) for head, name in zip(term.heads, names)]
    official_mcl = sup_mcl_official(embeddings, y)          # tau 0.1, kd_T 3, alpha 0.1, gamma 1, beta 0.1, lam 1
    torch.testing.assert_close(output.terms["mcl"], official_mcl.detach().float(), rtol=1e-5, atol=1e-6)
    loss_cls = sum(F.cross_entropy(values[name], y) for name in names)
    official = loss_cls + official_mcl
    for module in (*[distiller.models[name] for name in names], term.heads):
        for a, b in zip(gradients(output.loss, module), gradients(official, module)):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-6)
    # the interactive terms couple the networks: the student's gradient depends on the peer's embedding
    alone = sup_mcl_official(embeddings[:1] + [e.detach() for e in embeddings[1:]], y)
    assert any(not torch.allclose(a, b.float(), atol=1e-6) for a, b in zip(
        gradients(output.loss, distiller.models["peer1"]), gradients(loss_cls + alone, distiller.models["peer1"])))


@pytest.mark.parametrize("networks", [2, 3])
def test_mcl_logit_distillation_is_the_official_rule(networks):
    recipe = build_recipe("mcl", digits_setup(teacher=None), networks=networks, logit_distill=True)
    distiller, batch, values, output = first_step(recipe)
    names = ("student", "peer1", "peer2")[:networks]
    ensemble = (sum(values[name] for name in names) / networks).detach()
    learners = names if networks == 2 else names[-1:]         # main_cifar.py: only logits[-1] beyond two networks
    expected = sum(kd(values[name], ensemble, 3.0) for name in learners)
    torch.testing.assert_close(output.terms["mcl_logit_kd"], expected, rtol=1e-5, atol=1e-7)
    logit_term = next(t for t in distiller.terms if t.name == "mcl_logit_kd")
    loss = logit_term(distiller._resolve(values, logit_term), None)
    for name in names:
        grads = gradients(loss, distiller.models[name])
        assert any(g.abs().sum() > 0 for g in grads) == (name in learners)


def test_mcl_preset_and_training():
    recipe = build_recipe("mcl", digits_setup(teacher=None), preset="logit-distill")
    assert recipe.stages[0].distiller.evaluate == ("student", "peer1", "peer2", "peer3")
    recipe = build_recipe("mcl", digits_setup(teacher=None))
    result = Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.05, **QUIET)).fit(recipe, small_split().train,
                                                                                 small_split().test)
    assert set(result.accuracies) == {"student", "peer1"}


def test_mcl_resume_is_exact(tmp_path):
    def make(seed):
        return build_recipe("mcl", digits_setup(teacher=None, seed=seed))

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


@pytest.mark.parametrize("overrides, error, match", [
    ({"networks": 1}, ValueError, r"mcl: networks must be an int >= 2, got 1"),
    ({"temperature": 0.0}, ValueError, r"mcl: temperature must be positive and finite, got 0.0"),
    ({"kl_temperature": -1.0}, ValueError, r"mcl: kl_temperature must be positive and finite, got -1.0"),
    ({"icl_weight": -0.1}, ValueError, r"mcl: icl_weight must be >= 0 and finite, got -0.1"),
    ({"soft_vcl_weight": float("nan")}, ValueError, r"mcl: soft_vcl_weight must be >= 0 and finite, got nan"),
    ({"feat_dim": 0}, ValueError, r"mcl: feat_dim must be an int >= 1, got 0"),
    ({"logit_distill": 1}, TypeError, r"mcl: logit_distill must be a bool"),
])
def test_mcl_bad_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("mcl", digits_setup(teacher=None), **overrides)


# ---- SwitOKD with three networks (2T1S, 1T2S) ------------------------------------------------------------------

def official_kl_div(p_logit, q_logit, T=1.0):
    """hfutqian/SwitOKD ``kl_div(p_logit, q_logit, T)``: KL(p ‖ q), ``p`` the (detached) target, batch mean."""
    p = F.softmax(p_logit / T, dim=-1)
    return torch.mean(torch.sum(p * (F.log_softmax(p_logit / T, dim=-1) - F.log_softmax(q_logit / T, dim=-1)), 1))


def official_expert(teacher, student, target, classes=10):
    """The switch of one (teacher, student) pair in the multi-net ``main.py``s (``dist_s_label``, ``dist_s_t``), with
    the pair's own distances in ε (the paper's threshold)."""
    onehot = torch.zeros(target.shape[0], classes).scatter_(1, target.view(-1, 1), 1)
    s_label = torch.mean(torch.sum(torch.abs(F.softmax(student, -1) - onehot), 1))
    t_label = torch.mean(torch.sum(torch.abs(F.softmax(teacher, -1) - onehot), 1))
    ps_pt = torch.mean(torch.sum(torch.abs(F.softmax(student, -1) - F.softmax(teacher, -1)), 1))
    epsilon = torch.exp(-1 * (t_label / (t_label + s_label)))
    return bool(ps_pt > s_label - epsilon * t_label and t_label < s_label)


def test_switokd_2t1s_step_is_the_official_train_step():
    recipe = build_recipe("switokd", digits_setup(teacher=None), preset="2T1S")
    assert recipe.stages[0].model_lr_scales == {"teacher": 10.0, "teacher2": 10.0}
    distiller, batch, values, output = first_step(recipe)
    assert distiller.trainable == distiller.evaluate == ("student", "teacher", "teacher2")
    s, t1, t2, y = values["student"], values["teacher"], values["teacher2"], batch["target"]
    torch.testing.assert_close(output.terms["switokd_student"],
                               official_kl_div(t1.detach(), s) + official_kl_div(t2.detach(), s))
    for name, own, other in (("switokd_teacher", t1, t2), ("switokd_teacher2", t2, t1)):
        assert not official_expert(own, s, y)
        expected = F.cross_entropy(own, y) + official_kl_div(s.detach(), own) + official_kl_div(other.detach(), own)
        torch.testing.assert_close(output.terms[name], expected)
    # each network receives exactly its own loss's gradient (the official separate backward passes)
    def own_loss(learner, first, second):
        return F.cross_entropy(learner, y) + official_kl_div(first.detach(), learner) + official_kl_div(second.detach(),
                                                                                                       learner)

    own_losses = {"student": own_loss(s, t1, t2), "teacher": own_loss(t1, s, t2), "teacher2": own_loss(t2, s, t1)}
    for name, loss in own_losses.items():
        for a, b in zip(gradients(output.loss, distiller.models[name]), gradients(loss, distiller.models[name])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _pairs():
    """A teacher mildly right on every sample, a confidently wrong student (expert mode with it) and a student that
    is right too (learning mode with it)."""
    target = torch.arange(10).repeat(2)
    teacher = (2.0 * F.one_hot(target, 10)).float().requires_grad_()
    wrong = (8.0 * F.one_hot((target + 1) % 10, 10)).float()
    right = (5.0 * F.one_hot(target, 10)).float()
    assert official_expert(teacher, wrong, target) and not official_expert(teacher, right, target)
    return teacher, wrong, right, target


def test_switokd_1t2s_teacher_weights_follow_each_pair():
    recipe = build_recipe("switokd", digits_setup(teacher=None), preset="1T2S")
    distiller = recipe.stages[0].distiller
    assert distiller.evaluate == ("student", "student2", "teacher") and recipe.stages[0].model_lr_scales == {
        "teacher": 10.0}
    term = next(t for t in distiller.terms if t.name == "switokd_teacher")
    teacher, wrong, right, y = _pairs()
    # 1T2S main.py: loss_full2 = w0·CE + w2·KL(ks2 ‖ t) + w1·KL(model ‖ t)
    for s1, s2, (w1, w2) in ((wrong, right, (0, 1)), (right, wrong, (1, 0)), (right, right, (1, 1))):
        expected = F.cross_entropy(teacher, y) + w2 * official_kl_div(s2, teacher) + w1 * official_kl_div(s1, teacher)
        torch.testing.assert_close(term.loss(teacher, s1, s2, y, context=None), expected)
    paused = term.loss(teacher, wrong, wrong, y, context=None)        # w0 = 0: the teacher takes no step
    assert float(paused) == 0.0 and not paused.requires_grad
    distiller, batch, values, output = first_step(recipe)
    s1, s2, t = values["student"], values["student2"], values["teacher"]
    torch.testing.assert_close(output.terms["switokd_student"],
                               official_kl_div(s2.detach(), s1) + official_kl_div(t.detach(), s1))
    torch.testing.assert_close(output.terms["switokd_student2"],
                               official_kl_div(s1.detach(), s2) + official_kl_div(t.detach(), s2))


def test_switokd_2t1s_teacher_in_expert_mode_pauses():
    recipe = build_recipe("switokd", digits_setup(teacher=None), preset="2T1S")
    term = next(t for t in recipe.stages[0].distiller.terms if t.name == "switokd_teacher2")
    teacher, wrong, right, y = _pairs()
    paused = term.loss(teacher, wrong, right, y, context=None)       # its pair with the student: expert mode
    assert float(paused) == 0.0 and not paused.requires_grad
    learning = term.loss(teacher, right, wrong, y, context=None)
    torch.testing.assert_close(learning, F.cross_entropy(teacher, y) + official_kl_div(right, teacher)
                               + official_kl_div(wrong, teacher))


def test_switokd_topology_resume_is_exact(tmp_path):
    def make(seed):
        return build_recipe("switokd", digits_setup(student="student-mlp", teacher=None, seed=seed), preset="1T2S")

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


def test_switokd_bad_topology():
    with pytest.raises(ValueError, match=r"switokd: topology must be one of .*'1T1S', '2T1S', '1T2S'.*got '3T1S'"):
        build_recipe("switokd", digits_setup(teacher=None), topology="3T1S")
