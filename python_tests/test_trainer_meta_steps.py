"""Meta-steps in training (kdkernels.distill.meta_steps): the hyperparameter update is the held-out loss's gradient
through a one-step look-ahead (checked against central finite differences in float64), the held-out split is
stratified and never reaches a training batch, a resumed run repeats the uninterrupted one (the meta optimiser's
state included), 2 gloo processes equal one process with the whole batch, AMP runs, and bad configurations name the
problem."""
import importlib
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import Subset

import kdkernels
from kdkernels import distill
from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.data import TensorDictDataset
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.environment import Environment
from kdkernels.distill.meta_steps import MetaStep, MetaStepRun, held_out_indices
from kdkernels.distill.methods.meta import LearnedTemperatureKDTerm
from kdkernels.distill.models import digits_model
from kdkernels.distill.optimisers import Optimiser
from kdkernels.distill.recipe import Recipe, Stage
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm
from kdkernels.distill.trainer import TrainConfig, Trainer
from test_trainer_distributed import free_port
from trainer_testing import QUIET, assert_resume_is_exact, small_split, without_timings

HYPER = ("kd.log_temperature_student", "kd.log_temperature_teacher")


def meta_distiller(seed: int = 0) -> Distiller:
    torch.manual_seed(seed)
    return Distiller({"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp")},
                     [CrossEntropyTerm("student", 0.1), LearnedTemperatureKDTerm("kd", weight=0.9, temperature=2.0)])


def meta_recipe(seed: int = 0, **options) -> Recipe:
    meta_step = MetaStep(hyperparameters=HYPER, **{"held_out": 0.25, "lr": 0.05, **options})
    return Recipe("meta", [Stage("meta", meta_distiller(seed), meta_step=meta_step)])


def temperatures(recipe: Recipe) -> torch.Tensor:
    term = recipe.stages[0].distiller.terms[1]
    return torch.stack([term.log_temperature_student, term.log_temperature_teacher]).detach().clone()


# ------------------------------------------------------------------------------------------- the update by hand

def test_the_update_is_the_held_out_gradient_through_the_look_ahead():
    """One meta-step with plain SGD (lr 1) in float64: Δφ = −∂CE(f(x_h; θ − η∇_θL(θ, φ; x)), y_h)/∂φ, the derivative
    by central finite differences of the look-ahead computed by hand."""
    distiller = meta_distiller().double()
    split = small_split()
    batch = {"input": split.train.inputs[:12].double(), "target": split.train.targets[:12],
             "index": torch.arange(12)}
    distiller.build(batch).activate().train()
    held_out_set = Subset(TensorDictDataset(split.train.inputs.double(), split.train.targets), list(range(40, 64)))
    spec = MetaStep(hyperparameters=HYPER, optimiser="sgd", lr=1.0)
    meta_run = MetaStepRun("meta", spec, distiller, held_out_set)
    eta = 0.3
    run = types.SimpleNamespace(distiller=distiller, offset=0, step=0, epochs=1,
                                optimizer=torch.optim.SGD(meta_run.without_hyperparameters(
                                    distiller.trainable_parameters()), lr=eta))
    env, config = Environment(torch.device("cpu"), 0, 1), types.SimpleNamespace(seed=0, batch_size=8)
    held = meta_run.held_out_batch(0, 1, 0, 8, env)
    assert set(held["index"].tolist()) <= set(range(40, 64)) and len(held["index"]) == 8
    student, teacher = distiller.models["student"], distiller.models["teacher"]
    term = distiller.terms[1]
    phi0 = temperatures(Recipe("m", [Stage("m", distiller)])).double()

    def outer_of(phi: torch.Tensor) -> float:
        params = {name: p.detach().clone().requires_grad_(True) for name, p in student.named_parameters()}
        logits = torch.func.functional_call(student, params, (batch["input"],))
        with torch.no_grad():
            teacher_logits = teacher(batch["input"])
        t_s, t_t = phi.exp()
        inner = 0.1 * F.cross_entropy(logits, batch["target"]) + 0.9 * t_s * t_t * F.kl_div(
            F.log_softmax(logits / t_s, -1), F.log_softmax(teacher_logits / t_t, -1), log_target=True,
            reduction="batchmean")
        grads = torch.autograd.grad(inner, list(params.values()))
        fast = {name: p - eta * g for (name, p), g in zip(params.items(), grads)}
        student.eval()
        out = torch.func.functional_call(student, fast, (held["input"],))
        student.train()
        return float(F.cross_entropy(out, held["target"]).detach())

    eps = 1e-6
    expected = torch.tensor([(outer_of(phi0 + eps * e) - outer_of(phi0 - eps * e)) / (2 * eps)
                             for e in torch.eye(2, dtype=torch.float64)], dtype=torch.float64)
    meta_run.step(run, [batch], epoch=1, config=config, env=env)
    after = torch.stack([term.log_temperature_student, term.log_temperature_teacher]).detach()
    torch.testing.assert_close(phi0 - after, expected, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in meta_run.parameters.values())
    assert expected.abs().min() > 0


# ----------------------------------------------------------------------------------------------- held-out split

def test_the_held_out_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, held = held_out_indices(100, labels, 0.1, seed=3)
    assert np.bincount(labels[held]).tolist() == [1, 2, 3, 4]
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    again_train, again_held = held_out_indices(100, labels, 0.1, seed=3)
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    assert not np.array_equal(held, held_out_indices(100, labels, 0.1, seed=4)[1])
    assert len(held_out_indices(100, labels, 7, seed=3)[1]) == 7   # a count
    assert len(held_out_indices(100, None, 0.25, seed=3)[1]) == 25   # no labels: uniform


def test_held_out_samples_never_appear_in_training_batches():
    recipe = meta_recipe()
    seen = []
    term = recipe.stages[0].distiller.terms[0]
    original = term.loss

    def recording(logits, target, *, context):
        seen.append(context.batch["index"].clone())
        return original(logits, target, context=context)

    term.loss = recording
    split = small_split()
    Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.1, **QUIET)).fit(recipe, split.train, split.test)
    _, held = held_out_indices(len(split.train), split.train.labels, 0.25, seed=0)
    indices = set(torch.cat(seen).tolist())
    assert len(held) == 16 and not indices & set(held.tolist())
    assert indices == set(range(64)) - set(held.tolist())   # everything else trains


# --------------------------------------------------------------------------------------- resume, DDP and AMP

def test_resume_is_exact_with_the_meta_optimisers_state(tmp_path):
    config = dict(epochs=3, batch_size=16, lr=0.1, **QUIET)
    _, _, reference_recipe, resumed_recipe = assert_resume_is_exact(meta_recipe, config, tmp_path)
    assert torch.equal(temperatures(resumed_recipe), temperatures(reference_recipe))
    state = load_checkpoint(tmp_path / "pieces" / "last.pt")["run"]["meta_step"]["optimizer"]
    assert len(state["state"]) == 2 and int(state["state"][0]["step"]) == 9   # Adam's moments, 3 steps per epoch
    assert not torch.equal(temperatures(reference_recipe), temperatures(meta_recipe(seed=1)))


def test_the_temperature_is_logged_and_amp_runs():
    split = small_split()
    recipe = meta_recipe()
    result = Trainer(TrainConfig(epochs=1, batch_size=16, lr=0.1, amp="bf16", **QUIET)).fit(
        recipe, split.train, split.test)
    row = result.history[-1]
    t_s, t_t = temperatures(recipe).exp().tolist()
    assert row["temperature_student"] == pytest.approx(t_s) and row["temperature_teacher"] == pytest.approx(t_t)
    assert t_s != pytest.approx(2.0) and np.isfinite([t_s, t_t]).all()


def ddp_meta_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        recipe = meta_recipe()
        result = Trainer(TrainConfig(epochs=2, batch_size=8, lr=0.1, **QUIET)).fit(recipe, small_split().train)
        torch.save({"student": result.student.state_dict(), "temperatures": temperatures(recipe),
                    "history": without_timings(result.history)}, os.path.join(out_dir, f"meta{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Each rank trains on 8 of a step's 16 samples and computes the outer loss on 8 of its 16 held-out samples; the
    look-ahead runs on the gathered 16 and the meta-gradients are averaged: the same update as one process."""
    importlib.import_module("torch._dynamo")
    mp.start_processes(ddp_meta_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single_recipe = meta_recipe()
    single = Trainer(TrainConfig(epochs=2, batch_size=16, lr=0.1, **QUIET)).fit(single_recipe, small_split().train)
    for rank in range(2):
        ranked = torch.load(tmp_path / f"meta{rank}.pt")
        torch.testing.assert_close(ranked["temperatures"], temperatures(single_recipe), rtol=1e-5, atol=1e-6)
        for name, value in single.student.state_dict().items():
            torch.testing.assert_close(ranked["student"][name], value, rtol=1e-5, atol=1e-6)
        assert ranked["history"][-1]["temperature_teacher"] == pytest.approx(
            single.history[-1]["temperature_teacher"], rel=1e-5)


# ------------------------------------------------------------------------------------------------------- errors

def fused_distiller() -> Distiller:
    return Distiller({"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp")},
                     [CrossEntropyTerm("student"), LearnedTemperatureKDTerm("kd"),
                      FunctionTerm("fused", kdkernels.kd_loss, ("student", "teacher"), temperature=4.0)])


@pytest.mark.parametrize("make, error, message", [
    (lambda: MetaStep(hyperparameters=HYPER, held_out=1.5), ValueError, "held_out as a share must be in \\(0, 1\\)"),
    (lambda: MetaStep(hyperparameters=HYPER, held_out=0), ValueError, "must be at least 1"),
    (lambda: MetaStep(hyperparameters=()), TypeError, "non-empty tuple"),
    (lambda: MetaStep(hyperparameters=HYPER, lr=0.0), ValueError, "lr must be positive"),
    (lambda: MetaStep(hyperparameters=HYPER, optimiser="rmsprop"), ValueError, "optimiser must be one of"),
    (lambda: Stage("s", meta_distiller(), meta_step=MetaStep(hyperparameters=("kd.nope",))), ValueError,
     "is not a parameter of term 'kd'"),
    (lambda: Stage("s", meta_distiller(), meta_step=MetaStep(hyperparameters=("ce_student.weight",))), ValueError,
     "is not a parameter of term 'ce_student'"),
    (lambda: Stage("s", meta_distiller(), meta_step=MetaStep(hyperparameters=("other.x",))), ValueError,
     "names unknown term 'other'"),
    (lambda: Stage("s", meta_distiller(), meta_step=MetaStep(hyperparameters=HYPER, model="teacher")), ValueError,
     "does not train here"),
    (lambda: Stage("s", meta_distiller(), meta_step=MetaStep(hyperparameters=HYPER, terms=("nope",))), ValueError,
     "unknown term 'nope'"),
    (lambda: Stage("s", meta_distiller(), meta_step=MetaStep(hyperparameters=HYPER),
                   optimisers={"all": Optimiser(models=("student",), terms_params=("kd",),
                                                terms=("ce_student", "kd"))}),
     ValueError, "does not combine with optimisers"),
    (lambda: Stage("s", meta_distiller(), meta_step="yes"), TypeError, "must be a MetaStep"),
])
def test_bad_configurations_name_the_problem(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("options, message", [
    (dict(first_order=True), "does not depend on hyper"),               # only the inner loss reads the temperature
    (dict(held_out=64), "both must be at least 1"),                     # nothing left to train on
])
def test_bad_runs_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        Trainer(TrainConfig(epochs=1, batch_size=16, **QUIET)).fit(meta_recipe(**options), small_split().train)


def test_a_fused_inner_loss_is_refused():
    """kdkernels' fused losses are differentiable once: the look-ahead's second derivatives would be zero."""
    stage = Stage("s", fused_distiller(), meta_step=MetaStep(hyperparameters=HYPER))
    with pytest.raises(ValueError, match="not twice differentiable"):
        Trainer(TrainConfig(epochs=1, batch_size=16, **QUIET)).fit(Recipe("f", [stage]), small_split().train)


def test_readme_example_runs():
    """The README's trainer meta-step, run as written for one epoch: the temperatures are learned and logged."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Meta-steps in training.**"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "epochs=30" in example
    torch.manual_seed(0)
    namespace = {"distill": distill, "student": digits_model("student-cnn"), "teacher": digits_model("student-mlp"),
                 "split": small_split()}
    exec(example.replace("epochs=30", "epochs=1, batch_size=16, progress=False"), namespace)
    row = namespace["result"].history[-1]
    assert row["temperature_teacher"] != pytest.approx(4.0) and "temperature_student" in row
