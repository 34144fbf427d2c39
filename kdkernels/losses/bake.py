"""BAKE (Ge et al., "Self-Distillation with Batch Knowledge Ensembling Improves ImageNet Classification", 2021):
soft targets propagated over the batch's feature affinities, and the KD loss towards them.

    f = normalize(features.flatten(1)),   A = softmax_row(f f^T with the diagonal excluded)
    P = softmax(logits / T),              Q = (1 - omega) (I - omega A)^-1 P
    loss = T^2 * sum KL(Q || softmax(logits / T)) / B

as yxgeee/BAKE's ``knowledge_ensemble`` and ``KDLoss`` (../shared/reference/methods.md §1.14; the official code
verbatim is kdkernels/reference/bake.py). The closed form is computed by one linear solve, never an inverse, and
with no host synchronisation; the KL runs on the fused ``softmax_kl`` kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks, Reduction, accumulation_dtype
from kdkernels.distributed import all_gather_batch, rank_and_world_size
from kdkernels.losses.kd import kd_loss


def check_omega(check: Checks, omega) -> float:
    return check.real("omega", omega, minimum=0.0, maximum=1.0, maximum_open=True)


def _check_features_and_logits(check: Checks, features, logits) -> None:
    check.features("features", features, dims=None)
    if features.dim() < 2:
        check.value_error("features", "must have shape [B, ...] with at least one feature per sample",
                          f"shape {tuple(features.shape)}")
    check.logits("logits", logits)
    if logits.dim() != 2:
        check.value_error("logits", "must have shape [B, C]", f"{tuple(logits.shape)}")
    if features.shape[0] != logits.shape[0]:
        check.value_error("features", f"must have the same batch size as logits ({logits.shape[0]})",
                          f"{features.shape[0]}")
    check.batch_of_at_least("logits", logits, 2, "BAKE propagates knowledge between samples")
    check.same_device("features", features, "logits", logits)


def _all_gather_together(features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gathered by one collective, side by side as [B, D + C]."""
    gathered = all_gather_batch(torch.cat([features, logits], dim=1))
    return gathered.split([features.shape[1], logits.shape[1]], dim=1)


def _affinity(features: torch.Tensor) -> torch.Tensor:
    """Row-softmax of the cosine similarities, each sample's affinity to itself an exact zero."""
    unit = F.normalize(features.flatten(1), p=2, dim=1)
    gram = unit @ unit.t()
    self_pairs = torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
    return torch.softmax(gram.masked_fill(self_pairs, float("-inf")), dim=1)


def _propagate(affinity: torch.Tensor, probabilities: torch.Tensor, omega: float) -> torch.Tensor:
    """``(1 - omega) (I - omega A)^-1 P`` by an LU solve (never an inverse, no error check: no sync). The matrix is
    strictly diagonally dominant (rows of A sum to 1, omega < 1), so it is always invertible; the exact result is
    nonnegative, and the clamp removes the rounding's tiny negatives before the loss takes their log."""
    identity = torch.eye(affinity.shape[0], dtype=affinity.dtype, device=affinity.device)
    targets, _ = torch.linalg.solve_ex(identity - omega * affinity, (1.0 - omega) * probabilities,
                                       check_errors=False)
    return targets.clamp_min(0.0)


def bake_targets(features: torch.Tensor, logits: torch.Tensor, temperature: float = 4.0, omega: float = 0.5, *,
                 gather: bool = False) -> torch.Tensor:
    """BAKE's soft targets ``Q = (1 - omega) (I - omega A)^-1 softmax(logits / T)`` [B, C] (see the module docstring).

    Args:
        features: ``[B, ...]`` per-sample features (BAKE: the pooled penultimate features), flattened to [B, D].
        logits: ``[B, C]`` the network's own logits.
        temperature: ``T > 0`` (BAKE: 4).
        omega: the propagation weight, ``0 <= omega < 1`` (BAKE: 0.5; 0.9 on TinyImageNet). ``omega = 0`` gives
            ``softmax(logits / T)``.
        gather: propagate over the global batch of all data-parallel ranks (BAKE's ``GLOBAL_KE``): features and
            logits are all-gathered (equal batch sizes on every rank), and this rank's B rows are returned.

    Returns detached targets whose rows sum to 1, computed in float32 (float64 for float64 inputs).
    """
    return _targets(Checks("bake_targets"), features, logits, temperature, omega, gather)


def _targets(check: Checks, features, logits, temperature, omega, gather) -> torch.Tensor:
    _check_features_and_logits(check, features, logits)
    temperature, omega = check.temperature(temperature), check_omega(check, omega)
    check.flag("gather", gather)
    acc = accumulation_dtype(features, logits)
    with torch.no_grad():
        features, logits = features.detach().to(acc), logits.detach().to(acc)
        if gather:
            features, logits = _all_gather_together(features.flatten(1), logits)
        targets = _propagate(_affinity(features), torch.softmax(logits / temperature, dim=1), omega)
    if gather:
        rank, world_size = rank_and_world_size()
        rows = targets.shape[0] // world_size
        targets = targets.narrow(0, rank * rows, rows)
    return targets


def bake_loss(logits: torch.Tensor, features: torch.Tensor, temperature: float = 4.0, omega: float = 0.5, *,
              gather: bool = False, reduction: Reduction = "batchmean", backend: str = "auto") -> torch.Tensor:
    """BAKE's distillation term ``T^2 * sum KL(Q || softmax(logits / T)) / B`` with ``Q = bake_targets(...)``.

    Add it to the cross-entropy (BAKE: weight 1). The gradient reaches ``logits`` only (the targets are detached, as
    in BAKE); with ``gather=True`` the targets come from the global batch and each rank's loss covers its own rows.
    The KL runs on the fused ``softmax_kl`` kernel against teacher logits ``T * log Q`` (whose tempered softmax is Q;
    zero targets become ``-inf`` logits, which contribute exactly 0). Returns float32 (float64 for float64 inputs).
    ``reduction`` as :func:`kdkernels.kd_loss`'s (``"batchmean"``: BAKE's).
    """
    check = Checks("bake_loss")
    reduction = check.reduction(reduction)
    targets = _targets(check, features, logits, temperature, omega, gather)
    teacher_logits = temperature * torch.log(targets)
    return kd_loss(logits, teacher_logits, temperature, reduction=reduction, backend=backend)
