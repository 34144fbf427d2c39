"""``kdkernels list``, ``kdkernels distill`` for every listed method, and ``kdkernels demo --quick``."""
from __future__ import annotations

import json
import re

import pytest

from kdkernels import cli
from kdkernels.distill.registry import list_methods


def test_list_prints_every_method_with_category_and_paper(capsys, tmp_path):
    assert cli.main(["list", "--json", str(tmp_path / "methods.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    methods = list_methods()
    assert len(lines) == len(methods)
    for line, method in zip(lines, methods):
        assert line.split()[:2] == [method.name, method.category]
        assert method.paper in line
    listed = json.loads((tmp_path / "methods.json").read_text())
    assert [entry["name"] for entry in listed] == [m.name for m in methods]


def test_list_by_category(capsys):
    assert cli.main(["list", "--category", "baseline"]) == 0
    assert capsys.readouterr().out.split()[0] == "ce"


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_distill_runs_every_listed_method(method, teacher_cache, tmp_path, capsys):
    arguments = ["distill", "--method", method, "--epochs", "1", "--teacher-epochs", "1", "--train-size", "80",
                 "--batch-size", "16", "--teacher-cache", str(teacher_cache), "--no-progress",
                 "--json", str(tmp_path / "result.json")]
    if any(m.name == method and m.category == "multi-teacher" for m in list_methods()):
        arguments += ["--teachers", "2"]
    assert cli.main(arguments) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["method"] == method
    assert 0.0 <= result["accuracy"] <= 100.0
    assert result["nll"] > 0.0 and 0.0 <= result["ece"] <= 1.0
    assert result["teacher_agreement"] is None or 0.0 <= result["teacher_agreement"] <= 100.0
    assert (result["teacher_kl"] is None) == (result["teacher_agreement"] is None)
    assert f"{method}: " in capsys.readouterr().out
    if method == "byol":
        assert 0.0 <= result["evaluation"]["test_probe_acc_student"] <= 100.0, "byol's evaluation is a linear probe"


@pytest.mark.parametrize("arguments, message", [
    (["distill", "--method", "kdd"], "unknown method 'kdd'; did you mean kd"),
    (["distill", "--method", "kd", "--preset", "nope"], "no preset 'nope'"),
    (["distill", "--method", "kd", "--set", "temp=2"], r"no hyperparameter\(s\) \['temp'\]"),
    (["distill", "--method", "kd", "--set", "temperature"], "NAME=VALUE"),
    (["demo", "--methods", "ce,kdd"], "unknown method 'kdd'"),
    (["distill", "--method", "kd", "--metrics", "classification,probe"], r"--metrics: unknown task metric 'probe'"),
    (["distill", "--method", "kd", "--metrics", ","], "--metrics must name at least one task metric"),
])
def test_bad_command_lines_fail_with_a_clear_message(arguments, message, capsys):
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert re.search(message, error), error


def test_distill_overrides_reach_the_method(teacher_cache, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["distill", "--method", "kd", "--set", "temperature=2.5", "--epochs", "1", "--teacher-epochs",
                     "1", "--train-size", "60", "--teacher-cache", str(teacher_cache), "--no-progress",
                     "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["overrides"] == {"temperature": 2.5}
    assert (out / "metrics.csv").exists() and (out / "student.pt").exists()


def test_demo_quick_writes_per_seed_accuracies(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert list(report["methods"]) == ["ce", "kd", "dkd"]
    for summary in report["methods"].values():
        assert len(summary["accuracies"]) == 1 and 0.0 <= summary["accuracies"][0] <= 100.0
        assert 0.0 <= summary["loss_share"] <= 1.0
    assert (tmp_path / "demo.png").stat().st_size > 0
    table = (tmp_path / "demo.md").read_text()
    assert "| kd | response |" in table
    assert "| kd | response |" in capsys.readouterr().out


def test_demo_entries_may_name_a_preset(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--methods", "ce,mean-teacher:digits", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert list(report["methods"]) == ["ce", "mean-teacher:digits"]
    assert report["methods"]["mean-teacher:digits"]["category"] == "self-supervised"
    assert "| mean-teacher:digits | self-supervised |" in (tmp_path / "demo.md").read_text()
    assert cli.main(["demo", "--quick", "--methods", "mean-teacher:nope"]) == 2
    assert "no preset 'nope'" in capsys.readouterr().err


def test_demo_metrics_add_linear_probe_and_knn_columns(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--methods", "ce,byol:digits", "--metrics", "classification,linear_probe,knn",
                     "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    for summary in report["methods"].values():
        run = summary["runs"][0]
        assert set(run["representation"]) == {"probe_acc", "knn_acc"}
        assert 0.0 <= run["representation"]["probe_acc"] <= 100.0
        assert summary["representation"]["probe_acc"] == [run["representation"]["probe_acc"], 0.0]
    table = (tmp_path / "demo.md").read_text()
    assert "| vs ce | linear probe (mean ± std) | k-NN (mean ± std) | train s |" in table
    probe = report["methods"]["byol:digits"]["representation"]["probe_acc"][0]
    assert "| byol:digits | self-supervised | " in table and f"{probe:.2f} ± 0.00 %" in table
    assert cli.main(["demo", "--quick", "--metrics", "linear_prob"]) == 2
    assert "linear_prob" in capsys.readouterr().err
