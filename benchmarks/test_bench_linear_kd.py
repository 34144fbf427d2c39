"""The linear_kd benchmark (``kdkernels bench linear_kd``) at a tiny shape: every implementation runs, agrees
with the eager formula, and the report files are written."""
from __future__ import annotations

import json

from kdkernels import cli


def test_linear_kd_benchmark_runs_and_every_implementation_agrees(tmp_path, capsys):
    assert cli.main(["bench", "linear_kd", "--tokens", "48", "--student-hidden", "8", "--teacher-hidden", "12", "--vocabulary",
                           "300", "--rounds", "1", "--no-compile", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "linear_kd_loss.png").stat().st_size > 0
    result = json.loads((tmp_path / "linear_kd_loss.json").read_text())
    records = result["results"]
    assert {"eager", "kdkernels", "kdkernels-streaming", "kdkernels-reference", "gemm-floor"} <= set(records)
    for name, record in records.items():
        assert record["median_s"] > 0, name
        if name != "gemm-floor":
            assert record["loss_relative_error"] < 1e-5, name
            assert max(record["grad_relative_max_error"].values()) < 1e-4, name
    assert "| kdkernels |" in (tmp_path / "linear_kd_loss.md").read_text()
    assert "GEMM floor" in capsys.readouterr().out
