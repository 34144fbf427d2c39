"""Backend registry: which backends exist, which can run here, and why one cannot run a given input.

Choice order: the ``backend=`` argument, then the ``KDKERNELS_BACKEND`` environment variable, then ``"auto"``.
``auto`` takes the first backend of the device's preference list that can run the input:

* CPU tensors: ``cpu`` (C++), then ``reference``.
* CUDA tensors: ``cuda`` (C++/CUDA), then ``triton``, then ``reference``. This order is provisional: no GPU
  benchmark has been run yet to rank cuda against triton (see README, "Backends").

An explicitly requested backend that cannot run the input raises :class:`BackendUnavailableError` with its reasons.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

from kdkernels import _extension

BACKENDS = ("cpu", "cuda", "triton", "reference")
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
ENV_VAR = "KDKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:  # importing the family modules registers the triton ops
        import kdkernels.triton.contrastive  # noqa: F401
        import kdkernels.triton.dist  # noqa: F401
        import kdkernels.triton.logsoftmax_gather  # noqa: F401
        import kdkernels.triton.pairwise  # noqa: F401
        import kdkernels.triton.softmax_kl  # noqa: F401
        import kdkernels.triton.target_split  # noqa: F401
    except Exception as exc:  # a broken triton install must not break the other backends
        return f"the triton kernels failed to import: {type(exc).__name__}: {exc}"
    return None


def _installation_reasons(name: str) -> list[str]:
    if name == "reference":
        return []
    if name in ("cpu", "cuda"):
        if _extension._C is None:
            return [_extension.LOAD_ERROR or "kdkernels._C is not loaded"]
        if name == "cpu" and _extension.CPU_LOAD_ERROR is not None:
            return [_extension.CPU_LOAD_ERROR]
        if name not in _extension.compiled_backends():
            return [f"kdkernels._C was built without {name} kernels (compiled: "
                    f"{', '.join(_extension.compiled_backends())})"]
        if name == "cuda" and not torch.cuda.is_available():
            return ["no CUDA device is visible"]
        return []
    if not torch.cuda.is_available() and not triton_interpreter_enabled():
        return ["triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors, slow: for tests)"]
    error = _triton_import_error()
    return [error] if error is not None else []


# What the installation can run does not change within a process: decided once, at import (this also keeps
# backend selection free of calls that torch.compile cannot trace).
_INSTALLATION_REASONS = {name: tuple(_installation_reasons(name)) for name in BACKENDS}


def unsupported_install_reasons(name: str) -> list[str]:
    """Why `name` cannot run on this installation at all (empty when it can run somewhere)."""
    if name not in _INSTALLATION_REASONS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return list(_INSTALLATION_REASONS[name])


def unsupported_reasons(name: str, *tensors: torch.Tensor) -> list[str]:
    """Why backend `name` cannot run these tensors; an empty list means it can."""
    reasons = unsupported_install_reasons(name)
    if reasons:
        return reasons
    device_type = tensors[0].device.type
    if name == "cpu" and device_type != "cpu":
        reasons.append(f"the cpu backend runs CPU tensors, got {device_type} tensors")
    elif name == "cuda" and device_type != "cuda":
        reasons.append(f"the cuda backend runs CUDA tensors, got {device_type} tensors")
    elif name == "triton" and device_type != "cuda" and not (device_type == "cpu" and triton_interpreter_enabled()):
        reasons.append(f"the triton backend runs CUDA tensors (CPU only under TRITON_INTERPRET=1), got {device_type}")
    return reasons


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run on this machine, and why not when it cannot."""
    status = {}
    for name in BACKENDS:
        reasons = unsupported_install_reasons(name)
        status[name] = BackendStatus(not reasons, "; ".join(reasons) if reasons else "ok")
    return status


def requested_backend(backend: str) -> str:
    """Resolves the argument against the environment variable; validates the name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"the {ENV_VAR} environment variable"
    else:
        source = "backend"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def op_reasons(name: str, ops: tuple[str, ...]) -> list[str]:
    """Why backend `name` lacks one of these op families' kernels (the reference has them all)."""
    if name == "reference" or not ops:
        return []
    return [f"the {name} backend has no {op} kernel" for op in ops if not _has_kernel(name, op)]


def _has_kernel(name: str, op: str) -> bool:
    return _KERNELS.get((name, op), False)


def _kernel_registered(name: str, op: str) -> bool:
    if name == "triton":
        return hasattr(torch.ops.kdkernels, f"triton_{op}_forward")
    # A C++ schema can exist without a kernel for this backend's dispatch key.
    return hasattr(torch.ops.kdkernels, f"{op}_forward") and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"kdkernels::{op}_forward", name.upper())


# Decided once, at import, like the installation reasons (torch.compile traces select_backend).
OP_FAMILIES = ("softmax_kl", "softmax_jsd", "target_split", "logsoftmax_gather", "dist", "pairwise",
               "crd_nce")
_KERNELS = {(name, op): not _INSTALLATION_REASONS[name] and _kernel_registered(name, op)
            for name in ("cpu", "cuda", "triton") for op in OP_FAMILIES}


def select_backend(backend: str, *tensors: torch.Tensor, required_ops: tuple[str, ...] = ()) -> str:
    """The backend that runs these tensors and has the `required_ops` kernels: the requested one, or an error
    saying why it cannot; else the first that can in the device's auto order."""
    name = requested_backend(backend)
    if name != "auto":
        reasons = unsupported_reasons(name, *tensors) or op_reasons(name, required_ops)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run this input: {'; '.join(reasons)}")
        return name
    for candidate in AUTO_ORDER.get(tensors[0].device.type, ("reference",)):
        if not unsupported_reasons(candidate, *tensors) and not op_reasons(candidate, required_ops):
            return candidate
    return "reference"
