"""Relation-based distillation losses: RKD (distance, angle), SP, PKT and CC on the fused ``pairwise`` op, and the
instance relationship graph (IRG), category structure (CSKD), the multi-head graph loss (MHGD) and the patch-token
manifold relations of vision transformers (manifold distillation), plain PyTorch.

Each compares a relation among the samples of a batch of student features with the same relation of teacher
features. Features of any shape ``[B, ...]`` are flattened per sample; student and teacher widths may differ; fp32,
fp16 and bf16 inputs are computed in fp32 (fp64 in fp64). Gradients reach the student, and the teacher when it
requires grad. Formulas and the official code they match: :mod:`kdkernels.reference.pairwise`.

``gather=True`` all-gathers student and teacher features across the ``torch.distributed`` ranks first, so that the
relation spans the global batch (see :func:`kdkernels.distributed.all_gather_batch` for how gradients flow).
"""
from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from kdkernels import backends
from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import DISTANCE_CLAMP, accumulate, pairwise_distances
from kdkernels.ops.pairwise import relation_loss

CCKernel = Literal["gaussian", "bilinear"]
CC_KERNELS = get_args(CCKernel)
TripletNormalization = Literal["pairs", "triplets", "sum"]
TRIPLET_NORMALIZATIONS = get_args(TripletNormalization)


def _feature_rows(check: Checks, student, teacher, gather) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated [B, D] views of both feature tensors (all-gathered when asked)."""
    check.feature_pair("student", student, "teacher", teacher)
    check.flag("gather", gather)
    if student.dim() != 2 or teacher.dim() != 2:
        student, teacher = student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)
    if gather:
        from kdkernels.distributed import all_gather_batch
        student, teacher = all_gather_batch(student), all_gather_batch(teacher)
    check.batch_of_at_least("student", student, 2, "a batch relation needs at least 2 samples")
    return student, teacher


def _relation(function: str, relation: str, student, teacher, params: tuple, gather, backend: str,
              check: Checks | None = None) -> torch.Tensor:
    student, teacher = _feature_rows(check or Checks(function), student, teacher, gather)
    name = backends.select_backend(backend, student, teacher, required_ops=("pairwise",))
    return relation_loss(relation, student, teacher, params, name)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """RKD distance loss (Park et al., "Relational Knowledge Distillation", CVPR 2019), as lenscloth/RKD's
    ``RkdDistance``: pairwise Euclidean distances, each side divided by its mean positive distance, compared by
    smooth L1 (beta = 1) averaged over all B² pairs, diagonal included. O(B²) memory, no host synchronisation."""
    return _relation("rkd_distance_loss", "rkd_distance", student, teacher, (), gather, backend)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """RKD angle loss, as lenscloth/RKD's ``RKdAngle``: ``psi_ijk = <e_ij, e_ik>`` with ``e_ij`` the unit vector
    from x_i to x_j (zero for coincident points), smooth L1 (beta = 1) averaged over all B³ triples.

    Computed from the Gram matrix of the centred features, ``<e_ij, e_ik> = (G_jk - G_ij - G_ik + G_ii) /
    (d_ij d_ik)``: O(B²) memory instead of the official B×B×D and B×B×B tensors. The Gram is float64 (of the batch
    centred in float64) and the numerators are formed exactly from it, so angles between close samples are as
    accurate as the official fp32 code's down to a separation of about 1e-4 of their distance to the batch mean;
    samples closer than about 1.7e-7 of it count as coincident."""
    return _relation("rkd_angle_loss", "rkd_angle", student, teacher, (), gather, backend)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0, *, gather: bool = False, backend: str = "auto") -> torch.Tensor:
    """``distance_weight · rkd_distance_loss + angle_weight · rkd_angle_loss`` from one pair of Gram matrices.
    Defaults 25 / 50: RepDistiller's and mdistiller's classification setting (lenscloth's metric learning uses 1 / 2)."""
    check = Checks("rkd_loss")
    params = (check.real("distance_weight", distance_weight), check.real("angle_weight", angle_weight))
    return _relation("rkd_loss", "rkd", student, teacher, params, gather, backend, check)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor, *, gather: bool = False,
            backend: str = "auto") -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller's ``SP``: ``G = normalize_rows(Q Qᵀ)``
    (L2, eps 1e-12) of the flattened features, ``loss = Σ (G_t − G_s)² / B²``. (torchdistill's ``SPKDLoss``
    normalises rows by L1 by mistake; this follows the original.)"""
    return _relation("sp_loss", "sp", student, teacher, (), gather, backend)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7, *, gather: bool = False,
             backend: str = "auto") -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as probabilistic_kt's
    ``cosine_similarity_loss``: ``S = (cos + 1) / 2`` row-normalised per side,
    ``loss = mean_{B×B} S_t log((S_t + eps) / (S_s + eps))``. Computed in float64 below the Gram, so the fp32 loss
    is as accurate as the official formula's."""
    check = Checks("pkt_loss")
    return _relation("pkt_loss", "pkt", student, teacher, (check.real("eps", eps, positive=True),), gather, backend,
                     check)


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2,
            kernel: CCKernel = "gaussian", *, gather: bool = False, backend: str = "auto") -> torch.Tensor:
    """Correlation congruence (Peng et al., ICCV 2019), as Knowledge-Distillation-Zoo's ``CC``: features
    L2-normalised, ``S = x̂ x̂ᵀ``, ``K = Σ_{p ≤ order} e^{−2γ} (2γ)^p / p! · S^p`` (the Taylor series of the Gaussian
    RBF ``exp(−γ |x̂_i − x̂_j|²)``), ``loss = mean (K_s − K_t)²``. ``kernel="bilinear"`` uses ``K = S``.

    Other CC variants: torchdistill's ``CCKDLoss`` applies the same series to unnormalised embeddings and reports
    ``‖K_s − K_t‖_F / B²``; RepDistiller's ``Correlation`` is a consecutive-pair approximation. Neither is this loss.
    """
    check = Checks("cc_loss")
    gamma = check.real("gamma", gamma)
    order = check.integer("order", order, minimum=0, maximum=64)
    kernel = check.choice("kernel", kernel, CC_KERNELS)
    params = (gamma, float(order), 1.0 if kernel == "bilinear" else 0.0)
    return _relation("cc_loss", "cc", student, teacher, params, gather, backend, check)


def _irg_edge(x: torch.Tensor) -> torch.Tensor:
    """IRG edge: squared pairwise distances (diagonal 0) divided by their maximum."""
    distances = pairwise_distances(x, squared=True)
    return distances / distances.max()


def _irg_transform(check: Checks, earlier: torch.Tensor, later: torch.Tensor, side: str) -> torch.Tensor:
    """IRG transformation of one network: ``‖f1 − f2‖²`` per sample, clamped at 1e-12, divided by its maximum.
    ``f1`` is average-pooled to ``f2``'s spatial size when larger; when ``f1`` has fewer channels, ``f2``'s channels
    are averaged in adjacent pairs (KD-Zoo ``euclidean_dist_fms``)."""
    if earlier.dim() != 4 or later.dim() != 4:
        check.value_error(f"{side}[0], {side}[1]", "must be [B, C, H, W] maps (the transform compares two maps)",
                          f"shapes {tuple(earlier.shape)} and {tuple(later.shape)}")
    if earlier.shape[2] > later.shape[2]:
        earlier = F.adaptive_avg_pool2d(earlier, later.shape[2:])
    if earlier.shape[1] < later.shape[1]:
        later = (later[:, 0::2] + later[:, 1::2]) / 2.0
    if earlier.shape[1:] != later.shape[1:]:
        check.value_error(f"{side}[1]", f"must have {side}[0]'s channels, or twice as many, and at most its spatial "
                          "size (the transform compares the maps after pooling and channel pairing)",
                          f"{tuple(later.shape)} against {tuple(earlier.shape)}")
    distances = (earlier.reshape(earlier.shape[0], -1) - later.reshape(later.shape[0], -1)).pow(2).sum(dim=-1)
    distances = distances.clamp(min=DISTANCE_CLAMP)
    return distances / distances.max()


def irg_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], vertex_weight: float = 0.1,
             edge_weight: float = 5.0, transform_weight: float = 5.0) -> torch.Tensor:
    """Instance Relationship Graph distillation (Liu et al., CVPR 2019), as Knowledge-Distillation-Zoo's
    ``kd_losses/irg.py`` (the official code is Caffe).

    ``student`` and ``teacher`` are each ``(map1, map2, embedding, logits)``: two feature maps ``[B, C, H, W]`` (map1
    earlier in the network), the pooled embedding ``[B, D]`` and the logits ``[B, K]``. With ``E(x)`` the squared
    pairwise distances of the flattened ``x`` (diagonal 0) divided by their maximum and ``Tr(f1, f2)`` the squared
    per-sample distance between the two maps (map1 pooled to map2's size, map2's channels averaged in pairs when it
    has more) divided by its maximum::

        vertex    = mse(logits_s, logits_t)
        edge      = (mse(E(emb_s), E(emb_t)) + mse(E(map1_s), E(map1_t)) + mse(E(map2_s), E(map2_t))) / 3
        transform = mse(Tr_s, Tr_t)
        loss      = vertex_weight·vertex + edge_weight·edge + transform_weight·transform

    Defaults 0.1 / 5 / 5 are KD-Zoo's. Student and teacher widths may differ except for the logits.
    """
    check = Checks("irg_loss")
    weights = [check.real(name, value) for name, value in
               (("vertex_weight", vertex_weight), ("edge_weight", edge_weight), ("transform_weight", transform_weight))]
    for name, values in (("student", student), ("teacher", teacher)):
        if isinstance(values, torch.Tensor) or not isinstance(values, Sequence) or len(values) != 4:
            check.type_error(name, "a sequence (map1, map2, embedding, logits) of 4 tensors", values)
    for index, (s, t) in enumerate(zip(student, teacher)):
        check.feature_pair(f"student[{index}]", s, f"teacher[{index}]", t)
        check.batch_of_at_least(f"student[{index}]", s, 2, "a batch relation needs at least 2 samples")
    check.logits_pair(student[3], teacher[3], "student[3]", "teacher[3]")
    vertex = F.mse_loss(student[3], teacher[3])
    edge = sum(F.mse_loss(_irg_edge(s), _irg_edge(t)) for s, t in zip(student[:3], teacher[:3])) / 3.0
    transform = F.mse_loss(_irg_transform(check, student[0], student[1], "student"),
                           _irg_transform(check, teacher[0], teacher[1], "teacher"))
    return weights[0] * vertex + weights[1] * edge + weights[2] * transform


def _class_means(x: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means [K, D] of the rows of ``x`` [B, D] weighted by ``members`` [B, K] (0/1), and the counts [K]
    (a class without members has mean 0)."""
    counts = members.sum(dim=0)
    return (members.t() @ x) / counts.clamp(min=1.0).unsqueeze(1), counts


def _category_centres(x: torch.Tensor, labels: torch.Tensor, members: torch.Tensor,
                      correct: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample centre [B, D], class centres [K, D], class counts [K]) of the flattened ``x``.

    The class centres average every sample of the class (CSKD ``cluster``). The per-sample centre is its class
    centre, or with ``correct`` [B] (bool) the centre of the class's correctly predicted samples, the sample itself
    where its class has none (CSKD ``cluster_filter``)."""
    centres, counts = _class_means(x, members)
    if correct is None:
        return centres[labels], centres, counts
    kept, kept_counts = _class_means(x, members * correct.unsqueeze(1).to(x.dtype))
    return torch.where((kept_counts[labels] > 0).unsqueeze(1), kept[labels], x), centres, counts


def _centre_structure_distance(student: torch.Tensor, teacher: torch.Tensor, present: torch.Tensor,
                               num_present: torch.Tensor) -> torch.Tensor:
    """``Σ_{present i, j} (cos_t(i, j) − cos_s(i, j))² / n³``: the mean squared difference of the cosine
    similarities among the present class centres (CSKD ``correlation``), divided once more by ``n`` (as CSKD's
    ``MSE(T_cor, S_cor) / T_cor.size(1)``)."""
    cos_s = F.normalize(student, dim=1, eps=1e-12) @ F.normalize(student, dim=1, eps=1e-12).t()
    cos_t = F.normalize(teacher, dim=1, eps=1e-12) @ F.normalize(teacher, dim=1, eps=1e-12).t()
    pairs = present.unsqueeze(1) & present.unsqueeze(0)
    squared = torch.where(pairs, (cos_t - cos_s).pow(2), torch.zeros((), dtype=cos_s.dtype, device=cos_s.device))
    return squared.sum() / num_present.pow(3)


def category_structure_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor,
                            student_logits: torch.Tensor, teacher_logits: torch.Tensor, intra_weight: float = 0.002,
                            inter_weight: float = 0.04, center_weight: float = 0.1,
                            filter_correct: bool = True) -> torch.Tensor:
    """Category structure KD (Chen, Zheng, Shen, Zeng, Zhou, Zhao, "Improving Knowledge Distillation via Category
    Structure", ECCV 2020), as the official ``xeanzheng/CSKD`` ``train_cifar.py`` (commit a309f0f).

    ``student_features`` and ``teacher_features`` ``[B, ...]`` have one shape (the official student maps its last
    stage through a 1×1 convolution to the teacher's width); ``labels`` ``[B]`` index the ``K`` classes of the
    logits ``[B, K]``. Per class ``c`` present in the batch, ``μ_c`` is the mean of its samples; ``μ̃(i)`` is the
    mean of the samples of ``y_i``'s class that the network itself classifies correctly (argmax of its own logits),
    or ``x_i`` where there are none (``filter_correct=False``: ``μ_{y_i}``). With ``sg`` stop-gradient, ``n`` the
    number of classes present, ``N`` the per-sample size of the features and ``cos`` the cosine-similarity matrix of
    the present class centres (flattened)::

        intra = intra_weight·( mse(f_t − μ̃_t(f_t), f_s − sg(μ̃_s(f_s))) / N
                               + mse(z_t − μ_t(z_t), z_s − sg(μ_s(z_s))) / K )
                + center_weight·mse(z_s, sg(μ_s(z_s)))
        inter = inter_weight·( mse(cos(μ(f_t)), cos(μ(f_s))) / n + mse(cos(μ(z_t)), cos(μ(z_s))) / n )
        loss  = intra + inter

    The teacher side is detached, as in the official code; the student's class centres carry gradients in the inter
    term only. Defaults 0.002 / 0.04 / 0.1 are the official ones. Norms in ``cos`` are clamped at 1e-12 (the
    official code divides unclamped: an all-zero class centre gives it NaN). Computed in float32 (float64 stays).
    Labels are range-checked on the host (one synchronisation on a GPU); the rest runs without one.
    """
    check = Checks("category_structure_loss")
    weights = [check.real(name, value) for name, value in (("intra_weight", intra_weight),
                                                          ("inter_weight", inter_weight),
                                                          ("center_weight", center_weight))]
    check.flag("filter_correct", filter_correct)
    check.feature_pair("student_features", student_features, "teacher_features", teacher_features, same_shape=True,
                       hint=" (map the student's features to the teacher's shape first)")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    if student_logits.shape[0] != student_features.shape[0]:
        check.value_error("student_logits", f"must have the features' batch size {student_features.shape[0]}",
                          f"shape {tuple(student_logits.shape)}")
    check.same_device("student_logits", student_logits, "student_features", student_features)
    labels = check.class_labels(labels, student_logits)
    dtype = torch.float64 if torch.float64 in (student_features.dtype, teacher_features.dtype, student_logits.dtype,
                                               teacher_logits.dtype) else torch.float32
    batch = student_features.shape[0]
    f_s, f_t = student_features.reshape(batch, -1).to(dtype), teacher_features.detach().reshape(batch, -1).to(dtype)
    z_s, z_t = student_logits.to(dtype), teacher_logits.detach().to(dtype)
    members = F.one_hot(labels, z_s.shape[1]).to(dtype)
    correct_s = z_s.detach().argmax(dim=1) == labels if filter_correct else None
    correct_t = z_t.argmax(dim=1) == labels if filter_correct else None

    own_s, centres_fs, counts = _category_centres(f_s, labels, members, correct_s)
    own_t, centres_ft, _ = _category_centres(f_t, labels, members, correct_t)
    logit_own_s, centres_zs, _ = _category_centres(z_s, labels, members, None)
    logit_own_t, centres_zt, _ = _category_centres(z_t, labels, members, None)

    intra = weights[0] * (F.mse_loss(f_s - own_s.detach(), f_t - own_t) / f_t.shape[1]
                          + F.mse_loss(z_s - logit_own_s.detach(), z_t - logit_own_t) / z_t.shape[1]) \
        + weights[2] * F.mse_loss(z_s, logit_own_s.detach())
    present = counts > 0
    num_present = present.sum().to(dtype)
    inter = weights[1] * (_centre_structure_distance(centres_fs, centres_ft, present, num_present)
                          + _centre_structure_distance(centres_zs, centres_zt, present, num_present))
    return intra + inter


def mhgd_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """Multi-head graph distillation's graph loss (Lee & Song, "Graph-based Knowledge Distillation by Multi-head
    Attention Network", BMVC 2019), as the official ``sseung0703/KD_methods_with_TF`` ``nets/Relation.py``
    (``MHGD`` with ``kld_loss``, commit 9fb5414)::

        G_s, G_t = tanh(student_attention), tanh(teacher_attention)
        loss     = Σ_rows Σ_j softmax(G_s)_j · (log_softmax(G_s)_j − log_softmax(G_t)_j)

    the KL divergence ``KL(softmax(G_s) ‖ softmax(G_t))`` of every row over the last dim (the attention of one
    sample to the batch), summed over all rows (heads × samples), not averaged: the official reduction. Inputs are
    attention scores of one shape ``[..., N]`` (MHGD's ``[heads, B, B]``); fp32/fp16/bf16 are computed in fp32 (fp64
    in fp64). Gradients reach the student, and the teacher when it requires grad."""
    check = Checks("mhgd_loss")
    check.logits_pair(student_attention, teacher_attention, "student_attention", "teacher_attention")
    student, teacher = torch.tanh(accumulate(student_attention)), torch.tanh(accumulate(teacher_attention))
    if student.dtype != teacher.dtype:
        student, teacher = student.double(), teacher.double()
    log_student = F.log_softmax(student, dim=-1)
    return (log_student.exp() * (log_student - F.log_softmax(teacher, dim=-1))).sum()
# ------------------------------------------------------------------------------------------------------- REFILLED

def _refilled_labels(check: Checks, labels, batch: int, device: torch.device) -> torch.Tensor:
    check.integers("labels", labels, dims=(1,))
    if labels.shape[0] != batch:
        check.value_error("labels", f"must hold one label per sample ({batch})", f"shape {tuple(labels.shape)}")
    if labels.device != device:
        check.value_error("labels", f"must be on the embeddings' device {device}", f"a tensor on {labels.device}")
    return labels.long()


def _refilled_semi_hard_triplets(embed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REFILLED's triplet miner (njulus/ReFilled @c5e077f ``utils/Triplet.py::generate_semi_hard_triplets``, FaceNet's
    semi-hard rule) on the rows of ``embed`` [B, d] (used as given, no grad): for every positive pair (a, p) (same
    label, a ≠ p) the negative n* is the nearest negative farther than p, ``argmin_{n: y_n≠y_a, D_an > D_ap} D_an``,
    else the farthest negative ``argmax_{n: y_n≠y_a} D_an`` (D the clamped squared distances). Returns
    (negative [B, B] int64, keep [B, B] bool: (a, p) is a positive pair and a has a negative). No host sync."""
    with torch.no_grad():
        x = embed.detach()
        squared = x.pow(2).sum(dim=1)
        distances = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * x @ x.t()).clamp_min(0.0)
        distances = distances * (1.0 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        different = ~same
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        outside = different.unsqueeze(1) & (distances.unsqueeze(1) > distances.unsqueeze(2))   # [a, p, n]
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        nearest_outside = torch.where(outside, distances.unsqueeze(1), inf).argmin(dim=2)      # [a, p]
        farthest = torch.where(different, distances, -inf).argmax(dim=1)                       # [a]
        negative = torch.where(outside.any(dim=2), nearest_outside, farthest.unsqueeze(1))
        keep = same & ~eye & different.any(dim=1, keepdim=True)
    return negative, keep


def refilled_triplet_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 4.0, *,
                          normalization: TripletNormalization = "pairs") -> torch.Tensor:
    """REFILLED stage 1 (Ye, Lu, Zhan, "Distilling Cross-Task Knowledge via Relationship Matching", CVPR 2020), as
    njulus/ReFilled @c5e077f ``Train.py`` (stage 1) with ``utils/Triplet.py``: both embeddings are L2-normalised,
    the semi-hard triplets (a, p, n) are mined on the student's (:func:`_refilled_semi_hard_triplets`), and each
    triplet's probability that a is nearer to p than to n is matched to the teacher's by a binary KL::

        z = (‖e_a − e_n‖ − ‖e_a − e_p‖) / temperature,   p = sigmoid(z)   (teacher: q from t, student: p from s)
        loss = Σ_triplets [q log(q/p) + (1 − q) log((1 − q)/(1 − p))] / (2·#triplets)

    (``nn.KLDivLoss()`` of the [T, 2] (p, 1 − p) pairs, an element mean, hence the 2; the official multiplies by
    1000, the method's weight). ``normalization`` (the sum runs over triplets, not samples, so this is not the
    ``reduction`` vocabulary): ``"pairs"`` (the official / (2·#triplets)), ``"triplets"`` (/ #triplets) or ``"sum"``;
    no triplet (no class with two samples) gives 0. ``student_embed`` [B, d_s], ``teacher_embed``
    [B, d_t] (any widths), ``labels`` [B] integer. Computed in fp32 (fp64 for fp64), log-sigmoids in log space.
    """
    check = Checks("refilled_triplet_loss")
    check.feature_pair("student_embed", student_embed, "teacher_embed", teacher_embed, dims=(2,))
    labels = _refilled_labels(check, labels, student_embed.shape[0], student_embed.device)
    temperature = check.temperature(temperature)
    normalization = check.choice("normalization", normalization, TRIPLET_NORMALIZATIONS)
    dtype = torch.float64 if torch.float64 in (student_embed.dtype, teacher_embed.dtype) else torch.float32
    student = F.normalize(student_embed.to(dtype), p=2, dim=1)
    teacher = F.normalize(teacher_embed.to(dtype), p=2, dim=1)
    negative, keep = _refilled_semi_hard_triplets(student, labels)

    def logit(x: torch.Tensor) -> torch.Tensor:
        distances = torch.linalg.vector_norm(x.unsqueeze(1) - x.unsqueeze(0), dim=2)           # [a, b]
        return (distances.gather(1, negative) - distances) / temperature                       # [a, p]

    z_s, z_t = logit(student), logit(teacher)
    q, log_q, log_1mq = torch.sigmoid(z_t), F.logsigmoid(z_t), F.logsigmoid(-z_t)
    kl = q * (log_q - F.logsigmoid(z_s)) + (1.0 - q) * (log_1mq - F.logsigmoid(-z_s))
    total = torch.where(keep, kl, torch.zeros((), dtype=dtype, device=kl.device)).sum()
    if normalization == "sum":
        return total
    count = keep.sum().clamp_min(1).to(dtype)
    return total / (2.0 * count if normalization == "pairs" else count)


def refilled_classifier_loss(student_logits: torch.Tensor, teacher_embed: torch.Tensor, labels: torch.Tensor,
                             temperature: float = 2.0, *, reduction: Reduction = "mean") -> torch.Tensor:
    """REFILLED stage 2, the teacher's local embedding classifier distilled into the student's logits, as
    njulus/ReFilled @c5e077f ``Train.py`` (stage 2): over the K classes present in the batch, the teacher's centres
    are its mean embeddings of the batch's samples of each class, L2-normalised; the teacher scores every sample
    by the inner products of its (unnormalised) embedding with them, and the student's logits of those classes are
    matched by a KL at ``temperature`` (no T²)::

        c_k = normalize(mean_{i: y_i = k} t_i),   q_i = softmax_K(t_i · c / τ),   p_i = softmax_K(z_i[present] / τ)
        loss = Σ_i KL(q_i ‖ p_i) / (B·K)

    (``nn.KLDivLoss()``: an element mean over the B×K terms; the official multiplies by 1000, the method's weight).
    ``reduction``: ``"mean"`` (the official), ``"batchmean"`` (/ B), ``"sum"`` or ``"none"`` ([B]).
    ``student_logits`` [B, C], ``teacher_embed`` [B, d], ``labels`` [B] in [0, C). No host synchronisation.
    """
    check = Checks("refilled_classifier_loss")
    check.logits("student_logits", student_logits, dims=(2,))
    check.features("teacher_embed", teacher_embed, dims=(2,))
    if teacher_embed.shape[0] != student_logits.shape[0]:
        check.value_error("teacher_embed", f"must have the batch size of student_logits "
                          f"{tuple(student_logits.shape)}", f"shape {tuple(teacher_embed.shape)}")
    check.same_device("teacher_embed", teacher_embed, "student_logits", student_logits)
    labels = check.class_labels(labels, student_logits).long()
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction, ("mean", "batchmean", "sum", "none"))
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_embed.dtype) else torch.float32
    student, teacher = student_logits.to(dtype), teacher_embed.to(dtype)
    classes = student.shape[1]
    counts = torch.zeros(classes, dtype=dtype, device=student.device).index_add_(
        0, labels, torch.ones_like(labels, dtype=dtype))
    present = counts > 0
    sums = torch.zeros(classes, teacher.shape[1], dtype=dtype, device=teacher.device).index_add_(0, labels, teacher)
    centres = F.normalize(sums / counts.clamp_min(1).unsqueeze(1), p=2, dim=1)
    minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=student.device)
    log_q = F.log_softmax(torch.where(present, teacher @ centres.t() / temperature, minus_inf), dim=1)
    log_p = F.log_softmax(torch.where(present, student / temperature, minus_inf), dim=1)
    zero = torch.zeros((), dtype=dtype, device=student.device)
    rows = torch.where(present, log_q.exp() * (torch.where(present, log_q, zero) - torch.where(present, log_p, zero)),
                       zero).sum(dim=1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.mean()
    return rows.sum() / (rows.shape[0] * present.sum().to(dtype))


def _token_layers(check: Checks, name: str, value) -> list[torch.Tensor]:
    """One ``[B, N, D]`` token tensor or a list/tuple of them (one per layer)."""
    if isinstance(value, torch.Tensor):
        layers = [value]
    elif isinstance(value, (list, tuple)) and value:
        layers = list(value)
    else:
        check.type_error(name, "a [B, N, D] token tensor or a non-empty list of them (one per layer)", value)
    for index, layer in enumerate(layers):
        label = name if isinstance(value, torch.Tensor) else f"{name}[{index}]"
        check.floating(label, layer, dims=(3,))
    return layers


def _relation_gap(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((M_t − M_s)²)`` of the Gram matrices ``M = f·fᵀ`` (batched over the leading dim when 3-D)."""
    difference = teacher @ teacher.transpose(-1, -2) - student @ student.transpose(-1, -2)
    return (difference * difference).mean()


def manifold_loss(student_tokens, teacher_tokens, samples: int = 192, sample_weight: float = 0.1,
                  patch_weight: float = 4.0, random_weight: float = 0.2, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Fine-grained manifold distillation (Hao et al., "Learning Efficient Vision Transformers via Fine-Grained
    Manifold Distillation", NeurIPS 2022), Hao840/manifold-distillation @1096b82 ``losses.py`` ``mf_loss`` and
    ``layer_mf_loss``: per layer pair, with ``F = normalize(tokens, dim=-1)`` of shape ``[B, N, D]``::

        patch  = mean((F_t F_tᵀ − F_s F_sᵀ)²)                 # intra-image: [B, N, N], the patches of each image
        sample = mean((f_t f_tᵀ − f_s f_sᵀ)²), f = Fᵀ₀₁       # inter-image: [N, B, B], each patch across the batch
        random = mean((r_t r_tᵀ − r_s r_sᵀ)²)                 # r: the same ``samples`` random rows of F.view(B·N, D)
        loss   = mean over layer pairs of (sample_weight·sample + patch_weight·patch + random_weight·random)

    ``student_tokens`` / ``teacher_tokens``: a ``[B, N, D]`` tensor or a list of them (one per distilled layer pair,
    the same count on both sides); the patch count N and batch B must agree within each pair, the widths D may differ
    (only the relation maps are compared). Pass the patch tokens only (the official drops the student's extra leading
    tokens). The random rows are a fresh ``torch.randperm(B·N)[:samples]`` per layer pair, drawn on the CPU from
    ``generator`` (default: torch's global generator, as the official); with ``samples ≥ B·N`` every row is taken, in
    order, and nothing is drawn (the value of any permutation of all rows is the same). Defaults are the official
    README's DeiT-Tiny ← CaiT-S24 command (``--w-sample 0.1 --w-patch 4 --w-rand 0.2 --K 192``; its
    ``--distillation-beta 1`` multiplies all three). The value is a scalar (fp32, fp64 for fp64 inputs); gradients
    reach both sides (the official teacher runs under ``no_grad``: detach it for offline distillation).
    """
    check = Checks("manifold_loss")
    student_layers = _token_layers(check, "student_tokens", student_tokens)
    teacher_layers = _token_layers(check, "teacher_tokens", teacher_tokens)
    if len(student_layers) != len(teacher_layers):
        check.value_error("teacher_tokens", f"must hold as many layers as student_tokens ({len(student_layers)})",
                          f"{len(teacher_layers)}")
    for index, (student, teacher) in enumerate(zip(student_layers, teacher_layers)):
        if student.shape[:2] != teacher.shape[:2]:
            check.value_error(f"teacher_tokens[{index}]", f"must have the student's batch and token count "
                              f"{tuple(student.shape[:2])} (shape [B, N, D])", f"shape {tuple(teacher.shape)}")
        check.same_device(f"teacher_tokens[{index}]", teacher, f"student_tokens[{index}]", student)
    samples = check.integer("samples", samples, minimum=1)
    weights = [check.real(name, value, nonnegative=True) for name, value in
               (("sample_weight", sample_weight), ("patch_weight", patch_weight), ("random_weight", random_weight))]
    if generator is not None and not isinstance(generator, torch.Generator):
        check.type_error("generator", "a torch.Generator or None", generator)
    total = None
    for student, teacher in zip(student_layers, teacher_layers):
        student = F.normalize(accumulate(student), dim=-1)
        teacher = F.normalize(accumulate(teacher).to(student.dtype), dim=-1)
        patch = _relation_gap(student, teacher)
        sample = _relation_gap(student.transpose(0, 1), teacher.transpose(0, 1))
        batch, tokens, _ = student.shape
        student_rows, teacher_rows = student.reshape(batch * tokens, -1), teacher.reshape(batch * tokens, -1)
        if samples < batch * tokens:
            rows = torch.randperm(batch * tokens, generator=generator)[:samples].to(student.device)
            student_rows, teacher_rows = student_rows[rows], teacher_rows[rows]
        random = _relation_gap(student_rows, teacher_rows)
        layer = weights[0] * sample + weights[1] * patch + weights[2] * random
        total = layer if total is None else total + layer
    return total / len(student_layers)
