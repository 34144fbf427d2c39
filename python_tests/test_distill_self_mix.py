"""Self-distillation from mixing (MixSKD) and from earlier snapshots (snapshot distillation): one training step
equals the official (or paper's) formula on that step's tensors, exact resume, and configuration errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

from distill_testing import batches_for, digits_setup, first_step, viewed_step
from test_losses_self_distillation import official_mixskd
from trainer_testing import QUIET, assert_resume_is_exact, small_split
from kdkernels.distill import TrainConfig, Trainer, build_recipe
from kdkernels.distill.methods.self_distillation import BatchMixUp
from kdkernels.distill.terms import StepContext
from kdkernels.distill.views import Draws, View, apply_views


# ---------------------------------------------------------------------------------------------------------- MixSKD

def mixskd_step(step=2, **overrides):
    recipe = build_recipe("mixskd", digits_setup(teacher=None), **overrides)
    return (recipe, *viewed_step(recipe, step))


def test_mixskd_step_is_the_official_loss_on_the_clean_and_mixup_batch():
    recipe, viewed, output = mixskd_step(temperature=2.0)
    distiller = recipe.stages[0].distiller
    student, term = distiller.models["student"], distiller.terms[0]
    assert distiller.models["mixskd"].network is student
    lam, index = viewed["mix_lam"], viewed["mix_perm"]
    assert torch.all(lam == lam[0]) and 0 < float(lam[0]) < 1, "one lam per batch"
    x = viewed["input"]
    torch.testing.assert_close(viewed["input_mix"], lam[0] * x + (1 - lam[0]) * x[index])
    # the official forward: the network on cat([inputs, mix_inputs]), branches on the shallow stage maps
    maps = {}
    handles = [getattr(student, name).register_forward_hook(lambda _m, _i, out, name=name: maps.__setitem__(name, out))
               for name in ("stage1", "stage2", "stage3")]
    bs = x.shape[0]
    with torch.no_grad():
        logits = student(torch.cat([x, viewed["input_mix"]]))
        branches = [head(maps[name]) for head, name in zip(term.heads, ("stage1", "stage2"))]
        features = [b[0] for b in branches] + [maps["stage3"]]
        all_logits = [b[1] for b in branches] + [logits]
        lam0 = float(lam[0])
        ensemble_features = [lam0 * f[:bs] + (1 - lam0) * f[index] for f in features]
        mixup_features = [f[bs:] for f in features]
        teacher = term.teacher.fc(term.teacher.conv(torch.cat(ensemble_features, 1)).mean((2, 3)))
        teacher_mixup = term.teacher.fc(term.teacher.conv(torch.cat(mixup_features, 1)).mean((2, 3)))
        judged = [d(f.mean((2, 3))) for d, f in zip(term.discriminators, ensemble_features)]
        judged_mixup = [d(f.mean((2, 3))) for d, f in zip(term.discriminators, mixup_features)]
    for handle in handles:
        handle.remove()
    expected = official_mixskd([z.double() for z in all_logits], [f.double() for f in features], teacher.double(),
                               teacher_mixup.double(), [d.double() for d in judged],
                               [d.double() for d in judged_mixup], viewed["target"], lam0, index, 2.0)
    torch.testing.assert_close(output.terms["mixskd"].double(), expected, rtol=1e-5, atol=1e-6)
    assert len(term.heads) == 2 and len(term.discriminators) == 3
    assert all(f.shape[1:] == maps["stage3"].shape[1:] for f in features), "branches reach the deepest map's shape"
    # the network, the branches and the self-teacher learn; the discriminators stay as initialised (as coded)
    output.loss.backward()
    for name, module in (("student", student), ("heads", term.heads), ("teacher", term.teacher)):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(p.grad is None and not p.requires_grad for p in term.discriminators.parameters())
    trained = {id(p) for p in distiller.trainable_parameters()}
    assert not any(id(p) in trained for p in term.discriminators.parameters())
    assert all(id(p) in trained for p in term.teacher.parameters())


def test_mixskd_can_train_its_discriminators():
    recipe, _, output = mixskd_step(train_discriminators=True)
    discriminators = recipe.stages[0].distiller.terms[0].discriminators
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in discriminators.parameters())


def test_batch_mixup_draws_one_lam_per_batch_and_evaluates_as_the_identity():
    x = torch.randn(6, 1, 4, 4)
    index = torch.arange(10, 16)
    view = View("input", "input_mix", BatchMixUp(alpha=0.4))
    out = view({"input": x, "index": index}, Draws(5, index))
    assert torch.all(out["mix_lam"] == out["mix_lam"][0])
    torch.testing.assert_close(out["input_mix"], out["mix_lam"][0] * x + (1 - out["mix_lam"][0]) * x[out["mix_perm"]])
    again = view({"input": x.flip(0), "index": index.flip(0)}, Draws(5, index.flip(0)))
    assert torch.equal(again["mix_lam"], out["mix_lam"]), "the batch's draw does not depend on the row order"
    other = view({"input": x, "index": index}, Draws(6, index))
    assert not torch.equal(other["mix_lam"], out["mix_lam"])
    evaluated = apply_views([view], {"input": x, "index": index}, training=False)
    assert torch.equal(evaluated["input_mix"], x) and torch.all(evaluated["mix_lam"] == 1)


def make_mixskd(seed=0):
    return build_recipe("mixskd", digits_setup(seed=seed, teacher=None))


def test_mixskd_resume_is_bit_exact_and_evaluates_the_network(tmp_path):
    assert_resume_is_exact(make_mixskd, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1))
    recipe = make_mixskd()
    distiller = recipe.stages[0].distiller
    assert distiller.evaluate == ("student",) and recipe.student is distiller.models["student"]


def test_mixskd_presets_and_bad_configuration():
    assert build_recipe("mixskd", digits_setup(), preset="imagenet").hyperparameters["alpha"] == 0.2
    with pytest.raises(ValueError, match="mixskd: alpha"):
        build_recipe("mixskd", digits_setup(), alpha=0.0)
    with pytest.raises(TypeError, match="mixskd: temperature"):
        build_recipe("mixskd", digits_setup(), temperature="3")
    with pytest.raises(TypeError, match="mixskd: train_discriminators"):
        build_recipe("mixskd", digits_setup(), train_discriminators=1)
    with pytest.raises(ValueError, match="mixskd's network.*no submodule 'stage9'"):
        build_recipe("mixskd", digits_setup(), stages=["stage1", "stage9"])
    recipe = build_recipe("mixskd", digits_setup(student="student-mlp"))
    batch = next(iter(batches_for(recipe.stages[0])))
    with pytest.raises(ValueError, match="mixskd.*convolutional stage maps"):
        recipe.stages[0].distiller.build(batch)
    with pytest.raises(ValueError, match="mixskd reads the mixup images 'input_mix'.*apply_views"):
        recipe = build_recipe("mixskd", digits_setup())
        recipe.stages[0].distiller.models["mixskd"](batch)


def test_mixskd_mixed_inputs_change_the_loss():
    """The mixup rows matter: the same step with lam forced to 1 (mixup images = the clean ones) differs."""
    _, _, output = mixskd_step()
    recipe, viewed, _ = mixskd_step()
    distiller = recipe.stages[0].distiller
    viewed = dict(viewed, input_mix=viewed["input"], mix_lam=torch.ones_like(viewed["mix_lam"]))
    same = distiller.compute_terms(distiller.run_models(viewed), StepContext(epoch=1, epochs=10, step=2, batch=viewed))
    assert not torch.allclose(same.terms["mixskd"], output.terms["mixskd"])


# -------------------------------------------------------------------------------------------- snapshot distillation

def make_snapshot(seed=0, **overrides):
    return build_recipe("snapshot-distillation", digits_setup(seed=seed, teacher=None), **overrides)


def test_snapshot_cycles_split_the_run_and_share_one_frozen_teacher():
    recipe = make_snapshot(cycles=3)
    assert [stage.name for stage in recipe.stages] == ["cycle-1", "cycle-2", "cycle-3"]
    assert [stage.epochs_of(10) for stage in recipe.stages] == [3, 3, 4]
    assert [stage.epochs_of(2) for stage in recipe.stages] == [0, 1, 1]
    first, second, third = (stage.distiller for stage in recipe.stages)
    student = first.models["student"]
    assert list(first.models) == ["student"] and [t.name for t in first.terms] == ["ce_student"]
    assert second.models["student"] is student and third.models["student"] is student
    assert second.models["teacher"] is third.models["teacher"] and second.models["teacher"] is not student
    assert second.trainable == ("student",) and recipe.student is student
    # the teacher becomes the student's snapshot when a cycle starts, and only then
    with torch.no_grad():
        student.fc.bias.add_(1.0)
    recipe.stages[1].before()
    teacher = second.models["teacher"]
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))
    with torch.no_grad():
        student.fc.bias.add_(1.0)
    assert not torch.equal(teacher.fc.bias, student.fc.bias)


def test_snapshot_step_is_ce_plus_kd_from_the_previous_cycle():
    recipe = make_snapshot(temperature=2.0, ce_weight=0.5, kd_weight=3.0)
    student, teacher = recipe.stages[1].distiller.models["student"], recipe.stages[1].distiller.models["teacher"]
    with torch.no_grad():   # the snapshot of an earlier cycle differs from the network it teaches
        for parameter in student.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    distiller, batch, values, output = first_step(recipe, stage_index=1)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        z_s, z_t = student(batch["input"]).double(), teacher(batch["input"]).double()
    kd = F.kl_div(F.log_softmax(z_s / 2.0, 1), F.softmax(z_t / 2.0, 1), reduction="batchmean") * 4.0
    expected = 0.5 * F.cross_entropy(z_s, batch["target"]) + 3.0 * kd
    torch.testing.assert_close(output.terms["snapshot"].double(), expected, rtol=1e-5, atol=1e-7)
    assert kd > 0
    _, _, _, plain = first_step(recipe, stage_index=0)
    assert set(plain.terms) == {"ce_student"}


def test_snapshot_teacher_is_the_last_snapshot_of_the_previous_cycle_and_the_lr_restarts(tmp_path):
    config = dict(epochs=4, batch_size=32, lr=0.05, **QUIET)
    reference = Trainer(TrainConfig(out_dir=tmp_path / "first", stop_after_epochs=2, **config))
    recipe = make_snapshot(seed=1, cycles=2)
    reference.fit(recipe, small_split().train, small_split().test)
    end_of_cycle_1 = copy.deepcopy(recipe.student.state_dict())
    resumed = make_snapshot(seed=5, cycles=2)
    result = Trainer(TrainConfig(out_dir=tmp_path / "first", resume=True, **config)).fit(
        resumed, small_split().train, small_split().test)
    teacher = resumed.stages[1].distiller.models["teacher"]
    assert all(torch.equal(teacher.state_dict()[key], value) for key, value in end_of_cycle_1.items())
    assert not torch.equal(resumed.student.fc.weight, end_of_cycle_1["fc.weight"]), "the student trained on"
    rates = [row["lr"] for row in result.history]
    assert rates[0] == rates[2] == 0.05 and rates[1] < 0.05 and rates[3] < 0.05, rates


def test_snapshot_resume_is_bit_exact_across_the_cycle_boundary(tmp_path):
    assert_resume_is_exact(lambda seed: make_snapshot(seed=seed, cycles=2),
                           dict(epochs=4, batch_size=32, lr=0.05, **QUIET), tmp_path, pieces=(1, 1, 1, 1))


def test_snapshot_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="snapshot-distillation: cycles must be an int >= 2"):
        make_snapshot(cycles=1)
    with pytest.raises(TypeError, match="snapshot-distillation: cycles"):
        make_snapshot(cycles=2.0)
    with pytest.raises(ValueError, match="snapshot-distillation: temperature"):
        make_snapshot(temperature=0.0)
    with pytest.raises(ValueError, match="snapshot-distillation: kd_weight"):
        make_snapshot(kd_weight=-1.0)
