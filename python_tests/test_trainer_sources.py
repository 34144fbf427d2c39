"""Input sources other than the dataset (kdkernels.distill.sources): a generator source's batches (keys, shapes,
deterministic draws per seed, epoch, step, micro-batch and rank), a data-free stage training a generator and a
student with two optimisers and evaluated on the real test split, bit-exact resume, and configuration errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.distill import GeneratorSource, Optimiser, SyntheticData, TensorSource
from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Stage
from kdkernels.distill.terms import CrossEntropyTerm, Term
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, assert_resume_is_exact, parameters_of, small_split

NOISE = 8


class TinyGenerator(nn.Module):
    """noise [B, 8] -> digits-shaped images [B, 1, 8, 8] (with batch norm: state the checkpoint must hold)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(NOISE, 64)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, z):
        return torch.tanh(self.bn(self.fc(z).view(-1, 1, 8, 8)))


class ConfidenceTerm(Term):
    """The generator's loss: the teacher's cross-entropy against its own top-1 (DAFL's one-hot loss)."""

    def __init__(self):
        super().__init__("confidence", ("teacher",))

    def loss(self, teacher, *, context):
        return F.cross_entropy(teacher, teacher.argmax(dim=1))


class KDTerm(Term):
    def __init__(self):
        super().__init__("kd", ("student", "teacher"))

    def loss(self, student, teacher, *, context):
        return kdkernels.kd_loss(student, teacher.detach(), 4.0)


def data_free_recipe(seed: int = 0, steps_per_epoch: int = 3, step_plan="simultaneous") -> Recipe:
    torch.manual_seed(seed)
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"),
              "generator": TinyGenerator()}
    distiller = Distiller(models, [ConfidenceTerm(), KDTerm()], trainable=("student", "generator"))
    optimisers = {"generator": Optimiser(models=("generator",), terms=("confidence",)),
                  "student": Optimiser(models=("student",), terms=("kd",))}
    source = GeneratorSource(generator="generator", batch_size=16, noise_dim=NOISE, steps_per_epoch=steps_per_epoch)
    return Recipe("data-free", [Stage("data-free", distiller, source=source, optimisers=optimisers,
                                      step_plan=step_plan)])


CONFIG = dict(epochs=2, batch_size=16, lr=0.05, warmup_epochs=1, **QUIET)


def test_generator_source_yields_the_documented_keys_and_shapes():
    source = GeneratorSource(generator="generator", batch_size=5, noise_dim=NOISE, steps_per_epoch=2)
    request = source.request(seed=0, epoch=1, step=3, micro=1, grad_accum=2, rank=1, world_size=2)
    assert set(request) == {"noise", "index"}
    assert request["noise"].shape == (5, NOISE) and request["noise"].dtype == torch.float32
    assert request["index"].dtype == torch.int64
    assert request["index"].tolist() == list(range(((3 * 2 + 1) * 2 + 1) * 5, ((3 * 2 + 1) * 2 + 2) * 5))
    generator = TinyGenerator()
    distiller = Distiller({"student": digits_model("student-mlp"), "generator": generator}, [KDSelf()],
                          trainable=("student", "generator"))
    batch = source.generate(distiller, request)
    assert set(batch) == {"input", "noise", "index"} and "target" not in batch
    assert batch["input"].shape == (5, 1, 8, 8)
    assert batch["input"].requires_grad and batch["input"].grad_fn is not None   # the graph to the generator
    batch["input"].sum().backward()
    assert generator.fc.weight.grad is not None
    assert GeneratorSource(noise_dim=(2, 3, 4), batch_size=2).request(seed=0, epoch=1, step=0)["noise"].shape \
        == (2, 2, 3, 4)


class KDSelf(Term):
    def __init__(self):
        super().__init__("self", ("student",))

    def loss(self, student, *, context):
        return student.square().mean()


def test_generator_noise_is_a_function_of_seed_epoch_step_micro_and_rank():
    source = GeneratorSource(batch_size=4, noise_dim=NOISE)
    key = dict(seed=0, epoch=2, step=5, micro=0, rank=0)
    state = torch.get_rng_state()
    first = source.request(**key, grad_accum=2, world_size=2)
    assert torch.equal(torch.get_rng_state(), state)              # the global RNG is neither read nor advanced
    torch.manual_seed(123)
    assert torch.equal(source.request(**key, grad_accum=2, world_size=2)["noise"], first["noise"])   # identical
    for field in key:
        other = source.request(**{**key, field: key[field] + 1}, grad_accum=2, world_size=2)
        assert not torch.allclose(other["noise"], first["noise"]), field    # any other key draws anew
    assert abs(float(first["noise"].mean())) < 1.0 and 0.5 < float(first["noise"].std()) < 1.5
    indices = [source.request(seed=0, epoch=1, step=step, micro=micro, grad_accum=2, rank=rank, world_size=2)
               ["index"] for step in range(3) for micro in range(2) for rank in range(2)]
    flat = torch.cat(indices)
    assert flat.unique().numel() == flat.numel()                   # unique per sample in the stage
    # Two ranks of 4 samples draw together what one process with 8 draws (DDP equals the whole batch).
    whole = GeneratorSource(batch_size=8, noise_dim=NOISE).request(seed=0, epoch=1, step=3)
    ranks = [source.request(seed=0, epoch=1, step=3, rank=rank, world_size=2) for rank in range(2)]
    assert torch.equal(torch.cat([r["index"] for r in ranks]), whole["index"])
    assert torch.equal(torch.cat([r["noise"] for r in ranks]), whole["noise"])


def test_data_free_stage_trains_generator_and_student_and_evaluates_on_the_test_split(tmp_path):
    recipe = data_free_recipe()
    distiller = recipe.stages[0].distiller
    before = {name: parameters_of(distiller.models[name]) for name in ("student", "teacher", "generator")}
    result = Trainer(TrainConfig(out_dir=tmp_path, **CONFIG)).fit(recipe, small_split().train, small_split().test)
    after = {name: parameters_of(distiller.models[name]) for name in ("student", "teacher", "generator")}
    for name in ("student", "generator"):
        assert any(not torch.equal(before[name][key], after[name][key]) for key in before[name]), name
    assert all(torch.equal(before["teacher"][key], after["teacher"][key]) for key in before["teacher"])
    assert len(result.history) == 2 and all("test_acc_student" in row for row in result.history)
    assert 0.0 <= result.accuracy <= 100.0
    assert {"confidence", "kd"} <= set(result.history[0])
    state = load_checkpoint(tmp_path / "last.pt")["run"]
    assert state["step"] == 6 and set(state["optimisers"]) == {"generator", "student"}
    assert any(key.startswith("models.generator.") for key in state["distiller"])


class RecordingKD(KDTerm):
    def __init__(self):
        super().__init__()
        self.rows = []

    def loss(self, student, teacher, *, context):
        self.rows.append((context.step, context.batch["input"].shape[0], context.batch["index"].tolist()))
        return super().loss(student, teacher, context=context)


def test_a_source_stage_with_one_optimiser_grad_accum_and_the_run_s_batch_size_runs():
    """One optimiser over student and generator (both minimise KD: not a useful objective, but the path runs),
    two micro-batches per step; the source's batch size and epoch length default to the run's (64 samples in
    batches of 16: 4 micro-batches, 2 optimiser steps)."""
    torch.manual_seed(0)
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"),
              "generator": TinyGenerator()}
    term = RecordingKD()
    distiller = Distiller(models, [term], trainable=("student", "generator"))
    stage = Stage("one", distiller, source=GeneratorSource(noise_dim=NOISE))
    generator_before = parameters_of(models["generator"])
    result = Trainer(TrainConfig(epochs=1, batch_size=16, grad_accum=2, **QUIET)).fit(
        Recipe("one", [stage]), small_split().train, small_split().test)
    assert result.history[0]["train_loss"] > 0 and result.steps == 2
    assert [(step, rows) for step, rows, _ in term.rows] == [(0, 16), (0, 16), (1, 16), (1, 16)]
    assert [index for *_, index in term.rows] == [list(range(16 * k, 16 * (k + 1))) for k in range(4)]
    assert not torch.equal(parameters_of(models["generator"])["fc.weight"], generator_before["fc.weight"])


def test_resume_of_a_data_free_stage_is_bit_exact(tmp_path):
    assert_resume_is_exact(data_free_recipe, CONFIG, tmp_path, pieces=(1, 1))


def test_generator_source_errors_name_the_problem():
    models = lambda: {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"),  # noqa: E731
                      "generator": TinyGenerator()}
    with pytest.raises(ValueError, match="unknown generator model 'gen'"):
        Stage("s", Distiller(models(), [KDTerm()], trainable=("student", "generator")),
              source=GeneratorSource(generator="gen", noise_dim=NOISE))
    with pytest.raises(ValueError, match="evaluated models"):
        Stage("s", Distiller(models(), [KDTerm()], trainable=("generator", "student")),
              source=GeneratorSource(noise_dim=NOISE))
    with pytest.raises(ValueError, match=r"terms \[.ce_student.\] read 'target'"):
        Stage("s", Distiller(models(), [KDTerm(), CrossEntropyTerm("student")], trainable=("student", "generator")),
              source=GeneratorSource(noise_dim=NOISE))
    with pytest.raises(TypeError, match="source must be a Source"):
        Stage("s", Distiller(models(), [KDTerm()], trainable=("student", "generator")), source="generator")
    with pytest.raises(ValueError, match="batch_size"):
        GeneratorSource(batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        GeneratorSource(batch_size=2.5)
    with pytest.raises(TypeError, match="batch_size"):
        GeneratorSource(batch_size=True)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        GeneratorSource(steps_per_epoch=0)
    with pytest.raises(TypeError, match="noise_dim"):
        GeneratorSource(noise_dim="8")
    with pytest.raises(TypeError, match="generator"):
        GeneratorSource(generator=3)


def test_readme_input_sources_example_runs():
    """The README's data-free example, run as written (with 3 steps per epoch) for one epoch on the digits."""
    import pathlib
    import re

    from kdkernels import distill

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Input sources.**"):readme.index("**Meta-steps.**")]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "steps_per_epoch=50" in example
    torch.manual_seed(0)
    namespace = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"), "torch": torch,
                 "F": F, "distill": distill, "kdkernels": kdkernels}
    exec(example.replace("steps_per_epoch=50", "steps_per_epoch=3"), namespace)
    generator = parameters_of(namespace["generator"])
    result = Trainer(TrainConfig(epochs=1, **QUIET)).fit(Recipe("data-free", [namespace["stage"]]),
                                                         small_split().train, small_split().test)
    assert result.steps == 3 and "test_acc_student" in result.history[-1]
    assert not torch.equal(parameters_of(namespace["generator"])["0.weight"], generator["0.weight"])


# ------------------------------------------------------------------------------------------ learnable tensor dataset

class TeacherCETerm(Term):
    """The synthetic images' loss: the frozen teacher should classify them as their labels."""

    def __init__(self):
        super().__init__("teacher_ce", ("teacher", "target"))

    def loss(self, teacher, target, *, context):
        return F.cross_entropy(teacher, target)


def synthetic_recipe(seed: int = 0) -> Recipe:
    torch.manual_seed(seed)
    data = SyntheticData(torch.randn(20, 1, 8, 8), torch.arange(20) % 10)
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"), "synthetic": data}
    distiller = Distiller(models, [CrossEntropyTerm("student"), TeacherCETerm()], trainable=("student", "synthetic"))
    optimisers = {"student": Optimiser(models=("student",), terms=("ce_student",)),
                  "synthetic": Optimiser(models=("synthetic",), terms=("teacher_ce",))}
    return Recipe("synthetic", [Stage("synthetic", distiller, source=TensorSource("synthetic", batch_size=8,
                                                                                   steps_per_epoch=3),
                                      optimisers=optimisers, step_plan="simultaneous")])


def test_tensor_source_draws_distinct_samples_with_their_fixed_labels_deterministically():
    recipe = synthetic_recipe()
    stage = recipe.stages[0]
    source, data = stage.source, stage.distiller.models["synthetic"]
    request = source.request(seed=0, epoch=1, step=2, micro=0, rank=0)
    assert set(request) == {"index"} and request["index"].shape == (8,)
    assert request["index"].unique().numel() == 8 and int(request["index"].max()) < 20
    batch = source.generate(stage.distiller, request)
    assert set(batch) == {"input", "target", "index"}
    assert torch.equal(batch["target"], data.labels[request["index"]]) and batch["input"].shape == (8, 1, 8, 8)
    assert batch["input"].grad_fn is not None                      # in the graph of the synthetic images
    assert torch.equal(source.request(seed=0, epoch=1, step=2, micro=0, rank=0)["index"], request["index"])
    for key in ("seed", "epoch", "step", "micro", "rank"):
        other = dict(seed=0, epoch=1, step=2, micro=0, rank=0)
        other[key] += 1
        assert not torch.equal(source.request(**other)["index"], request["index"]), key


def test_tensor_source_trains_the_synthetic_images_not_their_labels_and_resumes_exactly(tmp_path):
    recipe = synthetic_recipe()
    data = recipe.stages[0].distiller.models["synthetic"]
    images, labels = data.images.detach().clone(), data.labels.clone()
    result = Trainer(TrainConfig(**CONFIG)).fit(recipe, small_split().train, small_split().test)
    assert not torch.equal(data.images.detach(), images) and torch.equal(data.labels, labels)
    assert result.steps == 6 and "test_acc_student" in result.history[-1]
    assert_resume_is_exact(synthetic_recipe, CONFIG, tmp_path, pieces=(1, 1))


def test_tensor_source_errors_name_the_problem():
    def distiller(trainable=("student", "synthetic"), data=None):
        data = data if data is not None else SyntheticData(torch.randn(4, 1, 8, 8), torch.arange(4))
        return Distiller({"student": digits_model("student-mlp"), "synthetic": data}, [CrossEntropyTerm("student")],
                         trainable=trainable)

    with pytest.raises(ValueError, match="unknown data model 'data'"):
        Stage("s", distiller(), source=TensorSource("data"))
    with pytest.raises(ValueError, match="evaluated models"):
        Stage("s", distiller(trainable=("synthetic", "student")), source=TensorSource())
    with pytest.raises(TypeError, match="must be a SyntheticData"):
        Stage("s", distiller(data=nn.Linear(2, 2)), source=TensorSource())
    with pytest.raises(ValueError, match="batch_size 5 is larger than the synthetic set"):
        Stage("s", distiller(), source=TensorSource(batch_size=5))
    with pytest.raises(ValueError, match="batch_size"):
        TensorSource(batch_size=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        SyntheticData(torch.randn(4, 3), torch.arange(3))
    with pytest.raises(TypeError, match="labels"):
        SyntheticData(torch.randn(4, 3), torch.ones(4))


# ------------------------------------------------------------------------------ data synthesised by an earlier stage

class ImagePriorTerm(Term):
    """A small L2 prior on the synthetic images (DeepInversion's ``l2`` regulariser)."""

    def __init__(self):
        super().__init__("prior", ("input",), weight=1e-3)

    def loss(self, images, *, context):
        return images.square().mean()


def inversion_recipe(seed: int = 0) -> Recipe:
    """Model inversion, then distillation on its images: stage 1 optimises 20 images so that the frozen teacher
    classifies them as their labels; stage 2 trains the student with KD on those images, frozen."""
    torch.manual_seed(seed)
    teacher, student = digits_model("student-mlp"), digits_model("student-mlp")
    images = SyntheticData(torch.randn(20, 1, 8, 8), torch.arange(20) % 10)
    invert = Stage("invert", Distiller({"teacher": teacher, "synthetic": images}, [TeacherCETerm(), ImagePriorTerm()],
                                       trainable=("synthetic",), evaluate=("teacher",)),
                   source=TensorSource("synthetic", batch_size=8, steps_per_epoch=3), epochs=1)
    distil = Stage("distil", Distiller({"student": student, "teacher": teacher, "synthetic": images}, [RecordingKD()]),
                   source=TensorSource("synthetic", batch_size=8, steps_per_epoch=3), epochs=1)
    return Recipe("inversion", [invert, distil])


def test_a_stage_distils_on_images_an_earlier_stage_synthesised_and_leaves_them_unchanged(tmp_path):
    recipe = inversion_recipe()
    invert, distil = (stage.distiller for stage in recipe.stages)
    images = invert.models["synthetic"]
    assert distil.models["synthetic"] is images
    start = images.images.detach().clone()
    teacher, student = parameters_of(invert.models["teacher"]), parameters_of(distil.models["student"])
    kd = distil.terms[0]
    seen_in_stage_2 = []
    kd_loss = kd.loss

    def recording_loss(student_logits, teacher_logits, *, context):
        seen_in_stage_2.append((context.batch["input"].detach().clone(), context.batch["input"].requires_grad))
        return kd_loss(student_logits, teacher_logits, context=context)

    kd.loss = recording_loss
    result = Trainer(TrainConfig(**CONFIG)).fit(recipe, small_split().train, small_split().test)
    assert result.steps == 6 and [row["stage"] for row in result.history] == ["invert", "distil"]
    assert "test_acc_teacher" in result.history[0] and "test_acc_student" in result.history[1]   # real test split
    synthesised = images.images.detach()
    assert not torch.equal(synthesised, start)                         # stage 1 optimised the images
    assert len(seen_in_stage_2) == 3
    for batch, needs_grad in seen_in_stage_2:                          # stage 2 read them as stage 1 left them
        assert not needs_grad
        assert all(any(torch.equal(row, image) for image in synthesised) for row in batch)
    assert all(torch.equal(value, parameters_of(invert.models["teacher"])[key]) for key, value in teacher.items())
    assert any(not torch.equal(value, parameters_of(distil.models["student"])[key]) for key, value in student.items())
    assert all(0 <= index < 20 for *_, rows in kd.rows for index in rows)   # indices into the synthetic set


def test_resume_across_the_inversion_and_the_distillation_stage_is_bit_exact(tmp_path):
    assert_resume_is_exact(inversion_recipe, CONFIG, tmp_path, pieces=(1, 1))


def test_a_frozen_generator_trained_earlier_samples_without_a_graph():
    torch.manual_seed(0)
    generator = TinyGenerator()
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"), "generator": generator}
    distiller = Distiller(models, [KDTerm()]).activate()
    distiller.train()
    source = GeneratorSource(generator="generator", batch_size=4, noise_dim=NOISE)
    Stage("fixed", distiller, source=source)
    batch = source.generate(distiller, source.request(seed=0, epoch=1, step=0))
    assert not batch["input"].requires_grad and not generator.training      # eval mode: running statistics
    before = parameters_of(generator)
    Trainer(TrainConfig(epochs=1, batch_size=16, **QUIET)).fit(
        Recipe("fixed", [Stage("fixed", distiller, source=GeneratorSource(noise_dim=NOISE, steps_per_epoch=2))]),
        small_split().train, small_split().test)
    after = parameters_of(generator)
    assert all(torch.equal(before[key], after[key]) for key in before)    # batch-norm statistics included


# ------------------------------------------------------------------------------------------------------------ DDP

def ddp_source_recipe(two_optimisers: bool) -> Recipe:
    """A generator without batch statistics (so that per-rank batches compute what the whole batch does)."""
    torch.manual_seed(0)
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"),
              "generator": nn.Sequential(nn.Linear(NOISE, 64), nn.Unflatten(1, (1, 8, 8)), nn.Tanh())}
    distiller = Distiller(models, [ConfidenceTerm(), KDTerm()], trainable=("student", "generator"))
    source = GeneratorSource(noise_dim=NOISE, steps_per_epoch=3)
    if not two_optimisers:
        return Recipe("one", [Stage("one", distiller, source=source)])
    optimisers = {"generator": Optimiser(models=("generator",), terms=("confidence",)),
                  "student": Optimiser(models=("student",), terms=("kd",))}
    return Recipe("two", [Stage("two", distiller, source=source, optimisers=optimisers, step_plan="simultaneous")])


DDP_SOURCE_CONFIG = dict(epochs=1, lr=0.1, **QUIET)


def ddp_source_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for two in (False, True):
            recipe = ddp_source_recipe(two)
            result = Trainer(TrainConfig(batch_size=8, **DDP_SOURCE_CONFIG)).fit(recipe, small_split().train,
                                                                                 small_split().test)
            models = recipe.stages[0].distiller.models
            torch.save({name: parameters_of(models[name]) for name in ("student", "generator")} |
                       {"loss": result.history[-1]["train_loss"]}, os.path.join(out_dir, f"{int(two)}{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Each rank generates 8 of a step's 16 samples (its noise keyed by the samples' indices, the same as the whole
    batch's); DDP's average (one optimiser) or the hand average (two optimisers) is the 16-sample gradient."""
    import importlib
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    importlib.import_module("torch._dynamo")
    mp.start_processes(ddp_source_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for two in (False, True):
        recipe = ddp_source_recipe(two)
        single = Trainer(TrainConfig(batch_size=16, **DDP_SOURCE_CONFIG)).fit(recipe, small_split().train,
                                                                              small_split().test)
        models = recipe.stages[0].distiller.models
        for rank in range(2):
            ranked = torch.load(tmp_path / f"{int(two)}{rank}.pt")
            assert ranked["loss"] == pytest.approx(single.history[-1]["train_loss"], rel=1e-5)
            for name in ("student", "generator"):
                for key, value in parameters_of(models[name]).items():
                    torch.testing.assert_close(ranked[name][key], value, rtol=1e-5, atol=1e-6,
                                               msg=f"{two} {rank} {name}.{key}")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_data_free_stage_trains_under_amp(amp):
    """The generator runs under autocast with the models (the terms in fp32); fp16 gives each optimiser a scaler."""
    if not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    recipe = data_free_recipe()
    generator = parameters_of(recipe.stages[0].distiller.models["generator"])
    result = Trainer(TrainConfig(amp=amp, **{**CONFIG, "epochs": 1})).fit(recipe, small_split().train,
                                                                           small_split().test)
    row = result.history[-1]
    assert all(torch.isfinite(torch.tensor(row[name])) for name in ("confidence", "kd", "train_loss"))
    after = parameters_of(recipe.stages[0].distiller.models["generator"])
    assert not torch.equal(after["fc.weight"], generator["fc.weight"])


def test_views_apply_to_the_generated_batch_in_the_generator_s_graph(tmp_path):
    """A student reading a flipped, noised view of the generated images: the view is drawn per sample index (the
    same in a resumed run), and the confidence term read through the teacher on the view trains the generator."""
    from kdkernels.distill import GaussianNoise, HorizontalFlip, View

    def make(seed=0):
        torch.manual_seed(seed)
        models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp"),
                  "generator": TinyGenerator()}
        term = RecordingKD()
        distiller = Distiller(models, [ConfidenceTerm(), term], trainable=("student", "generator"),
                              inputs={"student": "input_aug", "teacher": "input_aug"},
                              views=[View("input", "input_aug", HorizontalFlip()),
                                     View("input_aug", "input_aug", GaussianNoise(0.1))])
        optimisers = {"generator": Optimiser(models=("generator",), terms=("confidence",)),
                      "student": Optimiser(models=("student",), terms=("kd",))}
        return Recipe("views", [Stage("views", distiller, source=GeneratorSource(noise_dim=NOISE, steps_per_epoch=2),
                                      optimisers=optimisers, step_plan="simultaneous")])

    recipe = make()
    generator = parameters_of(recipe.stages[0].distiller.models["generator"])
    Trainer(TrainConfig(**CONFIG)).fit(recipe, small_split().train, small_split().test)
    assert not torch.equal(parameters_of(recipe.stages[0].distiller.models["generator"])["fc.weight"],
                           generator["fc.weight"])
    assert_resume_is_exact(make, CONFIG, tmp_path, pieces=(1, 1))
