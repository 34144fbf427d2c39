"""Backend choice (argument > KDKERNELS_BACKEND > auto), reasons for unavailable backends, and extension loading."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kdkernels
from kdkernels import backends


def test_available_backends_lists_every_backend_with_a_reason():
    status = kdkernels.available_backends()
    assert set(status) == {"cpu", "cuda", "triton", "reference"}
    assert status["reference"].available
    for name, entry in status.items():
        assert entry.available == (entry.reason == "ok"), name
        assert entry.reason, name
    assert status["cuda"].available == (torch.cuda.is_available() and "cuda" in
                                        kdkernels.build_info().get("compiled_backends", ()))


def test_auto_picks_the_compiled_cpu_kernel_for_cpu_tensors():
    x = torch.zeros(2, 3)
    expected = "cpu" if kdkernels.available_backends()["cpu"].available else "reference"
    assert backends.select_backend("auto", x, x) == expected


def test_explicit_backend_that_cannot_run_raises_with_its_reason():
    x = torch.zeros(2, 3)  # CPU tensors: cuda cannot run them, whether or not it is built and a GPU is present
    with pytest.raises(kdkernels.BackendUnavailableError, match="backend 'cuda' cannot run this input: .+"):
        kdkernels.kd_loss(x, x, backend="cuda")


def test_environment_variable_chooses_the_backend(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv("KDKERNELS_BACKEND", "reference")
    assert backends.select_backend("auto", x, x) == "reference"
    assert backends.select_backend("cpu", x, x) == "cpu" or not kdkernels.available_backends()["cpu"].available
    monkeypatch.setenv("KDKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="KDKERNELS_BACKEND environment variable must be"):
        kdkernels.kd_loss(x, x)


def test_build_info_names_versions_and_backends():
    info = kdkernels.build_info()
    if not info["loaded"]:
        pytest.fail(f"kdkernels._C did not load: {info['error']}")
    assert info["version"] == kdkernels.__version__
    assert info["torch_version"] == torch.__version__
    assert "cpu" in info["compiled_backends"]
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    assert info["cpu_capability"] in info["cpu_capabilities"]


def test_failed_extension_load_warns_once_and_other_backends_still_work():
    """With kdkernels._C unimportable, import warns (naming built-for and present versions) and falls back."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["kdkernels._C"] = None  # makes `from kdkernels import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kdkernels
            import kdkernels.losses
        messages = [str(w.message) for w in caught if "kdkernels._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert "Built for:" in messages[0] and "present: torch" in messages[0], messages[0]
        status = kdkernels.available_backends()
        assert not status["cpu"].available and "not loaded" in status["cpu"].reason, status
        import torch
        x = torch.randn(3, 5)
        assert kdkernels.backends.select_backend("auto", x, x) == "reference"
        loss = kdkernels.kd_loss(x, torch.randn(3, 5))
        assert torch.isfinite(loss)
        print("ok")
    """)
    environment = {k: v for k, v in os.environ.items() if k != "KDKERNELS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_backend_without_the_required_kernel_is_refused_or_skipped():
    x = torch.zeros(2, 3)
    with pytest.raises(kdkernels.BackendUnavailableError, match="has no no_such_family kernel"):
        backends.select_backend("cpu", x, x, required_ops=("no_such_family",))
    assert backends.select_backend("auto", x, x, required_ops=("no_such_family",)) == "reference"
    assert backends.select_backend("reference", x, x, required_ops=("no_such_family",)) == "reference"


def test_refusal_reasons_are_derived_from_each_backends_data():
    cpu = backends.INSTALLED["cpu"]
    x = torch.zeros(2, 3)
    assert cpu.devices == ("cpu",) and set(cpu.dtypes) == {torch.float32, torch.float16, torch.bfloat16,
                                                             torch.float64}
    assert backends.unsupported_reasons("reference", x.to("meta"), x.int()) == \
        ["the reference backend takes torch.float32, torch.float16, torch.bfloat16, torch.float64 inputs, got torch.int32"]
    if not cpu.install_reasons:
        assert cpu.ops == set(backends.OPS)
        assert backends.unsupported_reasons("cpu", x.to("meta")) == ["the cpu backend runs cpu tensors, got meta tensors"]
        assert backends.unsupported_reasons("cpu", x, required_ops=("pairwise", "nope")) == \
            ["the cpu backend has no nope kernel"]
    assert backends.INSTALLED["reference"].ops is None  # the reference has every op
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.unsupported_reasons("fast", x)


def test_the_family_list_is_read_once_from_ops():
    from kdkernels.ops import FAMILIES
    assert backends.OPS == tuple(op for ops in FAMILIES.values() for op in ops)
