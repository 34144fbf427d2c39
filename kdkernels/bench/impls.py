"""What is benchmarked: the kdkernels backends (auto plus every other available one), PyTorch eager and
``torch.compile`` of the eager loss, as loss functions of (student, teacher); and the random inputs."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

import kdkernels
from kdkernels import backends as _backends
from kdkernels.reference import pairwise as _pairwise
from kdkernels.reference.contrastive import eager_crd
from kdkernels.reference.dist import eager_dist
from kdkernels.reference.softmax_kl import eager_generalized_jsd, eager_hinton_kd
from kdkernels.reference.target_split import eager_dkd, eager_nkd

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
IMPL_ORDER = ("eager", "compile")  # then the kdkernels:* rows


class BenchedLoss(NamedTuple):
    """The loss a run measures: its name (title and file stem), its eager formula as the reference repositories
    write it, and the kdkernels call; both take (student, teacher, T) and the kdkernels one also a backend.
    ``inputs(n, v, dtype, device) -> (student, teacher, state)``, when given, replaces make_inputs; the two
    callables then get the state as a last argument (bind it with :func:`with_state`)."""
    name: str
    eager: Callable
    fused: Callable
    inputs: Callable | None = None


def with_state(loss: BenchedLoss, state) -> BenchedLoss:
    return loss._replace(eager=functools.partial(_call_with_state, loss.eager, state),
                         fused=functools.partial(_call_with_state, loss.fused, state))


def _call_with_state(fn, state, *args):
    return fn(*args, state)


def benchmark_labels(student: torch.Tensor) -> torch.Tensor:
    """Deterministic class labels for the label-taking losses: row i gets class i mod V."""
    rows, classes = student.shape
    return torch.arange(rows, device=student.device) % classes


def _eager_dkd(s, t, temperature):
    return eager_dkd(s, t, benchmark_labels(s), 1.0, 8.0, temperature)


def _eager_nkd(s, t, temperature):
    return eager_nkd(s, t, benchmark_labels(s), temperature, 1.5)


# Relation losses on features [B, D] (the shapes are BxD); the temperature does not apply to them.
RELATION_LOSSES = {
    "rkd_distance": (_pairwise.eager_rkd_distance, kdkernels.rkd_distance_loss),
    "rkd_angle": (_pairwise.eager_rkd_angle, kdkernels.rkd_angle_loss),
    "rkd": (_pairwise.eager_rkd, kdkernels.rkd_loss),
    "sp": (_pairwise.eager_sp, kdkernels.sp_loss),
    "pkt": (_pairwise.eager_pkt, kdkernels.pkt_loss),
    "cc": (_pairwise.eager_cc, kdkernels.cc_loss),
}
LOSSES = ("kd", "dkd", "nkd", "dist") + tuple(RELATION_LOSSES) + ("crd",)

CRD_FEATURES, CRD_NUM_DATA = 128, 50000  # RepDistiller's embedding size; a CIFAR-sized bank


def _crd_inputs(batch: int, negatives: int, dtype: torch.dtype, device: torch.device):
    """Unit embeddings [B, 128] (the student's requires grad), both banks [50000, 128] initialised as RepDistiller,
    contrast indices [B, K + 1] (column 0 the positive) and the normalisers of the first call (steady state)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    unit = lambda: torch.nn.functional.normalize(torch.randn(batch, CRD_FEATURES, generator=gen), dim=1)  # noqa: E731
    stdv = 1.0 / (CRD_FEATURES / 3) ** 0.5
    banks = [((torch.rand(CRD_NUM_DATA, CRD_FEATURES, generator=gen) * 2 - 1) * stdv).to(dtype).to(device)
             for _ in range(2)]
    indices = torch.randperm(CRD_NUM_DATA, generator=gen)[:batch]
    contrast = torch.randint(0, CRD_NUM_DATA, (batch, negatives + 1), generator=gen)
    contrast[:, 0] = indices
    student, teacher = unit().to(dtype).to(device).requires_grad_(True), unit().to(dtype).to(device)
    indices, contrast = indices.to(device), contrast.to(device)
    normalizers = kdkernels.crd_normalizers(student.detach(), teacher, contrast, banks[0], banks[1])
    return student, teacher, (indices, contrast, banks[0], banks[1], normalizers)


def _crd_loss() -> BenchedLoss:
    def eager(s, t, temperature, state):
        _, contrast, memory_student, memory_teacher, normalizers = state
        return eager_crd(s, t, contrast, memory_student, memory_teacher, normalizers.clone()).sum()

    def fused(s, t, temperature, backend, state):
        indices, contrast, memory_student, memory_teacher, normalizers = state
        return kdkernels.crd_loss(s, t, indices, contrast, memory_student, memory_teacher, normalizers,
                                  backend=backend)

    return BenchedLoss("crd_loss", eager, fused, _crd_inputs)


def _relation_loss(loss: str) -> BenchedLoss:
    eager, fused = RELATION_LOSSES[loss]
    return BenchedLoss(f"{loss}_loss", lambda s, t, temperature: eager(s, t),
                       lambda s, t, temperature, backend: fused(s, t, backend=backend))


def benched_loss(loss: str, divergence: str = "forward", beta: float = 0.5) -> BenchedLoss:
    if loss in RELATION_LOSSES:
        return _relation_loss(loss)
    if loss == "crd":
        return _crd_loss()
    if loss == "dkd":
        return BenchedLoss("dkd_loss", _eager_dkd, lambda s, t, temperature, backend: kdkernels.dkd_loss(
            s, t, benchmark_labels(s), temperature, 1.0, 8.0, backend=backend))
    if loss == "nkd":
        return BenchedLoss("nkd_loss", _eager_nkd, lambda s, t, temperature, backend: kdkernels.nkd_loss(
            s, t, benchmark_labels(s), temperature, 1.5, backend=backend))
    if loss == "dist":
        return BenchedLoss("dist_loss", lambda s, t, temperature: eager_dist(s, t, 1.0, 1.0, temperature),
                           lambda s, t, temperature, backend: kdkernels.dist_loss(s, t, temperature, backend=backend))
    if divergence == "jsd":  # GKD has no T^2
        return BenchedLoss("jsd_loss", functools.partial(eager_generalized_jsd, beta=beta),
                           lambda s, t, temperature, backend: kdkernels.kd_loss(
                               s, t, temperature, divergence="jsd", beta=beta, scale_by_t2=False, backend=backend))
    return BenchedLoss("kd_loss", eager_hinton_kd,
                       lambda s, t, temperature, backend: kdkernels.kd_loss(s, t, temperature, backend=backend))


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
    return lambda s, t: loss.fused(s, t, temperature, backend)


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
