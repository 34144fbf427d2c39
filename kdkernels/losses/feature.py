"""Feature-based distillation losses (plain PyTorch; each function IS the reference of its method).

Each loss compares one student feature map with one teacher feature map (the strategies sum them over stages with
the official stage weights) and matches the official code named in its docstring
(../shared/reference/methods.md §2). Inputs are float tensors ``[B, C, H, W]`` (FitNet, VID and FT also take
``[B, D]``); the teacher side is used as given (detach it for offline distillation). Shape mismatches that a
connector would fix raise a ValueError naming both arguments and their shapes. Every loss takes a ``reduction`` over
its elementwise terms (``"mean"``: over all elements; ``"batchmean"``: sum / B; ``"sum"``; ``"none"``: per sample),
defaulting to the official one.

* :func:`fitnet_loss` — FitNet hint MSE;            * :func:`nst_loss` — NST polynomial-kernel MMD;
* :func:`fsp_loss` — FSP (flow) matrices;            * :func:`ofd_margins` / :func:`ofd_loss` — OFD;
* :func:`vid_loss` — VID Gaussian NLL;               * :func:`ab_loss` — AB alternative L2;
* :func:`ft_loss` — factor transfer L1;               * :func:`cwd_loss` — channel-wise KL of spatial softmaxes;
* :func:`cd_loss` — channel distillation (MSE of pooled channels);
* :func:`pad_l2_loss` — prime-aware adaptive distillation (L2 weighted by a predicted per-dimension variance).
* :func:`kd_svd_loss` — KD-SVD (RBF correlations of consecutive stages' singular vectors);
* :func:`jacobian_matching_loss` — normalised input-gradient (Jacobian) matching;
* :func:`tofd_loss` — task-oriented feature distillation (heads' features, CE and soft CE, orthogonal links; one
  scalar, no ``reduction``: its feature norms run over the whole batch);
* :func:`hkd_loss` — heterogeneous KD's information-flow divergence (Jeffreys over two kernels' batch probabilities).
(Attention transfer is in :mod:`kdkernels.losses.attention`.)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, pool_to_smaller, reduce_rows

_CONNECTOR_HINT = " (use a connector/regressor to map the student feature)"


def reduce_elements(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduces elementwise loss terms [B, ...]: "mean" over all elements, "sum", "batchmean" = sum / B, or "none"
    (the per-sample sums [B])."""
    if reduction == "mean":
        return values.mean()
    return reduce_rows(values.reshape(values.shape[0], -1).sum(dim=1), reduction)


def _check_pair(check: Checks, student_name: str, student, teacher_name: str, teacher,
                dims: Sequence[int] = (4,), same_shape: bool = False) -> None:
    check.feature_pair(student_name, student, teacher_name, teacher, dims=dims, same_shape=same_shape,
                       hint=_CONNECTOR_HINT)


def fitnet_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor, *, reduction: Reduction = "mean") -> torch.Tensor:
    """FitNet hint loss (Romero et al., ICLR 2015), as RepDistiller ``distiller_zoo/FitNet.py`` (``HintLoss``):
    ``mean((r(f_s) − f_t)²)`` over every element, where ``student_hint`` is already the regressor's output ``r(f_s)``.
    """
    check = Checks("fitnet_loss")
    _check_pair(check, "student_hint", student_hint, "teacher_hint", teacher_hint, dims=(2, 3, 4), same_shape=True)
    reduction = check.reduction(reduction)
    if reduction == "mean":
        return F.mse_loss(student_hint, teacher_hint)
    return reduce_elements((student_hint - teacher_hint).pow(2), reduction)


def _channel_maps(features: torch.Tensor) -> torch.Tensor:
    """[B, C, H·W] with every channel's spatial map L2-normalised."""
    return F.normalize(features.reshape(features.shape[0], features.shape[1], -1), dim=2)


def _poly_kernel_means(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample ``mean((a bᵀ)²)`` over [C_a, C_b], by bmm (never the B×C×C×HW broadcast) -> [B]."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean(dim=(1, 2))


def nst_loss(student: torch.Tensor, teacher: torch.Tensor, *,
             reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang, 2017) for one stage, as RepDistiller ``NST.py`` (full loss, c = 0):
    the larger map pooled to the smaller, every channel map L2-normalised over H·W (F [B, C, HW]), then per sample
    ``mean((F_t F_tᵀ)²).detach() + mean((F_s F_sᵀ)²) − 2·mean((F_s F_tᵀ)²)`` with batched matrix products
    (the official TuSimple ``mmd_poly`` uses ``batch_dot``; RepDistiller's broadcast builds B×C×C×HW), averaged over
    the batch (``"batchmean"``, the official value; also ``"sum"`` and ``"none"``)."""
    check = Checks("nst_loss")
    _check_pair(check, "student", student, "teacher", teacher)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    student, teacher = pool_to_smaller(student, teacher)
    f_s, f_t = _channel_maps(student), _channel_maps(teacher)
    rows = _poly_kernel_means(f_t, f_t).detach() + _poly_kernel_means(f_s, f_s) - 2 * _poly_kernel_means(f_s, f_t)
    return reduce_rows(rows, reduction)


def fsp_matrices(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """FSP matrices of consecutive maps ``(g_i, g_{i+1})``, the larger pooled to the smaller:
    ``G = g_{i+1} g_iᵀ / HW`` [B, C_{i+1}, C_i] (RepDistiller ``FSP.compute_fsp``, by bmm)."""
    matrices = []
    for bottom, top in zip(features[:-1], features[1:]):
        bottom, top = pool_to_smaller(bottom, top)
        bottom = bottom.reshape(bottom.shape[0], bottom.shape[1], -1)
        top = top.reshape(top.shape[0], top.shape[1], -1)
        matrices.append(torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[2])
    return matrices


def fsp_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], *,
             reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """FSP (Yim et al., CVPR 2017), as RepDistiller ``FSP.py`` summed as in ``helper/pretrain.py``:
    ``Σ_i mean((G_s,i − G_t,i)²)`` over the FSP matrices of consecutive stage maps (see :func:`fsp_matrices`), each
    mean over the batch and the matrix (``"batchmean"``: the official value, i.e. the batch mean of the per-sample
    ``Σ_i mean_matrix``; also ``"sum"`` and ``"none"`` over samples). Student and teacher must have the same channel
    count at every stage (RepDistiller raises otherwise)."""
    check = Checks("fsp_loss")
    student_features = check.tensor_list("student_features", student_features, minimum=2)
    teacher_features = check.tensor_list("teacher_features", teacher_features, minimum=2)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    if len(student_features) != len(teacher_features):
        check.value_error("teacher_features", f"must hold the same number of maps as student_features "
                          f"({len(student_features)})", f"{len(teacher_features)}")
    for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        _check_pair(check, f"student_features[{index}]", student, f"teacher_features[{index}]", teacher)
        if student.shape[1] != teacher.shape[1]:
            check.value_error(f"teacher_features[{index}]", f"must have the channels of student_features[{index}] "
                              f"{tuple(student.shape)} (FSP needs equal channel counts)",
                              f"{teacher.shape[1]} channels {tuple(teacher.shape)}")
    pairs = zip(fsp_matrices(student_features), fsp_matrices(teacher_features))
    rows = torch.stack([(g_s - g_t).pow(2).mean(dim=(1, 2)) for g_s, g_t in pairs]).sum(dim=0)
    return reduce_rows(rows, reduction)


def ofd_margins(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """OFD's per-channel margins from the teacher's BN before ReLU (clovaai/overhaul-distillation
    ``distiller.py::get_margin_from_BN``), with s = |γ|, μ = β: the expectation of the negative part of N(μ, s²),
    ``m = −s·exp(−(μ/s)²/2)/√(2π)/Φ(−μ/s) + μ`` where ``Φ(−μ/s) > 1e-3``, else ``m = −3s``. Computed in float64,
    returned as float32 [C]."""
    check = Checks("ofd_margins")
    check.floating("bn_weight", bn_weight, dims=(1,))
    check.floating("bn_bias", bn_bias, dims=(1,))
    check.same_shape("bn_bias", bn_bias, "bn_weight", bn_weight)
    s = bn_weight.detach().double().abs()
    mu = bn_bias.detach().double()
    cdf = torch.special.ndtr(-mu / s)
    negative_mean = -s * torch.exp(-(mu / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + mu
    return torch.where(cdf > 1e-3, negative_mean, -3 * s).float()


def ofd_loss(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor,
             reduction: Reduction = "sum") -> torch.Tensor:
    """OFD's partial L2 for one stage (Heo et al., ICCV 2019; overhaul-distillation ``distillation_loss``): with the
    teacher's pre-ReLU map clipped at the margin, ``t' = max(t, m_c)``,
    ``loss = Σ (s − t')² · 1[(s > t') ∨ (t' > 0)]``; ``student`` is the connector's output (pre-ReLU side).
    ``reduction="sum"`` is the official per-stage value; ``"batchmean"`` divides by B."""
    check = Checks("ofd_loss")
    _check_pair(check, "student", student, "teacher", teacher, same_shape=True)
    reduction = check.reduction(reduction)
    check.tensor("margin", margin)
    if margin.reshape(-1).shape[0] != teacher.shape[1]:
        check.value_error("margin", f"must be a tensor of {teacher.shape[1]} per-channel values",
                          f"shape {tuple(margin.shape)}")
    clipped = torch.max(teacher, margin.reshape(1, -1, 1, 1).to(teacher))
    mask = (student > clipped) | (clipped > 0)
    return reduce_elements((student - clipped).pow(2) * mask, reduction)


def vid_loss(mean: torch.Tensor, teacher: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5, *,
             reduction: Reduction = "mean") -> torch.Tensor:
    """VID (Ahn et al., CVPR 2019), as RepDistiller ``VID.py``: a Gaussian with per-channel variance
    ``σ²_c = softplus(log_scale_c) + eps`` around the regressor's ``mean`` (same shape as the teacher map),
    ``loss = mean_{B,C,H,W} ½((mean − t)²/σ² + log σ²)``."""
    check = Checks("vid_loss")
    _check_pair(check, "mean", mean, "teacher", teacher, dims=(2, 4), same_shape=True)
    eps = check.real("eps", eps)
    reduction = check.reduction(reduction)
    check.tensor("log_scale", log_scale)
    if log_scale.shape != (teacher.shape[1],):
        check.value_error("log_scale", f"must be a [{teacher.shape[1]}] tensor (one per teacher channel)",
                          f"shape {tuple(log_scale.shape)}")
    variance = (F.softplus(log_scale) + eps).reshape(1, -1, *([1] * (teacher.dim() - 2)))
    return reduce_elements(0.5 * ((mean - teacher).pow(2) / variance + variance.log()), reduction)


def ab_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float = 1.0,
            reduction: Reduction = "sum") -> torch.Tensor:
    """AB's alternative L2 (Heo et al., AAAI 2019; bhheo/AB_distillation, RepDistiller ``AB.py``) on pre-ReLU maps:
    ``Σ (s + m)²·1[(s > −m) ∧ (t ≤ 0)] + (s − m)²·1[(s ≤ m) ∧ (t > 0)]``; ``student`` is the connector's output.
    ``reduction="batchmean"`` divides by B (the official per-stage value before the stage weight and 3/1000)."""
    check = Checks("ab_loss")
    _check_pair(check, "student", student, "teacher", teacher, dims=(2, 4), same_shape=True)
    margin = check.real("margin", margin)
    reduction = check.reduction(reduction)
    positive_teacher = teacher > 0
    below = (student + margin).pow(2) * ((student > -margin) & ~positive_teacher)
    above = (student - margin).pow(2) * ((student <= margin) & positive_teacher)
    return reduce_elements(below + above, reduction)


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Factor transfer (Kim et al., NeurIPS 2018), as Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``
    (``FT(x) = normalize(x.view(B, −1))``, ``nn.L1Loss()``): ``mean |FT(F_s) − FT(F_t)|`` over B·D, on the translator's
    and the paraphraser's factors."""
    check = Checks("ft_loss")
    _check_pair(check, "student_factor", student_factor, "teacher_factor", teacher_factor, dims=(2, 3, 4),
                same_shape=True)
    reduction = check.reduction(reduction)
    batch = student_factor.shape[0]
    student, teacher = F.normalize(student_factor.reshape(batch, -1)), F.normalize(teacher_factor.reshape(batch, -1))
    if reduction == "mean":
        return F.l1_loss(student, teacher)
    return reduce_elements((student - teacher).abs(), reduction)


def cwd_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, temperature: float = 4.0, *,
             reduction: Reduction = "mean") -> torch.Tensor:
    """Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021),
    as irfanICMLL/TorchDistiller ``SemSeg-distill/utils/criterion.py`` (``CriterionCWD``, ``norm_type='channel'``,
    ``divergence='kl'``; = mmrazor ``ChannelWiseDivergence``). Each channel's map becomes a distribution over the
    H·W positions::

        p_nc = softmax(f_nc / τ) over H·W,    loss = τ² · Σ_{n,c} KL(p^t_nc ‖ p^s_nc) / (N·C)

    ``reduction`` over the N·C channel terms: ``"mean"`` (the official / (N·C)), ``"batchmean"`` (/ N), ``"sum"`` or
    ``"none"`` (per sample, the sum over its channels [N]). Both maps ``[N, C, H, W]`` (or ``[N, C, L]``) of one shape: map the student's channels with a
    connector first. The teacher is used as given (the official code detaches it).
    """
    check = Checks("cwd_loss")
    _check_pair(check, "student_map", student_map, "teacher_map", teacher_map, dims=(3, 4), same_shape=True)
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction)
    student = accumulate(student_map).flatten(2)
    teacher = accumulate(teacher_map).to(student.dtype).flatten(2)
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    channel_terms = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature ** 2
    return reduce_rows(channel_terms.sum(dim=1), reduction, elements=channel_terms.shape[1])


def cd_loss(student_features, teacher_features, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Channel distillation (Zhou, Zhou, Zheng, "Channel Distillation: Channel-Wise Attention for Knowledge
    Distillation", 2020), as zhouzaida/channel-distillation ``losses/cd_loss.py`` (``CDLoss``): each map's channel
    attention is its global average pool, and the squared distances are summed over the stages::

        a_c = mean_{h,w} f_{c,h,w},    loss = Σ_stages Σ_{n,c} (a^s_nc − a^t_nc)² / (N·C_stage)

    ``student_features`` / ``teacher_features``: one map ``[N, C, H, W]`` or a list of them, stage by stage, each
    student map with its teacher's channel count (map the student's channels with a connector first); the spatial
    sizes may differ. ``reduction`` per stage over the N·C terms: ``"mean"`` (the official), ``"batchmean"`` (/ N),
    ``"sum"`` or ``"none"`` (per sample [N], summed over channels and stages). The teacher is used as given.
    """
    check = Checks("cd_loss")
    single = isinstance(student_features, torch.Tensor) and isinstance(teacher_features, torch.Tensor)
    students = [student_features] if single else check.tensor_list("student_features", student_features)
    teachers = [teacher_features] if single else check.tensor_list("teacher_features", teacher_features)
    if len(students) != len(teachers):
        check.value_error("teacher_features", f"must hold one map per student map ({len(students)})",
                          f"{len(teachers)} maps")
    reduction = check.reduction(reduction)
    total = None
    for index, (student, teacher) in enumerate(zip(students, teachers)):
        suffix = "" if single else f"[{index}]"
        _check_pair(check, f"student_features{suffix}", student, f"teacher_features{suffix}", teacher)
        if student.shape[1] != teacher.shape[1]:
            check.value_error(f"student_features{suffix}", f"must have the channels of teacher_features{suffix} "
                              f"{tuple(teacher.shape)}{_CONNECTOR_HINT}", f"shape {tuple(student.shape)}")
        attention_s = accumulate(student).mean(dim=(2, 3))
        attention_t = accumulate(teacher).to(attention_s.dtype).mean(dim=(2, 3))
        rows = (attention_s - attention_t).pow(2).sum(dim=1)
        stage = reduce_rows(rows, reduction, elements=attention_s.shape[1])
        total = stage if total is None else total + stage
    return total


def pad_l2_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, log_variance: torch.Tensor,
                eps: float = 1e-6, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Prime-aware adaptive distillation (Zhang, Lan, Dai, Zeng, Bai, Chang, Wei, "Prime-Aware Adaptive
    Distillation", ECCV 2020) with the L2 loss, as torchdistill ``torchdistill/losses/mid_level.py`` (``PADL2Loss``):
    the squared feature distance of each dimension is divided by a variance the student predicts for that sample and
    dimension (its variance branch), and the predicted log-variance is added as a penalty::

        loss = mean_{b,d} ( (t_bd − s_bd)² / (eps + exp(v_bd)) + v_bd ),    v = log_variance

    Samples whose features the student cannot match ("non-prime" ones) learn a large variance and weigh less; the
    penalty keeps the variances from growing without bound. ``student_feature`` / ``teacher_feature`` ``[B, ...]``
    (flattened per sample, as the official ``.flatten(1)`` of the pooled embeddings) and ``log_variance`` of the
    same shape; the gradient reaches the student feature and the log-variance (the teacher is used as given: detach
    it). ``reduction`` over the B·D terms: ``"mean"`` (the official ``reduction='mean'``), ``"batchmean"`` (sum / B),
    ``"sum"`` or ``"none"`` (per-sample sums [B]; torchdistill's ``reduction='sum'`` is ``"mean"`` times B).
    """
    check = Checks("pad_l2_loss")
    _check_pair(check, "student_feature", student_feature, "teacher_feature", teacher_feature, dims=None,
                same_shape=True)
    check.features("log_variance", log_variance)
    check.same_shape("log_variance", log_variance, "student_feature", student_feature)
    check.same_device("log_variance", log_variance, "student_feature", student_feature)
    eps = check.real("eps", eps, nonnegative=True)
    reduction = check.reduction(reduction)
    rows = [accumulate(value.reshape(value.shape[0], -1))
            for value in (student_feature, teacher_feature, log_variance)]
    dtype = torch.float64 if any(row.dtype == torch.float64 for row in rows) else torch.float32
    student, teacher, log_var = (row.to(dtype) for row in rows)
    terms = (teacher - student).pow(2) / (eps + log_var.exp()) + log_var
    return reduce_elements(terms, reduction)
def _svd_basis(features: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KD_methods_with_TF ``nets/SVP.py`` ``SVD``: the map as ``[N, H·W, C]`` (positions × channels), its thin SVD,
    the first ``count`` singular values L2-normalised [N, n] and right singular vectors [N, C, n] (n = ``count``, or
    min(H·W, C) when smaller), each vector unit-norm. For the teacher (no gradient): the signs are LAPACK's."""
    matrix = features.flatten(2).transpose(1, 2)
    _, values, vectors_h = torch.linalg.svd(matrix, full_matrices=False)
    count = min(count, values.shape[1])
    return F.normalize(values[:, :count], dim=1), F.normalize(vectors_h[:, :count, :].transpose(1, 2), dim=1)


class _GapSafeEigh(torch.autograd.Function):
    """``torch.linalg.eigh`` of symmetric matrices whose backward drops the pairs of (nearly) equal eigenvalues: the
    coefficient 1/(λ_j − λ_i) is set to 0 where |λ_j − λ_i| ≤ 1e-6·max|λ|, as the official KD-SVD gradient zeroes
    its non-finite entries (``removenan``), instead of giving inf/NaN for a rank-deficient map."""

    @staticmethod
    def forward(ctx, gram):
        values, vectors = torch.linalg.eigh(gram)
        ctx.save_for_backward(values, vectors)
        return values, vectors

    @staticmethod
    def backward(ctx, grad_values, grad_vectors):
        values, vectors = ctx.saved_tensors
        gap = values.unsqueeze(-2) - values.unsqueeze(-1)                      # [i, j] = λ_j − λ_i
        tolerance = 1e-6 * values.abs().amax(dim=-1, keepdim=True).unsqueeze(-1)
        kept = gap.abs() > tolerance
        inner = torch.zeros_like(gap)
        if grad_vectors is not None:
            inner = torch.where(kept, gap, torch.ones_like(gap)).reciprocal() * kept * (vectors.mT @ grad_vectors)
        if grad_values is not None:
            inner = inner + torch.diag_embed(grad_values)
        grad = vectors @ inner @ vectors.mT
        return 0.5 * (grad + grad.mT)


def _right_singular_vectors(features: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` right singular vectors [N, C, n] of the map read as ``[N, H·W, C]``, unit-norm, from the
    eigenvectors of its Gram matrix ``[C, C]`` (largest first) with :class:`_GapSafeEigh`'s backward; their signs are
    arbitrary (the caller aligns them to the teacher's)."""
    matrix = features.flatten(2).transpose(1, 2)
    count = min(count, *matrix.shape[1:])
    _, vectors = _GapSafeEigh.apply(matrix.mT @ matrix)
    return F.normalize(vectors[..., -count:].flip(-1), dim=1)


def kd_svd_loss(student_features, teacher_features, *, k: int = 1, student_k: int | None = None,
                rbf_scale: float = 8.0, reduction: SampleReduction = "sum") -> torch.Tensor:
    """KD-SVD (Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV
    2018), as sseung0703/KD_methods_with_TF @9fb5414 ``nets/Shared.py`` (``KD_SVD``, ``dist_type='SVD'``) with
    ``nets/SVP.py`` (``SVD``, ``Align_rsv``). Per stage, the map read as the matrix ``[H·W, C]`` is decomposed by a
    thin SVD; the teacher keeps its first ``k`` right singular vectors V_t [N, C, k] (unit norm) and its first ``k``
    singular values σ_t L2-normalised; the student's first ``student_k`` (default k + 3) right singular vectors are
    searched, and each teacher vector takes the student vector of largest |cosine| with it, sign-flipped to a positive
    cosine (the selection is a constant, as ``tf.sign`` / ``tf.where``). Both are scaled by σ_t. Between
    consecutive stages l−1, l the radial-basis-function correlations of the vectors' entries are compared::

        G_{n,a,b,j} = exp(−(V_{l}[n,a,j] − V_{l−1}[n,b,j])² / rbf_scale)        [C_l × C_{l−1} per vector j]
        loss = Σ_{l ≥ 1} Σ_{n,a,b,j} (G^s − stopgrad(G^t))²

    ``student_features`` / ``teacher_features``: lists of at least two maps ``[N, C_l, H, W]``, stage by stage, each
    student map with its teacher's channel count (map the student with a connector first; the spatial sizes may
    differ). The teacher side gets no gradient (the official ``tf.stop_gradient``). ``reduction``: ``"sum"`` (the
    official ``reduce_sum``, the batch included), ``"batchmean"`` (/ N) or ``"none"`` (per sample [N]).

    Numerics: the decompositions run in float32 (float64 stays float64). The student's singular vectors come from
    the eigenvectors of its Gram matrix with a backward that leaves out the pairs of (nearly) equal singular values,
    where the plain SVD gradient is inf/NaN (a rank-deficient or constant map): the official code zeroes those
    non-finite entries (``removenan``). The sign of the teacher's singular vectors is the SVD routine's convention, as in the
    official code (it changes the RBF target; LAPACK and cuSOLVER may differ).
    """
    check = Checks("kd_svd_loss")
    students = check.tensor_list("student_features", student_features, minimum=2)
    teachers = check.tensor_list("teacher_features", teacher_features, minimum=2)
    if len(students) != len(teachers):
        check.value_error("teacher_features", f"must hold one map per student map ({len(students)})",
                          f"{len(teachers)} maps")
    k = check.integer("k", k, minimum=1)
    student_k = k + 3 if student_k is None else check.integer("student_k", student_k, minimum=k)
    rbf_scale = check.real("rbf_scale", rbf_scale, positive=True)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    for index, (student, teacher) in enumerate(zip(students, teachers)):
        _check_pair(check, f"student_features[{index}]", student, f"teacher_features[{index}]", teacher)
        if student.shape[1] != teacher.shape[1]:
            check.value_error(f"student_features[{index}]", f"must have the channels of teacher_features[{index}] "
                              f"{tuple(teacher.shape)}{_CONNECTOR_HINT}", f"shape {tuple(student.shape)}")
        if student.shape[0] != students[0].shape[0]:
            check.value_error(f"student_features[{index}]", f"must have the batch size of student_features[0] "
                              f"({students[0].shape[0]})", f"shape {tuple(student.shape)}")
    rows, previous = None, None
    for student, teacher in zip(students, teachers):
        student = accumulate(student)
        sigma_t, vectors_t = _svd_basis(accumulate(teacher.detach()).to(student.dtype), k)
        vectors_s = _right_singular_vectors(student, student_k)
        cosine = (vectors_s.transpose(1, 2) @ vectors_t).detach()          # [N, student_k, k]
        largest = cosine.abs() == cosine.abs().amax(dim=1, keepdim=True)
        selection = torch.where(largest, torch.sign(cosine), torch.zeros_like(cosine))
        vectors_s = (vectors_s @ selection) * sigma_t.unsqueeze(1)
        vectors_t = vectors_t * sigma_t.unsqueeze(1)
        if previous is not None:
            previous_s, previous_t = previous
            if previous_t.shape[2] != vectors_t.shape[2]:
                check.value_error("teacher_features", f"must give every stage {previous_t.shape[2]} singular "
                                  f"vector(s) (min(H·W, C) >= k)", f"{vectors_t.shape[2]}")
            rbf_s = torch.exp(-(vectors_s.unsqueeze(2) - previous_s.unsqueeze(1)).pow(2) / rbf_scale)
            rbf_t = torch.exp(-(vectors_t.unsqueeze(2) - previous_t.unsqueeze(1)).pow(2) / rbf_scale)
            stage = (rbf_s - rbf_t).pow(2).sum(dim=(1, 2, 3))
            rows = stage if rows is None else rows + stage
        previous = (vectors_s, vectors_t)
    return reduce_rows(rows, reduction)


def jacobian_matching_loss(student_jacobian: torch.Tensor, teacher_jacobian: torch.Tensor, *,
                           reduction: Reduction = "mean") -> torch.Tensor:
    """Jacobian matching (Srinivas & Fleuret, "Knowledge Transfer with Jacobian Matching", ICML 2018): the squared
    distance of the L2-normalised input gradients of one output of each network::

        loss_n = ‖ J_s,n / ‖J_s,n‖₂ − J_t,n / ‖J_t,n‖₂ ‖₂²,    J_n = ∂ z_{n,c} / ∂ x_n  (flattened per sample)

    ``student_jacobian`` / ``teacher_jacobian``: the gradients ``[N, ...]`` of one shape (the input's); compute the
    student's with ``create_graph=True`` so that the loss trains the student (double back-propagation). The
    normalisation is ``F.normalize`` (norms clamped at 1e-12: a zero gradient stays zero). ``reduction``:
    ``"mean"`` over the N·D elements (AberHu/Knowledge-Distillation-Zoo @65470c8 ``kd_losses/sobolev.py``,
    ``F.mse_loss``), ``"batchmean"`` (the paper's per-sample squared norm averaged over the batch), ``"sum"`` or
    ``"none"`` (per sample [N]). The teacher is used as given (the reference detaches it).
    """
    check = Checks("jacobian_matching_loss")
    check.feature_pair("student_jacobian", student_jacobian, "teacher_jacobian", teacher_jacobian, same_shape=True)
    reduction = check.reduction(reduction)
    student = F.normalize(accumulate(student_jacobian).flatten(1), dim=1)
    teacher = F.normalize(accumulate(teacher_jacobian).to(student.dtype).flatten(1), dim=1)
    return reduce_elements((student - teacher).pow(2), reduction)


def tofd_loss(student_features, teacher_features, student_logits, teacher_logits, labels, link_weights=None, *,
              temperature: float = 4.0, feature_weight: float = 0.05, orthogonal_weight: float = 0.03
              ) -> torch.Tensor:
    """Task-oriented feature distillation (Zhang, Shi, Ma, NeurIPS 2020), as
    ArchipLab-LinfengZhang/Task-Oriented-Feature-Distillation ``distill.py`` and ``utils.py`` (``CrossEntropy``):
    over the heads i (the auxiliary classifiers and the main one) and the feature links' weights W_j::

        loss = Σ_i [ α·‖s_i − t_i‖_F + CE(z_i, y) − mean_b Σ_c softmax(z^t_i/T)·log_softmax(z_i/T) ]
               + β·Σ_j (‖W_j W_jᵀ − I‖_F + ‖W_jᵀ W_j − I‖_F)

    ``student_features`` [B, D] per head, already through its link (``link_j(f_s)``, a bias-free linear layer to the
    teacher's width), ``teacher_features`` [B, D] per head (the teacher's auxiliary features), ``‖·‖_F`` the
    Frobenius norm over the whole batch (``torch.dist``, not squared, not averaged), ``student_logits`` /
    ``teacher_logits`` [B, C] per head, ``labels`` [B], ``link_weights`` the links' [D_t, D_s] weights for the
    orthogonal penalty (None: no penalty). The soft cross-entropy is not scaled by T² (as the official). ``α`` =
    ``feature_weight`` (official 0.05), ``β`` = ``orthogonal_weight`` (0.03); ``temperature`` is the current one (the
    official raises it linearly from 1 to 4 over the epochs). A scalar in fp32 (fp64 for fp64 inputs). The
    teachers are used as given (detach them).
    """
    check = Checks("tofd_loss")
    students = check.tensor_list("student_features", student_features)
    teachers = check.tensor_list("teacher_features", teacher_features)
    student_heads = check.tensor_list("student_logits", student_logits)
    teacher_heads = check.tensor_list("teacher_logits", teacher_logits)
    heads = len(students)
    for name, values in (("teacher_features", teachers), ("student_logits", student_heads),
                         ("teacher_logits", teacher_heads)):
        if len(values) != heads:
            check.value_error(name, f"must hold one tensor per head ({heads}, as student_features)",
                              f"{len(values)} tensors")
    temperature = check.temperature(temperature)
    alpha = check.real("feature_weight", feature_weight, nonnegative=True)
    beta = check.real("orthogonal_weight", orthogonal_weight, nonnegative=True)
    weights = [] if link_weights is None else check.tensor_list("link_weights", link_weights)
    total, target = None, None
    for index in range(heads):
        suffix = f"[{index}]"
        _check_pair(check, f"student_features{suffix}", students[index], f"teacher_features{suffix}",
                    teachers[index], dims=(2,), same_shape=True)
        check.logits_pair(student_heads[index], teacher_heads[index], f"student_logits{suffix}",
                          f"teacher_logits{suffix}", dims=(2,))
        if student_heads[index].shape[0] != students[index].shape[0]:
            check.value_error(f"student_logits{suffix}", f"must have the batch size of student_features{suffix} "
                              f"({students[index].shape[0]})", f"shape {tuple(student_heads[index].shape)}")
        logits = accumulate(student_heads[index])
        if target is None:
            target = check.class_labels(labels, logits)
        elif student_heads[index].shape[0] != target.shape[0]:
            check.value_error(f"student_logits{suffix}", f"must have the batch size of the labels ({target.shape[0]})",
                              f"shape {tuple(student_heads[index].shape)}")
        feature = accumulate(students[index])
        distance = torch.linalg.vector_norm(feature - accumulate(teachers[index]).to(feature.dtype))
        soft = torch.softmax(accumulate(teacher_heads[index]).to(logits.dtype) / temperature, dim=-1)
        soft_ce = -(soft * torch.log_softmax(logits / temperature, dim=-1)).sum(dim=-1).mean()
        head = alpha * distance.to(logits.dtype) + F.cross_entropy(logits, target) + soft_ce
        total = head if total is None else total + head.to(total.dtype)
    for index, weight in enumerate(weights):
        check.floating(f"link_weights[{index}]", weight, dims=(2,))
        weight = accumulate(weight)
        gram_rows, gram_columns = weight @ weight.t(), weight.t() @ weight
        eye_rows = torch.eye(gram_rows.shape[0], dtype=weight.dtype, device=weight.device)
        eye_columns = torch.eye(gram_columns.shape[0], dtype=weight.dtype, device=weight.device)
        penalty = torch.linalg.vector_norm(gram_rows - eye_rows) + torch.linalg.vector_norm(gram_columns - eye_columns)
        total = total + beta * penalty.to(total.dtype)
    return total


def _hkd_probabilities(features: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pkth ``prob_loss`` 'combined' kernels of one side, row-normalised: the cosine one ``(cos + 1) / 2`` (features
    divided by ``‖f‖ + eps``) and the Student-t one ``1 / (1 + sqrt(max(‖a‖² + ‖b‖² − 2a·b, 0) + eps))``."""
    norms = features.pow(2).sum(dim=1, keepdim=True)
    unit = features / (norms.sqrt() + eps)
    cosine = (unit @ unit.t() + 1.0) / 2.0
    squared = (norms + norms.t() - 2.0 * features @ features.t()).clamp_min(0.0)
    student_t = 1.0 / (1.0 + torch.sqrt(squared + eps))
    return cosine / cosine.sum(dim=1, keepdim=True), student_t / student_t.sum(dim=1, keepdim=True)


def hkd_loss(student_features, teacher_features, layer_weights=None, *, eps: float = 1e-6,
             reduction: Reduction = "mean") -> torch.Tensor:
    """Information-flow divergence of heterogeneous KD (Passalis, Tzelepi, Tefas, "Heterogeneous Knowledge
    Distillation using Information Flow Modeling", CVPR 2020), as passalis/pkth ``nn/pkt_transfer.py``
    (``prob_loss`` with ``kernel_parameters`` 'combined', the setting of every official experiment): per layer pair
    l, the batch's conditional probabilities under two kernels, each row normalised (the diagonal included),
    compared by the Jeffreys divergence::

        P^k_ij = K^k(f_i, f_j) / Σ_j K^k(f_i, f_j),   k ∈ {cosine (cos + 1)/2, Student-t 1/(1 + ‖f_i − f_j‖)}
        loss = Σ_l w_l Σ_k mean_{i,j} (P^k_t,ij − P^k_s,ij)·(log P^k_t,ij − log P^k_s,ij)

    ``student_features`` / ``teacher_features``: one tensor ``[B, ...]`` or a list of them (layer by layer; each is
    flattened to [B, D], the widths of a pair may differ); ``layer_weights``: one real per pair (None: all 1; the
    official student stage weighs the last layer 1 and the others by the critical-period schedule). ``eps`` as the
    official (1e-6, in the cosine normaliser and under the distance's square root). ``reduction`` over the B rows
    of each B×B matrix: ``"mean"`` (official: / B²), ``"batchmean"`` (/ B), ``"sum"``, ``"none"`` (per sample
    [B]). The teacher is used as given (detach it for offline distillation). The kernels are computed in float64
    (B×B, cheap): the divergence of two close distributions cancels, and the distances' Gram formula would lose
    the small pairs in float32; the result is float32 (float64 for float64 inputs).
    """
    check = Checks("hkd_loss")
    single = isinstance(student_features, torch.Tensor) and isinstance(teacher_features, torch.Tensor)
    students = [student_features] if single else check.tensor_list("student_features", student_features)
    teachers = [teacher_features] if single else check.tensor_list("teacher_features", teacher_features)
    if len(students) != len(teachers):
        check.value_error("teacher_features", f"must hold one tensor per student tensor ({len(students)})",
                          f"{len(teachers)} tensors")
    if layer_weights is None:
        weights = [1.0] * len(students)
    else:
        if isinstance(layer_weights, (str, torch.Tensor)) or not isinstance(layer_weights, Sequence):
            check.type_error("layer_weights", "a sequence of real numbers", layer_weights)
        weights = [check.real(f"layer_weights[{i}]", w) for i, w in enumerate(layer_weights)]
        if len(weights) != len(students):
            check.value_error("layer_weights", f"must hold one weight per layer pair ({len(students)})",
                              f"{len(weights)} weights")
    eps = check.real("eps", eps, positive=True)
    reduction = check.reduction(reduction)
    total = None
    for index, (student, teacher) in enumerate(zip(students, teachers)):
        suffix = "" if single else f"[{index}]"
        check.feature_pair(f"student_features{suffix}", student, f"teacher_features{suffix}", teacher)
        student = student.flatten(1).double()
        teacher = teacher.flatten(1).double()
        rows = None
        for p_s, p_t in zip(_hkd_probabilities(student, eps), _hkd_probabilities(teacher, eps)):
            kernel_rows = ((p_t - p_s) * (p_t.log() - p_s.log())).sum(dim=1)
            rows = kernel_rows if rows is None else rows + kernel_rows
        layer = weights[index] * reduce_rows(rows, reduction, elements=student.shape[0])
        total = layer if total is None else total + layer
    wide = any(x.dtype == torch.float64 for x in (*students, *teachers))
    return total if wide else total.float()
