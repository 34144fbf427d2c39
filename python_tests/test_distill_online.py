"""Online methods (DML, DML + feature, SwitOKD, SOKD, BD-KD, MMT, ONE and its multi-branch builder): training steps on digits, SwitOKD's switch against the
official code, who receives which gradient, and each term equal to its weight times the public loss on the method's
own values (the losses against the official formulas: test_losses_kd.py, test_losses_response.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import batches_for, digits_setup, first_step, run_steps
from kdkernels.distill import Setup, build_recipe, digits_model
from kdkernels.distill import models as zoo_models
from kdkernels.distill.methods.online import GlobalStepEMA, MultiBranchNetwork, switokd_expert_mode
from kdkernels.distill.terms import StepContext
from kdkernels.distill.trainer import TrainConfig, Trainer
from kdkernels.distill.updates import StepClock
from trainer_testing import QUIET, assert_resume_is_exact, small_split


def close(actual, expected):
    """The same computation up to the order of a few float32 operations."""
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-9)


def kl(learner, target, temperature=1.0):
    """KD-Zoo / SOKD ``SoftTarget`` towards a detached target: Hinton KD, T² batchmean."""
    return kdkernels.kd_loss(learner, target.detach(), temperature)


def gradients(loss, module):
    parameters = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


@pytest.mark.parametrize("method", ["dml", "dml-feature", "switokd", "sokd", "bd-kd"])
def test_online_method_trains(method):
    run_steps(build_recipe(method, digits_setup()))


# ---- DML -------------------------------------------------------------------------------------------------------------

def test_dml_terms_and_own_gradients():
    distiller, batch, values, output = first_step(build_recipe("dml", digits_setup(), peers=3))
    assert distiller.trainable == distiller.evaluate == ("student", "peer1", "peer2")
    names, y = distiller.evaluate, batch["target"]
    for name in names:
        others = [other for other in names if other != name]
        own = sum(kl(values[name], values[other]) for other in others)
        close(output.terms[f"dml_{name}"], own)
        close(output.terms[f"ce_{name}"], F.cross_entropy(values[name], y))
        # the joint loss gives each peer exactly the gradient of its own loss (KD-Zoo's separate backward passes)
        own_loss = F.cross_entropy(values[name], y) + own
        for joint, alone in zip(gradients(output.loss, distiller.models[name]),
                                gradients(own_loss, distiller.models[name])):
            torch.testing.assert_close(joint, alone, rtol=1e-5, atol=1e-7)


def test_dml_needs_two_peers_and_a_factory():
    with pytest.raises(ValueError, match="peers must be an integer >= 2"):
        build_recipe("dml", digits_setup(), peers=1)
    setup = Setup(student=digits_model("student-cnn"), num_classes=10)
    with pytest.raises(ValueError, match="needs new_student"):
        build_recipe("dml", setup)


# ---- DML + feature (PaddleClas UDML) -------------------------------------------------------------------------------

def test_dml_feature_terms_and_both_peers_learn():
    distiller, batch, values, output = first_step(build_recipe("dml-feature", digits_setup()))
    close(output.terms["dml"], kdkernels.kd_loss(values["student"], values["peer"], divergence="symmetric"))
    close(output.terms["feature_l2"], F.mse_loss(values["student:stage2"], values["peer:stage2"]))
    close(output.terms["ce_peer"], F.cross_entropy(values["peer"], batch["target"]))
    # no detach (PaddleClas): the mutual term moves both peers
    dml = distiller.terms[[t.name for t in distiller.terms].index("dml")]
    mutual = dml(distiller._resolve(values, dml), None)
    for name in ("student", "peer"):
        assert any(g.abs().sum() > 0 for g in gradients(mutual, distiller.models[name]))


def test_dml_feature_shape_mismatch_names_the_term():
    setup = digits_setup()
    setup.new_student = lambda: digits_model("assistant-cnn")
    with pytest.raises(ValueError, match="term 'feature_l2'.*differ in shape"):
        first_step(build_recipe("dml-feature", setup))


# ---- SwitOKD -----------------------------------------------------------------------------------------------------

def official_switch(output, output_ks2, target, classes=10):
    """hfutqian/SwitOKD main.py: ``output`` the teacher, ``output_ks2`` the student."""
    onehot = torch.zeros(target.shape[0], classes).scatter_(1, target.view(-1, 1), 1)
    dist_label = lambda y, q: torch.mean(torch.sum(torch.abs(F.softmax(q, dim=-1) - y), 1))  # noqa: E731
    s_label, t_label = dist_label(onehot, output_ks2), dist_label(onehot, output)
    ps_pt = torch.mean(torch.sum(torch.abs(F.softmax(output_ks2, -1) - F.softmax(output, -1)), 1))
    epsilon = torch.exp(-1 * (t_label / (t_label + s_label)))
    delta = s_label - epsilon * t_label
    return bool(ps_pt > delta and t_label < s_label)


def test_switokd_switch_matches_official():
    generator = torch.Generator().manual_seed(0)
    modes = set()
    for trial in range(200):
        target = torch.randint(0, 10, (16,), generator=generator)
        teacher = torch.randn(16, 10, generator=generator) * 3 + 6 * F.one_hot(target, 10) * (trial % 3)
        student = torch.randn(16, 10, generator=generator) * 3
        expected = official_switch(teacher, student, target)
        assert switokd_expert_mode(student, teacher, target) == expected
        modes.add(expected)
    assert modes == {True, False}


def test_switokd_learning_mode_terms():
    distiller, batch, values, output = first_step(build_recipe("switokd", digits_setup()))
    s, t, y = values["student"], values["teacher"], batch["target"]
    assert distiller.evaluate == ("student", "teacher")
    close(output.terms["switokd_student"], kl(s, t))
    assert not official_switch(t, s, y)
    close(output.terms["switokd_teacher"], F.cross_entropy(t, y) + kl(t, s))


def test_switokd_expert_mode_leaves_the_teacher_alone():
    recipe = build_recipe("switokd", digits_setup())
    distiller = recipe.stages[0].distiller
    teacher_term = distiller.terms[-1]
    target = torch.arange(10).repeat(2)
    teacher = (2.0 * F.one_hot(target, 10)).float().requires_grad_()           # mildly right
    student = (8.0 * F.one_hot((target + 1) % 10, 10)).float().requires_grad_()  # confidently wrong
    assert official_switch(teacher, student, target)
    loss = teacher_term.loss(teacher, student, target, context=None)
    assert float(loss) == 0.0 and not loss.requires_grad
    student_term = distiller.terms[1]
    close(student_term.loss(student, teacher, context=None), kl(student, teacher))
    assert torch.autograd.grad(student_term.loss(student, teacher, context=None), teacher, allow_unused=True)[0] is None


# ---- SOKD --------------------------------------------------------------------------------------------------------

def test_sokd_branch_learns_from_both_and_teaches_the_student():
    distiller, batch, values, output = first_step(build_recipe("sokd", digits_setup()))
    teacher, term = distiller.models["teacher"], distiller.terms[1]
    assert teacher.training and not any(p.requires_grad for p in teacher.parameters())   # official teacher.train()
    auxiliary = term.branch(values["teacher:stage2"].detach())
    s, t, y = values["student"], values["teacher"], batch["target"]
    expected = F.cross_entropy(auxiliary, y) + kl(auxiliary, t, 4.0) + kl(auxiliary, s, 4.0) + kl(s, auxiliary, 4.0)
    close(output.terms["sokd"], expected)
    close(output.terms["ce_student"], F.cross_entropy(s, y))


def test_sokd_branch_copies_the_teacher_and_the_teacher_stays_frozen():
    setup = digits_setup()
    recipe = build_recipe("sokd", setup)
    branch = recipe.stages[0].distiller.terms[1].branch
    torch.testing.assert_close(branch[0][0].weight, setup.teacher.stage3[0].weight)
    torch.testing.assert_close(branch[-1].weight, setup.teacher.fc.weight)
    teacher_before = [p.detach().clone() for p in setup.teacher.parameters()]
    branch_before = [p.detach().clone() for p in branch.parameters()]
    run_steps(recipe)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, setup.teacher.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(branch_before, branch.parameters()))
    random_branch = build_recipe("sokd", digits_setup(), preset="official-code").stages[0].distiller.terms[1].branch
    assert not torch.equal(random_branch[-1].weight, setup.teacher.fc.weight)


def test_sokd_bad_configuration():
    with pytest.raises(ValueError, match="pass a trained teacher"):
        build_recipe("sokd", digits_setup(teacher=None))
    with pytest.raises(ValueError, match="branch_init"):
        build_recipe("sokd", digits_setup(), branch_init="zeros")
    with pytest.raises(ValueError, match="not one of the teacher's stages"):
        build_recipe("sokd", digits_setup(), branch_from="stage3.0")


# ---- BD-KD (approximation) -------------------------------------------------------------------------------------

def test_bdkd_terms_and_registry_flag():
    from kdkernels.distill import get_method
    assert get_method("bd-kd").approximation.startswith("approximation of")
    distiller, batch, values, output = first_step(build_recipe("bd-kd", digits_setup()))
    s, t = values["student"], values["teacher"]
    close(output.terms["bdkd_student"], kdkernels.bdkd_loss(s, t.detach()))
    close(output.terms["bdkd_teacher"], kdkernels.bdkd_loss(t, s.detach()))
    student_term = distiller.terms[[term.name for term in distiller.terms].index("bdkd_student")]
    loss = student_term(distiller._resolve(values, student_term), None)
    assert all(float(g.abs().sum()) == 0 for g in gradients(loss, distiller.models["teacher"]))


def test_switokd_trains_its_teacher_ten_times_faster_as_the_official_code():
    recipe = build_recipe("switokd", digits_setup())
    stage = recipe.stages[0]
    assert stage.model_lr_scales == {"teacher": 10.0}
    groups = stage.distiller.parameter_groups(0.01, stage.model_lr_scales)
    teacher = {id(p) for p in stage.distiller.models["teacher"].parameters()}
    assert [g["lr"] for g in groups if {id(p) for p in g["params"]} == teacher] == [0.1]


def _switokd_batch():
    """Rows 0-3: a right teacher and a confidently wrong student (expert mode on their own); rows 4-7: the reverse
    (learning mode on their own)."""
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    right = F.one_hot(target, 5).float() * 2.0
    wrong = F.one_hot((target + 1) % 5, 5).float() * 8.0
    teacher = torch.cat([right[:4], wrong[4:]])
    student = torch.cat([wrong[:4], right[4:]])
    return student, teacher, target


def _switokd_rank(rank: int, port: int, out_dir: str) -> None:
    import os
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        student, teacher, target = _switokd_batch()
        rows = slice(4 * rank, 4 * rank + 4)
        torch.save(switokd_expert_mode(student[rows], teacher[rows], target[rows]),
                   os.path.join(out_dir, f"switokd{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_switokd_ranks_switch_alike_from_the_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_switokd_rank, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"switokd{rank}.pt") for rank in range(2)]
    student, teacher, target = _switokd_batch()
    local = [switokd_expert_mode(student[r], teacher[r], target[r]) for r in (slice(0, 4), slice(4, 8))]
    assert local == [True, False], "the two halves alone would switch differently"
    assert ranks[0] == ranks[1] == switokd_expert_mode(student, teacher, target)


# ---- MMT ---------------------------------------------------------------------------------------------------------

def mmt_official_loss(z1, z2, e1, e2, targets, ce_soft_weight=0.5, epsilon=0.1):
    """yxgeee/MMT ``MMTTrainer.train`` without the triplet terms (``CrossEntropyLabelSmooth``, ``SoftEntropy``)."""
    def label_smooth(inputs):
        log_probs = F.log_softmax(inputs, dim=1)
        one_hot = (1 - epsilon) * torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1)
        return (-(one_hot + epsilon / inputs.shape[1]) * log_probs).mean(0).sum()

    def soft_entropy(inputs, target_logits):
        return (-F.softmax(target_logits, dim=1).detach() * F.log_softmax(inputs, dim=1)).mean(0).sum()

    return ((label_smooth(z1) + label_smooth(z2)) * (1 - ce_soft_weight)
            + (soft_entropy(z1, e2) + soft_entropy(z2, e1)) * ce_soft_weight)


def test_mmt_step_is_the_official_loss_with_each_peer_taught_by_the_other_ema():
    recipe = build_recipe("mmt", digits_setup(teacher=None), preset="digits")
    distiller = recipe.stages[0].distiller
    assert distiller.evaluate == ("student_ema", "peer_ema", "student", "peer")
    assert recipe.student is distiller.models["student_ema"], "the temporal average is the exported model"
    batch = next(iter(batches_for(recipe.stages[0], batch_size=16)))
    distiller.build(batch).activate().train()
    viewed = distiller.apply_views(batch, seed=0, epoch=1, step=0)
    assert not torch.equal(viewed["input"], viewed["input_peer"]), "each peer reads its own augmentation"
    values = distiller.run_models(viewed)
    output = distiller.compute_terms(values, StepContext(epoch=1, epochs=2, step=0, batch=viewed))
    models = distiller.models
    assert models["student_ema"].training and models["peer_ema"].training, "MMT's model_*_ema.train()"
    with torch.no_grad():   # each EMA reads its own peer's view
        torch.testing.assert_close(values["peer_ema"], models["peer_ema"](viewed["input_peer"]), rtol=0, atol=0)
    z1, z2, e1, e2 = (values[name] for name in ("student", "peer", "student_ema", "peer_ema"))
    expected = mmt_official_loss(z1, z2, e1, e2, viewed["target"])
    close(output.terms["mmt"], expected)
    # who teaches whom: the student's gradient comes from the PEER's EMA (swapping the EMAs changes it)
    own = gradients(output.loss, models["student"])
    official = gradients(mmt_official_loss(z1, z2, e1, e2, viewed["target"]), models["student"])
    swapped = gradients(mmt_official_loss(z1, z2, e2, e1, viewed["target"]), models["student"])
    for a, b in zip(own, official):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(own, swapped))
    assert all(not p.requires_grad for name in ("student_ema", "peer_ema") for p in models[name].parameters())


def official_update_ema_variables(model, ema_model, alpha, global_step):
    """yxgeee/MMT ``MMTTrainer._update_ema_variables`` (``add_(1 - alpha, param.data)`` in today's signature)."""
    alpha = min(1 - 1 / (global_step + 1), alpha)
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)


def test_mmt_ema_is_the_official_update():
    source, ours = digits_model("student-mlp"), digits_model("student-mlp")
    ours.load_state_dict(source.state_dict())
    official = digits_model("student-mlp")
    official.load_state_dict(source.state_dict())
    update = GlobalStepEMA("student", 0.6)
    generator = torch.Generator().manual_seed(0)
    for global_step in range(5):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        update.after_step(ours, source, StepClock(global_step, 10, 10))
        official_update_ema_variables(source, official, 0.6, global_step)
        for a, b in zip(ours.parameters(), official.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        if global_step == 0:   # alpha = 0: the first update copies the peer
            assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), source.parameters()))
    assert update.count == 5 and update.buffers == "own"


def test_mmt_trains_both_peers_and_averages_them():
    recipe = build_recipe("mmt", digits_setup(teacher=None), preset="digits", ema_decay=0.9)
    distiller = recipe.stages[0].distiller
    initial = {name: [p.detach().clone() for p in distiller.models[name].parameters()] for name in ("student", "peer")}
    result = Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.05, **QUIET)).fit(recipe, small_split().train,
                                                                                 small_split().test)
    assert set(result.accuracies) == {"student_ema", "peer_ema", "student", "peer"}
    for name in ("student", "peer"):
        ema, model = distiller.models[f"{name}_ema"], distiller.models[name]
        for e, p, p0 in zip(ema.parameters(), model.parameters(), initial[name]):
            assert e.grad is None and not torch.equal(p.detach(), p0) and not torch.equal(e, p.detach())


def test_mmt_resume_is_exact(tmp_path):
    def make(seed):
        return build_recipe("mmt", digits_setup(student="student-cnn", teacher=None, seed=seed), preset="digits",
                            ema_decay=0.9)

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


@pytest.mark.parametrize("overrides, error, match", [
    ({"soft_ce_weight": 1.5}, ValueError, r"mmt: soft_ce_weight must be in \[0, 1\], got 1.5"),
    ({"ema_decay": -0.1}, ValueError, r"mmt: ema_decay must be in \[0, 1\], got -0.1"),
    ({"label_smoothing": 1.0}, ValueError, r"mmt: label_smoothing must be in \[0, 1\), got 1.0"),
    ({"translate": -1}, ValueError, r"mmt: translate must be an int >= 0, got -1"),
    ({"flip": "yes"}, TypeError, r"mmt: flip must be a bool"),
])
def test_mmt_bad_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("mmt", digits_setup(teacher=None), **overrides)


# ---- ONE -----------------------------------------------------------------------------------------------------------

def official_sigmoid_rampup(current, rampup_length):
    """Lan1991Xu/ONE_NeurIPS2018 ``utils/ramps.py``."""
    if rampup_length == 0:
        return 1.0
    current = min(max(current, 0.0), rampup_length)
    phase = 1.0 - current / rampup_length
    return float(math.exp(-5.0 * phase * phase))


def one_official_loss(outputs, x_m, targets, consistency_weight):
    """``cifar_one.py`` ``train`` with ``loss/kl_loss.py`` ``KLLoss`` (T 3; its 1e-7 left out: kdkernels is exact)."""
    def kl_loss(pred, label, T=3):
        target = F.softmax(label / T, dim=1).detach()
        return T * T * ((target * (target.log() - F.log_softmax(pred / T, dim=1))).sum(1).sum() / target.size()[0])

    loss_cross = sum(F.cross_entropy(z, targets) for z in outputs) + F.cross_entropy(x_m, targets)
    return loss_cross + consistency_weight * sum(kl_loss(z, x_m) for z in outputs)


@pytest.mark.parametrize("epoch", [1, 5, 12])
def test_one_step_is_the_official_gate_and_loss(epoch):
    recipe = build_recipe("one", digits_setup(teacher=None), preset="digits")
    distiller, batch, values, output = first_step(recipe, epoch=epoch)
    net = distiller.models["student"]
    assert isinstance(net, MultiBranchNetwork) and recipe.student is net and distiller.evaluate == ("student",)
    branch_logits, gate = values["student:branch_logits"], values["student:gate_weights"]
    assert branch_logits.shape == (3, 32, 10) and gate.shape == (32, 3)
    torch.testing.assert_close(values["student"], branch_logits[0], rtol=0, atol=0)   # deployed: branch 0
    # ONE_ResNet.forward's gate on the shared map (stage2 of the digits CNN): avgpool, control_v1, bn_v1 (batch
    # statistics in train mode), relu, softmax
    with torch.no_grad():
        shared = net.trunk.stage2(net.trunk.stage1(batch["input"]))
        linear, bn = net.gate[1], net.gate[2]
        x_c = shared.mean(dim=(2, 3)) @ linear.weight.t() + linear.bias
        x_c = (x_c - x_c.mean(0)) / torch.sqrt(x_c.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
        expected_gate = F.softmax(F.relu(x_c), dim=1)
        x_3 = [branch(shared) for branch in net.branches]
    torch.testing.assert_close(gate, expected_gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(branch_logits, torch.stack(x_3), rtol=1e-5, atol=1e-6)
    x_m = sum(gate[:, i].repeat(10, 1).transpose(0, 1) * branch_logits[i] for i in range(3))
    weight = official_sigmoid_rampup(epoch - 1, 8.0)
    close(output.terms["one"], one_official_loss(list(branch_logits), x_m, batch["target"], weight))
    # every branch and the gate learn
    for module in (*net.branches, net.gate, net.trunk.stage1):
        assert any(g.abs().sum() > 0 for g in gradients(output.loss, module))


def test_multi_branch_builder_on_the_digits_cnn_and_a_zoo_resnet():
    for backbone, factory, x in ((digits_model("student-cnn"), lambda: digits_model("student-cnn"),
                                  torch.randn(5, 1, 8, 8)),
                                 (zoo_models.create("resnet8", num_classes=10),
                                  lambda: zoo_models.create("resnet8", num_classes=10), torch.randn(5, 3, 32, 32))):
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        children = [name for name, _ in backbone.named_children()]
        net = MultiBranchNetwork(backbone, 3, new_backbone=factory)
        assert [name for name, _ in backbone.named_children()] == children, "the caller's backbone is not changed"
        assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
        assert len(net.branches) == 3 and net.gate[1].out_features == 3
        first = [p for p in net.branches[0].parameters()]
        copied = [p for name, p in backbone.named_parameters()
                  if name.split(".")[0] in (*net.stage_paths, net.classifier_path)]
        assert all(torch.equal(a, b) for a, b in zip(first, copied)), "branch 0 starts from the backbone"
        for other in net.branches[1:]:    # independent initialisations: otherwise the branches never differ
            assert not torch.equal(next(other.parameters()), first[0])
        net.train()
        logits = net(x)
        assert logits.shape == (5, 10)
        net.eval()
        deployed = net.single_branch(0).eval()
        assert type(deployed) is type(backbone)
        torch.testing.assert_close(deployed(x), net(x), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            original = backbone.eval()(x)
        assert not torch.allclose(original, net(x)), "one training forward moved branch 0's batch norm"


def test_multi_branch_deploys_the_ensemble_and_refuses_other_layouts():
    net = MultiBranchNetwork(digits_model("student-cnn"), 2, deploy="ensemble").eval()
    taps = {}
    net.branch_logits.register_forward_hook(lambda m, i, o: taps.__setitem__("z", o))
    net.gate_weights.register_forward_hook(lambda m, i, o: taps.__setitem__("g", o))
    out = net(torch.randn(4, 1, 8, 8))
    torch.testing.assert_close(out, taps["g"][:, :1] * taps["z"][0] + taps["g"][:, 1:] * taps["z"][1])
    with pytest.raises(ValueError, match=r"WideResNet's forward after 'block2' is not its stages \['block3'\]"):
        MultiBranchNetwork(zoo_models.create("wrn_16_2", num_classes=10))(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"split must be one of the backbone's stages before the last"):
        MultiBranchNetwork(digits_model("student-cnn"), split="stage3")


def test_one_resume_is_exact(tmp_path):
    def make(seed):
        return build_recipe("one", digits_setup(teacher=None, seed=seed), preset="digits", rampup=1.0)

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


@pytest.mark.parametrize("overrides, error, match", [
    ({"branches": 1}, ValueError, r"one: branches must be an int >= 2, got 1"),
    ({"temperature": 0.0}, ValueError, r"one: temperature must be positive and finite, got 0.0"),
    ({"rampup": -1.0}, ValueError, r"one: rampup must be >= 0 and finite, got -1.0"),
    ({"consistency": float("inf")}, ValueError, r"one: consistency must be >= 0 and finite, got inf"),
    ({"deploy": "both"}, ValueError, r"one: deploy must be one of"),
    ({"branch_from": 3}, TypeError, r"one: branch_from must be a stage path"),
    ({"branch_from": "stage3"}, ValueError, r"one: branch_from must be one of the student's stages before the last "
                                            r"\['stage1', 'stage2'\], got 'stage3'"),
])
def test_one_bad_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("one", digits_setup(teacher=None), **overrides)
