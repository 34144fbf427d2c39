"""The `kdkernels` command: `info` and a small real `bench` run writing its result files."""
import json

import pytest

from kdkernels import cli


def test_info_lists_build_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert '"compiled_backends"' in out
    for name in ("cpu", "cuda", "triton", "reference"):
        assert f"  {name}" in out


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    code = cli.main(["bench", "--quick", "--no-compile", "--shapes", "32x10,64x700", "--dtypes", "fp32,bf16",
                     "--out", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| shape | dtype | impl |" in table and "kdkernels:auto" in table
    result = json.loads((tmp_path / "kd_loss.json").read_text())
    assert (tmp_path / "kd_loss.md").read_text().strip() and (tmp_path / "kd_loss.png").stat().st_size > 0
    records = result["records"]
    cases = {(r["shape"][0], r["shape"][1], r["dtype"], r["impl"].split(" ")[0]) for r in records}
    for shape in ((32, 10), (64, 700)):
        for dtype in ("fp32", "bf16"):
            assert (*shape, dtype, "eager") in cases and (*shape, dtype, "kdkernels:auto") in cases
    for record in records:
        assert record["median_ms"] > 0 and record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["distil"])


def test_bench_jsd_mode_matches_the_eager_gkd_formula(tmp_path):
    code = cli.main(["bench", "--quick", "--no-compile", "--divergence", "jsd", "--beta", "0.3", "--shapes", "48x300",
                     "--out", str(tmp_path)])
    assert code == 0  # non-zero when a kdkernels row errors or disagrees with the eager formula
    result = json.loads((tmp_path / "jsd_loss.json").read_text())
    assert result["metadata"]["divergence"] == "jsd" and result["metadata"]["beta"] == 0.3
    rows = {r["impl"].split(" ")[0]: r for r in result["records"]}
    assert rows["kdkernels:auto"]["accuracy_warning"] is None and rows["eager"]["status"] == "ok"
