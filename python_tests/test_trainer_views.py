"""Views and per-model inputs (kdkernels.distill.views, Distiller(inputs=..., views=...)): each transform against a
hand computation, draws that are functions of (seed, epoch, step, index) alone, views in the trainer (a teacher
reading a rotated view, resume, DDP), evaluation through the same inputs, the cached teacher, and the errors."""
import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels import distill
from kdkernels.distill.cache import cache_teacher
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Stage
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term
from kdkernels.distill.trainer import TrainConfig, Trainer
from kdkernels.distill.views import (CutMix, Downsample, Draws, GaussianNoise, HorizontalFlip, MixUp, RandomCrop,
                                     Rotate90, View, apply_views)
from test_trainer_distributed import free_port
from trainer_testing import (QUIET, assert_resume_is_exact, assert_same_run, run_in_pieces, small_split,
                             without_timings)

KEY = dict(seed=3, epoch=2, step=5)


def images(rows: int = 16, channels: int = 2, size: int = 6, seed: int = 0) -> dict:
    """A batch of distinct random images whose dataset indices are not their positions."""
    generator = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(rows, channels, size, size, generator=generator),
            "index": torch.arange(rows) * 7 + 3}


def viewed(transform, batch=None, output="out", **key):
    batch = batch or images()
    return batch, apply_views([View("input", output, transform)], batch, **(key or KEY))


# ------------------------------------------------------------------------------------------- each transform

def test_rotate90_is_torch_rot90_by_the_stored_label():
    batch, out = viewed(Rotate90(label="rot_label"))
    labels = out["rot_label"]
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2, 3}
    for b in range(len(labels)):
        assert torch.equal(out["out"][b], torch.rot90(batch["input"][b], int(labels[b]), dims=(-2, -1)))
    assert torch.equal(out["input"], batch["input"])  # the source is untouched
    # turns: a subset; the label is the position in it.
    batch, out = viewed(Rotate90(turns=(0, 2), label="rot"))
    for b, position in enumerate(out["rot"].tolist()):
        assert torch.equal(out["out"][b], torch.rot90(batch["input"][b], (0, 2)[position], dims=(-2, -1)))
    with pytest.raises(ValueError, match="square"):
        apply_views([View("input", "r", Rotate90())], {"input": torch.zeros(2, 1, 3, 4), "index": torch.arange(2)})


def test_random_crop_is_a_zero_padded_shift():
    padding = 2
    batch, out = viewed(RandomCrop(padding=padding, label="shift"))
    padded = F.pad(batch["input"], (padding,) * 4)
    offsets = set()
    for b in range(len(batch["index"])):
        # Hand computation: the crop at offset (dy, dx) of the padded image; exactly one offset gives the output.
        matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.equal(out["out"][b], padded[b, :, dy:dy + 6, dx:dx + 6])]
        assert len(matches) == 1
        dy, dx = matches[0]
        assert out["shift"][b].tolist() == [padding - dy, padding - dx]
        offsets.add(matches[0])
    assert len(offsets) > 4   # 16 samples spread over the 25 offsets
    _, same = viewed(RandomCrop(padding=0))
    assert torch.equal(same["out"], same["input"])


def test_horizontal_flip_mirrors_the_last_dim():
    batch, out = viewed(HorizontalFlip(label="flipped"))
    flags = out["flipped"].tolist()
    assert set(flags) == {0, 1}
    for b, flag in enumerate(flags):
        assert torch.equal(out["out"][b], batch["input"][b].flip(-1) if flag else batch["input"][b])
    assert viewed(HorizontalFlip(p=1.0, label="f"))[1]["f"].tolist() == [1] * 16
    assert viewed(HorizontalFlip(p=0.0, label="f"))[1]["f"].tolist() == [0] * 16


def test_gaussian_noise_has_the_asked_statistics():
    batch = {"input": torch.full((64, 1, 16, 16), 2.0), "index": torch.arange(64)}
    _, out = viewed(GaussianNoise(std=0.5), batch)
    z = (out["out"] - 2.0) / 0.5                   # 16384 draws
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1.0) < 0.02
    assert abs(float((z.abs() < 1).float().mean()) - 0.6827) < 0.015
    flat = z.flatten(1)
    assert abs(float((flat[:, 1:] * flat[:, :-1]).mean())) < 0.03   # neighbouring pixels uncorrelated
    assert abs(float((z[1:] * z[:-1]).mean())) < 0.03              # and neighbouring samples


def test_downsample_averages_blocks_and_restores_the_shape():
    batch = images(rows=4, size=8)
    x = batch["input"]
    _, nearest = viewed(Downsample(factor=2, down="area", up="nearest"), batch)
    # Hand computation: each 2×2 block replaced by its mean.
    means = x.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2))
    expected = means.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(nearest["out"], expected, rtol=0, atol=1e-6)
    _, low = viewed(Downsample(factor=4, restore=False), batch)
    assert low["out"].shape == (4, 2, 2, 2)
    torch.testing.assert_close(low["out"], x.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2)), rtol=0, atol=1e-6)
    _, smooth = viewed(Downsample(factor=2), batch)
    assert smooth["out"].shape == x.shape
    torch.testing.assert_close(smooth["out"], F.interpolate(means, size=(8, 8), mode="bilinear",
                                                            align_corners=False), rtol=0, atol=1e-6)


def test_mixup_mixes_with_the_stored_partner_and_weight():
    batch, out = viewed(MixUp(alpha=0.4))
    x, lam, perm = batch["input"], out["mix_lam"], out["mix_perm"]
    assert lam.dtype == torch.float32 and perm.dtype == torch.int64 and lam.shape == perm.shape == (16,)
    assert sorted(perm.tolist()) == list(range(16)) and bool((perm != torch.arange(16)).all())
    mixed = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]
    torch.testing.assert_close(out["out"], mixed, rtol=0, atol=1e-6)
    assert bool(((lam > 0) & (lam < 1)).all()) and len(set(lam.tolist())) == 16   # one weight per sample


@pytest.mark.parametrize("alpha", [0.4, 1.0, 3.0])
def test_mixing_weights_are_beta_alpha_alpha(alpha):
    lam = Draws(11, torch.arange(20000)).beta(alpha)
    variance = 1.0 / (4.0 * (2.0 * alpha + 1.0))      # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(float(lam.mean()) - 0.5) < 0.01
    assert abs(float(lam.var()) - variance) < 0.05 * variance
    assert bool(((lam >= 0) & (lam <= 1)).all())


def test_cutmix_pastes_the_partners_box_and_stores_its_share():
    batch, out = viewed(CutMix(alpha=1.0, lam="cut_lam", perm="cut_perm"), images(rows=32, size=8))
    x, lam, perm = batch["input"], out["cut_lam"], out["cut_perm"]
    assert sorted(perm.tolist()) == list(range(32))
    boxes = 0
    for b in range(32):
        pasted = (out["out"][b] == x[perm[b]]).all(dim=0) & (out["out"][b] != x[b]).any(dim=0)     # [H, W]
        kept = (out["out"][b] == x[b]).all(dim=0)
        assert bool((pasted | kept).all())
        rows, cols = pasted.any(dim=1).nonzero().flatten(), pasted.any(dim=0).nonzero().flatten()
        if len(rows):
            boxes += 1
            top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            assert bool(pasted[top:bottom, left:right].all()) and int(pasted.sum()) == (bottom - top) * (right - left)
        assert float(lam[b]) == pytest.approx(1.0 - float(pasted.sum()) / 64)
    assert boxes > 16


# ---------------------------------------------------------------------------------------------- randomness

RANDOM_VIEWS = [View("input", "input_clean"),
                View("input", "input", RandomCrop(padding=1)),
                View("input", "input", HorizontalFlip()),
                View("input", "input_rot", Rotate90(label="rot_label")),
                View("input_rot", "input_noisy", GaussianNoise(0.3))]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_mixed_by_a_view_mixes_each_samples_targets_with_its_weight(label_smoothing):
    """``mean_b lam_b·CE(z_b, y_b) + (1 − lam_b)·CE(z_b, y_perm_b)`` with the view's own lam and partners (MixUp's
    criterion per sample); in evaluation mode (lam = 1, every sample its own partner) it is the plain CE."""
    batch = dict(images(), target=torch.arange(16) % 5)
    term = CrossEntropyTerm("student", mixed_by=("mix_lam", "mix_perm"), label_smoothing=label_smoothing)
    assert term.reads == ("student", "target", "mix_lam", "mix_perm")
    logits = torch.randn(16, 5, dtype=torch.float64)
    for training in (True, False):
        out = apply_views([View("input", "input_mix", MixUp(alpha=0.4))], batch, **KEY, training=training)
        lam, perm, y = out["mix_lam"].double(), out["mix_perm"], out["target"]
        expected = torch.stack([
            lam[b] * F.cross_entropy(logits[b:b + 1], y[b:b + 1], label_smoothing=label_smoothing)
            + (1 - lam[b]) * F.cross_entropy(logits[b:b + 1], y[perm[b]:perm[b] + 1], label_smoothing=label_smoothing)
            for b in range(16)]).mean()
        values = {"student": logits, **out}
        value = term({key: values[key] for key in term.reads}, distill.StepContext(batch=out))
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        if training:
            assert 0 < float(lam.min()) < 1 and not torch.equal(perm, torch.arange(16))
        else:
            torch.testing.assert_close(value, F.cross_entropy(logits, y, label_smoothing=label_smoothing))


def test_cross_entropy_mixed_by_errors_name_the_problem():
    with pytest.raises(TypeError, match="mixed_by must be a pair of batch keys"):
        CrossEntropyTerm("student", mixed_by="mix_lam")
    with pytest.raises(ValueError, match="mixed_by does not combine with rows"):
        CrossEntropyTerm("student", mixed_by=("mix_lam", "mix_perm"), rows=4)


def test_views_compose_in_order_and_a_view_without_transform_copies():
    batch = images()
    out = apply_views(RANDOM_VIEWS, batch, **KEY)
    assert torch.equal(out["input_clean"], batch["input"])
    assert not torch.equal(out["input"], batch["input"])
    crop_then_flip = apply_views(RANDOM_VIEWS[:3], batch, **KEY)["input"]     # a prefix draws what the list draws
    for b in range(16):
        assert torch.equal(out["input"][b], crop_then_flip[b])
        rotated = torch.rot90(out["input"][b], int(out["rot_label"][b]), dims=(-2, -1))
        assert torch.equal(out["input_rot"][b], rotated)
    assert not torch.equal(out["input_noisy"], out["input_rot"])


def test_draws_are_a_function_of_seed_epoch_step_and_index():
    batch = images()
    first = apply_views(RANDOM_VIEWS, batch, **KEY)
    again = apply_views(RANDOM_VIEWS, {k: v.clone() for k, v in batch.items()}, **KEY)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    for change in ({"seed": 4}, {"epoch": 3}, {"step": 6}):
        other = apply_views(RANDOM_VIEWS, batch, **{**KEY, **change})
        assert not torch.equal(other["input_noisy"], first["input_noisy"]), change
    # Two samples with the same image but different indices draw differently; the same index draws the same.
    twins = {"input": batch["input"][:1].repeat(3, 1, 1, 1), "index": torch.tensor([5, 9, 5])}
    noisy = apply_views([View("input", "noisy", GaussianNoise(1.0))], twins, **KEY)["noisy"]
    assert not torch.equal(noisy[0], noisy[1]) and torch.equal(noisy[0], noisy[2])
    # The view's position is part of the key: two identical transforms draw independently.
    two = apply_views([View("input", "a", GaussianNoise(1.0)), View("input", "b", GaussianNoise(1.0))], batch, **KEY)
    assert not torch.equal(two["a"], two["b"])


def test_a_samples_view_does_not_depend_on_its_batch():
    """Halves, a reordering, or any subset of the batch give each sample the view it gets in the whole batch: one
    process with 32 samples equals 2 ranks or 2 micro-batches of 16."""
    batch = images(rows=32)
    whole = apply_views(RANDOM_VIEWS, batch, **KEY)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    for rows in (torch.arange(16), torch.arange(16, 32), order, torch.tensor([7])):
        part = apply_views(RANDOM_VIEWS, {k: v[rows] for k, v in batch.items()}, **KEY)
        for key in whole:
            assert torch.equal(part[key], whole[key][rows]), key


def test_views_leave_the_global_generators_alone():
    state = torch.get_rng_state()
    apply_views(RANDOM_VIEWS + [View("input", "m", MixUp()), View("input", "c", CutMix(lam="l", perm="p"))],
                images(), **KEY)
    assert torch.equal(torch.get_rng_state(), state)


def test_evaluation_mode_is_the_identity_for_random_views_and_keeps_deterministic_ones():
    batch = images(size=8)
    views = RANDOM_VIEWS + [View("input", "mixed", MixUp()), View("input", "low", Downsample(2, up="nearest"))]
    out = apply_views(views, batch, training=False)
    for key in ("input", "input_clean", "input_rot", "input_noisy", "mixed"):
        assert torch.equal(out[key], batch["input"]), key
    assert out["rot_label"].tolist() == [0] * 16
    assert out["mix_lam"].tolist() == [1.0] * 16 and out["mix_perm"].tolist() == list(range(16))
    torch.testing.assert_close(out["low"], apply_views(views[-1:], batch, **KEY)["low"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------- views in the trainer

class Recording(nn.Module):
    """A model that records every input it is called with."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


class RecordBatch(Term):
    """A zero loss that records the batch values it reads."""

    def __init__(self, *keys):
        super().__init__("record", ("student", *keys), weight=0.0)
        self.records = []

    def loss(self, student, *values, context):
        self.records.append([value.detach().clone() for value in values] + [context.step])
        return student.sum() * 0.0


def rotation_recipe(seed: int = 0, record: bool = False) -> Recipe:
    """KD from a teacher that reads a rotated view; the student reads the shifted, flipped, noisy input."""
    torch.manual_seed(seed)
    teacher = Recording(digits_model("student-mlp")) if record else digits_model("student-mlp")
    terms = [CrossEntropyTerm("student"), FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"),
                                                       temperature=4.0)]
    if record:
        terms.append(RecordBatch("input_clean", "rot_label", "index"))
    views = [View("input", "input_clean"), View("input", "input", RandomCrop(1)),
             View("input", "input", HorizontalFlip()), View("input", "input", GaussianNoise(0.1)),
             View("input_clean", "input_rot", Rotate90(label="rot_label"))]
    distiller = Distiller({"student": digits_model("student-mlp"), "teacher": teacher}, terms, views=views,
                          inputs={"teacher": "input_rot"})
    return Recipe("rotation", [Stage("rotation", distiller)])


def test_a_teacher_reading_a_rotated_view_sees_the_rotated_clean_inputs():
    split = small_split()
    recipe = rotation_recipe(record=True)
    Trainer(TrainConfig(epochs=2, batch_size=32, **QUIET)).fit(recipe, split.train)
    distiller = recipe.stages[0].distiller
    teacher, record = distiller.models["teacher"], distiller.terms[-1]
    seen = teacher.seen[1:]                     # the first call is Distiller.build's sizing pass
    assert len(seen) == len(record.records) == 4
    labels = set()
    for x, (clean, rot_label, index, step) in zip(seen, record.records):
        torch.testing.assert_close(clean, split.train.inputs[index], rtol=0, atol=0)
        for b in range(len(index)):
            assert torch.equal(x[b], torch.rot90(clean[b], int(rot_label[b]), dims=(-2, -1)))
        labels |= set(rot_label.tolist())
    assert labels == {0, 1, 2, 3}
    # The step's draws: the same sample draws anew in the next epoch.
    first, third = record.records[0], record.records[2]
    common = [i for i in first[2].tolist() if i in third[2].tolist()]
    assert common
    assert any(int(first[1][first[2].tolist().index(i)]) != int(third[1][third[2].tolist().index(i)])
               for i in common)


VIEWS_RESUME_CONFIG = dict(epochs=3, batch_size=16, lr=0.05, warmup_epochs=1, mixup_alpha=0.4, **QUIET)


def test_resume_with_views_continues_identically(tmp_path):
    assert_resume_is_exact(rotation_recipe, VIEWS_RESUME_CONFIG, tmp_path)


def mixing_recipe(seed: int = 0) -> Recipe:
    torch.manual_seed(seed)
    views = [View("input", "input", CutMix(alpha=1.0)), View("input", "input", MixUp(alpha=0.4, lam="l", perm="p"))]
    distiller = Distiller({"student": digits_model("student-mlp")}, [CrossEntropyTerm("student", mixed_by=("l", "p"))],
                          views=views)
    return Recipe("mixing", [Stage("mixing", distiller)])


def test_resume_with_mixing_views_continues_identically(tmp_path):
    config = dict(epochs=2, batch_size=16, lr=0.05, **QUIET)
    assert_resume_is_exact(mixing_recipe, config, tmp_path)


def mean_teacher_recipe(seed: int = 0) -> Recipe:
    """Mean teacher on two views: the student reads one noisy, shifted view, its EMA another."""
    torch.manual_seed(seed)
    views = [View("input", "input_view1", GaussianNoise(0.2)), View("input_view1", "input_view1", RandomCrop(1)),
             View("input", "input_view2", GaussianNoise(0.2)), View("input_view2", "input_view2", RandomCrop(1))]
    terms = [CrossEntropyTerm("student"), FunctionTerm("consistency", F.mse_loss, ("student", "teacher"))]
    distiller = Distiller({"student": digits_model("student-mlp")}, terms,
                          updates={"teacher": distill.EMA("student", momentum=0.9)}, views=views,
                          inputs={"student": "input_view1", "teacher": "input_view2"})
    return Recipe("mean-teacher", [Stage("mean-teacher", distiller)])


def test_views_with_a_moving_average_teacher_resume_identically(tmp_path):
    config = dict(epochs=2, batch_size=16, lr=0.05, **QUIET)
    reference_recipe = mean_teacher_recipe(seed=1)
    assert reference_recipe.stages[0].distiller.inputs == {"student": "input_view1", "teacher": "input_view2"}
    reference = Trainer(TrainConfig(out_dir=tmp_path / "whole", **config)).fit(
        reference_recipe, small_split().train, small_split().test)
    assert reference.history[-1]["consistency"] > 0
    resumed, resumed_recipe = run_in_pieces(mean_teacher_recipe, config, [1, 5], tmp_path / "pieces")
    assert_same_run(resumed, resumed_recipe, reference, reference_recipe)


DDP_VIEWS_CONFIG = dict(epochs=2, lr=0.1, **QUIET)


def ddp_views_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        recipe = rotation_recipe()
        result = Trainer(TrainConfig(batch_size=8, grad_accum=2, **DDP_VIEWS_CONFIG)).fit(
            recipe, small_split().train, small_split().test)
        torch.save({"student": recipe.stages[0].distiller.models["student"].state_dict(),
                    "history": without_timings(result.history)}, os.path.join(out_dir, f"views{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_with_views_equals_one_process_with_the_whole_batch(tmp_path):
    """Each rank takes 16 of a step's 32 samples in two micro-batches of 8; every sample draws its views from its
    index, so the run equals one process with batches of 32."""
    importlib.import_module("torch._dynamo")
    mp.start_processes(ddp_views_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"views{rank}.pt") for rank in range(2)]
    single_recipe = rotation_recipe()
    single = Trainer(TrainConfig(batch_size=32, **DDP_VIEWS_CONFIG)).fit(single_recipe, small_split().train,
                                                                         small_split().test)
    for rank in ranks:
        for name, value in single_recipe.stages[0].distiller.models["student"].state_dict().items():
            torch.testing.assert_close(rank["student"][name], value, rtol=1e-5, atol=1e-6)
        for ddp_row, row in zip(rank["history"], without_timings(single.history)):
            assert ddp_row["train_loss"] == pytest.approx(row["train_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------ per-model inputs

def test_evaluation_reads_each_models_input_through_the_views():
    """A student trained on 2× down-sampled inputs is tested on down-sampled test inputs; a teacher reading a
    random rotation is tested on the unrotated ones (random views are the identity in evaluation)."""
    split = small_split()
    torch.manual_seed(0)
    student, teacher = Recording(digits_model("student-mlp")), Recording(digits_model("student-mlp"))
    distiller = Distiller({"student": student, "teacher": teacher},
                          [CrossEntropyTerm("student"), FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"))],
                          views=[View("input", "input_low", Downsample(2, up="nearest")),
                                 View("input", "input_rot", Rotate90())],
                          inputs={"student": "input_low", "teacher": "input_rot"})
    result = Trainer(TrainConfig(epochs=1, batch_size=64, eval_batch_size=1000, **QUIET)).fit(
        Recipe("low", [Stage("low", distiller)]), split.train, split.test)
    tested = split.test.inputs
    low = tested.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2)).repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(student.seen[-1], low, rtol=0, atol=1e-6)
    assert torch.equal(teacher.seen[-1], tested)
    with torch.no_grad():
        accuracy = 100.0 * float((student.model(low).argmax(1) == split.test.targets).float().mean())
    assert result.accuracy == pytest.approx(accuracy)


class BatchReader(nn.Module):
    """A model that reads the whole batch (and uses a view's output from it)."""

    def __init__(self):
        super().__init__()
        self.body = digits_model("student-mlp")

    def forward(self, batch):
        assert isinstance(batch, dict) and "index" in batch
        return self.body(batch["input_clean"])


def test_the_batch_sentinel_and_the_cached_teacher():
    split = small_split()
    torch.manual_seed(0)
    cached = cache_teacher(digits_model("student-mlp"), split.train)
    assert cached.distill_input == distill.BATCH
    # A cached teacher (its default input is the batch) with a student on augmented inputs.
    distiller = Distiller({"student": digits_model("student-mlp"), "teacher": cached}, kd_terms(),
                          views=[View("input", "input", RandomCrop(1))])
    assert distiller.inputs == {"student": "input", "teacher": distill.BATCH}
    result = Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(Recipe("kd", [Stage("kd", distiller)]),
                                                                        split.train, split.test)
    assert result.history[-1]["kd"] > 0
    with torch.no_grad():
        rows = torch.tensor([3, 1, 4])
        assert torch.equal(distiller.models["teacher"](distiller.model_input("teacher", {"index": rows})),
                           cached.logits[rows])
    # Any model may read the batch through inputs.
    reader = Distiller({"student": BatchReader()}, [CrossEntropyTerm("student")],
                       views=[View("input", "input_clean")], inputs={"student": distill.BATCH})
    Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(Recipe("reader", [Stage("reader", reader)]),
                                                                split.train, split.test)


def two_models():
    return {"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp")}


def kd_terms():
    return [CrossEntropyTerm("student"), FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"))]


def test_an_input_naming_no_batch_key_fails_at_the_first_step_listing_the_keys():
    distiller = Distiller(two_models(), kd_terms(), inputs={"teacher": "input_clean"})
    with pytest.raises(ValueError, match=r"model 'teacher' reads batch key 'input_clean'.*keys are "
                                         r"\['index', 'input', 'target'\]"):
        Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(Recipe("x", [Stage("x", distiller)]),
                                                                    small_split().train)
    viewed_distiller = Distiller(two_models(), kd_terms(), inputs={"teacher": "input_rot"},
                                 views=[View("input", "input_rot", Rotate90())])
    batch = next(iter(torch.utils.data.DataLoader(small_split().train, batch_size=4)))
    viewed_distiller.build(batch)
    with pytest.raises(ValueError, match="written by the distiller's views: apply them first"):
        viewed_distiller(batch)
    viewed_distiller(viewed_distiller.apply_views(batch, seed=0, epoch=1, step=0))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(inputs={"teachr": "input"}), ValueError, r"inputs names unknown models \['teachr'\]; the models are"),
    (dict(inputs=["teacher"]), TypeError, "inputs must be a mapping"),
    (dict(inputs={"teacher": 3}), TypeError, "the input of model 'teacher' must be a batch key"),
    (dict(views=View("input", "a")), TypeError, "views must be a sequence"),
    (dict(views=[GaussianNoise()]), TypeError, "views must be a sequence"),
    (dict(views=[View("input", "a", Rotate90(label="r")), View("input", "b", HorizontalFlip(label="r"))]),
     ValueError, "each label key once"),
    (dict(views=[View("input", "r", Rotate90(label="a")), View("input", "a")]), ValueError, "each label key once"),
    (dict(views=[View("input", "teacher")]), ValueError, "must not write the keys"),
    (dict(views=[View("input", "batch")]), ValueError, "must not write the keys"),
])
def test_bad_inputs_and_views_name_the_problem(kwargs, error, message):
    with pytest.raises(error, match=message):
        Distiller(two_models(), kd_terms(), **kwargs)


@pytest.mark.parametrize("build, error, message", [
    (lambda: View(1, "a"), TypeError, "View: source must be a str"),
    (lambda: View("input", ""), ValueError, "View: output must be a non-empty batch key"),
    (lambda: View("input", "index"), ValueError, "View: output must not be one of"),
    (lambda: View("input", "a", F.relu), TypeError, "View: transform must be"),
    (lambda: Rotate90(turns=(0, 4)), ValueError, r"Rotate90: turns must be an int in \[0, 3\]"),
    (lambda: Rotate90(turns=(1, 1)), ValueError, "Rotate90: turns must be distinct"),
    (lambda: Rotate90(label="target"), ValueError, "Rotate90: label must not be one of"),
    (lambda: RandomCrop(padding=-1), ValueError, "RandomCrop: padding must be an int >= 0"),
    (lambda: RandomCrop(padding=1.5), TypeError, "RandomCrop: padding must be an int"),
    (lambda: HorizontalFlip(p=2), ValueError, r"HorizontalFlip: p must be in \[0, 1\]"),
    (lambda: GaussianNoise(std=-1), ValueError, "GaussianNoise: std must be >= 0"),
    (lambda: Downsample(factor=0), ValueError, "Downsample: factor must be an int >= 1"),
    (lambda: Downsample(up="linear"), ValueError, "Downsample: up must be one of"),
    (lambda: MixUp(alpha=0), ValueError, "MixUp: alpha must be positive"),
    (lambda: CutMix(lam="x", perm="x"), ValueError, "CutMix: perm must differ from lam"),
])
def test_bad_view_arguments_name_the_problem(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_bad_view_sources_name_the_problem():
    batch = images()
    with pytest.raises(ValueError, match=r"reads batch key 'input_x'.*keys are \['index', 'input'\]"):
        apply_views([View("input_x", "a")], batch, **KEY)
    with pytest.raises(ValueError, match=r"batch\['index'\]"):
        apply_views([View("input", "a", GaussianNoise())], {"input": batch["input"]}, **KEY)
    with pytest.raises(ValueError, match="Downsample: factor must be at most"):
        apply_views([View("input", "a", Downsample(8))], batch, **KEY)
    with pytest.raises(ValueError, match="RandomCrop: the source must have at least 3 dims"):
        apply_views([View("input", "a", RandomCrop())], {"input": torch.zeros(4, 3), "index": torch.arange(4)})
