"""Self-supervised and consistency losses that compose torch ops: what a model is taught by another view of the
data or by its own moving average (the mean teacher's softmax MSE, BYOL's regression loss).

Plain PyTorch: each function IS the reference implementation of its formula, transcribed from the official code
named in its docstring.
"""
from __future__ import annotations

import torch

from kdkernels._validation import SAMPLE_REDUCTIONS, Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, reduce_rows
from kdkernels.losses.kd import kd_loss


def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                     reduction: Reduction = "batchmean") -> torch.Tensor:
    """``Σ_b Σ_c (softmax(s)_bc − softmax(t)_bc)² / C / B``: the mean teacher's consistency cost.

    As CuriousAI/mean-teacher ``pytorch/mean_teacher/losses.py`` ``softmax_mse_loss`` codes it (a sum over the batch
    and the C classes divided by C; ``pytorch/main.py`` then divides by the minibatch size and multiplies by the
    ramped-up consistency weight). Per sample: ``Σ_c (p_s − p_t)² / C``. ``reduction`` over samples:
    ``"batchmean"`` (above), ``"sum"`` (the official function's return value), ``"mean"`` (the same as batchmean:
    a sample's value is already a mean over classes) or ``"none"``. The gradient reaches both inputs; the official
    code sends it to the student only (pass the teacher's logits detached, or from a frozen model).
    """
    check = Checks("softmax_mse_loss")
    check.logits_pair(student_logits, teacher_logits)
    reduction = check.reduction(reduction)
    student = accumulate(student_logits)
    teacher = accumulate(teacher_logits).to(student.dtype)
    classes = student_logits.shape[-1]
    squares = (torch.softmax(student, dim=-1) - torch.softmax(teacher, dim=-1)).pow(2)
    rows = squares.reshape(-1, classes).sum(dim=-1)
    return reduce_rows(rows, "batchmean" if reduction == "mean" else reduction,
                       leading_shape=student_logits.shape[:-1], scale=1.0 / classes)


BYOL_NORM_EPSILON = 1e-12   # deepmind-research byol/utils/helpers.py l2_normalize: rsqrt(max(Σ x², 1e-12))


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x · rsqrt(max(Σ_d x², ε))`` over the last dim (BYOL's ``l2_normalize``, ε = 1e-12 on the squared norm)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True).clamp_min(BYOL_NORM_EPSILON))


def byol_loss(prediction: torch.Tensor, target: torch.Tensor, *,
              reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """``‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z)`` per sample: BYOL's regression loss (Grill et al., NeurIPS 2020).

    As deepmind-research ``byol/utils/helpers.py`` ``regression_loss`` codes it: both inputs [B, D] are
    L2-normalised over D by ``l2_normalize`` (``x · rsqrt(max(Σ x², 1e-12))``), then the squared differences are
    summed over D. ``byol/byol_experiment.py`` ``loss_fn`` takes the batch mean (``"batchmean"``, the default;
    also ``"sum"`` and ``"none"``) of ``regression_loss(online prediction of view 1, target projection of view 2)``
    plus the same with the views swapped. The gradient reaches both inputs; the official code stops it at the
    target (``jax.lax.stop_gradient``): pass the target projection detached, or from a frozen model.
    """
    check = Checks("byol_loss")
    check.feature_pair("prediction", prediction, "target", target, dims=(2,), same_shape=True)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    online = accumulate(prediction)
    target = accumulate(target).to(online.dtype)
    rows = (_l2_normalize(online) - _l2_normalize(target)).pow(2).sum(dim=-1)
    return reduce_rows(rows, reduction)



SIMSIAM_COSINE_EPSILON = 1e-8   # torch.nn.CosineSimilarity's default eps, the criterion of main_simsiam.py


def simsiam_loss(prediction: torch.Tensor, target: torch.Tensor, *,
                 reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """``−cos(p, z)`` per sample: SimSiam's negative cosine similarity (Chen & He, CVPR 2021).

    As facebookresearch/simsiam ``main_simsiam.py`` codes it: ``criterion = nn.CosineSimilarity(dim=1)`` (eps 1e-8)
    of the prediction p [B, D] of one view and the projection z [B, D] of the other, and ``loss = −(criterion(p1,
    z2).mean() + criterion(p2, z1).mean()) · 0.5``: this function is one of the two halves, ``−cos(p, z)`` per
    sample with the batch mean (``"batchmean"``, the default; also ``"sum"`` and ``"none"``). The gradient reaches
    both inputs; the official code stops it at z (``simsiam/builder.py`` returns ``z1.detach(), z2.detach()``): pass
    the target projection detached.
    """
    check = Checks("simsiam_loss")
    check.feature_pair("prediction", prediction, "target", target, dims=(2,), same_shape=True)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    online = accumulate(prediction)
    rows = -torch.nn.functional.cosine_similarity(online, accumulate(target).to(online.dtype), dim=-1,
                                                  eps=SIMSIAM_COSINE_EPSILON)
    return reduce_rows(rows, reduction)


MOCO_NORM_EPSILON = 1e-12   # torch.nn.functional.normalize's default eps, as moco/builder.py calls it


def moco_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, *, temperature: float = 0.07,
              reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """``−log(exp(q·k/T) / (exp(q·k/T) + Σ_j exp(q·n_j/T)))`` per sample: MoCo's InfoNCE of each query against its
    positive key and the queue of negative keys (He, Fan, Wu, Xie, Girshick, CVPR 2020; Chen et al., MoCo v2 2020).

    As facebookresearch/moco ``moco/builder.py`` ``MoCo.forward`` and ``main_moco.py`` code it: ``q =
    normalize(query)`` and ``k = normalize(key)`` over D (``nn.functional.normalize``, eps 1e-12), ``l_pos = q·k``
    [B, 1], ``l_neg = q · queue`` [B, K], ``logits = cat([l_pos, l_neg]) / T``, cross-entropy with the positive at
    index 0 (``nn.CrossEntropyLoss``: the batch mean, ``"batchmean"``; also ``"sum"`` and ``"none"``). ``query``,
    ``key`` [B, D]; ``queue`` [K, D], one negative key per row (the official buffer is its transpose [D, K]), used as
    given: the official queue holds normalised keys. Defaults: T 0.07 (MoCo v1; v2 trains with 0.2). The gradient
    reaches every input; the official code computes the keys under ``no_grad`` and detaches the queue: pass them
    detached.
    """
    check = Checks("moco_loss")
    check.feature_pair("query", query, "key", key, dims=(2,), same_shape=True)
    check.features("queue", queue, dims=(2,))
    if queue.shape[1] != query.shape[1]:
        check.value_error("queue", f"must hold keys of the query's width {query.shape[1]} (shape [K, D])",
                          f"shape {tuple(queue.shape)}")
    check.same_device("queue", queue, "query", query)
    temperature = check.temperature(temperature)
    reduction = check.reduction(reduction, SAMPLE_REDUCTIONS)
    q = torch.nn.functional.normalize(accumulate(query), dim=1, eps=MOCO_NORM_EPSILON)
    k = torch.nn.functional.normalize(accumulate(key).to(q.dtype), dim=1, eps=MOCO_NORM_EPSILON)
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ accumulate(queue).to(q.dtype).T
    logits = torch.cat([positive, negative], dim=1) / temperature
    rows = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return reduce_rows(rows, reduction)


def dino_loss(student_outputs: torch.Tensor, teacher_outputs: torch.Tensor, center: torch.Tensor, *,
              student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> torch.Tensor:
    """``mean_{(i, v), v ≠ i} mean_b Σ_k −softmax((t_i − c)/τ_t)_bk · log softmax(s_v/τ_s)_bk``: DINO's
    cross-entropy of the centred, sharpened teacher on each global view against the student on every other view
    (Caron, Touron, Misra, Jégou, Mairal, Bojanowski, Joulin, ICCV 2021).

    As facebookresearch/dino ``main_dino.py`` ``DINOLoss.forward`` codes it (``student_temp`` 0.1; the teacher
    temperature of the current epoch, 0.04 → 0.07 over the warm-up in the recommended runs): the student's outputs
    on all V_s views ``student_outputs`` [V_s, B, K] (the official chunks of ``student_output / student_temp``), the
    teacher's on the V_t ≤ V_s global views ``teacher_outputs`` [V_t, B, K] (the teacher sees the first V_t of the
    student's views, in the same order), ``center`` [K] or [1, K]; every pair of a teacher view i and a student view
    v ≠ i contributes the batch mean of ``Σ_k −q·log p``, and the pairs are averaged (``total_loss /=
    n_loss_terms``). The teacher's probabilities carry no gradient (``.detach()``); the gradient reaches
    ``student_outputs`` only. The center's update (``update_center``: ``c ← m·c + (1 − m)·mean_{views, b} t``) is
    the caller's. Returns a float32 scalar (float64 for float64 input).
    """
    check = Checks("dino_loss")
    check.floating("student_outputs", student_outputs, dims=(3,))
    check.floating("teacher_outputs", teacher_outputs, dims=(3,))
    check.floating("center", center, dims=(1, 2))
    views, batch, classes = student_outputs.shape
    if teacher_outputs.shape[1:] != (batch, classes) or not 1 <= teacher_outputs.shape[0] <= views:
        check.value_error("teacher_outputs", f"must have shape [V_t, {batch}, {classes}] with 1 <= V_t <= {views} "
                          "(the teacher's global views, the student's first)", f"shape {tuple(teacher_outputs.shape)}")
    if center.shape[-1] != classes or center.numel() != classes:
        check.value_error("center", f"must have shape [{classes}] or [1, {classes}]", f"shape {tuple(center.shape)}")
    if views < 2:
        check.value_error("student_outputs", "must hold at least 2 views (a pair of different views)",
                          f"shape {tuple(student_outputs.shape)}")
    check.same_device("teacher_outputs", teacher_outputs, "student_outputs", student_outputs)
    check.same_device("center", center, "student_outputs", student_outputs)
    student_temperature = check.temperature(student_temperature, "student_temperature")
    teacher_temperature = check.temperature(teacher_temperature, "teacher_temperature")
    log_p = torch.log_softmax(accumulate(student_outputs) / student_temperature, dim=-1)
    teacher = accumulate(teacher_outputs).to(log_p.dtype).detach()
    q = torch.softmax((teacher - accumulate(center).to(log_p.dtype).reshape(1, 1, classes)) / teacher_temperature,
                      dim=-1)
    cross = -torch.einsum("ibk,vbk->iv", q, log_p) / batch          # [V_t, V_s]: batch means of every pair
    same = torch.eye(q.shape[0], views, dtype=torch.bool, device=cross.device)
    return cross.masked_fill(same, 0.0).sum() / (q.shape[0] * views - q.shape[0])


def _infonce_in_batch(prediction: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """``2τ · CE(normalize(p) · normalize(k)ᵀ / τ, n mod B)`` of rows p [N, D] (layers stacked, N a multiple of B)
    against keys k [B, D]: MoCo v3's contrastive loss (one device), a mean over the N rows."""
    p = torch.nn.functional.normalize(prediction, dim=1)
    k = torch.nn.functional.normalize(key, dim=1)
    logits = p @ k.T / temperature
    labels = torch.arange(p.shape[0], device=p.device) % k.shape[0]
    return 2.0 * temperature * torch.nn.functional.cross_entropy(logits, labels)


def sdssl_loss(predictions: torch.Tensor, keys: torch.Tensor, *, temperature: float = 0.2,
               ratio: float = 1.0) -> torch.Tensor:
    """``I(p_L, k) + ratio · mean_{l<L} I(p_l, k)``, ``I(p, k) = 2τ · CE(p̂ k̂ᵀ / τ, arange(B))``: SDSSL's
    self-distilled contrastive loss of one view pair (Jang, Kim, Yoo, Kong, Kim, Kwak, "Self-Distilled
    Self-Supervised Representation Learning", WACV 2023), on MoCo v3's in-batch InfoNCE.

    As hagiss/SDSSL ``pl_train_moco.py`` ``training_step`` codes it (``info_nce_loss`` for the last layer,
    ``info_nce_loss_layer`` for the intermediate ones, τ = 0.2, both scaled by ``2τ``): ``predictions`` [L, B, D]
    are the student's predictions of its L layers' projections (the last row the final layer's), ``keys`` [B, D] the
    momentum teacher's final projections of the other view; p and k are L2-normalised over D and each prediction
    row's positive is the key of the same sample, the other samples' keys its negatives (one device: the official
    gathers keys across ranks). With L = 1 it is MoCo v3's loss. ``ratio`` weights the intermediate layers' mean
    (``loss_output + ratio · loss_mid``; the official code raises it from 0 to ``--ratio 1`` by a cosine); the
    official predictor-only term ``12 · loss_detached`` (the sum over all L layers on detached projections) is this
    function with ``ratio = L − 1``. Returns a float32 scalar (float64 for float64 input); the gradient reaches both
    inputs (the official keys come from the teacher under no gradient: pass them detached).
    """
    check = Checks("sdssl_loss")
    check.floating("predictions", predictions, dims=(3,))
    check.floating("keys", keys, dims=(2,))
    if keys.shape != predictions.shape[1:]:
        check.value_error("keys", f"must have shape [B, D] = {tuple(predictions.shape[1:])} (the predictions' "
                          "[L, B, D] without L)", f"shape {tuple(keys.shape)}")
    check.same_device("keys", keys, "predictions", predictions)
    temperature = check.temperature(temperature)
    ratio = check.real("ratio", ratio, nonnegative=True)
    p = accumulate(predictions)
    k = accumulate(keys).to(p.dtype)
    total = _infonce_in_batch(p[-1], k, temperature)
    if p.shape[0] > 1 and ratio != 0.0:
        middle = _infonce_in_batch(p[:-1].reshape(-1, p.shape[-1]), k, temperature)
        total = total + ratio * middle
    return total

# ---------------------------------------------------------------------------------------------------------- SSKD

SSKD_COSINE_EPSILON = 1e-8   # torch.nn.functional.cosine_similarity's eps, as the official code calls it


def _sskd_groups(check: Checks, name: str, value: torch.Tensor, copies: int) -> torch.Tensor:
    """``value`` [N·copies, D] (rows grouped per image: row n·copies + k is image n's k-th copy) as [N, copies, D]."""
    if value.shape[0] % copies or value.shape[0] == 0:
        check.value_error(name, f"must hold {copies} rows per image (image n's copy k at row n·{copies} + k)",
                          f"shape {tuple(value.shape)}")
    return value.reshape(value.shape[0] // copies, copies, *value.shape[1:])


def _sskd_similarity(features: torch.Tensor, copies: int) -> torch.Tensor:
    """Cosine similarity of every transformed copy (copies 1..) to every normal image (copy 0): [N·(copies−1), N],
    row n·(copies−1) + k − 1 for image n's copy k."""
    grouped = features.reshape(-1, copies, features.shape[-1])
    unit = features / features.norm(dim=-1, keepdim=True).clamp_min(SSKD_COSINE_EPSILON)
    unit = unit.reshape(grouped.shape)
    normal, transformed = unit[:, 0], unit[:, 1:].reshape(-1, unit.shape[-1])
    return transformed @ normal.T


def _rank_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of each row's target column in the row sorted descending: how many entries score above it (0: the
    target is the row's maximum)."""
    return (scores > scores.gather(1, target[:, None])).sum(dim=1)


def _sskd_keep(rank: torch.Tensor, ratio: float) -> torch.Tensor:
    """SSKD's error-level selection (``student.py``): every row whose target ranks first, plus the ``⌊ratio·#wrong⌋``
    wrong rows of the smallest rank (ties kept in row order), as a bool mask; on the device, no host sync."""
    wrong = (rank > 0).sum()
    keep = rank.shape[0] - wrong + torch.floor(wrong.double() * ratio).long()
    order = torch.argsort(rank, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.shape[0], device=order.device)
    return position < keep


def _masked_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, keep: torch.Tensor) -> torch.Tensor:
    """``T² · Σ_{kept rows} KL(softmax(t/T) ‖ softmax(s/T)) / #kept`` (``F.kl_div(..., reduction='batchmean')`` on
    the kept rows); 0 when no row is kept."""
    log_p_s = torch.log_softmax(student / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher / temperature, dim=-1)
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    return rows.sum() / keep.sum().clamp_min(1) * temperature ** 2


def sskd_head_loss(features: torch.Tensor, *, copies: int = 4) -> torch.Tensor:
    """SSKD's first stage (the teacher's self-supervision head): ``CE(cos(z_{n,k}, z_{m,0})_m, n)`` averaged over the
    transformed copies ``k ≥ 1`` of every image ``n`` — each transformed copy must find its own normal image among the
    batch's by cosine similarity (no temperature).

    As xuguodong03/SSKD ``student.py`` (the ``# train ssp_head`` loop): ``rep`` the projection-head outputs of the
    batch of 4 rotations (0°, 90°, 180°, 270°) per image, rows grouped per image (row ``n·copies + k``: image n's copy
    k; copy 0 the normal image), ``simi = F.cosine_similarity(aug_rep, nor_rep)`` [N·(copies−1), N], target the
    image index, ``F.cross_entropy`` (mean). ``features`` [N·copies, D], float; returns a float32 scalar (float64
    for float64 input). The gradient reaches ``features``.
    """
    check = Checks("sskd_head_loss")
    check.floating("features", features, dims=(2,))
    copies = check.integer("copies", copies, minimum=2)
    _sskd_groups(check, "features", features, copies)
    x = accumulate(features)
    similarity = _sskd_similarity(x, copies)
    images = similarity.shape[1]
    target = torch.arange(images, device=x.device).repeat_interleave(copies - 1)
    return torch.nn.functional.cross_entropy(similarity, target)


def sskd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_features: torch.Tensor,
              teacher_features: torch.Tensor, labels: torch.Tensor, *, ce_weight: float = 0.1,
              kd_weight: float = 0.9, tf_weight: float = 2.7, ss_weight: float = 10.0, kd_temperature: float = 4.0,
              tf_temperature: float = 4.0, ss_temperature: float = 0.5, tf_ratio: float = 1.0,
              ss_ratio: float = 0.75, copies: int = 4) -> torch.Tensor:
    """SSKD's student loss (Xu, Liu, Li, Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020)::

        ce·CE(s_nor, y) + kd·KD_T(s_nor, t_nor) + tf·KD_Ttf(s_aug, t_aug | kept_tf) + ss·KD_Tss(S_s, S_t | kept_ss)

    As xuguodong03/SSKD ``student.py`` (defaults: ``--ce-weight 0.1 --kd-weight 0.9 --tf-weight 2.7 --ss-weight 10``,
    ``--kd-T 4 --tf-T 4 --ss-T 0.5``, ``--ratio-tf 1.0 --ratio-ss 0.75``). The rows are grouped per image (row
    ``n·copies + k``: image n's k-th transformed copy, copy 0 the normal image; SSKD's copies are the rotations by
    0°, 90°, 180°, 270°):

    * ``CE`` (mean) and ``KD_T = T²·KL(softmax(t/T) ‖ softmax(s/T))`` (batchmean) on the normal rows;
    * the transformation term: the same KD at ``tf_temperature`` on the transformed rows, kept by the error-level
      ranking: a row is "wrong" when the teacher's probability of the image's label is not its maximum; all right
      rows are kept, plus the ``⌊tf_ratio·#wrong⌋`` wrong rows whose label ranks best; batchmean over the kept rows;
    * the self-supervision term: ``S[i, m] = cos(f_i, f_m)`` of each transformed row's embedding with each image's
      normal embedding ([N·(copies−1), N], per side: the projection-head outputs), the KD at ``ss_temperature`` of
      the student's rows to the teacher's, kept by the same ranking with the image's own index as the label
      (``ss_ratio``), batchmean over the kept rows (0 when none is kept; the official code would give NaN).

    The ranks count the entries strictly above the label's (the official ``argsort`` position; they differ only on
    exact ties) and ties at the cut are kept in row order (the official ``argsort`` leaves their order unspecified).
    ``student_logits``/``teacher_logits`` [N·copies, C], ``student_features``/``teacher_features`` [N·copies, D_s] /
    [N·copies, D_t], ``labels`` [N] (one per image); float inputs of any precision (computed in float32, float64
    kept). Returns a float32 scalar. The teacher is used as given (the official code stops its gradient: pass it
    detached, or from a frozen model).
    """
    check = Checks("sskd_loss")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    check.feature_pair("student_features", student_features, "teacher_features", teacher_features, dims=(2,))
    copies = check.integer("copies", copies, minimum=2)
    _sskd_groups(check, "student_logits", student_logits, copies)
    if student_features.shape[0] != student_logits.shape[0]:
        check.value_error("student_features", f"must have one row per logits row ({student_logits.shape[0]})",
                          f"shape {tuple(student_features.shape)}")
    check.same_device("student_features", student_features, "student_logits", student_logits)
    images = student_logits.shape[0] // copies
    labels = check.class_labels(labels, student_logits[::copies])
    weights = {name: check.real(name, value, nonnegative=True) for name, value in
               (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("tf_weight", tf_weight),
                ("ss_weight", ss_weight))}
    kd_t = check.temperature(kd_temperature, "kd_temperature")
    tf_t = check.temperature(tf_temperature, "tf_temperature")
    ss_t = check.temperature(ss_temperature, "ss_temperature")
    tf_ratio = check.probability("tf_ratio", tf_ratio)
    ss_ratio = check.probability("ss_ratio", ss_ratio)

    s_logits = accumulate(student_logits)
    t_logits = accumulate(teacher_logits).to(s_logits.dtype)
    s_grouped, t_grouped = s_logits.reshape(images, copies, -1), t_logits.reshape(images, copies, -1)
    s_nor, t_nor = s_grouped[:, 0], t_grouped[:, 0]
    s_aug, t_aug = s_grouped[:, 1:].reshape(-1, s_logits.shape[-1]), t_grouped[:, 1:].reshape(-1, s_logits.shape[-1])

    ce = torch.nn.functional.cross_entropy(s_nor, labels)
    everything = torch.ones(images, dtype=torch.bool, device=s_logits.device)
    kd = _masked_kl(s_nor, t_nor, kd_t, everything)
    aug_labels = labels.repeat_interleave(copies - 1)
    tf = _masked_kl(s_aug, t_aug, tf_t, _sskd_keep(_rank_of(t_aug, aug_labels), tf_ratio))

    s_similarity = _sskd_similarity(accumulate(student_features).to(s_logits.dtype), copies)
    t_similarity = _sskd_similarity(accumulate(teacher_features).to(s_logits.dtype), copies)
    own = torch.arange(images, device=s_logits.device).repeat_interleave(copies - 1)
    ss = _masked_kl(s_similarity, t_similarity, ss_t, _sskd_keep(_rank_of(t_similarity, own), ss_ratio))
    return (weights["ce_weight"] * ce + weights["kd_weight"] * kd + weights["tf_weight"] * tf
            + weights["ss_weight"] * ss)


# --------------------------------------------------------------------------------------------------------- HSAKD

def hsakd_joint_labels(labels: torch.Tensor, copies: int = 4) -> torch.Tensor:
    """HSAKD's self-supervised augmented labels for rows grouped per image (row ``n·copies + k``: image n's k-th
    transformed copy): ``copies·y_n + k`` (winycg/HSAKD ``train_*_cifar.py``: ``target*4 + i``), int64 [N·copies]."""
    check = Checks("hsakd_joint_labels")
    check.integers("labels", labels, dims=(1,))
    copies = check.integer("copies", copies, minimum=1)
    return (labels.long()[:, None] * copies + torch.arange(copies, device=labels.device)).reshape(-1)


def _hsakd_logits_list(check: Checks, name: str, value) -> list[torch.Tensor]:
    items = [value] if isinstance(value, torch.Tensor) else check.tensor_list(name, value)
    for index, item in enumerate(items):
        check.logits(f"{name}[{index}]" if not isinstance(value, torch.Tensor) else name, item, dims=(2,))
    return items


def hsakd_head_loss(aux_logits, labels: torch.Tensor, *, copies: int = 4) -> torch.Tensor:
    """HSAKD's auxiliary-classifier objective: ``Σ_heads CE(a_h, copies·y + k)`` (each a mean over the N·copies
    rows), the joint class × transformation classification of every transformed copy.

    As winycg/HSAKD ``train_teacher_cifar.py`` (``loss_cls += criterion_cls(ss_logits[i], labels)`` with ``labels =
    target*4 + i`` over the stacked rotations ``torch.rot90(input, k, (2, 3))``, k = 0..3). ``aux_logits``: one
    tensor [N·copies, copies·C] or a list of them (one per auxiliary head), rows grouped per image (row ``n·copies +
    k``: image n's copy k); ``labels`` [N] class indices. Returns a float32 scalar (float64 for float64 input).
    """
    check = Checks("hsakd_head_loss")
    heads = _hsakd_logits_list(check, "aux_logits", aux_logits)
    copies = check.integer("copies", copies, minimum=1)
    check.integers("labels", labels, dims=(1,))
    total = None
    for index, head in enumerate(heads):
        if head.shape[0] != labels.shape[0] * copies or head.shape[1] % copies:
            check.value_error("aux_logits", f"must hold {copies} rows per label and {copies}·C columns (the "
                              f"joint class × transformation classes; labels {tuple(labels.shape)})",
                              f"shape {tuple(head.shape)} at head {index}")
        joint = check.class_labels(hsakd_joint_labels(labels.to(head.device), copies), head)
        loss = torch.nn.functional.cross_entropy(accumulate(head), joint)
        total = loss if total is None else total + loss
    return total


def hsakd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_aux_logits,
               teacher_aux_logits, labels: torch.Tensor, *, temperature: float = 3.0, ce_weight: float = 1.0,
               copies: int = 4) -> torch.Tensor:
    """HSAKD's student loss (Yang, An, Xu, Xu, "Hierarchical Self-supervised Augmented Knowledge Distillation",
    IJCAI 2021)::

        ce·CE(z_s[normal rows], y) + Σ_heads KD_T(a_s,h, a_t,h) + KD_T(z_s, z_t)

    As winycg/HSAKD ``train_student_cifar.py`` (``--kd_T 3``): ``loss_cls = CE(logits[0::4], target)``, ``loss_div
    = Σ_i DistillKL(ss_logits[i], t_ss_logits[i]) + DistillKL(logits, t_logits)``, ``DistillKL`` =
    ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` batchmean (:func:`kdkernels.kd_loss`), over all N·copies rows. The rows are
    grouped per image (row ``n·copies + k``: image n's k-th rotation, copy 0 the normal image). ``student_logits``
    / ``teacher_logits`` [N·copies, C]; ``student_aux_logits`` / ``teacher_aux_logits``: one tensor or a list, one
    [N·copies, copies·C] per head (the joint class × rotation distributions, paired head by head); ``labels`` [N].
    Returns a float32 scalar. The teacher is used as given (the official code runs it under ``torch.no_grad``).
    """
    check = Checks("hsakd_loss")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    students = _hsakd_logits_list(check, "student_aux_logits", student_aux_logits)
    teachers = _hsakd_logits_list(check, "teacher_aux_logits", teacher_aux_logits)
    if len(students) != len(teachers):
        check.value_error("teacher_aux_logits", f"must hold one head per student head ({len(students)})",
                          f"{len(teachers)} heads")
    copies = check.integer("copies", copies, minimum=1)
    temperature = check.temperature(temperature)
    ce_weight = check.real("ce_weight", ce_weight, nonnegative=True)
    rows = student_logits.shape[0]
    if rows % copies:
        check.value_error("student_logits", f"must hold {copies} rows per image", f"shape {tuple(student_logits.shape)}")
    for index, (student, teacher) in enumerate(zip(students, teachers)):
        if student.shape[0] != rows:
            check.value_error("student_aux_logits", f"must have one row per logits row ({rows})",
                              f"shape {tuple(student.shape)} at head {index}")
        check.same_shape("teacher_aux_logits", teacher, "student_aux_logits", student, f" (head {index})")
        check.same_device("teacher_aux_logits", teacher, "student_logits", student_logits)
    labels = check.class_labels(labels, student_logits[::copies])
    total = ce_weight * torch.nn.functional.cross_entropy(accumulate(student_logits[::copies]), labels)
    for student, teacher in zip(students, teachers):
        total = total + _hsakd_kd(student, teacher, temperature)
    return total + _hsakd_kd(student_logits, teacher_logits, temperature)


def _hsakd_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(softmax(t/T) ‖ softmax(s/T))`` batchmean (the fused :func:`kdkernels.kd_loss`), in float32/64."""
    return kd_loss(student, teacher, temperature).to(torch.float64 if student.dtype == torch.float64 else
                                                     torch.float32)
