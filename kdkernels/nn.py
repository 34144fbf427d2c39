"""``torch.nn.Module`` wrappers of the functional losses."""
from __future__ import annotations

import math

import torch

from kdkernels import bake, contrastive_losses, decoupled_losses, losses, pearson_losses, relation_losses


class KDLoss(torch.nn.Module):
    """Hinton KD loss module: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (or the reverse or symmetric KL); see
    :func:`kdkernels.kd_loss`.

    Example::

        criterion = kdkernels.nn.KDLoss(temperature=4.0)
        loss = criterion(student(x), teacher(x).detach())
    """

    def __init__(self, temperature: float = 1.0, *, reduction: str = "batchmean", scale_by_t2: bool = True,
                 ignore_index: int = -100, divergence: str = "forward", beta: float = 0.5,
                 logit_softcap: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = losses._check_temperature(temperature)
        if reduction not in losses.REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(losses.REDUCTIONS)}; got {reduction!r}")
        self.reduction = reduction
        if divergence not in losses.DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(losses.DIVERGENCES)}; got {divergence!r}")
        self.divergence = divergence
        self.beta = beta
        self.scale_by_t2 = scale_by_t2
        self.ignore_index = ignore_index
        self.logit_softcap = logit_softcap
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return losses.kd_loss(student_logits, teacher_logits, self.temperature, reduction=self.reduction,
                              scale_by_t2=self.scale_by_t2, labels=labels, ignore_index=self.ignore_index,
                              divergence=self.divergence, beta=self.beta, logit_softcap=self.logit_softcap,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, divergence={self.divergence!r}, "
                f"backend={self.backend!r}")


class DKDLoss(torch.nn.Module):
    """Decoupled KD module: ``alpha · TCKD + beta · NCKD`` (mdistiller's DKD without its warm-up factor, which
    belongs to the training loop); see :func:`kdkernels.dkd_loss`.

    Example::

        criterion = kdkernels.nn.DKDLoss(temperature=4.0, alpha=1.0, beta=8.0)
        loss = ce + min(epoch / 20, 1.0) * criterion(student(x), teacher(x).detach(), y)
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, *,
                 reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__()
        self.temperature = losses._check_temperature(temperature)
        self.alpha = decoupled_losses._check_real("alpha", alpha)
        self.beta = decoupled_losses._check_real("beta", beta)
        if reduction not in decoupled_losses.DKD_REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(decoupled_losses.DKD_REDUCTIONS)}; got "
                             f"{reduction!r}")
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return decoupled_losses.dkd_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha,
                                         self.beta, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, reduction={self.reduction!r}"


class NKDLoss(torch.nn.Module):
    """Normalized KD module (cls_KD's NKD; add the student's cross-entropy separately); see
    :func:`kdkernels.nkd_loss`."""

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5, *, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = losses._check_temperature(temperature)
        self.gamma = decoupled_losses._check_real("gamma", gamma)
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return decoupled_losses.nkd_loss(student_logits, teacher_logits, labels, self.temperature, self.gamma,
                                         backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}"


class DISTLoss(torch.nn.Module):
    """DIST module: ``beta · T² · inter + gamma · T² · intra`` Pearson terms; see :func:`kdkernels.dist_loss`."""

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0, *,
                 backend: str = "auto") -> None:
        super().__init__()
        self.temperature = losses._check_temperature(temperature)
        self.beta = decoupled_losses._check_real("beta", beta)
        self.gamma = decoupled_losses._check_real("gamma", gamma)
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return pearson_losses.dist_loss(student_logits, teacher_logits, self.temperature, self.beta, self.gamma,
                                        backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, beta={self.beta}, gamma={self.gamma}"


class RKDLoss(torch.nn.Module):
    """Relational KD: ``distance_weight · RKD-D + angle_weight · RKD-A`` on features [B, ...]; see
    :func:`kdkernels.rkd_loss` (defaults 25 / 50, RepDistiller's)."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, *, gather: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.gather, self.backend = gather, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return relation_losses.rkd_loss(student, teacher, self.distance_weight, self.angle_weight,
                                        gather=self.gather, backend=self.backend)


class SPLoss(torch.nn.Module):
    """Similarity-preserving KD on features [B, ...]; see :func:`kdkernels.sp_loss`."""

    def __init__(self, *, gather: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.gather, self.backend = gather, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return relation_losses.sp_loss(student, teacher, gather=self.gather, backend=self.backend)


class PKTLoss(torch.nn.Module):
    """Probabilistic knowledge transfer on features [B, ...]; see :func:`kdkernels.pkt_loss`."""

    def __init__(self, eps: float = 1e-7, *, gather: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.eps, self.gather, self.backend = eps, gather, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return relation_losses.pkt_loss(student, teacher, self.eps, gather=self.gather, backend=self.backend)


class CCLoss(torch.nn.Module):
    """Correlation congruence on features [B, ...]; see :func:`kdkernels.cc_loss`."""

    def __init__(self, gamma: float = 0.4, order: int = 2, kernel: str = "gaussian", *, gather: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.gamma, self.order, self.kernel = gamma, order, kernel
        self.gather, self.backend = gather, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return relation_losses.cc_loss(student, teacher, self.gamma, self.order, self.kernel, gather=self.gather,
                                       backend=self.backend)


class BAKELoss(torch.nn.Module):
    """BAKE module: ``T² · Σ KL(Q ‖ softmax(z/T)) / B`` towards the batch-ensembled targets Q; see
    :func:`kdkernels.bake_loss`.

    Example::

        criterion = kdkernels.nn.BAKELoss(temperature=4.0, omega=0.5)
        loss = F.cross_entropy(logits, y) + criterion(logits, features)
    """

    def __init__(self, temperature: float = 4.0, omega: float = 0.5, *, gather: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.temperature = losses._check_temperature(temperature)
        self.omega = bake._check_omega(omega)
        self.gather = gather
        self.backend = backend

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return bake.bake_loss(logits, features, self.temperature, self.omega, gather=self.gather,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, omega={self.omega}, gather={self.gather}"


class CRDLoss(torch.nn.Module):
    """CRD's contrastive loss with its state, as RepDistiller's ``CRDLoss`` without the embedding heads (the caller's
    modules: pass their L2-normalised outputs). Holds the two memory banks ``memory_student`` / ``memory_teacher``
    [num_data, feat_dim] (buffers, init U(-stdv, stdv), stdv = 1/sqrt(feat_dim/3)) and ``normalizers`` [2] (Z_v1,
    Z_v2; -1 until set). Each call sets Z on the first call (:func:`kdkernels.contrastive_losses.crd_normalizers`;
    a loaded state_dict whose Z are > 0 counts as set), computes :func:`kdkernels.crd_loss` from the banks as they
    were, then updates both banks (:func:`kdkernels.crd_update_memory_`).

    Example::

        criterion = kdkernels.nn.CRDLoss(num_data=len(train_set), feat_dim=128)
        loss = criterion(embed_s(f_s), embed_t(f_t), sample_index, contrast_index)
    """

    def __init__(self, num_data: int, feat_dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, eps: float = 1e-7, *, backend: str = "auto") -> None:
        super().__init__()
        self.num_data = contrastive_losses._check_positive_int("num_data", num_data)
        self.feat_dim = contrastive_losses._check_positive_int("feat_dim", feat_dim)
        self.num_negatives = contrastive_losses._check_positive_int("num_negatives", num_negatives)
        self.temperature = losses._check_temperature(temperature)
        self.momentum = float(momentum)
        self.eps = contrastive_losses._check_eps(eps)
        self.backend = backend
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_teacher", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self.normalizers_set = False
        self.register_load_state_dict_post_hook(CRDLoss._after_load)

    @staticmethod
    def _after_load(module: "CRDLoss", _incompatible_keys) -> None:
        module.normalizers_set = bool((module.normalizers > 0).all())

    def forward(self, student_embed: torch.Tensor, teacher_embed: torch.Tensor, indices: torch.Tensor,
                contrast_indices: torch.Tensor | None = None) -> torch.Tensor:
        if contrast_indices is None:
            contrast_indices = contrastive_losses.sample_contrast_indices(indices, self.num_data, self.num_negatives)
        if not self.normalizers_set:
            self.normalizers.copy_(contrastive_losses.crd_normalizers(
                student_embed, teacher_embed, contrast_indices, self.memory_student, self.memory_teacher,
                self.temperature, backend=self.backend))
            self.normalizers_set = True
        loss = contrastive_losses.crd_loss(student_embed, teacher_embed, indices, contrast_indices,
                                           self.memory_student, self.memory_teacher, self.normalizers,
                                           self.temperature, self.eps, backend=self.backend)
        contrastive_losses.crd_update_memory_(self.memory_student, student_embed, indices, self.momentum)
        contrastive_losses.crd_update_memory_(self.memory_teacher, teacher_embed, indices, self.momentum)
        return loss

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
                f"temperature={self.temperature}, momentum={self.momentum}")
