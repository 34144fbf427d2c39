"""One CPU kernel library per vector ISA (avx512, avx2, default), one loaded per process (kdkernels/_extension.py):
KDKERNELS_CPU_CAPABILITY chooses it, and with each ISA that the build holds and this CPU runs, the CPU parts of
the op and loss suites pass (each run in a subprocess, since a process loads one library)."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kdkernels
from kdkernels import _extension
from kdkernels._extension import choose_cpu_capability

TESTS = Path(__file__).resolve().parent
SUITES = sorted(str(path) for pattern in ("test_ops_*.py", "test_losses_*.py") for path in TESTS.glob(pattern))
ISAS = ("avx512", "avx2", "default")


def _environment(**variables) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("KDKERNELS_BACKEND", "KDKERNELS_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    return {**environment, **variables}


def _require_extension() -> dict:
    info = kdkernels.build_info()
    if not info["loaded"]:
        pytest.skip(f"kdkernels._C is not loaded: {info['error']}")
    return info


def _require(isa: str) -> None:
    info = _require_extension()
    if isa.upper() not in info["cpu_capabilities"]:
        pytest.skip(f"this build holds no {isa} CPU kernels (built: {', '.join(info['cpu_capabilities']) or 'none'})")
    if isa not in _extension.runnable_cpu_capabilities():
        pytest.skip(f"this CPU cannot run {isa} kernels (it runs {', '.join(_extension.runnable_cpu_capabilities())})")


_IMPORT_REPORT = textwrap.dedent("""
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kdkernels
    print(json.dumps({"info": kdkernels.build_info(),
                      "warnings": [str(w.message) for w in caught if "kdkernels" in str(w.message)]}))
""")


def _import_report(**variables) -> dict:
    result = subprocess.run([sys.executable, "-c", _IMPORT_REPORT], capture_output=True, text=True,
                            env=_environment(**variables), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", ISAS)
def test_variable_loads_the_chosen_library(isa):
    _require(isa)
    report = _import_report(KDKERNELS_CPU_CAPABILITY=isa)
    assert report["warnings"] == []
    assert report["info"]["cpu_capability"] == isa.upper()
    assert "cpu" in report["info"]["compiled_backends"]


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_suites_pass_with_each_library(isa):
    """The op and loss tests restricted to the cpu backend (`-k cpu`), with this ISA's kernels; xfail is not a
    failure. The ISA that this process loaded runs them in this session already."""
    _require(isa)
    if isa.upper() == kdkernels.build_info()["cpu_capability"]:
        pytest.skip(f"this process runs the op and loss tests with the {isa} CPU kernels already")
    script = textwrap.dedent(f"""
        import sys
        import kdkernels
        import pytest
        loaded = kdkernels.build_info()["cpu_capability"]
        assert loaded == {isa.upper()!r}, f"KDKERNELS_CPU_CAPABILITY={isa} loaded {{loaded}}"
        sys.exit(pytest.main([*{SUITES!r}, "-q", "-k", "cpu", "-p", "no:cacheprovider"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=TESTS.parent,
                            env=_environment(KDKERNELS_CPU_CAPABILITY=isa), timeout=1800)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout.strip().splitlines()[-1], result.stdout[-2000:]


def test_choice_beyond_the_cpu_warns_and_loads_the_best_it_runs():
    """ATen's ATEN_CPU_CAPABILITY=default makes the CPU run only default kernels, whatever it is."""
    _require("default")
    report = _import_report(KDKERNELS_CPU_CAPABILITY="avx2", ATEN_CPU_CAPABILITY="default")
    if "AVX2" in report["info"]["cpu_capabilities"]:
        assert len(report["warnings"]) == 1, report["warnings"]
        assert "cannot run" in report["warnings"][0] and "loading the default CPU kernels" in report["warnings"][0]
    assert report["info"]["cpu_capability"] == "DEFAULT"


def test_unknown_choice_warns_naming_the_choices():
    _require_extension()
    report = _import_report(KDKERNELS_CPU_CAPABILITY="sse9")
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "'sse9' must be auto or one of avx512, avx2, default" in report["warnings"][0]
    assert report["info"]["cpu_capability"] == kdkernels.build_info().get("cpu_capability")


BUILT = {"avx512": "a", "avx2": "b", "default": "c"}


@pytest.mark.parametrize("requested,built,runnable,expected", [
    ("", BUILT, ISAS, "avx512"),
    ("auto", BUILT, ("avx2", "default"), "avx2"),
    ("AVX2", BUILT, ISAS, "avx2"),
    ("default", BUILT, ISAS, "default"),
    ("", {"avx2": "b", "default": "c"}, ISAS, "avx2"),
    ("", {"avx512": "a"}, ("avx2", "default"), None),
])
def test_choice_without_warning(requested, built, runnable, expected):
    assert choose_cpu_capability(requested, built, runnable) == (expected, None)


@pytest.mark.parametrize("requested,built,runnable,expected,message", [
    ("avx", BUILT, ISAS, "avx512", r"'avx' must be auto or one of avx512, avx2, default; loading the avx512"),
    ("avx512", {"avx2": "b", "default": "c"}, ISAS, "avx2", r"this build does not hold \(built: avx2, default\)"),
    ("avx512", BUILT, ("avx2", "default"), "avx2", r"this CPU cannot run .* it runs avx2, default\)"),
    ("avx2", {"avx2": "b"}, ("default",), None, r"cannot run .*; no CPU kernels can be loaded"),
])
def test_choice_that_cannot_be_honoured_warns(requested, built, runnable, expected, message):
    chosen, warning = choose_cpu_capability(requested, built, runnable)
    assert chosen == expected
    assert warning is not None and warning.startswith("kdkernels: KDKERNELS_CPU_CAPABILITY=")
    assert re.search(message, warning), warning


def test_failed_cpu_library_load_warns_and_turns_only_the_cpu_backend_off():
    _require_extension()
    script = textwrap.dedent("""
        import warnings
        import torch
        def refuse(path):
            raise OSError(f"cannot open {path}")
        torch.ops.load_library = refuse
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kdkernels
        messages = [str(w.message) for w in caught if "CPU kernels are not loaded" in str(w.message)]
        assert len(messages) == 1 and "_cpu_" in messages[0] and "OSError" in messages[0], messages
        status = kdkernels.available_backends()
        assert not status["cpu"].available and "CPU kernels are not loaded" in status["cpu"].reason, status
        assert kdkernels.build_info()["cpu_capability"] is None
        x = torch.randn(3, 5)
        assert kdkernels.backends.select_backend("auto", x, x) == "reference"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_environment(),
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_info_command_names_the_loaded_cpu_kernels(capsys):
    info = _require_extension()
    from kdkernels import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"CPU kernels loaded: {info['cpu_capability']} (built: {', '.join(info['cpu_capabilities'])};" in out
