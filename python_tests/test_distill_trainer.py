"""The trainer (kdkernels.distill.trainer) and its checkpoints, metrics files and offline teacher cache.

Runs are tiny (MLP students on 64-96 digits, 1-3 epochs). Equivalence tests compare two ways of computing the same
training run: gradient accumulation against one large batch, 2 gloo processes against one process, a resumed
run against an uninterrupted one (bit for bit), a cached teacher against the live one.
"""
import csv
import functools
import importlib
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kdkernels
from distill_testing import digits_split, first_step
from kdkernels.distill.cache import CachedTeacher, cache_teacher
from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.data import load_digits
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Setup, Stage
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.terms import CrossEntropyTerm, Term
from kdkernels.distill.schedules import lr_lambda
from kdkernels.distill.trainer import TrainConfig, Trainer

QUIET = dict(progress=False, num_workers=0)


@functools.lru_cache(maxsize=None)
def small_split(train_size: int = 64):
    return load_digits(train_size=train_size, seed=0)


def kd_recipe(seed: int = 0, student: str = "student-mlp", teacher: str = "student-mlp") -> Recipe:
    """KD between two BN-free MLPs (an untrained teacher is enough to exercise the machinery)."""
    torch.manual_seed(seed)
    setup = Setup(student=digits_model(student), teacher=digits_model(teacher), num_classes=10)
    return build_recipe("kd", setup)


def two_stage_recipe(seed: int = 0) -> Recipe:
    """Stage 1 trains a model on labels (2 epochs); stage 2 distils it, now frozen, into a second model. Input
    dropout makes training draw from torch's RNG, which a resume must restore."""
    torch.manual_seed(seed)
    first, second = (torch.nn.Sequential(torch.nn.Dropout(0.2), digits_model("student-mlp")) for _ in range(2))
    teacher_stage = build_recipe("ce", Setup(student=first, num_classes=10)).stages[0]
    teacher_stage.name, teacher_stage.epochs = "teacher", 2
    student_stage = build_recipe("kd", Setup(student=second, teacher=first, num_classes=10)).stages[0]
    return Recipe("two-stage", [teacher_stage, student_stage])


def parameters_of(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def accuracy_of(model, dataset) -> float:
    with torch.no_grad():
        model.eval()
        predictions = model(dataset.inputs).argmax(dim=1)
    return 100.0 * float((predictions == dataset.targets).float().mean())


def without_timings(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "loss_seconds")} for row in history]


class RecordingTerm(Term):
    """KD (forward KL, T = 4) that records what it was given: value dtypes, the step context, the batch input."""

    def __init__(self):
        super().__init__("recorded_kd", ("student", "teacher"))
        self.records = []

    def loss(self, student, teacher, *, context):
        loss = kdkernels.kd_loss(student, teacher, 4.0)
        self.records.append({"dtypes": (student.dtype, teacher.dtype), "loss_dtype": loss.dtype,
                             "epoch": context.epoch, "epochs": context.epochs, "step": context.step,
                             "mixup": context.mixup, "input": context.batch["input"].detach().clone(),
                             "index": context.batch["index"].clone()})
        return loss


def recording_recipe(seed: int = 0) -> tuple[Recipe, RecordingTerm]:
    torch.manual_seed(seed)
    term = RecordingTerm()
    models = {"student": digits_model("student-mlp"), "teacher": digits_model("student-cnn")}
    distiller = Distiller(models, [CrossEntropyTerm("student", 0.5), term])
    return Recipe("recorded", [Stage("recorded", distiller)]), term


def record_inputs(module, store):
    return module.register_forward_pre_hook(lambda _m, inputs: store.append(inputs[0].detach().clone()))


# ------------------------------------------------------------------------------------------------- outputs

def test_fit_writes_metrics_checkpoints_curves_and_the_student(tmp_path):
    split = small_split()
    recipe = kd_recipe()
    result = Trainer(TrainConfig(epochs=2, batch_size=32, out_dir=tmp_path, **QUIET)).fit(recipe, split.train,
                                                                                         split.test)
    for name in ("metrics.csv", "metrics.json", "curves.png", "last.pt", "best.pt", "student.pt"):
        assert (tmp_path / name).is_file(), name
    assert set(result.paths) == {"metrics_csv", "metrics_json", "curves", "last", "best", "student"}
    assert result.method == "kd" and result.completed
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert {"stage", "lr", "train_loss", "ce_student", "kd", "test_acc_student", "seconds"} <= set(rows[0])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(result.accuracy) and len(saved["history"]) == 2
    # The reported accuracy is the exported student's, recomputed here on the whole test set.
    assert result.accuracy == pytest.approx(accuracy_of(result.student, split.test))
    assert result.accuracies == {"student": result.accuracy}
    assert result.best_accuracy == max(row["test_acc_student"] for row in result.history)
    for row in result.history:  # the train loss is the sum of the weighted terms' epoch means
        assert row["train_loss"] == pytest.approx(row["ce_student"] + row["kd"], rel=1e-6)
    assert 0.0 < result.loss_share < 1.0
    assert result.train_seconds == pytest.approx(sum(row["seconds"] for row in result.history))
    exported = digits_model("student-mlp")
    exported.load_state_dict(torch.load(tmp_path / "student.pt"))
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(),
                                                 result.student.state_dict().values()))
    last = load_checkpoint(tmp_path / "last.pt")
    assert (last["stage"], last["epoch"], last["run"]["step"]) == (0, 2, 4)


def test_eval_every_evaluates_the_chosen_epochs_and_the_last():
    split = small_split()
    config = TrainConfig(epochs=3, batch_size=32, eval_every=2, **QUIET)
    result = Trainer(config).fit(kd_recipe(), split.train, split.test)
    assert ["test_acc_student" in row for row in result.history] == [False, True, True]


def test_without_test_set_there_is_no_accuracy():
    result = Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(kd_recipe(), small_split().train)
    assert result.accuracy is None and result.best_accuracy is None and result.accuracies == {}


# ---------------------------------------------------------------------------------------------- schedules

def test_lr_schedules_with_warmup():
    cosine = lr_lambda(TrainConfig(schedule="cosine", warmup_epochs=1), epochs=3, steps_per_epoch=2)
    assert [cosine(s) for s in range(6)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    step = lr_lambda(TrainConfig(schedule="step", step_size=1, gamma=0.5), epochs=3, steps_per_epoch=2)
    assert [step(s) for s in range(6)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    multistep = lr_lambda(TrainConfig(schedule="multistep", milestones=(2,), gamma=0.1), epochs=3, steps_per_epoch=2)
    assert [multistep(s) for s in range(6)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1])
    constant = lr_lambda(TrainConfig(schedule="constant"), epochs=3, steps_per_epoch=2)
    assert {constant(s) for s in range(6)} == {1.0}


def test_history_lr_follows_the_schedule_per_step():
    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, schedule="multistep", milestones=(1, 2), gamma=0.5,
                         **QUIET)
    result = Trainer(config).fit(kd_recipe(), small_split().train)
    assert [row["lr"] for row in result.history] == pytest.approx([0.1, 0.05, 0.025])


# -------------------------------------------------------------------------------------------- AMP, accum, clip

@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_models_in_low_precision_and_losses_in_fp32(amp, dtype):
    if amp == "fp16" and not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    recipe, term = recording_recipe()
    outputs = []
    handle = recipe.student.register_forward_hook(lambda _m, _i, output: outputs.append(output.dtype))
    try:
        result = Trainer(TrainConfig(epochs=1, batch_size=32, amp=amp, **QUIET)).fit(
            recipe, small_split().train, small_split().test)
    finally:
        handle.remove()
    # Distiller.build's sizing pass runs first, without autocast; then every training and eval forward uses it.
    assert outputs[0] == torch.float32 and set(outputs[1:]) == {dtype}
    assert {r["dtypes"] for r in term.records} == {(torch.float32, torch.float32)}
    assert {r["loss_dtype"] for r in term.records} == {torch.float32}
    assert all(math.isfinite(v) for row in result.history for v in row.values() if isinstance(v, float))


def test_fp16_uses_a_grad_scaler_and_checkpoints_it(tmp_path):
    config = TrainConfig(epochs=1, batch_size=32, amp="fp16", out_dir=tmp_path, **QUIET)
    Trainer(config).fit(kd_recipe(), small_split().train)
    scaler = load_checkpoint(tmp_path / "last.pt")["run"]["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 2   # two finite steps


def test_gradient_accumulation_equals_one_large_batch():
    """2 micro-batches of 16 per step = 1 batch of 32 (mean-reduced losses, no BN); 72 samples, so the epoch ends
    on a short batch of 8 in both runs (a group of one micro-batch)."""
    split = small_split(72)
    base = dict(epochs=2, lr=0.1, **QUIET)
    large = kd_recipe()
    Trainer(TrainConfig(batch_size=32, **base)).fit(large, split.train)
    accumulated = kd_recipe()
    result = Trainer(TrainConfig(batch_size=16, grad_accum=2, **base)).fit(accumulated, split.train)
    for name, value in parameters_of(large.student).items():
        torch.testing.assert_close(parameters_of(accumulated.student)[name], value, rtol=1e-5, atol=1e-6)
    assert result.history[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))


def test_clip_grad_norm_bounds_the_update():
    """One plain SGD step (lr 1, no momentum or decay) moves the parameters by lr · ‖clipped gradient‖."""
    split = small_split()
    base = dict(epochs=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", **QUIET)
    moves = {}
    for clip in (None, 1e-3):
        recipe = kd_recipe()
        before = torch.cat([p.detach().flatten().clone() for p in recipe.student.parameters()])
        Trainer(TrainConfig(clip_grad_norm=clip, **base)).fit(recipe, split.train)
        after = torch.cat([p.detach().flatten() for p in recipe.student.parameters()])
        moves[clip] = float((after - before).norm())
    assert moves[1e-3] == pytest.approx(1e-3, rel=1e-4)
    assert moves[None] > 10 * moves[1e-3]


# ------------------------------------------------------------------------------------------------------- mixup

def test_mixup_feeds_the_same_mixed_input_to_student_and_teacher():
    split = small_split()
    recipe, term = recording_recipe()
    student_inputs, teacher_inputs = [], []
    handles = [record_inputs(recipe.student, student_inputs),
               record_inputs(recipe.stages[0].distiller.models["teacher"], teacher_inputs)]
    try:
        Trainer(TrainConfig(epochs=2, batch_size=32, mixup_alpha=0.4, **QUIET)).fit(recipe, split.train)
    finally:
        for handle in handles:
            handle.remove()
    # Distiller.build runs the models once on the first (unmixed) batch before training.
    student_inputs, teacher_inputs = student_inputs[1:], teacher_inputs[1:]
    assert len(term.records) == len(student_inputs) == len(teacher_inputs) == 4
    for record, student_x, teacher_x in zip(term.records, student_inputs, teacher_inputs):
        lam, permutation = record["mixup"].lam, record["mixup"].permutation
        clean = split.train.inputs[record["index"]]
        assert 0.0 < lam < 1.0 and sorted(permutation.tolist()) == list(range(len(clean)))
        torch.testing.assert_close(student_x, lam * clean + (1 - lam) * clean[permutation], rtol=0, atol=0)
        assert torch.equal(student_x, teacher_x) and torch.equal(student_x, record["input"])
    assert [(r["epoch"], r["epochs"], r["step"]) for r in term.records] == [(1, 2, 0), (1, 2, 1), (2, 2, 2),
                                                                             (2, 2, 3)]


def test_mixup_with_a_cached_teacher_is_refused():
    split = small_split()
    torch.manual_seed(0)
    cached = cache_teacher(digits_model("student-mlp"), split.train)
    recipe = build_recipe("kd", Setup(student=digits_model("student-mlp"), teacher=cached, num_classes=10))
    with pytest.raises(ValueError, match="cached teacher"):
        Trainer(TrainConfig(epochs=1, mixup_alpha=0.2, **QUIET)).fit(recipe, split.train)


# ------------------------------------------------------------------------------------------------------ resume

def run_in_pieces(make_recipe, config: dict, pieces, out_dir):
    """Trains a fresh recipe for each piece's epochs, resuming from out_dir/last.pt (a new process would build
    the recipe again the same way); returns the last call's result and recipe."""
    for index, piece in enumerate(pieces):
        # The first call starts like the reference run; later calls start from other weights, which the
        # checkpoint must replace.
        recipe = make_recipe(seed=1 if index == 0 else 100 + index)
        result = Trainer(TrainConfig(out_dir=out_dir, resume=index > 0, stop_after_epochs=piece, **config)).fit(
            recipe, small_split().train, small_split().test)
        assert result.completed == (index == len(pieces) - 1)
    return result, recipe


def assert_same_run(resumed, resumed_recipe, reference, reference_recipe):
    for key, state in parameters_of_recipe(reference_recipe).items():
        for name, value in state.items():
            assert torch.equal(parameters_of_recipe(resumed_recipe)[key][name], value), f"{key}.{name}"
    assert without_timings(resumed.history) == without_timings(reference.history)
    assert resumed.accuracy == reference.accuracy and resumed.best_accuracy == reference.best_accuracy


def parameters_of_recipe(recipe):
    return {f"{i}/{name}": parameters_of(model) for i, stage in enumerate(recipe.stages)
            for name, model in stage.distiller.models.items()}


RESUME_CONFIG = dict(epochs=3, batch_size=16, lr=0.05, warmup_epochs=1, mixup_alpha=0.4, **QUIET)


def test_resume_continues_a_one_stage_run_identically(tmp_path):
    reference_recipe = kd_recipe(seed=1)
    reference = Trainer(TrainConfig(out_dir=tmp_path / "whole", **RESUME_CONFIG)).fit(
        reference_recipe, small_split().train, small_split().test)
    resumed, resumed_recipe = run_in_pieces(kd_recipe, RESUME_CONFIG, [1, 5], tmp_path / "pieces")
    assert_same_run(resumed, resumed_recipe, reference, reference_recipe)
    assert len(resumed.history) == 3


@pytest.mark.parametrize("pieces", [[1, 2, 5], [2, 5]], ids=["mid-stage-and-across", "at-the-boundary"])
def test_resume_continues_a_two_stage_run_identically(tmp_path, pieces):
    reference_recipe = two_stage_recipe(seed=1)
    reference = Trainer(TrainConfig(out_dir=tmp_path / "whole", **RESUME_CONFIG)).fit(
        reference_recipe, small_split().train, small_split().test)
    resumed, resumed_recipe = run_in_pieces(two_stage_recipe, RESUME_CONFIG, pieces, tmp_path / "pieces")
    assert_same_run(resumed, resumed_recipe, reference, reference_recipe)
    assert [row["stage"] for row in resumed.history] == ["teacher"] * 2 + ["kd"] * 3


def pruning_recipe(method: str, seed: int) -> Recipe:
    torch.manual_seed(0)
    teacher = digits_model("student-cnn")
    torch.manual_seed(seed)
    options = {"pruning_ratio": 0.5, "finetune_epochs": 1}
    return build_recipe(method, Setup(student=digits_model("student-mlp"), teacher=teacher, num_classes=10),
                        **options)


@pytest.mark.parametrize("method", ["prune-kd", "prue"])
def test_resume_with_a_pruned_teacher(tmp_path, method):
    """prune-kd prunes in each stage's ``before`` (a resume prunes again, then loads); PrUE prunes when its stage
    builds (a resume loads a pruned teacher into a fresh one). Both continue bit for bit."""
    config = dict(epochs=2, batch_size=16, **QUIET)
    reference = pruning_recipe(method, seed=1)
    Trainer(TrainConfig(out_dir=tmp_path / "whole", **config)).fit(reference, small_split().train)
    Trainer(TrainConfig(out_dir=tmp_path / "pieces", stop_after_epochs=2, **config)).fit(
        pruning_recipe(method, seed=1), small_split().train)
    resumed = pruning_recipe(method, seed=5)
    Trainer(TrainConfig(out_dir=tmp_path / "pieces", resume=True, **config)).fit(resumed, small_split().train)
    assert_same_run_models(resumed, reference)


def assert_same_run_models(resumed: Recipe, reference: Recipe) -> None:
    for key, state in parameters_of_recipe(reference).items():
        for name, value in state.items():
            assert torch.equal(parameters_of_recipe(resumed)[key][name], value), f"{key}.{name}"


def test_resume_true_without_a_checkpoint_starts_fresh(tmp_path):
    config = TrainConfig(epochs=1, batch_size=32, out_dir=tmp_path, resume=True, **QUIET)
    assert len(Trainer(config).fit(kd_recipe(), small_split().train).history) == 1


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(TrainConfig(resume=tmp_path / "missing.pt", **QUIET)).fit(kd_recipe(), small_split().train)
    with pytest.raises(ValueError, match="out_dir"):
        Trainer(TrainConfig(resume=True, **QUIET)).fit(kd_recipe(), small_split().train)
    Trainer(TrainConfig(epochs=1, batch_size=32, out_dir=tmp_path, **QUIET)).fit(kd_recipe(), small_split().train)
    with pytest.raises(ValueError, match="'two-stage'"):
        Trainer(TrainConfig(out_dir=tmp_path, resume=True, **QUIET)).fit(two_stage_recipe(), small_split().train)


# --------------------------------------------------------------------------------------------------------- DDP

DDP_CONFIG = dict(epochs=2, lr=0.1, **QUIET)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_SPLITS = {"plain": dict(batch_size=16), "accumulated": dict(batch_size=8, grad_accum=2)}


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    """One torchrun-like rank: the environment variables torchrun sets, then ordinary fits (the second one finds
    the process group the first initialised)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for name, options in DDP_SPLITS.items():
            result = Trainer(TrainConfig(**options, **DDP_CONFIG)).fit(kd_recipe(), small_split().train,
                                                                       small_split().test)
            torch.save({"student": result.student.state_dict(), "accuracy": result.accuracy,
                        "history": without_timings(result.history), "backend": dist.get_backend()},
                       os.path.join(out_dir, f"{name}{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Each rank takes 16 of the 32 samples of a step (one batch of 16, or two micro-batches of 8 with DDP's
    no_sync on the first); DDP's gradient average is the gradient of the 32-sample mean."""
    # fork: the children inherit the imported torch (a spawn re-imports it: seconds per process). They set one
    # intra-op thread, so they never enter the OpenMP pool the parent may have started (not fork-safe).
    importlib.import_module("torch._dynamo")  # what an optimiser's constructor imports lazily: once, before forking
    mp.start_processes(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"{name}{rank}.pt") for name in DDP_SPLITS for rank in range(2)]
    single_recipe = kd_recipe()
    single = Trainer(TrainConfig(batch_size=32, **DDP_CONFIG)).fit(single_recipe, small_split().train,
                                                                   small_split().test)
    assert {rank["backend"] for rank in ranks} == {"gloo"}
    for rank in ranks:
        for name, value in single_recipe.student.state_dict().items():
            torch.testing.assert_close(rank["student"][name], value, rtol=1e-5, atol=1e-6)
        # Losses and accuracies are reduced over the ranks: every rank reports the whole run's numbers.
        assert rank["accuracy"] == pytest.approx(single.accuracy)
        for ddp_row, row in zip(rank["history"], without_timings(single.history)):
            assert ddp_row["train_loss"] == pytest.approx(row["train_loss"], rel=1e-5)


def dropout_recipe(seed: int = 0) -> Recipe:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Dropout(0.2), digits_model("student-mlp"))
    return build_recipe("ce", Setup(student=model, num_classes=10))


def ddp_resume_worker(rank: int, port: int, out_dir: str) -> None:
    """Per rank: 3 epochs straight, and 1 epoch then a resume for the rest. Batches of 20 from 64 samples give
    rank 0 two batches of 20 and rank 1 one of 20 and one of 4, so dropout draws differently on the two ranks."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = dict(epochs=3, batch_size=20, lr=0.1, **QUIET)
    try:
        whole = dropout_recipe(seed=1)
        Trainer(TrainConfig(out_dir=os.path.join(out_dir, "whole"), **config)).fit(whole, small_split().train)
        pieces = os.path.join(out_dir, "pieces")
        Trainer(TrainConfig(out_dir=pieces, stop_after_epochs=1, **config)).fit(dropout_recipe(seed=1),
                                                                                small_split().train)
        resumed = dropout_recipe(seed=7)
        Trainer(TrainConfig(out_dir=pieces, resume=True, **config)).fit(resumed, small_split().train)
        torch.save({"whole": whole.student.state_dict(), "resumed": resumed.student.state_dict(),
                    "rng": torch.get_rng_state()}, os.path.join(out_dir, f"resume{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_resume_restores_every_ranks_rng(tmp_path):
    importlib.import_module("torch._dynamo")
    mp.start_processes(ddp_resume_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"resume{rank}.pt") for rank in range(2)]
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"]), "the ranks should have drawn differently"
    for rank in ranks:
        for name, value in rank["whole"].items():
            assert torch.equal(rank["resumed"][name], value), name
    checkpoint = load_checkpoint(tmp_path / "pieces" / "last.pt")
    assert len(checkpoint["rng_per_rank"]) == 2


# ------------------------------------------------------------------------------------------ offline teacher

def test_cached_teacher_gives_the_live_teachers_kd_losses():
    torch.manual_seed(0)
    teacher = digits_model("assistant-cnn").eval()
    cached = cache_teacher(teacher, digits_split().train, batch_size=64)
    assert isinstance(cached, CachedTeacher) and cached.takes_batch and len(cached) == len(digits_split().train)
    losses = {}
    for name, model in (("live", teacher), ("cached", cached)):
        torch.manual_seed(1)
        recipe = build_recipe("kd", Setup(student=digits_model("student-cnn"), teacher=model, num_classes=10))
        _, _, values, output = first_step(recipe)
        losses[name] = output.terms
    assert set(losses["live"]) == set(losses["cached"]) == {"ce_student", "kd"}
    for term in losses["live"]:
        torch.testing.assert_close(losses["cached"][term], losses["live"][term], rtol=1e-5, atol=1e-7)


def test_training_with_a_cached_teacher_never_runs_the_teacher():
    split = small_split()
    torch.manual_seed(0)
    teacher = digits_model("student-cnn")
    cached = cache_teacher(teacher, split.train)
    calls = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        recipe = build_recipe("kd", Setup(student=digits_model("student-mlp"), teacher=cached, num_classes=10))
        result = Trainer(TrainConfig(epochs=2, batch_size=32, **QUIET)).fit(recipe, split.train, split.test)
    finally:
        handle.remove()
    assert not calls and result.history[-1]["kd"] > 0


def test_topk_cache_rebuilds_minus_inf_logits_equal_to_the_sparse_kd_loss():
    split = small_split()
    torch.manual_seed(0)
    teacher = digits_model("student-cnn").eval()
    cached = cache_teacher(teacher, split.train, topk=3)
    batch = {"index": torch.tensor([5, 0, 17, 63])}
    dense = cached(batch)
    with torch.no_grad():
        log_p = F.log_softmax(teacher(split.train.inputs[batch["index"]]), dim=1)
    top_values, top_indices = log_p.topk(3, dim=1)
    assert dense.shape == (4, 10) and bool((torch.isfinite(dense).sum(dim=1) == 3).all())
    torch.testing.assert_close(dense.gather(1, top_indices), top_values, rtol=1e-5, atol=1e-6)
    logprobs, indices = cached.topk(batch)
    student = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
    temperature = 4.0
    # The official renormalised top-k KD, transcribed: q = softmax(lp / T) over the support, T² · KL(q ‖ p_s).
    q = F.softmax(top_values / temperature, dim=1)
    log_p_s = F.log_softmax(student / temperature, dim=1).gather(1, top_indices)
    expected = temperature ** 2 * (q * (q.log() - log_p_s)).sum() / 4
    from_dense = kdkernels.kd_loss(student, dense, temperature)
    from_sparse = kdkernels.kd_loss(student, temperature=temperature, teacher_topk_logprobs=logprobs,
                                    teacher_topk_indices=indices)
    torch.testing.assert_close(from_dense, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_sparse, expected, rtol=1e-5, atol=1e-6)
    recipe = build_recipe("kd", Setup(student=digits_model("student-mlp"), teacher=cached, num_classes=10))
    result = Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(recipe, split.train)
    assert math.isfinite(result.history[0]["kd"])


def test_cache_errors():
    split = small_split()
    teacher = digits_model("student-mlp")
    with pytest.raises(ValueError, match="topk"):
        cache_teacher(teacher, split.train, topk=11)
    with pytest.raises(ValueError, match="index"):
        cache_teacher(teacher, split.train)({"input": split.train.inputs[:2]})
    with pytest.raises(ValueError, match="dense logits"):
        cache_teacher(teacher, split.train).topk({"index": torch.tensor([0])})


# ---------------------------------------------------------------------------------------------- bad config

@pytest.mark.parametrize("options, match", [
    ({"optimizer": "rmsprop"}, "optimizer"), ({"schedule": "poly"}, "schedule"), ({"amp": "fp8"}, "amp"),
    ({"grad_accum": 0}, "grad_accum"), ({"batch_size": 0}, "batch_size"), ({"epochs": 1.5}, "epochs"),
    ({"lr": 0.0}, "lr"), ({"clip_grad_norm": 0.0}, "clip_grad_norm"), ({"mixup_alpha": -1.0}, "mixup_alpha"),
    ({"schedule": "multistep"}, "milestones"), ({"device": "gpu"}, "device"), ({"num_workers": -1}, "num_workers"),
])
def test_bad_config_is_rejected_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_a_stage_without_batches_is_an_error():
    config = TrainConfig(epochs=1, batch_size=128, drop_last=True, **QUIET)
    with pytest.raises(ValueError, match="no batch"):
        Trainer(config).fit(kd_recipe(), small_split().train)


class _Unlabelled(torch.utils.data.Dataset):
    """Images without labels, as SSLD's mined unlabelled data."""

    def __init__(self, inputs):
        self.inputs = inputs

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return {"input": self.inputs[index]}


def test_label_free_methods_train_on_unlabelled_data_and_others_say_what_is_missing():
    from kdkernels.distill import Trainer, TrainConfig, build_recipe

    split = digits_split()
    unlabelled = _Unlabelled(split.train.inputs[:64])
    torch.manual_seed(0)
    teacher = digits_model("teacher-cnn")
    setup = Setup(student=digits_model("student-cnn"), teacher=teacher, num_classes=10)
    before = [p.detach().clone() for p in setup.student.parameters()]
    result = Trainer(TrainConfig(epochs=1, batch_size=16, progress=False)).fit(build_recipe("ssld", setup),
                                                                              unlabelled, split.test)
    assert 0.0 <= result.accuracy <= 100.0
    assert any(not torch.equal(b, p) for b, p in zip(before, setup.student.parameters()))
    with pytest.raises(ValueError, match="reads 'target'"):
        Trainer(TrainConfig(epochs=1, batch_size=16, progress=False)).fit(
            build_recipe("kd", Setup(student=digits_model("student-cnn"), teacher=teacher, num_classes=10)),
            unlabelled)
    with pytest.raises(ValueError, match="no 'target' labels"):
        Trainer(TrainConfig(epochs=1, batch_size=16, progress=False)).fit(
            build_recipe("bake", Setup(student=digits_model("student-cnn"), num_classes=10)), unlabelled)
