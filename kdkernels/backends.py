"""Backends as data: which exist, what each can run (devices, dtypes, ops), and why one cannot run a given input.

Each :class:`Backend` states its devices, its input dtypes, the ops it has kernels for and why the installation
cannot run it at all (decided once, at import); every refusal reason is derived from those facts, xformers-style.
Choice order: the ``backend=`` argument, then the ``KDKERNELS_BACKEND`` environment variable, then ``"auto"``, which
takes the first backend of the device's preference list that can run the input:

* CPU tensors: ``cpu`` (C++), then ``reference``.
* CUDA tensors: ``cuda`` (C++/CUDA), then ``triton``, then ``reference``. This order is provisional: no GPU
  benchmark has been run yet to rank cuda against triton (see README, "Backends").

An explicitly requested backend that cannot run the input raises :class:`BackendUnavailableError` with its reasons.
The op list comes from :data:`kdkernels.ops.FAMILIES`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import NamedTuple

import torch

from kdkernels import _extension
from kdkernels._validation import FLOAT_DTYPES
from kdkernels.ops import FAMILIES

BACKENDS = ("cpu", "cuda", "triton", "reference")
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
ENV_VAR = "KDKERNELS_BACKEND"
OPS = tuple(op for ops in FAMILIES.values() for op in ops)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one backend can run on this installation."""

    name: str
    devices: tuple[str, ...] | None  # device types whose tensors it runs (None: any)
    dtypes: tuple[torch.dtype, ...]  # input dtypes its kernels take
    ops: frozenset[str] | None  # the ops it has kernels for (None: every op, the reference)
    install_reasons: tuple[str, ...]  # why this installation cannot run it at all (empty: it can)
    device_note: str = ""  # added to the device refusal

    def reasons(self, tensors: tuple[torch.Tensor, ...], ops: tuple[str, ...] = ()) -> list[str]:
        """Why this backend cannot run these tensors with these ops; empty when it can."""
        if self.install_reasons:
            return list(self.install_reasons)
        reasons = []
        device = tensors[0].device.type
        if self.devices is not None and device not in self.devices:
            reasons.append(f"the {self.name} backend runs {' or '.join(self.devices)} tensors{self.device_note}, "
                           f"got {device} tensors")
        dtypes = sorted({str(t.dtype) for t in tensors if t.dtype not in self.dtypes})
        if dtypes:
            reasons.append(f"the {self.name} backend takes {', '.join(str(d) for d in self.dtypes)} inputs, got "
                           f"{', '.join(dtypes)}")
        if self.ops is not None:
            reasons += [f"the {self.name} backend has no {op} kernel" for op in ops if op not in self.ops]
        return reasons


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:  # importing the family modules registers the triton ops
        for family in FAMILIES:
            importlib.import_module(f"kdkernels.triton.{family}")
    except Exception as exc:  # a broken triton install must not break the other backends
        return f"the triton kernels failed to import: {type(exc).__name__}: {exc}"
    return None


def _compiled_reasons(name: str) -> list[str]:
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


def _triton_reasons() -> list[str]:
    if not torch.cuda.is_available() and not triton_interpreter_enabled():
        return ["triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors, slow: for tests)"]
    error = _triton_import_error()
    return [error] if error is not None else []


def _registered_ops(name: str, reasons: list[str]) -> frozenset[str]:
    if reasons:
        return frozenset()
    if name == "triton":
        return frozenset(op for op in OPS if hasattr(torch.ops.kdkernels, f"triton_{op}_forward"))
    # A C++ schema can exist without a kernel for this backend's dispatch key.
    return frozenset(op for op in OPS if hasattr(torch.ops.kdkernels, f"{op}_forward")
                     and torch._C._dispatch_has_kernel_for_dispatch_key(f"kdkernels::{op}_forward", name.upper()))


def _describe_installation() -> dict[str, Backend]:
    backends = {}
    for name in ("cpu", "cuda"):
        reasons = _compiled_reasons(name)
        backends[name] = Backend(name, (name,), FLOAT_DTYPES, _registered_ops(name, reasons), tuple(reasons))
    reasons = _triton_reasons()
    devices = ("cuda", "cpu") if triton_interpreter_enabled() else ("cuda",)
    backends["triton"] = Backend("triton", devices, FLOAT_DTYPES, _registered_ops("triton", reasons), tuple(reasons),
                                 "" if triton_interpreter_enabled() else " (CPU only under TRITON_INTERPRET=1)")
    backends["reference"] = Backend("reference", None, FLOAT_DTYPES, None, ())
    return backends


# What the installation can run does not change within a process: decided once, at import (this also keeps
# backend selection free of calls that torch.compile cannot trace).
INSTALLED = _describe_installation()


def unsupported_install_reasons(name: str) -> list[str]:
    """Why `name` cannot run on this installation at all (empty when it can run somewhere)."""
    if name not in INSTALLED:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return list(INSTALLED[name].install_reasons)


def unsupported_reasons(name: str, *tensors: torch.Tensor, required_ops: tuple[str, ...] = ()) -> list[str]:
    """Why backend `name` cannot run these tensors (with these ops); an empty list means it can."""
    if name not in INSTALLED:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return INSTALLED[name].reasons(tensors, required_ops)


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run on this machine, and why not when it cannot."""
    return {name: BackendStatus(not backend.install_reasons, "; ".join(backend.install_reasons) or "ok")
            for name, backend in INSTALLED.items()}


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


def select_backend(backend: str, *tensors: torch.Tensor, required_ops: tuple[str, ...] = ()) -> str:
    """The backend that runs these tensors and has the `required_ops` kernels: the requested one, or an error
    saying why it cannot; else the first that can in the device's auto order."""
    name = requested_backend(backend)
    if name != "auto":
        reasons = INSTALLED[name].reasons(tensors, required_ops)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run this input: {'; '.join(reasons)}")
        return name
    for candidate in AUTO_ORDER.get(tensors[0].device.type, ("reference",)):
        if not INSTALLED[candidate].reasons(tensors, required_ops):
            return candidate
    return "reference"
