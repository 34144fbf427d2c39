"""Several optimisers in one stage (kdkernels.distill.optimisers): step plans step the right optimisers and leave the
others' parameters alone, simultaneous steps equal a hand computation, per-optimiser LR schedules, exact resume,
AMP scalers per optimiser, the gradient-reversal layer, and configuration errors naming the problem."""
import copy
import importlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

import kdkernels
from kdkernels.distill import GradientReversal, Optimiser, grad_reverse
from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Stage
from kdkernels.distill.schedules import lr_lambda
from kdkernels.distill.terms import CrossEntropyTerm, Term
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, assert_resume_is_exact, parameters_of, small_split


class KDTerm(Term):
    def __init__(self):
        super().__init__("kd", ("student", "teacher"))

    def loss(self, student, teacher, *, context):
        return kdkernels.kd_loss(student, teacher, 4.0)


class DiscriminatorTerm(Term):
    """The discriminator's loss: teacher logits are real (1), the student's (detached) fake (0)."""

    def __init__(self, discriminator):
        super().__init__("adv_d", ("student", "teacher"))
        self.discriminator = discriminator

    def loss(self, student, teacher, *, context):
        real, fake = self.discriminator(teacher), self.discriminator(student.detach())
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


class FoolTerm(Term):
    """The student's adversarial loss: its logits should look real to the (shared) discriminator."""

    def __init__(self, discriminator):
        super().__init__("adv_g", ("student",), weight=0.5)
        self.discriminator = discriminator

    def loss(self, student, *, context):
        fake = self.discriminator(student)
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


OPTIMISERS = {"student": Optimiser(models=("student",), terms=("ce_student", "kd", "adv_g")),
              "discriminator": Optimiser(terms_params=("adv_d",), terms=("adv_d",), lr_scale=0.5)}


def adversarial_distiller(seed: int = 0) -> Distiller:
    torch.manual_seed(seed)
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp")}
    discriminator = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    terms = [CrossEntropyTerm("student"), KDTerm(), FoolTerm(discriminator), DiscriminatorTerm(discriminator)]
    return Distiller(models, terms)


def adversarial_recipe(seed: int = 0, step_plan="alternate", optimisers=OPTIMISERS) -> Recipe:
    distiller = adversarial_distiller(seed)
    return Recipe("adversarial", [Stage("adv", distiller, optimisers=optimisers, step_plan=step_plan)])


def discriminator_of(recipe):
    return recipe.stages[0].distiller.terms[3].discriminator


class StepLog:
    """Every optimiser step of a run: which optimiser (by its first parameter), its LR, and afterwards the
    student's and discriminator's parameters."""

    def __init__(self, recipe):
        self.student, self.discriminator = recipe.student, discriminator_of(recipe)
        self.records = []

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self.hook)
        return self

    def __exit__(self, *_):
        self.handle.remove()

    def hook(self, optimizer, _args, _kwargs):
        first = optimizer.param_groups[0]["params"][0]
        who = "student" if any(first is p for p in self.student.parameters()) else "discriminator"
        self.records.append({"who": who, "lr": optimizer.param_groups[0]["lr"],
                             "student": parameters_of(self.student),
                             "discriminator": parameters_of(self.discriminator)})


def same(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("plan, expected", [
    ("alternate", ["student", "discriminator"] * 3),
    ({"discriminator": 1, "student": 2}, ["discriminator", "student", "student"] * 2),
], ids=["alternate", "1:2"])
def test_step_plans_step_the_right_optimiser_and_leave_the_other_alone(plan, expected):
    """96 samples in batches of 16: 6 turns; in each, only that turn's optimiser's parameters move."""
    recipe = adversarial_recipe(step_plan=plan)
    initial = {"student": parameters_of(recipe.student), "discriminator": parameters_of(discriminator_of(recipe))}
    with StepLog(recipe) as log:
        Trainer(TrainConfig(epochs=1, batch_size=16, lr=0.1, **QUIET)).fit(recipe, small_split(96).train)
    assert [r["who"] for r in log.records] == expected
    previous = initial
    for record in log.records:
        other = "discriminator" if record["who"] == "student" else "student"
        assert same(record[other], previous[other]), f"{other} changed in a {record['who']} turn"
        assert not same(record[record["who"]], previous[record["who"]])
        previous = record


def hand_step(distiller, batch, lr):
    """One plain SGD step by hand: the student on ce + kd + adv_g, the discriminator (lr · 0.5) on adv_d."""
    distiller = copy.deepcopy(distiller)
    values = distiller.run_models(batch)
    student, teacher = values["student"], values["teacher"]
    terms = {term.name: term for term in distiller.terms}
    discriminator = terms["adv_d"].discriminator
    student_loss = (F.cross_entropy(student, batch["target"]) + kdkernels.kd_loss(student, teacher, 4.0)
                    + terms["adv_g"]({"student": student}, None))
    disc_loss = terms["adv_d"]({"student": student, "teacher": teacher}, None)
    student_params = list(distiller.models["student"].parameters())
    disc_params = list(discriminator.parameters())
    student_grads = torch.autograd.grad(student_loss, student_params, retain_graph=True)
    disc_grads = torch.autograd.grad(disc_loss, disc_params)
    with torch.no_grad():
        for parameter, grad in zip(student_params, student_grads):
            parameter -= lr * grad
        for parameter, grad in zip(disc_params, disc_grads):
            parameter -= 0.5 * lr * grad
    return distiller


def test_simultaneous_steps_equal_a_hand_computation():
    """One step over the whole batch: each optimiser's gradient is that of its own terms only (a single backward of
    the sum would also push adv_g's gradient into the discriminator)."""
    split = small_split()
    config = dict(epochs=1, batch_size=64, lr=0.5, momentum=0.0, weight_decay=0.0, schedule="constant", **QUIET)
    recipe = adversarial_recipe(step_plan="simultaneous")
    distiller = recipe.stages[0].distiller
    initial = copy.deepcopy(distiller)
    Trainer(TrainConfig(**config)).fit(recipe, split.train)
    loader = torch.utils.data.DataLoader(split.train, batch_size=64)
    batch = next(iter(loader))
    batch = batch if isinstance(batch, dict) else {"input": batch[0], "target": batch[1]}
    expected = hand_step(initial.build(batch), batch, 0.5)
    for name, value in parameters_of(expected).items():
        torch.testing.assert_close(parameters_of(distiller)[name], value, rtol=1e-5, atol=1e-6)
    # The discriminator moved by its own loss only: a single backward of the sum would differ.
    single = adversarial_distiller()
    Trainer(TrainConfig(**config)).fit(Recipe("one", [Stage("one", single)]), split.train)
    assert not torch.allclose(parameters_of(single.terms[3].discriminator)["0.weight"],
                              parameters_of(distiller.terms[3].discriminator)["0.weight"], rtol=1e-5, atol=1e-6)


def test_one_optimiser_over_everything_equals_the_default():
    """A stage whose one Optimiser owns every parameter and minimises every term trains like the default stage, bit
    for bit (autograd.grad of the same summed loss, the same SGD over the same parameters)."""
    config = dict(epochs=2, batch_size=16, lr=0.1, **QUIET)
    default = Recipe("d", [Stage("d", adversarial_distiller())])
    Trainer(TrainConfig(**config)).fit(default, small_split().train)
    everything = Optimiser(models=("student",), terms_params=("adv_d", "adv_g"),
                           terms=("ce_student", "kd", "adv_g", "adv_d"))
    single = adversarial_recipe(optimisers={"all": everything})   # adv_g and adv_d share the discriminator
    Trainer(TrainConfig(**config)).fit(single, small_split().train)
    for name, value in parameters_of(default.stages[0].distiller).items():
        assert torch.equal(parameters_of(single.stages[0].distiller)[name], value), name


def test_each_optimiser_follows_the_schedule_at_its_own_lr_scale():
    """Cosine over 2 epochs of 4 turns with a 1-epoch warm-up: at stage step s the student's LR is
    0.1 · factor(s) and the discriminator's 0.05 · factor(s), whichever optimiser steps."""
    recipe = adversarial_recipe(step_plan={"student": 1, "discriminator": 1})
    config = TrainConfig(epochs=2, batch_size=16, lr=0.1, warmup_epochs=1, **QUIET)
    with StepLog(recipe) as log:
        Trainer(config).fit(recipe, small_split().train)
    factor = lr_lambda(config, 2, 4)
    assert len(log.records) == 8
    for step, record in enumerate(log.records):
        scale = 1.0 if record["who"] == "student" else 0.5
        assert record["lr"] == pytest.approx(0.1 * scale * factor(step), rel=1e-12)


RESUME_CONFIG = dict(epochs=2, batch_size=16, lr=0.05, warmup_epochs=1, **QUIET)


def test_resume_with_two_optimisers_is_bit_exact(tmp_path):
    """A 1:2 plan (a 3-turn cycle over 4-turn epochs, so it crosses the epoch boundaries) with momentum SGD: every
    optimiser's state, schedule and scaler is in the checkpoint."""
    def make(seed=0):
        return adversarial_recipe(seed=seed, step_plan={"discriminator": 1, "student": 2})

    _, _, reference_recipe, resumed_recipe = assert_resume_is_exact(make, RESUME_CONFIG, tmp_path)
    for name, value in parameters_of(reference_recipe.stages[0].distiller).items():
        assert torch.equal(parameters_of(resumed_recipe.stages[0].distiller)[name], value), name
    state = load_checkpoint(tmp_path / "pieces" / "last.pt")["run"]
    assert set(state["optimisers"]) == {"student", "discriminator"} and state["step"] == 8


def test_fp16_gives_each_optimiser_its_own_scaler(tmp_path):
    if not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    config = TrainConfig(epochs=1, batch_size=16, amp="fp16", out_dir=tmp_path, **QUIET)
    Trainer(config).fit(adversarial_recipe(step_plan={"discriminator": 1, "student": 3}), small_split().train)
    optimisers = load_checkpoint(tmp_path / "last.pt")["run"]["optimisers"]
    assert optimisers["discriminator"]["scaler"]["_growth_tracker"] == 1    # one finite step
    assert optimisers["student"]["scaler"]["_growth_tracker"] == 3


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_gradient_reversal_gradient_is_minus_scale_times_the_identitys(scale):
    torch.manual_seed(0)
    x = torch.randn(4, 5, requires_grad=True)
    weight = torch.randn(4, 5)
    (plain,) = torch.autograd.grad((x * weight).sin().sum(), x)
    out = grad_reverse(x, scale)
    assert torch.equal(out, x)
    (reversed_,) = torch.autograd.grad((out * weight).sin().sum(), x)
    torch.testing.assert_close(reversed_, -scale * plain)
    (module,) = torch.autograd.grad((GradientReversal(scale)(x) * weight).sin().sum(), x)
    assert torch.equal(module, reversed_)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_gradient_reversal_against_finite_differences_in_float64(scale):
    """The autograd Jacobian of f(x) = sin(w · grad_reverse(x)) is −scale × its central finite differences (the
    forward is f without the layer)."""
    torch.manual_seed(0)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)

    def f(v):
        return torch.sin(w * grad_reverse(v, scale))

    analytical = torch.autograd.functional.jacobian(f, x)
    eps, numerical = 1e-6, torch.empty(6, 6, dtype=torch.float64)
    with torch.no_grad():
        for j in range(6):
            step = torch.zeros(6, dtype=torch.float64)
            step[j] = eps
            numerical[:, j] = (f(x + step) - f(x - step)) / (2 * eps)
    torch.testing.assert_close(analytical, -scale * numerical, rtol=1e-7, atol=1e-9)
    # gradcheck: adding (1 + scale)·(x − x.detach()) (0 forward, gradient 1 + scale) undoes an exact −scale.
    def undone(v):
        return torch.sin(w * (grad_reverse(v, scale) + (1.0 + scale) * (v - v.detach())))

    assert torch.autograd.gradcheck(undone, (x,))


def test_gradient_reversal_errors():
    with pytest.raises(TypeError, match="grad_reverse: x"):
        grad_reverse([1.0])
    with pytest.raises(ValueError, match="scale"):
        grad_reverse(torch.ones(2), -1.0)
    with pytest.raises(TypeError, match="GradientReversal: scale"):
        GradientReversal("1")


def stage_error(optimisers, step_plan=None, **kwargs):
    return lambda: Stage("adv", adversarial_distiller(), optimisers=optimisers, step_plan=step_plan, **kwargs)


STUDENT = Optimiser(models=("student",), terms=("ce_student", "kd", "adv_g"))
DISC = Optimiser(terms_params=("adv_d",), terms=("adv_d",))


@pytest.mark.parametrize("make, error, match", [
    (stage_error({"s": STUDENT, "d": Optimiser(terms=("adv_d",))}), ValueError, "optimiser 'd' names no parameter"),
    (stage_error({"s": STUDENT, "d": Optimiser(terms_params=("adv_d",))}), ValueError, "'d' minimises no term"),
    (stage_error({"s": Optimiser(models=("pupil",), terms=("ce_student", "kd", "adv_g")), "d": DISC}), ValueError,
     "unknown model 'pupil'"),
    (stage_error({"s": Optimiser(models=("teacher",), terms=("ce_student", "kd", "adv_g")), "d": DISC}),
     ValueError, "'teacher', which does not train"),
    (stage_error({"s": STUDENT, "d": Optimiser(terms_params=("adv",), terms=("adv_d",))}), ValueError,
     "unknown term 'adv'"),
    (stage_error({"s": STUDENT, "d": Optimiser(terms_params=("adv_d",), terms=("gan",))}), ValueError,
     "unknown term 'gan'"),
    (stage_error({"s": STUDENT, "d": Optimiser(models=("student",), terms=("adv_d",))}), ValueError,
     "model 'student' are in two optimisers"),
    (stage_error({"s": Optimiser(models=("student",), terms=("ce_student", "kd")), "d": DISC}), ValueError,
     r"terms \['adv_g'\] are in no optimiser"),
    (stage_error({"s": STUDENT, "d": DISC}, "sometimes"), ValueError, "unknown step_plan 'sometimes'"),
    (stage_error({"s": STUDENT, "d": DISC}, 3), TypeError, "step_plan must be"),
    (stage_error({"s": STUDENT, "d": DISC}, {"s": 1}), ValueError, "step_plan must name every optimiser"),
    (stage_error({"s": STUDENT, "d": DISC}, {"s": 1, "d": 0}), ValueError, r"step_plan\['d'\] must be at least 1"),
    (stage_error({"s": STUDENT, "d": DISC}, {"s": 1, "d": 1.5}), TypeError, r"step_plan\['d'\] must be an int"),
    (stage_error(None, "alternate"), ValueError, "step_plan needs optimisers"),
    (stage_error({}), ValueError, "optimisers is empty"),
    (stage_error([STUDENT]), TypeError, "optimisers must be a mapping"),
    (stage_error({"s": STUDENT, "d": "adv_d"}), TypeError, r"optimisers\['d'\] must be an Optimiser"),
    (stage_error({"s": STUDENT, "d": DISC}, model_lr_scales={"student": 2.0}), ValueError, "model_lr_scales"),
    (lambda: Optimiser(models="student", terms=("kd",)), TypeError, "Optimiser: models must be a tuple"),
    (lambda: Optimiser(models=("student",), terms=("kd",), lr_scale=0), ValueError, "lr_scale must be positive"),
])
def test_configuration_errors_name_the_problem(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_parameter_errors_when_the_stage_starts():
    """Checked after the distiller is built (connectors exist only then): a parameter owned by no optimiser or by
    two (a module shared by two terms), or an optimiser owning only parameters that do not train."""
    shared = adversarial_recipe(optimisers={"s": STUDENT, "d": DISC, "g": Optimiser(terms_params=("adv_g",),
                                                                                    terms=("adv_d",))})
    with pytest.raises(ValueError, match="a parameter is in two optimisers, 'd' and 'g'"):
        Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(shared, small_split().train)
    unowned = adversarial_recipe(optimisers={"s": STUDENT, "d": Optimiser(terms_params=("ce_student",),
                                                                          terms=("adv_d",))})
    with pytest.raises(ValueError, match=r"'d' names no parameter that trains"):
        Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(unowned, small_split().train)
    nobody = adversarial_recipe(optimisers={"s": Optimiser(models=("student",), terms=("ce_student", "kd", "adv_g",
                                                                                       "adv_d"))})
    with pytest.raises(ValueError, match=r"the parameters of \[\"term 'adv_g'\", \"term 'adv_d'\"\] are in no"):
        Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(nobody, small_split().train)


def test_a_stage_without_optimisers_keeps_one_optimiser_and_its_checkpoint_layout(tmp_path):
    Trainer(TrainConfig(epochs=1, batch_size=32, out_dir=tmp_path, **QUIET)).fit(
        Recipe("d", [Stage("d", adversarial_distiller())]), small_split().train)
    state = load_checkpoint(tmp_path / "last.pt")["run"]
    assert set(state) == {"distiller", "optimizer", "scheduler", "scaler", "step"}
    assert len(state["optimizer"]["param_groups"]) == 1 and state["step"] == 2


DDP_PLANS = ("alternate", "simultaneous")
DDP_CONFIG = dict(epochs=1, lr=0.1, **QUIET)   # 64 samples, 32 per turn: 2 turns


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    """One torchrun-like rank training the adversarial stage with each plan (16 samples per rank per turn)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for plan in DDP_PLANS:
            recipe = adversarial_recipe(step_plan=plan)
            Trainer(TrainConfig(batch_size=16, **DDP_CONFIG)).fit(recipe, small_split().train)
            torch.save(parameters_of(recipe.stages[0].distiller), os.path.join(out_dir, f"{plan}{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Several optimisers are not DDP-wrapped: each turn's gradients are averaged over the ranks by hand, which
    equals one process taking both ranks' 32 samples."""
    importlib.import_module("torch._dynamo")  # what an optimiser's constructor imports lazily: once, before forking
    mp.start_processes(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for plan in DDP_PLANS:
        single = adversarial_recipe(step_plan=plan)
        Trainer(TrainConfig(batch_size=32, **DDP_CONFIG)).fit(single, small_split().train)
        expected = parameters_of(single.stages[0].distiller)
        for rank in range(2):
            state = torch.load(tmp_path / f"{plan}{rank}.pt")
            for name, value in expected.items():
                torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=f"{plan} {rank} {name}")


def test_readme_example_runs():
    import re
    from pathlib import Path

    from kdkernels import distill

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Several optimisers.**"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"distill": distill, "kdkernels": kdkernels, "torch": torch,
                 "student": digits_model("student-mlp"), "teacher": digits_model("student-mlp")}
    exec(example, namespace)
    recipe = Recipe("adv", [namespace["stage"]])
    discriminator = namespace["disc"]
    before = parameters_of(discriminator)
    result = Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(recipe, small_split().train)
    assert set(result.history[-1]) >= {"ce_student", "kd", "adv_g", "adv_d"}
    assert not same(parameters_of(discriminator), before)


class GameTerm(Term):
    """The discriminator's loss L_D = BCE(D(t), 1) + BCE(D(s'), 0), with s' = grad_reverse(s) (``reverse``), s
    detached (``"detach"``) or s itself; ``sign`` −1 gives the student's side of the saturating min–max game. Owns D
    unless ``owns`` is False (then D is only referenced)."""

    def __init__(self, name, discriminator, student_input, sign=1.0, owns=True):
        super().__init__(name, ("student", "teacher"))
        if owns:
            self.discriminator = discriminator
        else:
            self._discriminator = [discriminator]
        self.student_input, self.sign = student_input, sign

    def loss(self, student, teacher, *, context):
        discriminator = getattr(self, "discriminator", None) or self._discriminator[0]
        student = {"reverse": grad_reverse, "detach": lambda s: s.detach(), "plain": lambda s: s}[
            self.student_input](student)
        real, fake = discriminator(teacher), discriminator(student)
        return self.sign * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def test_one_backward_through_gradient_reversal_equals_two_optimisers_stepping_simultaneously():
    """The saturating min–max game min_s max_D −L_D: one optimiser over both sides with L_D read through
    grad_reverse (one backward) takes the same steps as the student minimising −L_D and D minimising L_D with
    step_plan="simultaneous" (separate backward passes)."""
    config = dict(epochs=1, batch_size=16, lr=0.1, **QUIET)

    def models():
        torch.manual_seed(0)
        student, teacher = digits_model("student-mlp"), digits_model("student-mlp")
        return {"student": student, "teacher": teacher}, torch.nn.Sequential(torch.nn.Linear(10, 8),
                                                                             torch.nn.Tanh(), torch.nn.Linear(8, 1))

    pair, discriminator = models()
    reversal = Distiller(pair, [CrossEntropyTerm("student"), GameTerm("game", discriminator, "reverse")])
    Trainer(TrainConfig(**config)).fit(Recipe("grl", [Stage("grl", reversal)]), small_split().train)
    pair, discriminator = models()
    two = Distiller(pair, [CrossEntropyTerm("student"), GameTerm("adv_s", discriminator, "plain", -1.0, owns=False),
                           GameTerm("adv_d", discriminator, "detach")])
    optimisers = {"student": Optimiser(models=("student",), terms=("ce_student", "adv_s")),
                  "discriminator": Optimiser(terms_params=("adv_d",), terms=("adv_d",))}
    Trainer(TrainConfig(**config)).fit(Recipe("two", [Stage("two", two, optimisers=optimisers,
                                                            step_plan="simultaneous")]), small_split().train)
    expected = parameters_of(reversal.models["student"])
    for name, value in parameters_of(two.models["student"]).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    expected = parameters_of(reversal.terms[1].discriminator)
    for name, value in parameters_of(two.terms[2].discriminator).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_optimiser_whose_terms_do_not_reach_its_parameters_does_not_step():
    """Its gradients stay None, so it skips its step (also under fp16, where the scaler would refuse a step without
    gradients) and its parameters do not change."""
    amp = "fp16" if torch.amp.autocast_mode.is_autocast_available("cpu") else "off"
    optimisers = {"student": Optimiser(models=("student",), terms=("ce_student", "kd", "adv_g", "adv_d")),
                  "discriminator": Optimiser(terms_params=("adv_d",), terms=("kd",))}
    recipe = adversarial_recipe(optimisers=optimisers, step_plan="simultaneous")
    before = parameters_of(discriminator_of(recipe))
    Trainer(TrainConfig(epochs=1, batch_size=32, amp=amp, **QUIET)).fit(recipe, small_split().train)
    assert same(parameters_of(discriminator_of(recipe)), before)
