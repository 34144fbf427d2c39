"""The trainer's run (kdkernels.distill.loop): what a fit writes and returns, when it evaluates, and the errors and
label-free data a stage meets.

Runs are tiny (MLP students on 64 digits, 1-3 epochs).
"""
import csv
import json

import pytest
import torch

from distill_testing import digits_split
from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Setup
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, kd_recipe, small_split


def accuracy_of(model, dataset) -> float:
    with torch.no_grad():
        model.eval()
        predictions = model(dataset.inputs).argmax(dim=1)
    return 100.0 * float((predictions == dataset.targets).float().mean())


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
