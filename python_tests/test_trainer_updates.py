"""Model updates after the optimiser step (kdkernels.distill.updates): EMA copies follow the formula by hand (every
buffer policy, mean teacher's warm-up, BYOL/DINO's cosine momentum), snapshots refresh on their schedule, copies get
no gradient and no optimiser, skip the steps the fp16 scaler skipped, resume bit for bit, agree on every DDP rank, and
bad configurations name the problem."""
import importlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels import distill
from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.models import digits_model
from kdkernels.distill.precision import scaler_step
from kdkernels.distill.recipe import Recipe, Stage
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term
from kdkernels.distill.trainer import TrainConfig, Trainer
from kdkernels.distill.updates import EMA, Snapshot, StepClock, cosine_momentum
from test_trainer_distributed import free_port
from trainer_testing import QUIET, assert_same_run, parameters_of, run_in_pieces, small_split

ROOT = Path(__file__).resolve().parents[1]


def bn_model() -> nn.Module:
    """A small model with batch norm (float running statistics and an integer batch counter)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def manual_steps(update, steps: int = 4, total_steps: int = 8, seed: int = 0):
    """``steps`` SGD steps of a BN student with an ``"ema"`` copy read by a consistency term, the updates called as
    the trainer calls them; returns the distiller and the source's (parameters, buffers) at stage start and after
    each step."""
    torch.manual_seed(seed)
    distiller = distill.Distiller({"student": bn_model()},
                                  [CrossEntropyTerm("student"), FunctionTerm("consistency", F.mse_loss,
                                                                             ("student", "ema"))],
                                  updates={"ema": update})
    split = small_split()
    batch = {"input": split.train.inputs[:16], "target": split.train.targets[:16]}
    student = distiller.models["student"]
    with torch.no_grad():   # a stage that starts from a trained state: the copy must take it at activate()
        student[1].weight.mul_(2.0)
    distiller.build(batch).activate().train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.5)
    states = [(parameters_of_kind(student, "parameters"), parameters_of_kind(student, "buffers"))]
    for step in range(steps):
        rows = slice(16 * step, 16 * (step + 1))
        batch = {"input": split.train.inputs[rows], "target": split.train.targets[rows]}
        optimizer.zero_grad()
        distiller(batch).loss.backward()
        optimizer.step()
        distiller.updates.after_step(distiller.models, StepClock(step, steps_per_epoch=4, total_steps=total_steps))
        states.append((parameters_of_kind(student, "parameters"), parameters_of_kind(student, "buffers")))
    return distiller, states


def parameters_of_kind(model: nn.Module, kind: str) -> dict:
    named = model.named_parameters() if kind == "parameters" else model.named_buffers()
    return {name: tensor.detach().clone().double() for name, tensor in named}


@pytest.mark.parametrize("warmup", [False, True], ids=["constant", "mean-teacher-warmup"])
@pytest.mark.parametrize("buffers", ["copy", "average", "own"])
def test_ema_follows_the_formula_by_hand(buffers, warmup):
    """m = 0.6: the warm-up's min(1 − 1/(n + 1), 0.6) is 0.5 on the first update, then 0.6."""
    distiller, states = manual_steps(EMA("student", 0.6, warmup=warmup, buffers=buffers))
    parameters, start_buffers = states[0]
    expected_parameters, expected_buffers = dict(parameters), dict(start_buffers)
    for n, (source_parameters, source_buffers) in enumerate(states[1:], start=1):
        m = min(1 - 1 / (n + 1), 0.6) if warmup else 0.6
        expected_parameters = {k: m * v + (1 - m) * source_parameters[k] for k, v in expected_parameters.items()}
        if buffers == "copy":
            expected_buffers = dict(source_buffers)
        elif buffers == "average":
            expected_buffers = {k: source_buffers[k] if k.endswith("num_batches_tracked")
                                else m * v + (1 - m) * source_buffers[k] for k, v in expected_buffers.items()}
    ema = distiller.models["ema"]
    for name, value in ema.named_parameters():
        torch.testing.assert_close(value.double(), expected_parameters[name], rtol=1e-6, atol=1e-7)
    for name, value in ema.named_buffers():
        torch.testing.assert_close(value.double(), expected_buffers[name], rtol=1e-6, atol=1e-7)
    assert int(ema[2].num_batches_tracked) == (0 if buffers == "own" else 4)   # the copy runs in eval mode
    assert distiller.updates["ema"].count == 4


def test_warmup_with_momentum_one_is_the_true_mean_of_the_source_states():
    """Mean teacher's warm-up: with m = 1 the copy is the mean of the source's states since the stage began."""
    distiller, states = manual_steps(EMA("student", 1.0, warmup=True), steps=3)
    for name, value in distiller.models["ema"].named_parameters():
        mean = sum(state[0][name] for state in states) / len(states)
        torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)


def test_cosine_momentum_goes_from_the_base_to_one():
    K, base = 1000, 0.99
    assert cosine_momentum(base, 0, K) == pytest.approx(base, abs=1e-15)
    assert cosine_momentum(base, K // 2, K) == pytest.approx((1 + base) / 2, abs=1e-15)
    assert cosine_momentum(base, K, K) == 1.0 and cosine_momentum(base, K + 7, K) == 1.0   # clamped, as BYOL
    # DINO's utils.cosine_scheduler(base, 1, epochs, niter_per_ep) at its iterations 0..N-1 (N = epochs·niter)
    iterations = np.arange(K)
    dino = 1 + 0.5 * (base - 1) * (1 + np.cos(np.pi * iterations / len(iterations)))
    ours = np.array([cosine_momentum(base, int(k), K) for k in iterations])
    np.testing.assert_allclose(ours, dino, rtol=0, atol=1e-15)
    ema = EMA("student", base, schedule="cosine", warmup=True)
    assert ema.momentum_at(0, K, update=1) == 0.5                             # the warm-up caps the start
    assert ema.momentum_at(K // 2, K, update=K // 2 + 1) == pytest.approx((1 + base) / 2)
    assert EMA("student", base).momentum_at(K // 2, K, update=1) == base      # constant: no schedule


def test_cosine_schedule_runs_over_the_stage_steps():
    """The trainer's clock: step k of K = epochs · steps_per_epoch; one step with m = 1 leaves the copy alone."""
    distiller, states = manual_steps(EMA("student", 0.0, schedule="cosine"), steps=2, total_steps=2)
    # step 0: m = 0 (the copy becomes the source); step 1: m = 1 − (cos(π/2) + 1)/2 = 0.5
    for name, value in distiller.models["ema"].named_parameters():
        expected = 0.5 * states[1][0][name] + 0.5 * states[2][0][name]
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("every, unit, refreshed", [(2, "epochs", [5, 11]), (4, "steps", [3, 7, 11]),
                                                    (1, "epochs", [2, 5, 8, 11])])
def test_snapshot_refresh_points(every, unit, refreshed):
    """3 steps per epoch, 12 steps: the copy equals the source right after each refresh and keeps it until the
    next one."""
    torch.manual_seed(0)
    distiller = distill.Distiller({"student": bn_model()}, [CrossEntropyTerm("student")],
                                  updates={"snap": Snapshot("student", every=every, unit=unit)})
    student, snap = distiller.models["student"], distiller.models["snap"]
    distiller.activate()
    held = parameters_of(student)
    for step in range(12):
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(1.0)
            student[2].running_mean.add_(1.0)
        distiller.updates.after_step(distiller.models, StepClock(step, steps_per_epoch=3, total_steps=12))
        if step in refreshed:
            held = parameters_of(student)
        assert all(torch.equal(value, held[name]) for name, value in snap.state_dict().items()), step
        assert snap.state_dict().keys() == held.keys()
    assert distiller.updates["snap"].count == len(refreshed)
    assert [step for step in range(12) if distiller.updates["snap"].due(step, 3)] == refreshed


def mean_teacher_recipe(seed: int = 0, *, warmup: bool = True, schedule: str = "cosine",
                        dropout: float = 0.2) -> Recipe:
    """CE + consistency MSE to an EMA copy + KD from a snapshot every 3 steps; input dropout draws from the RNG."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Dropout(dropout), digits_model("student-mlp"))
    terms = [CrossEntropyTerm("student"), FunctionTerm("consistency", F.mse_loss, ("student", "ema"), weight=2.0),
             FunctionTerm("snapshot_kd", kdkernels.kd_loss, ("student", "snap"), weight=0.5, temperature=4.0)]
    distiller = distill.Distiller({"student": student}, terms, evaluate=("student", "ema"),
                                  updates={"ema": EMA("student", 0.99, warmup=warmup, schedule=schedule),
                                           "snap": Snapshot("student", every=3, unit="steps")})
    return Recipe("mean-teacher-test", [Stage("mt", distiller)])


def test_the_copies_get_no_gradient_and_no_optimiser(tmp_path):
    recipe = mean_teacher_recipe()
    distiller = recipe.stages[0].distiller
    before = parameters_of(distiller.models["ema"])
    result = Trainer(TrainConfig(epochs=1, batch_size=16, out_dir=tmp_path, **QUIET)).fit(
        recipe, small_split().train, small_split().test)
    student = distiller.models["student"]
    for name in ("ema", "snap"):
        copy = distiller.models[name]
        assert all(p.grad is None and not p.requires_grad for p in copy.parameters()), name
        assert not copy.training, name      # eval mode unless listed in frozen_train_mode
        assert not {id(p) for p in copy.parameters()} & {id(p) for p in distiller.trainable_parameters()}
    optimised = load_checkpoint(tmp_path / "last.pt")["run"]["optimizer"]["param_groups"]
    assert sum(len(group["params"]) for group in optimised) == len(list(student.parameters()))
    ema = parameters_of(distiller.models["ema"])
    assert any(not torch.equal(ema[k], v) for k, v in before.items())                     # it moved
    assert any(not torch.equal(ema[k], v) for k, v in parameters_of(student).items())     # but is not the student
    assert "test_acc_ema" in result.history[-1]
    assert distiller.updates["ema"].count == 4 and distiller.updates["snap"].count == 1   # 64 / 16 = 4 steps


def test_resume_mid_stage_with_an_ema_and_a_snapshot_is_bit_exact(tmp_path):
    """The warm-up makes the EMA depend on its update counter and the cosine schedule on the stage's step: a resume
    that lost either would differ."""
    config = dict(epochs=3, batch_size=16, lr=0.05, warmup_epochs=1, mixup_alpha=0.4, **QUIET)
    reference_recipe = mean_teacher_recipe(seed=1)
    reference = Trainer(TrainConfig(out_dir=tmp_path / "whole", **config)).fit(
        reference_recipe, small_split().train, small_split().test)
    resumed, resumed_recipe = run_in_pieces(mean_teacher_recipe, config, [1, 5], tmp_path / "pieces")
    assert_same_run(resumed, resumed_recipe, reference, reference_recipe)
    updates = resumed_recipe.stages[0].distiller.updates
    assert updates["ema"].count == 12 and updates["snap"].count == 4
    saved = load_checkpoint(tmp_path / "pieces" / "last.pt")["run"]["distiller"]
    assert saved["updates.ema._extra_state"] == {"count": 12}


class OverflowOnce(Term):
    """CE whose first call overflows the fp16 grad scaler (an infinite gradient): that step is skipped."""

    def __init__(self):
        super().__init__("overflow_once", ("student", "target"))
        self.calls = 0

    def loss(self, logits, target, *, context):
        self.calls += 1
        return F.cross_entropy(logits, target) * (1e38 if self.calls == 1 else 1.0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_an_ema_skips_the_steps_the_fp16_scaler_skipped(tmp_path):
    torch.manual_seed(0)
    distiller = distill.Distiller({"student": digits_model("student-mlp")}, [OverflowOnce()],
                                  updates={"ema": EMA("student", 0.5, warmup=True), "snap": Snapshot(unit="steps")})
    recipe = Recipe("skip", [Stage("skip", distiller)])
    Trainer(TrainConfig(epochs=1, batch_size=16, amp="fp16", out_dir=tmp_path, **QUIET)).fit(
        recipe, small_split().train)
    scaler = load_checkpoint(tmp_path / "last.pt")["run"]["scaler"]
    assert scaler["scale"] == 2.0 ** 15 and scaler["_growth_tracker"] == 3   # backed off once, then 3 good steps
    assert distiller.updates["ema"].count == 3      # 4 steps, the first skipped
    assert distiller.updates["snap"].count == 4     # snapshots keep their schedule


def test_scaler_step_reports_a_skipped_step():
    parameter = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for factor, applied in ((float("inf"), False), (1.0, True)):
        optimizer.zero_grad()
        scaler.scale(parameter.sum() * factor).backward()
        assert scaler_step(scaler, optimizer, report_skip=True) == applied
    assert torch.equal(parameter.detach(), torch.full((3,), 0.9))
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    optimizer.zero_grad()
    disabled.scale(parameter.sum()).backward()
    assert scaler_step(disabled, optimizer, report_skip=True)


def test_the_copy_drops_other_distillers_taps_and_gets_its_own():
    torch.manual_seed(0)
    student = digits_model("student-mlp")
    hint = FunctionTerm("hint", F.mse_loss, ("student:hidden1", "student:hidden1"))
    first = distill.Distiller({"student": student}, [hint])   # taps the student's hidden1
    second = distill.Distiller({"student": student},
                               [FunctionTerm("feature", F.mse_loss, ("student:hidden1", "ema:hidden1"))],
                               updates={"ema": EMA()})
    batch = {"input": torch.randn(4, 1, 8, 8), "target": torch.zeros(4, dtype=torch.long)}
    second.build(batch).activate()
    values = second.run_models(batch)
    assert torch.equal(values["ema:hidden1"], values["student:hidden1"])   # the copy is the student at start
    assert first._taps["student"].pop() == {"hidden1": values["student:hidden1"]}   # only the student's own forward
    second.models["ema"](batch["input"])
    assert first._taps["student"].pop() == {}


@pytest.mark.parametrize("make, error, message", [
    (lambda: dict(updates={"ema": EMA("teacher")}), ValueError, "EMA of the frozen model 'teacher'"),
    (lambda: dict(updates={"snap": Snapshot("teacher")}), ValueError, "Snapshot of the frozen model 'teacher'"),
    (lambda: dict(updates={"ema": EMA("pupil")}), ValueError, "unknown source 'pupil'"),
    (lambda: dict(updates={"teacher": EMA("student")}), ValueError, "'teacher' is already a model"),
    (lambda: dict(updates={"ema": EMA()}, trainable=("student", "ema")), ValueError, "cannot also be trainable"),
    (lambda: dict(updates={"ema:x": EMA()}), ValueError, "not allowed"),
    (lambda: dict(updates={"ema": nn.Linear(2, 2)}), TypeError, r"updates\['ema'\] must be an EMA or Snapshot"),
    (lambda: dict(updates=[EMA()]), TypeError, "updates must be a mapping"),
    (lambda: EMA(momentum=1.5), ValueError, r"EMA: momentum must be in \[0, 1\], got 1.5"),
    (lambda: EMA(momentum=-0.1), ValueError, r"EMA: momentum must be in \[0, 1\]"),
    (lambda: EMA(momentum="high"), TypeError, "EMA: momentum must be a real number"),
    (lambda: EMA(schedule="linear"), ValueError, "EMA: schedule must be one of 'constant', 'cosine'"),
    (lambda: EMA(buffers="mean"), ValueError, "EMA: buffers must be one of"),
    (lambda: EMA(warmup=1), TypeError, "EMA: warmup must be a bool"),
    (lambda: EMA(source=None), TypeError, "EMA: source must be a model name"),
    (lambda: Snapshot(every=0), ValueError, "Snapshot: every must be an int >= 1"),
    (lambda: Snapshot(unit="hours"), ValueError, "Snapshot: unit must be one of 'epochs', 'steps'"),
])
def test_bad_updates_name_the_problem(make, error, message):
    with pytest.raises(error, match=message):
        options = make()
        distill.Distiller({"student": nn.Linear(64, 10), "teacher": nn.Linear(64, 10)},
                          [FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"))], **options)


def test_trainable_may_be_any_iterable_and_the_copy_is_a_model():
    distiller = distill.Distiller({"student": nn.Linear(64, 10)}, [CrossEntropyTerm("student")],
                                  trainable=(name for name in ["student"]), updates={"ema": EMA()})
    assert distiller.trainable == ("student",) and list(distiller.models) == ["student", "ema"]
    with pytest.raises(TypeError, match="model 'student' must be an nn.Module"):
        distill.Distiller({"student": "not a model"}, [CrossEntropyTerm("student")], updates={"ema": EMA()})


def ddp_updates_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        recipe = mean_teacher_recipe(seed=3, dropout=0.0)
        Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.1, **QUIET)).fit(recipe, small_split().train)
        models = recipe.stages[0].distiller.models
        torch.save({"world_size": dist.get_world_size(),
                    **{name: models[name].state_dict() for name in ("student", "ema", "snap")}},
                   os.path.join(out_dir, f"updates{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_ranks_hold_the_same_copies_as_one_process(tmp_path):
    """2 gloo ranks of 16 samples per step = 1 process with 32: the EMA and the snapshot are identical on the two
    ranks and equal the single process's (4 steps: the snapshot refreshes once; dropout, which draws per rank, is
    off)."""
    importlib.import_module("torch._dynamo")
    mp.start_processes(ddp_updates_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"updates{rank}.pt") for rank in range(2)]
    single = mean_teacher_recipe(seed=3, dropout=0.0)
    Trainer(TrainConfig(epochs=2, batch_size=32, lr=0.1, **QUIET)).fit(single, small_split().train)
    models = single.stages[0].distiller.models
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    for name in ("student", "ema", "snap"):
        for key, value in ranks[0][name].items():
            assert torch.equal(ranks[1][name][key], value), f"{name}.{key}"
            torch.testing.assert_close(value, models[name].state_dict()[key], rtol=1e-5, atol=1e-6)


def test_readme_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Moving-average and snapshot models.**"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "epochs=30" in example
    namespace = {"distill": distill, "student": digits_model("student-cnn"), "split": small_split()}
    exec(example.replace("epochs=30", "epochs=1, batch_size=32, progress=False"), namespace)
    assert "test_acc_teacher" in namespace["result"].history[-1]
