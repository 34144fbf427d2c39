"""Checkpoints and resume (kdkernels.distill.checkpoint): a run resumed from its checkpoint, in one stage, across
stages and with a pruned teacher, equals the uninterrupted run bit for bit; resume errors name the problem."""
import pytest
import torch

from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import (QUIET, assert_resume_is_exact, assert_same_run, assert_same_run_models, kd_recipe,
                             run_in_pieces, small_split)


def two_stage_recipe(seed: int = 0) -> Recipe:
    """Stage 1 trains a model on labels (2 epochs); stage 2 distils it, now frozen, into a second model. Input
    dropout makes training draw from torch's RNG, which a resume must restore."""
    torch.manual_seed(seed)
    first, second = (torch.nn.Sequential(torch.nn.Dropout(0.2), digits_model("student-mlp")) for _ in range(2))
    teacher_stage = build_recipe("ce", Setup(student=first, num_classes=10)).stages[0]
    teacher_stage.name, teacher_stage.epochs = "teacher", 2
    student_stage = build_recipe("kd", Setup(student=second, teacher=first, num_classes=10)).stages[0]
    return Recipe("two-stage", [teacher_stage, student_stage])


RESUME_CONFIG = dict(epochs=3, batch_size=16, lr=0.05, warmup_epochs=1, mixup_alpha=0.4, **QUIET)


def test_resume_continues_a_one_stage_run_identically(tmp_path):
    _, resumed, _, _ = assert_resume_is_exact(kd_recipe, RESUME_CONFIG, tmp_path)
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
