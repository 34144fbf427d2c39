"""Loads the compiled extension ``kdkernels._C``.

A failed load (no build, a torch upgrade since the build, a CPU without the vector ISA it was built for) warns once,
naming what it was built for and what is present, and leaves the Triton and reference backends working.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

try:  # written by setup.py at build time
    from kdkernels._build_config import BUILD_CONFIG
except ImportError:
    BUILD_CONFIG = None

_CAPABILITY_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def _incompatibility() -> str | None:
    if BUILD_CONFIG is None:
        return None
    built = BUILD_CONFIG["cpu_capability"]
    present = torch.backends.cpu.get_cpu_capability()
    if built in _CAPABILITY_RANK and _CAPABILITY_RANK[built] > _CAPABILITY_RANK.get(present, 0):
        return (f"it was built for {built} CPUs and this CPU supports {present}; rebuild with "
                "KDKERNELS_CPU_CAPABILITY=avx2 (or default)")
    return None


def _built_for() -> str:
    if BUILD_CONFIG is None:
        return "unknown build"
    return f"torch {BUILD_CONFIG['torch_version']}, CPU {BUILD_CONFIG['cpu_capability']}, " + (
        f"CUDA archs {BUILD_CONFIG['cuda_archs']}" if BUILD_CONFIG["cuda_archs"] else "no CUDA")


def _load():
    reason = _incompatibility()
    if reason is None:
        try:
            from kdkernels import _C as module
            return module, None
        except (ImportError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            package_dir = Path(__file__).resolve().parent
            if (package_dir.parent / "setup.py").is_file() and not any(package_dir.glob("_C*.so")):
                reason = (f"kdkernels is imported from its source tree {package_dir.parent}, which holds no built "
                          "extension: run from another directory, or build in place with "
                          "`pip install --no-build-isolation -e .`")
    present = f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, " + (
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA")
    message = (f"kdkernels: the compiled extension kdkernels._C is not loaded ({reason}). Built for: {_built_for()}; "
               f"present: {present}. The cpu and cuda backends are off; triton and reference still work. "
               "Reinstall with `pip install --no-build-isolation .` to rebuild.")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return None, message


_C, LOAD_ERROR = _load()


def build_info() -> dict:
    """How kdkernels._C was built: version, torch version, compiled backends, CUDA archs, CPU capability."""
    if _C is None:
        return {"loaded": False, "error": LOAD_ERROR, "build_config": BUILD_CONFIG}
    return {"loaded": True, **_C.build_info()}


def compiled_backends() -> tuple[str, ...]:
    return tuple(_C.build_info()["compiled_backends"]) if _C is not None else ()
