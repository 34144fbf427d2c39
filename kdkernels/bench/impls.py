"""What is benchmarked: the kdkernels backends (auto plus every other available one), PyTorch eager and
``torch.compile`` of the eager loss, as loss functions of (student, teacher); and the random inputs."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

import kdkernels
from kdkernels import backends as _backends
from kdkernels.reference.softmax_kl import eager_generalized_jsd, eager_hinton_kd

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
IMPL_ORDER = ("eager", "compile")  # then the kdkernels:* rows


class BenchedLoss(NamedTuple):
    """The loss a run measures: its name (title and file stem), its eager formula and kd_loss's arguments for it."""
    name: str
    eager: Callable
    kd_loss_kwargs: dict


def benched_loss(divergence: str, beta: float) -> BenchedLoss:
    if divergence == "jsd":
        return BenchedLoss("jsd_loss", functools.partial(eager_generalized_jsd, beta=beta),
                           {"divergence": "jsd", "beta": beta, "scale_by_t2": False})  # GKD has no T^2
    return BenchedLoss("kd_loss", eager_hinton_kd, {})


def kdkernels_impls(device: torch.device, requested: list[str] | None, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(impl id, backend argument) for the kdkernels rows: auto plus every other available non-reference backend
    that can run tensors on ``device``, or exactly ``requested``."""
    if requested:
        return [(f"kdkernels:{b}", b) for b in requested]
    resolved = _backends.select_backend("auto", sample, sample)
    impls = [("kdkernels:auto", "auto")]
    for name in _backends.BACKENDS:
        if name in ("reference", resolved) or (name == "triton" and device.type != "cuda"):
            continue  # triton on CPU tensors is the interpreter (tests only): run it only when asked for
        if not _backends.unsupported_reasons(name, sample, sample):
            impls.append((f"kdkernels:{name}", name))
    return impls


def make_loss_fn(impl: str, backend: str | None, temperature: float, compiled: Callable | None,
                 loss: BenchedLoss) -> Callable:
    if impl == "eager":
        return lambda s, t: loss.eager(s, t, temperature)
    if impl == "compile":
        return lambda s, t: compiled(s, t, temperature)
    return lambda s, t: kdkernels.kd_loss(s, t, temperature, backend=backend, **loss.kd_loss_kwargs)


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    student = (torch.randn(n, v, device=device, generator=gen) * 2.0).to(dtype).requires_grad_(True)
    teacher = (torch.randn(n, v, device=device, generator=gen) * 3.0).to(dtype)
    return student, teacher


def resolved_backend(backend: str, student: torch.Tensor, teacher: torch.Tensor) -> str | None:
    try:
        return _backends.select_backend(backend, student, teacher)
    except Exception:  # noqa: BLE001  (the error shows up again when the row runs)
        return None
