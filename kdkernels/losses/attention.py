"""Attention-based distillation losses: the student matches the teacher's attention maps (attention transfer).

Plain PyTorch: each function IS the reference of its method, transcribed from the official code named in its
docstring (../shared/reference/methods.md §2).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks, Reduction
from kdkernels.losses._common import accumulate, pool_to_smaller
from kdkernels.losses.feature import reduce_elements


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's spatial attention ``normalize(mean_c |f|^p)`` [B, H·W] (L2 over the positions)."""
    return F.normalize(features.pow(p).mean(1).reshape(features.shape[0], -1))


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) for one stage, as RepDistiller ``AT.py`` /
    attention-transfer ``utils.py::at_loss``: the larger map pooled to the smaller, ``a(f) = normalize(mean_c f^p)``,
    ``loss = mean_{B,HW} (a(f_s) − a(f_t))²``. Channel counts may differ. ``reduction`` over the B·HW terms:
    ``"mean"`` (official), ``"batchmean"``, ``"sum"`` or ``"none"`` (per sample)."""
    check = Checks("at_loss")
    check.feature_pair("student", student, "teacher", teacher, dims=(4,))
    p = check.real("p", p, positive=True)
    reduction = check.reduction(reduction)
    student, teacher = pool_to_smaller(student, teacher)
    return reduce_elements((attention_map(student, p) - attention_map(teacher, p)).pow(2), reduction)


def _grid(check: Checks, name: str, value, height: int, width: int) -> tuple[int, int]:
    """A pair of positive ints (rows, columns), at most the map's (height, width)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        check.type_error(name, "a pair of ints (rows, columns) or None", value)
    rows = check.integer(f"{name}[0]", value[0], minimum=1, maximum=height)
    columns = check.integer(f"{name}[1]", value[1], minimum=1, maximum=width)
    return rows, columns


def _patch_groups(x: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """TaT-seg ``grid_tensor_seq`` + ``stack_attn``: the map cut into rows × columns patches of (H // rows,
    W // columns) (``unfold``: a remainder is dropped), the patches stacked along the channels, patch-major:
    [N, C, H, W] -> [N, rows·columns·C, H // rows, W // columns]."""
    patch_h, patch_w = x.shape[2] // rows, x.shape[3] // columns
    patches = x.unfold(2, patch_h, patch_h).unfold(3, patch_w, patch_w)      # [N, C, rows, columns, ph, pw]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, patch_h, patch_w)


def ttkd_loss(student_query: torch.Tensor, student_value: torch.Tensor, teacher_map: torch.Tensor,
              teacher_key: torch.Tensor | None = None, *, heads: int = 1, patches: Sequence[int] | None = None,
              anchors: Sequence[int] | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """Target-aware transformer KD (Lin et al., "Knowledge Distillation via the Target-aware Transformer", CVPR 2022),
    as sihaoevery/TaT @a6cc329 ``torchdistill/losses/single.py`` (``MaskedFM.batch_loss``): every student position i
    aggregates the student's value map by its similarity to the teacher's positions, and the reconfigured map is
    regressed on the teacher's::

        A_h = softmax_j(q_{h,i} · k_{h,j})  [HW × HW, no scaling],   out_h = A_h v_h,   loss = mean (out − t)²

    with q, v, k, t read as ``[N, heads, H·W, C/heads]`` (channels split into heads, head-major, as ``einops``
    ``'b (h d) x y -> b h (x y) d'``). ``student_query`` / ``student_value`` are the student map through the query and
    value embeddings (the official conv 3×3 + BN each, C_s → C_t), ``teacher_map`` the teacher's map t, and
    ``teacher_key`` the key map (default: the teacher map itself, the official identity key embedding); all
    ``[N, C, H, W]`` of one shape. ``reduction`` over the squared errors: ``"mean"`` (official ``nn.MSELoss``),
    ``"batchmean"``, ``"sum"`` or ``"none"`` (per sample). The teacher is used as given (the official teacher runs
    under ``no_grad``).

    The segmentation code's variants (sihaoevery/TaT-seg @9e34e0e ``distiller_tat.py``), on the same formula:
    ``patches=(n, m)``, patch-group distillation (``distillation_patchgroup``, ``attn_type='stack_attn'``): every map
    is cut into n × m patches of (H // n, W // m) and the patches are stacked along the channels
    ([N, n·m·C, H // n, W // m], patch-major), so that attention runs within a patch, ``heads`` dividing n·m·C;
    ``anchors=(a, b)``, anchor-point distillation (``distillation_anchorpoint``, which uses 1 head): every map is
    average-pooled with kernel and stride (H // a, W // b) first. TaT-seg weighs them ``β·patch + γ·anchor`` (β 1,
    γ 0.4, n = m = 16, 64 heads, 32 × 32 anchors in ``train_voc_resnet18.sh``); one call computes one of them.
    """
    check = Checks("ttkd_loss")
    for name, value in (("student_value", student_value), ("teacher_map", teacher_map)):
        check.feature_pair("student_query", student_query, name, value, dims=(4,))
        check.same_shape(name, value, "student_query", student_query,
                         " (map the student with query/value embeddings to the teacher's channels and size)")
    if teacher_key is not None:
        check.feature_pair("student_query", student_query, "teacher_key", teacher_key, dims=(4,))
        check.same_shape("teacher_key", teacher_key, "student_query", student_query)
    heads = check.integer("heads", heads, minimum=1)
    height, width = student_query.shape[2:]
    if patches is not None and anchors is not None:
        check.value_error("anchors", "must be None when patches is given (the patch-group and anchor-point losses "
                          "are separate calls)", repr(anchors))
    grid = None if patches is None else _grid(check, "patches", patches, height, width)
    pool = None if anchors is None else _grid(check, "anchors", anchors, height, width)
    channels = student_query.shape[1] * (grid[0] * grid[1] if grid else 1)
    if channels % heads:
        check.value_error("heads", f"must divide the channels ({channels}"
                          f"{' = patches × channels' if grid else ''})", heads)
    reduction = check.reduction(reduction)
    query = accumulate(student_query)
    value = accumulate(student_value).to(query.dtype)
    target = accumulate(teacher_map).to(query.dtype)
    key = target if teacher_key is None else accumulate(teacher_key).to(query.dtype)
    maps = [query, key, value, target]
    if grid is not None:
        maps = [_patch_groups(x, *grid) for x in maps]
    elif pool is not None:
        kernel = (height // pool[0], width // pool[1])
        maps = [F.avg_pool2d(x, kernel, kernel) for x in maps]
    query, key, value, target = maps
    batch, _, height, width = query.shape

    def split(x):  # [N, (h d), H, W] -> [N, h, H·W, d]
        return x.reshape(batch, heads, channels // heads, height * width).transpose(2, 3)

    attention = torch.softmax(split(query) @ split(key).transpose(2, 3), dim=-1)
    out = (attention @ split(value)).transpose(2, 3).reshape(batch, channels, height, width)
    return reduce_elements((out - target).pow(2), reduction)
