"""Test-set evaluation (kdkernels.distill.task_metrics, kdkernels.distill.evaluation): each task metric against a
hand computation, the same value however the test set is split (as data-parallel ranks merge their sums, and
under real DDP), the keys a run reports in its history, metrics.json, RunResult and ``kdkernels distill --json``,
the teacher rule, and the errors."""
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

from kdkernels import cli
from kdkernels.distill import task_metrics
from kdkernels.distill.cache import cache_teacher
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.environment import Environment, set_up_environment
from kdkernels.distill.evaluation import Evaluator, teacher_of
from kdkernels.distill.metrics import plot_curves
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.task_metrics import Classification, LanguageModel, MeanIoU
from kdkernels.distill.terms import CrossEntropyTerm
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, kd_recipe, small_split

SUMMARY_KEYS = ("nll", "ece", "teacher_agreement", "teacher_kl")


def computed(metric, output, target, teacher=None):
    metric.update(output, target, teacher)
    return metric.compute()


# ------------------------------------------------------------------------------------------- against hand values

def test_classification_accuracy_nll_and_ece_with_known_bins():
    probabilities = torch.tensor([[0.95, 0.03, 0.02],    # conf 0.95, bin 14 (14/15, 1], right
                                  [0.02, 0.95, 0.03],    # conf 0.95, bin 14, wrong
                                  [0.90, 0.05, 0.05],    # conf 0.90, bin 13 (13/15, 14/15], right
                                  [0.50, 0.30, 0.20],    # conf 0.50, bin 7 (7/15, 8/15], wrong
                                  [0.20, 0.50, 0.30],    # conf 0.50, bin 7, right
                                  [0.35, 0.33, 0.32]],   # conf 0.35, bin 5 (5/15, 6/15], wrong
                                 dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = probabilities.log().float() + 3.0            # any shift: the same softmax
    values = computed(Classification(), logits, target)
    # ECE = sum_b |B_b|/n |acc_b - conf_b| = 2/6·|0.5 − 0.95| + 1/6·|1 − 0.9| + 2/6·|0.5 − 0.5| + 1/6·|0 − 0.35|
    assert values["ece"] == pytest.approx(2 / 6 * 0.45 + 1 / 6 * 0.1 + 0 + 1 / 6 * 0.35, rel=1e-6)
    assert values["acc"] == pytest.approx(50.0)
    assert values["nll"] == pytest.approx(float(F.cross_entropy(logits.double(), target)), rel=1e-12)
    assert set(values) == {"acc", "nll", "ece"}


def guo_ece(logits: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float:
    """Guo et al.'s _ECELoss, transcribed: bins (lower, upper], |B|/n · |acc − conf| summed."""
    confidences, predictions = F.softmax(logits.double(), dim=1).max(dim=1)
    accuracies = predictions.eq(target)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = confidences.gt(lower) & confidences.le(upper)
        if in_bin.any():
            share = in_bin.double().mean()
            ece += float(share * (accuracies[in_bin].double().mean() - confidences[in_bin].mean()).abs())
    return ece


def test_classification_with_a_teacher_against_torch():
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(50, 7, generator=generator) * 2 for _ in range(2))
    target = torch.randint(0, 7, (50,), generator=generator)
    values = computed(Classification(), student, target, teacher)
    log_s, log_t = F.log_softmax(student.double(), dim=1), F.log_softmax(teacher.double(), dim=1)
    assert values["teacher_kl"] == pytest.approx(
        float(F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")), rel=1e-12)
    agreement = (student.argmax(1) == teacher.argmax(1)).double().mean()
    assert values["agreement"] == pytest.approx(100.0 * float(agreement))
    assert values["acc"] == pytest.approx(100.0 * float((student.argmax(1) == target).double().mean()))
    assert values["nll"] == pytest.approx(float(F.cross_entropy(student.double(), target)), rel=1e-12)
    assert values["ece"] == pytest.approx(guo_ece(student, target), rel=1e-9, abs=1e-12)
    assert list(values) == ["acc", "nll", "ece", "agreement", "teacher_kl"]


def test_teacher_kl_skips_classes_the_teacher_rules_out():
    """A top-k teacher's -inf logits have p_t = 0: they add nothing to KL(p_t ‖ p_s)."""
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[2.0, 1.0, -math.inf]])
    values = computed(Classification(), student, torch.tensor([0]), teacher)
    p_t = F.softmax(teacher.double()[:, :2], dim=1)
    log_s = F.log_softmax(student.double(), dim=1)[:, :2]
    assert values["teacher_kl"] == pytest.approx(float((p_t * (p_t.log() - log_s)).sum()), rel=1e-12)


def one_hot_logits(prediction: torch.Tensor, classes: int) -> torch.Tensor:
    """[N, H, W] predicted classes -> [N, C, H, W] logits whose argmax they are."""
    return F.one_hot(prediction, classes).permute(0, 3, 1, 2).float() * 5.0


def test_mean_iou_against_a_hand_confusion_matrix():
    target = torch.tensor([[[0, 0, 1], [2, 255, 1]],
                           [[255, 255, 2], [255, 255, 255]]])
    prediction = torch.tensor([[[0, 1, 1], [2, 2, 0]],
                               [[1, 1, 3], [0, 0, 0]]])
    # Valid pixels (target, prediction): (0,0) (0,1) (1,1) (2,2) (1,0) | (2,3); ignored pixels count nowhere.
    confusion = torch.tensor([[1, 1, 0, 0],
                              [1, 1, 0, 0],
                              [0, 0, 1, 1],
                              [0, 0, 0, 0]], dtype=torch.float64)
    metric = MeanIoU()
    values = computed(metric, one_hot_logits(prediction, 5), target)   # class 4: in neither, left out
    assert torch.equal(metric.sums["confusion"][:4, :4], confusion) and metric.sums["confusion"][4].sum() == 0
    # IoU_c = tp / (target count + prediction count − tp): class 0: 1/3, class 1: 1/3, class 2: 1/2, class 3 (only
    # predicted): 0/1; class 4 (absent from both) is not averaged.
    assert values == {"miou": pytest.approx(100.0 * (1 / 3 + 1 / 3 + 1 / 2 + 0.0) / 4)}
    assert computed(MeanIoU(ignore_index=0), one_hot_logits(prediction, 5)[:1, :, :1, :1],
                    torch.zeros(1, 1, 1, dtype=torch.long)) == {"miou": None}


def test_language_model_token_accuracy_and_perplexity():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=generator)
    target = torch.randint(0, 11, (3, 6), generator=generator)
    target[0, :2] = target[2, 5] = -100
    values = computed(LanguageModel(), logits, target)
    expected = math.exp(float(F.cross_entropy(logits.double().flatten(0, 1), target.flatten(), ignore_index=-100)))
    assert values["ppl"] == pytest.approx(expected, rel=1e-12)
    kept = target != -100
    correct = sum(int(logits[n, i].argmax() == target[n, i]) for n in range(3) for i in range(6) if kept[n, i])
    assert values["token_acc"] == pytest.approx(100.0 * correct / int(kept.sum()))


# ------------------------------------------------------------------------------------------------ split batches

def split_cases():
    generator = torch.Generator().manual_seed(2)
    classification = (Classification, torch.randn(30, 5, generator=generator) * 3,
                      torch.randint(0, 5, (30,), generator=generator), torch.randn(30, 5, generator=generator))
    segmentation_target = torch.randint(0, 4, (30, 3, 3), generator=generator)
    segmentation_target[::4, 0] = 255
    segmentation = (MeanIoU, torch.randn(30, 4, 3, 3, generator=generator), segmentation_target, None)
    tokens = torch.randint(0, 9, (30, 4), generator=generator)
    tokens[::3, -1] = -100
    language = (LanguageModel, torch.randn(30, 4, 9, generator=generator), tokens, None)
    return {"classification": classification, "miou": segmentation, "language_model": language}


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("name", list(split_cases()))
def test_a_metric_over_split_batches_equals_it_over_the_whole(name, parts):
    """Each part is a rank's share (every parts-th sample); merging the parts' sums is what the all-reduce does."""
    factory, output, target, teacher = split_cases()[name]
    whole = computed(factory(), output, target, teacher)
    shares = []
    for rank in range(parts):
        share = factory()
        share.update(output[rank::parts], target[rank::parts], teacher[rank::parts] if teacher is not None else None)
        shares.append(share)
    merged = shares[0]
    for share in shares[1:]:
        merged.merge(share)
    assert merged.compute() == pytest.approx(whole, rel=1e-12)
    assert all(value is not None for value in whole.values())


# ------------------------------------------------------------------------------------------------- the trainer

def test_a_run_reports_the_metrics_in_history_metrics_json_and_result(tmp_path):
    split = small_split()
    recipe = kd_recipe()
    result = Trainer(TrainConfig(epochs=2, batch_size=32, out_dir=tmp_path, **QUIET)).fit(recipe, split.train,
                                                                                         split.test)
    last = result.history[-1]
    keys = ["test_acc_student", "test_nll_student", "test_ece_student", "test_agreement_student",
            "test_teacher_kl_student"]
    assert [key for key in last if key.startswith("test_")] == keys
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["history"][-1]["test_nll_student"] == pytest.approx(last["test_nll_student"])
    assert saved["evaluation"] == pytest.approx({key: last[key] for key in keys})
    for summary in (saved, vars(result)):
        assert summary["accuracy"] == pytest.approx(last["test_acc_student"])
        assert summary["nll"] == pytest.approx(last["test_nll_student"]) and summary["nll"] > 0
        assert 0.0 <= summary["ece"] <= 1.0
        assert 0.0 <= summary["teacher_agreement"] <= 100.0 and summary["teacher_kl"] >= 0.0
    assert "test_ece_student" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    # The reported values are the exported student's and the teacher's on the whole test set, recomputed here.
    with torch.no_grad():
        student = result.student.eval()(split.test.inputs).double()
        teacher = recipe.stages[-1].distiller.models["teacher"].eval()(split.test.inputs).double()
    assert result.nll == pytest.approx(float(F.cross_entropy(student, split.test.targets)), rel=1e-9)
    assert result.ece == pytest.approx(guo_ece(student, split.test.targets), rel=1e-9, abs=1e-12)
    assert result.teacher_agreement == pytest.approx(100.0 * float((student.argmax(1) == teacher.argmax(1)).double()
                                                                   .mean()))
    assert result.teacher_kl == pytest.approx(float(F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1),
                                                             log_target=True, reduction="batchmean")), rel=1e-9)


def test_without_a_teacher_there_are_no_teacher_keys():
    torch.manual_seed(0)
    recipe = build_recipe("ce", Setup(student=digits_model("student-mlp"), num_classes=10))
    result = Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(recipe, small_split().train,
                                                                        small_split().test)
    assert [key for key in result.history[-1] if key.startswith("test_")] == [
        "test_acc_student", "test_nll_student", "test_ece_student"]
    assert result.teacher_agreement is None and result.teacher_kl is None
    assert result.nll > 0 and 0.0 <= result.ece <= 1.0


def test_without_a_test_set_every_metric_is_none():
    result = Trainer(TrainConfig(epochs=1, batch_size=32, **QUIET)).fit(kd_recipe(), small_split().train)
    assert all(getattr(result, key) is None for key in SUMMARY_KEYS) and result.evaluation == {}


def test_the_teacher_rule():
    """The model named "teacher", not compared with itself; none for multi-teacher names or a cached teacher."""
    torch.manual_seed(0)
    student, teacher = digits_model("student-mlp"), digits_model("student-mlp")
    online = Distiller({"student": student, "teacher": teacher}, [CrossEntropyTerm("student")],
                       trainable=("student", "teacher"), evaluate=("student", "teacher"))
    evaluator = Evaluator(small_split().test, Environment(torch.device("cpu"), 0, 1), batch_size=200, num_workers=0,
                          amp_dtype=None)
    row = evaluator(online)
    assert {"test_agreement_student", "test_teacher_kl_student", "test_acc_teacher", "test_ece_teacher"} <= set(row)
    assert "test_agreement_teacher" not in row and "test_teacher_kl_teacher" not in row
    several = Distiller({"student": student, "teacher1": teacher, "teacher2": teacher}, [CrossEntropyTerm("student")])
    assert teacher_of(several) is None and not any("agreement" in key for key in evaluator(several))
    cached = Distiller({"student": student, "teacher": cache_teacher(teacher, small_split().train)},
                       [CrossEntropyTerm("student")])
    assert teacher_of(cached) is None and set(evaluator(cached)) == {
        "test_acc_student", "test_nll_student", "test_ece_student"}
    assert teacher.training and student.training       # eval mode only while evaluating


def test_the_cli_json_summary_has_the_metrics(tmp_path):
    common = ["--epochs", "1", "--teacher-epochs", "1", "--train-size", "60", "--student", "student-mlp",
              "--no-progress"]
    assert cli.main(["distill", "--method", "kd", "--teacher", "student-mlp", *common,
                     "--json", str(tmp_path / "kd.json")]) == 0
    assert cli.main(["distill", "--method", "ce", *common, "--json", str(tmp_path / "ce.json")]) == 0
    kd, ce = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("kd", "ce"))
    assert kd["nll"] > 0 and 0.0 <= kd["ece"] <= 1.0
    assert 0.0 <= kd["teacher_agreement"] <= 100.0 and kd["teacher_kl"] >= 0.0
    assert kd["history"][-1]["test_agreement_student"] == pytest.approx(kd["teacher_agreement"])
    assert ce["nll"] > 0 and ce["teacher_agreement"] is None and ce["teacher_kl"] is None
    assert {"accuracy", "best_accuracy", "accuracies", *SUMMARY_KEYS} <= set(kd) & set(ce)


def test_curves_without_calibration_metrics(tmp_path):
    rows = [{"stage_index": 0, "stage": "seg", "epoch": 1, "train_loss": 1.0, "test_miou_student": 40.0}]
    assert plot_curves(rows, tmp_path / "curves.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------- DDP

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluation_rows(env: Environment) -> list[dict]:
    """The same distiller evaluated on the whole test split and on a 1-sample one (rank 1 of 2 sees nothing)."""
    torch.manual_seed(0)
    distiller = Distiller({"student": digits_model("student-mlp"), "teacher": digits_model("student-mlp")},
                          [CrossEntropyTerm("student")])
    test = small_split().test
    one = torch.utils.data.Subset(test, [3])
    return [Evaluator(data, env, batch_size=64, num_workers=0, amp_dtype=None)(distiller) for data in (test, one)]


def ddp_evaluation_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        torch.save(evaluation_rows(set_up_environment("cpu")), os.path.join(out_dir, f"rows{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_ranks_report_the_whole_test_sets_metrics(tmp_path):
    importlib.import_module("torch._dynamo")   # as test_trainer_distributed.py: imported once, before forking
    mp.start_processes(ddp_evaluation_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = evaluation_rows(Environment(torch.device("cpu"), 0, 1))
    assert len(single[0]) == 5 and single[0]["test_ece_student"] > 0
    for rank in range(2):
        for ddp_row, row in zip(torch.load(tmp_path / f"rows{rank}.pt"), single):
            assert ddp_row == pytest.approx(row, rel=1e-9, abs=1e-12)


# -------------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("metrics, error, match", [
    (("mIoU",), ValueError, r"unknown task metric 'mIoU' \(did you mean 'miou'\?\)"),
    (("classification", "classification"), ValueError, "repeated"),
    ((), ValueError, "at least one"),
    ("classification", TypeError, "metrics must be a list or tuple"),
    ((1,), TypeError, "metric names"),
])
def test_bad_metrics_option(metrics, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(metrics=metrics)


@pytest.mark.parametrize("metric, output, target, error, match", [
    (Classification, torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ValueError,
     r"task metric 'classification': outputs must have shape \[N, C\] \(logits\), got shape \(2, 3, 4, 4\)"),
    (MeanIoU, torch.randn(2, 3), torch.zeros(2, dtype=torch.long), ValueError,
     r"task metric 'miou': outputs must have shape \[N, C, H, W\] \(logits\), got shape \(2, 3\)"),
    (LanguageModel, torch.randn(2, 3), torch.zeros(2, dtype=torch.long), ValueError,
     r"task metric 'language_model': outputs must have shape \[N, L, V\] \(logits\), got shape \(2, 3\)"),
    (Classification, torch.randn(2, 3), torch.zeros(3, dtype=torch.long), ValueError, r"targets must have shape \[N\]"),
    (Classification, torch.randn(2, 3), torch.tensor([0, 3]), ValueError, r"class indices in \[0, 3\), got 3"),
    (MeanIoU, torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7), ValueError, r"\[0, 3\) or 255, got 7"),
    (Classification, torch.randn(2, 3), torch.zeros(2), TypeError, "targets must be an integer tensor"),
    (Classification, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), TypeError, "float logits"),
])
def test_bad_outputs_and_targets_name_the_metric(metric, output, target, error, match):
    with pytest.raises(error, match=match):
        metric().update(output, target)


def test_bad_teacher_outputs_and_registrations():
    with pytest.raises(ValueError, match=r"teacher outputs must have the outputs' shape \(2, 3\), got shape \(2, 4\)"):
        Classification().update(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(TypeError, match="name"):
        task_metrics.register("", MeanIoU)
    with pytest.raises(TypeError, match="factory"):
        task_metrics.register("miou-void0", None)


def test_a_metric_that_does_not_fit_the_models_outputs_fails_naming_it():
    config = TrainConfig(epochs=1, batch_size=32, metrics=("miou",), **QUIET)
    with pytest.raises(ValueError, match=r"task metric 'miou': outputs must have shape \[N, C, H, W\].*\(256, 10\)"):
        Trainer(config).fit(kd_recipe(), small_split().train, small_split().test)


def test_registered_metrics_are_selectable():
    task_metrics.register("miou-void0", lambda: MeanIoU(ignore_index=0))
    try:
        assert TrainConfig(metrics=("classification", "miou-void0")).metrics == ("classification", "miou-void0")
        assert task_metrics.build(["miou-void0"])[0].ignore_index == 0
    finally:
        del task_metrics.METRICS["miou-void0"]


# ------------------------------------------------------------------------------------------ representation metrics

def test_knn_is_dinos_weighted_vote():
    """facebookresearch/dino eval_knn.py knn_classifier, written out for one query."""
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2], [0.2, 0.9]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 2])
    queries = torch.tensor([[1.0, 0.05], [0.1, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([1, 2, 2])
    metric = task_metrics.KNN(k=3, temperature=0.5)
    metric.fit(bank, labels)
    metric.update(queries, targets)
    normalised_bank = bank / bank.norm(dim=1, keepdim=True)
    expected_correct = 0
    for query, target in zip(queries, targets):
        similarity = normalised_bank @ (query / query.norm())
        top = similarity.topk(3)
        votes = torch.zeros(3, dtype=torch.float64)
        for s, i in zip(top.values, top.indices):
            votes[labels[i]] += math.exp(s / 0.5)
        expected_correct += int(votes.argmax() == target)
    assert metric.compute() == {"knn_acc": 100.0 * expected_correct / 3}
    assert 0 < expected_correct < 3, "the example should have a right and a wrong vote"


def test_linear_probe_reaches_the_regularised_optimum_and_separates_separable_data():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=generator, dtype=torch.float64) * 4
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + torch.randn(60, 5, generator=generator, dtype=torch.float64) * 0.3
    metric = task_metrics.LinearProbe(weight_decay=1e-2)
    metric.fit(features, labels)
    x = (features - metric.mean) / metric.scale
    weight, bias = metric.weight.clone().requires_grad_(), metric.bias.clone().requires_grad_()
    gradients = torch.autograd.grad(metric.objective(x, labels, weight, bias), (weight, bias))
    assert max(float(g.abs().max()) for g in gradients) < 1e-7, "first-order optimality of mean CE + λ/2 |W|²"
    metric.update(features.float(), labels)
    assert metric.compute() == {"probe_acc": 100.0}


def test_a_run_reports_knn_and_linear_probe_accuracies():
    recipe = kd_recipe(student="student-cnn", teacher="student-cnn")
    result = Trainer(TrainConfig(epochs=1, batch_size=16, metrics=("classification", "knn", "linear_probe"),
                                 **QUIET)).fit(recipe, small_split().train, small_split().test)
    last = result.history[-1]
    assert 0.0 <= last["test_knn_acc_student"] <= 100.0 and 0.0 <= last["test_probe_acc_student"] <= 100.0
    assert result.evaluation["test_knn_acc_student"] == last["test_knn_acc_student"]


def test_a_recipes_own_metrics_join_the_runs():
    recipe = kd_recipe(student="student-cnn", teacher="student-cnn")
    recipe.metrics = ("knn", "classification")
    assert recipe.evaluation_metrics(("classification",)) == ("classification", "knn")
    result = Trainer(TrainConfig(epochs=1, batch_size=16, **QUIET)).fit(recipe, small_split().train,
                                                                       small_split().test)
    assert 0.0 <= result.evaluation["test_knn_acc_student"] <= 100.0 and "test_acc_student" in result.evaluation
    with pytest.raises(ValueError, match=r"metrics: unknown task metric 'probe'"):
        Recipe("kd", recipe.stages, metrics=("probe",))
    with pytest.raises(TypeError, match="metrics must be a list or tuple"):
        Recipe("kd", recipe.stages, metrics="knn")


def test_the_cli_metrics_option_reaches_the_json_summary(tmp_path):
    assert cli.main(["distill", "--method", "ce", "--epochs", "1", "--train-size", "60", "--no-progress",
                     "--metrics", "classification,knn", "--json", str(tmp_path / "ce.json")]) == 0
    summary = json.loads((tmp_path / "ce.json").read_text())
    assert 0.0 <= summary["evaluation"]["test_knn_acc_student"] <= 100.0 and summary["nll"] > 0


def test_representation_metrics_need_an_embedding_and_a_training_set():
    env = set_up_environment("cpu")
    distiller = Distiller({"student": torch.nn.Linear(64, 10)}, [CrossEntropyTerm("student")])
    split = small_split()
    with pytest.raises(ValueError, match="representation metrics of model 'student': cannot tell where the features"):
        Evaluator(split.test, env, batch_size=16, num_workers=0, amp_dtype=None, metrics=("knn",),
                  train_set=split.train)(distiller)
    with pytest.raises(ValueError, match="need the training set"):
        Evaluator(split.test, env, batch_size=16, num_workers=0, amp_dtype=None, metrics=("knn",))(distiller)
    with pytest.raises(ValueError, match="task metric 'knn': k must be"):
        task_metrics.KNN(k=0)
