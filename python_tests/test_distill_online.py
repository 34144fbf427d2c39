"""Online methods (DML, DML + feature, SwitOKD, SOKD, BD-KD): training steps on digits, SwitOKD's switch against the
official code, who receives which gradient, and each term equal to its weight times the public loss on the method's
own values (the losses against the official formulas: test_losses_kd.py, test_losses_response.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_setup, first_step, run_steps
from kdkernels.distill import Setup, build_recipe, digits_model
from kdkernels.distill.methods.online import switokd_expert_mode


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
