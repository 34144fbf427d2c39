"""Loads the compiled parts of kdkernels: ``kdkernels._C`` (the op schemas, build information and CUDA kernels) and
exactly one CPU kernel library ``kdkernels/_cpu_<isa>*.so``.

setup.py builds the CPU kernels once per vector ISA (avx512, avx2, default), as ATen does. The library loaded is the
best one that the build holds and this CPU runs, as ATen sees the CPU (``torch.backends.cpu.get_cpu_capability()``,
which ``ATEN_CPU_CAPABILITY`` lowers too), unless the environment variable ``KDKERNELS_CPU_CAPABILITY`` names one
(avx512, avx2 or default); a choice that is unknown, not built or beyond this CPU warns and loads the best instead.

A failed load (no build, a torch upgrade since the build) warns once, naming what was built and what is present, and
leaves the other backends working.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
import warnings
from pathlib import Path

import torch

try:  # written by setup.py at build time
    from kdkernels._build_config import BUILD_CONFIG
except ImportError:
    BUILD_CONFIG = None

CPU_CAPABILITIES = ("avx512", "avx2", "default")  # best first
CAPABILITY_VARIABLE = "KDKERNELS_CPU_CAPABILITY"
_PACKAGE_DIR = Path(__file__).resolve().parent
# What each of ATen's answers lets this CPU run.
_RUNNABLE = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}


def runnable_cpu_capabilities() -> tuple[str, ...]:
    """The ISAs this CPU runs, best first, as ATen sees it."""
    return _RUNNABLE.get(torch.backends.cpu.get_cpu_capability(), ("default",))


def built_cpu_libraries() -> dict[str, Path]:
    """The CPU kernel libraries in the package, by ISA, best first (only those of the last build, when known)."""
    recorded = None if BUILD_CONFIG is None else BUILD_CONFIG.get("cpu_capabilities")
    libraries = {}
    for isa in CPU_CAPABILITIES:
        if recorded is not None and isa.upper() not in recorded:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = _PACKAGE_DIR / f"_cpu_{isa}{suffix}"
            if path.is_file():
                libraries[isa] = path
                break
    return libraries


def choose_cpu_capability(requested: str, built, runnable) -> tuple[str | None, str | None]:
    """(the ISA to load or None, a warning or None) for KDKERNELS_CPU_CAPABILITY=`requested` ("" when unset)."""
    best = next((isa for isa in CPU_CAPABILITIES if isa in built and isa in runnable), None)
    requested = requested.strip().lower()
    if requested in ("", "auto"):
        return best, None
    if requested not in CPU_CAPABILITIES:
        problem = f"must be auto or one of {', '.join(CPU_CAPABILITIES)}"
    elif requested not in built:
        problem = f"names CPU kernels that this build does not hold (built: {', '.join(built) or 'none'})"
    elif requested not in runnable:
        problem = (f"names CPU kernels that this CPU cannot run (torch reports "
                   f"{torch.backends.cpu.get_cpu_capability()}: it runs {', '.join(runnable)})")
    else:
        return requested, None
    instead = f"loading the {best} CPU kernels instead" if best else "no CPU kernels can be loaded"
    return best, f"kdkernels: {CAPABILITY_VARIABLE}={requested!r} {problem}; {instead}."


def _present() -> str:
    return f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, " + (
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA")


def _built_for() -> str:
    if BUILD_CONFIG is None:
        return "unknown build"
    cpu = BUILD_CONFIG.get("cpu_capabilities") or [BUILD_CONFIG.get("cpu_capability", "unknown")]  # older builds: one
    return (f"torch {BUILD_CONFIG.get('torch_version')}, CPU kernels for {', '.join(cpu)}, "
            + (f"CUDA archs {BUILD_CONFIG['cuda_archs']}" if BUILD_CONFIG.get("cuda_archs") else "no CUDA"))


def _load_schemas():
    try:
        from kdkernels import _C as module
        return module, None
    except (ImportError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if (_PACKAGE_DIR.parent / "setup.py").is_file() and not any(_PACKAGE_DIR.glob("_C*.so")):
            reason = (f"kdkernels is imported from its source tree {_PACKAGE_DIR.parent}, which holds no built "
                      "extension: run from another directory, or build in place with "
                      "`pip install --no-build-isolation -e .`")
    message = (f"kdkernels: the compiled extension kdkernels._C is not loaded ({reason}). Built for: {_built_for()}; "
               f"present: {_present()}. The cpu and cuda backends are off; triton and reference still work. "
               "Reinstall with `pip install --no-build-isolation .` to rebuild.")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return None, message


def _load_cpu_kernels() -> tuple[str | None, str | None]:
    """Loads one CPU kernel library: (the ISA it reports, None) or (None, why none is loaded)."""
    built = built_cpu_libraries()
    isa, note = choose_cpu_capability(os.environ.get(CAPABILITY_VARIABLE, ""), built, runnable_cpu_capabilities())
    if note is not None:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    if isa is None:
        reason = (f"no CPU kernel library that this CPU runs is built (built: {', '.join(built) or 'none'}; "
                  f"present: {_present()})")
    else:
        try:
            torch.ops.load_library(str(built[isa]))
            name = ctypes.CDLL(str(built[isa])).kdkernels_cpu_capability
            name.restype = ctypes.c_char_p
            return name().decode(), None
        except (OSError, AttributeError) as exc:
            reason = f"{built[isa].name} failed to load: {type(exc).__name__}: {exc}"
    message = (f"kdkernels: the CPU kernels are not loaded ({reason}). Built for: {_built_for()}. The cpu backend is "
               "off; the others still work. Reinstall with `pip install --no-build-isolation .` to rebuild.")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return None, message


_C, LOAD_ERROR = _load_schemas()
# The loaded CPU kernels' ISA ("AVX512", "AVX2", "DEFAULT"), or None with the reason in CPU_LOAD_ERROR.
CPU_CAPABILITY, CPU_LOAD_ERROR = _load_cpu_kernels() if _C is not None else (None, LOAD_ERROR)


def build_info() -> dict:
    """How kdkernels was built and what this process loaded: version, torch version, compiled backends (cpu when a
    CPU kernel library is loaded), CUDA archs, the CPU kernels' ISAs built and the one loaded."""
    built = [isa.upper() for isa in built_cpu_libraries()]
    if _C is None:
        return {"loaded": False, "error": LOAD_ERROR, "build_config": BUILD_CONFIG, "cpu_capabilities": built}
    info = {"loaded": True, **_C.build_info()}
    info["compiled_backends"] = (["cpu"] if CPU_CAPABILITY is not None else []) + list(info["compiled_backends"])
    info["cpu_capabilities"] = built
    info["cpu_capability"] = CPU_CAPABILITY
    if CPU_LOAD_ERROR is not None:
        info["cpu_error"] = CPU_LOAD_ERROR
    return info


def compiled_backends() -> tuple[str, ...]:
    if _C is None:
        return ()
    return (("cpu",) if CPU_CAPABILITY is not None else ()) + tuple(_C.build_info()["compiled_backends"])
