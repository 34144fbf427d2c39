"""``kdkernels distill`` on the user's data and models: a ``module:function`` dataset, published teacher weights
loaded (reported, not trained), a per-class ``--train-size`` subset re-indexed for index-keyed methods, and the
usage errors of the data options (the datasets themselves: test_distill_datasets.py; the zoo: test_distill_zoo.py)."""
import json
import sys

import pytest
import torch

from kdkernels.cli import main
from kdkernels.distill import load_digits
from kdkernels.distill.data import stratified_subset
from kdkernels.distill.models import digits_model

FACTORY = '''
from kdkernels.distill import load_digits


def make(data_dir=None):
    split = load_digits()
    return split.train, split.test
'''
QUICK = ["--epochs", "1", "--batch-size", "32", "--no-progress"]


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "own_data.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "own_data:make"
    sys.modules.pop("own_data", None)


def test_published_teacher_weights_are_loaded_evaluated_and_not_trained(tmp_path, factory, capsys):
    torch.manual_seed(3)
    teacher = digits_model("teacher-cnn")
    torch.save({"epoch": 240, "model": teacher.state_dict(), "accuracy": 0.0}, tmp_path / "ckpt_epoch_240.pth")
    summary = tmp_path / "kd.json"
    assert main(["distill", "--method", "kd", "--dataset", factory, "--student", "student-cnn", "--teacher",
                 "teacher-cnn", "--teacher-weights", str(tmp_path / "ckpt_epoch_240.pth"), "--train-size", "60",
                 "--json", str(summary), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "loaded from" in out and "ckpt_epoch_240.pth" in out
    result = json.loads(summary.read_text())
    (loaded,) = result["teachers"]
    assert loaded["stopped"] == "loaded" and loaded["steps"] == 0
    split = load_digits()
    with torch.no_grad():
        expected = (teacher.eval()(split.test.inputs).argmax(1) == split.test.targets).float().mean().item() * 100
    assert loaded["accuracy"] == pytest.approx(expected)                    # the untrained weights' own accuracy
    assert result["experiment"]["dataset"] == "own_data:make" and result["experiment"]["train_size"] == 60


def test_index_keyed_methods_run_on_a_subset_of_a_factory_dataset(factory, tmp_path):
    """CRD's memory bank has one row per training sample: the per-class subset is re-indexed 0..N-1."""
    torch.save(digits_model("teacher-cnn").state_dict(), tmp_path / "teacher.pt")     # no teacher training here
    assert main(["distill", "--method", "crd", "--dataset", factory, "--student", "student-cnn", "--teacher",
                 "teacher-cnn", "--teacher-weights", str(tmp_path / "teacher.pt"), "--train-size", "40", "--json",
                 str(tmp_path / "c.json"), *QUICK]) == 0
    assert len(json.loads((tmp_path / "c.json").read_text())["history"]) == 1


def test_stratified_subset_keeps_each_classes_share_and_reindexes():
    train = load_digits().train
    subset = stratified_subset(train, 50, seed=1)
    assert len(subset) == 50 and [int(subset[i]["index"]) for i in range(50)] == list(range(50))
    counts = torch.bincount(torch.as_tensor(subset.labels), minlength=10)
    assert counts.sum() == 50 and int(counts.max()) - int(counts.min()) <= 1
    assert torch.equal(subset[7]["input"], train[int(subset.positions[7])]["input"])
    assert list(subset.positions) == sorted(subset.positions)
    assert not torch.equal(torch.as_tensor(stratified_subset(train, 50, seed=2).positions),
                           torch.as_tensor(subset.positions))
    with pytest.raises(ValueError, match="size must be an int in"):
        stratified_subset(train, 5)


@pytest.mark.parametrize("argv, message", [
    (["--method", "kd", "--dataset", "cifar100", "--data-dir", "absent"], "--student is required"),
    (["--method", "kd", "--dataset", "cifar100", "--student", "resnet8x4"], "--teacher is required"),
    (["--method", "kd", "--dataset", "cifar100", "--student", "a", "--teacher", "b", "--data-dir", "absent"],
     "the data directory absent does not exist; expected the cifar100"),
    (["--method", "kd", "--dataset", "svhn", "--student", "a", "--teacher", "b"], "unknown dataset 'svhn'"),
    (["--method", "ce", "--teacher-weights", "w.pt"], "--teacher-weights: method 'ce' has no teacher"),
    (["--method", "kd", "--teacher-weights", "w.pt", "--reversed"], "does not combine with --reversed"),
    (["--method", "kd", "--teacher-weights", "w.pt", "--teacher-steps", "3"], "teacher_weights loads a trained"),
    (["--method", "kd", "--dataset", "own_data:make", "--student", "a", "--teacher", "b", "--imbalance-ratio",
      "10"], "imbalance_ratio applies to the digits data"),
])
def test_data_option_errors_name_the_problem(capsys, factory, argv, message):
    assert main(["distill", *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_weights_that_do_not_fit_the_teacher_are_a_clear_error(tmp_path, capsys):
    torch.save({"model": digits_model("student-cnn").state_dict()}, tmp_path / "small.pth")
    assert main(["distill", "--method", "kd", "--teacher-weights", str(tmp_path / "small.pth"), *QUICK]) == 2
    assert "small.pth do not fit DigitsCNN: " in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["cifar10", "imagefolder"])
def test_a_zoo_pair_distils_on_cifar_pickles_and_an_image_folder_from_the_command_line(tmp_path, dataset):
    """The CIFAR zoo on tiny on-disk data: a published-format teacher checkpoint (RepDistiller's {"model": ...})
    is loaded, the student is distilled one epoch and evaluated on the test split."""
    from test_distill_datasets import write_cifar10, write_image_folder

    from kdkernels.distill.models import create

    if dataset == "cifar10":
        write_cifar10(tmp_path / "data")
        options = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data")]
        classes = 10
    else:
        write_image_folder(tmp_path / "data", train_per_class=4)
        options = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size", "32"]
        classes = 3
    torch.save({"epoch": 240, "model": create("resnet14", classes).state_dict()}, tmp_path / "teacher.pth")
    summary = tmp_path / "run.json"
    assert main(["distill", "--method", "kd", *options, "--student", "resnet8", "--teacher", "resnet14",
                 "--teacher-weights", str(tmp_path / "teacher.pth"), "--epochs", "1", "--batch-size", "4",
                 "--no-progress", "--json", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["teachers"][0]["stopped"] == "loaded" and len(result["history"]) == 1
    assert 0.0 <= result["accuracy"] <= 100.0 and result["experiment"]["dataset"] == dataset
