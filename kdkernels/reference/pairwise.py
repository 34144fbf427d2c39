"""Pure-PyTorch reference for the ``pairwise`` family: the executable specification of the batch-relation losses.

Each loss compares a relation computed inside a batch of student features ``s`` [B, D_s] with the same relation of
teacher features ``t`` [B, D_t] (the feature widths may differ; features of any shape are flattened to [B, -1] by
the loss layer). Formulas as the official code writes them (../shared/reference/methods.md §2.4, §3.1-3.3):

* ``rkd_distance`` (Park et al., CVPR 2019; lenscloth/RKD ``metric/loss.py::RkdDistance``, ``utils.py::pdist``)::

      d_ij = sqrt(clamp(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, min=1e-12))  for i != j,   d_ii = 0
      d    = d / mean(d[d > 0])              # the student's normaliser is differentiable too
      loss = mean_{B x B} smooth_l1(d_s - d_t)          # beta = 1, diagonal included

* ``rkd_angle`` (``RKdAngle``): ``e_ij = normalize(x_j - x_i)`` (the zero vector when x_j = x_i),
  ``psi_ijk = e_ij . e_ik``, ``loss = mean_{B x B x B} smooth_l1(psi_s - psi_t)``.
* ``sp`` (Tung & Mori, ICCV 2019; RepDistiller ``distiller_zoo/SP.py``): ``G = normalize_rows(x x^T)`` (L2,
  eps 1e-12), ``loss = sum (G_t - G_s)^2 / B^2``.
* ``pkt`` (Passalis & Tefas, ECCV 2018; passalis/probabilistic_kt ``nn/pkt.py``): ``x^ = x / (|x| + eps)``,
  ``S = (x^ x^T + 1) / 2`` divided by its row sums, ``loss = mean_{B x B} S_t log((S_t + eps) / (S_s + eps))``.
* ``cc`` (Peng et al., ICCV 2019; AberHu/Knowledge-Distillation-Zoo ``kd_losses/cc.py``): ``x^ = normalize(x)``,
  ``S = x^ x^T``, ``K = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! S^p`` (elementwise powers: the Taylor series of
  the Gaussian RBF ``exp(-gamma |x^_i - x^_j|^2)``), ``loss = mse(K_s, K_t)``; kernel ``"bilinear"`` uses ``K = S``.

Deliberate differences from the official code, all outside its forward values:

* no host synchronisation: RKD's mean over the positive distances is a masked sum over a masked count;
* PKT's norm is ``torch.norm`` (zero gradient at a zero feature row) rather than ``sqrt(sum(x ** 2))`` (NaN there);
* RKD angle's coincident points (``x_j = x_i``): the official ``F.normalize`` of the zero vector has gradient
  ``1/1e-12`` (1e12-sized gradients); here the unit vector of a zero difference is 0 with zero gradient, the limit
  that the distance's clamp also takes. Forward values are identical.

These functions differentiate by autograd (both sides) and accumulate in float64 for float64 inputs, else
float32. ``eager_*`` are the official formulas verbatim in the inputs' dtype: the benchmarks' baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdkernels._validation import accumulation_dtype

RELATIONS = ("rkd_distance", "rkd_angle", "rkd", "sp", "pkt", "cc")
NORMALIZE_EPS = 1e-12  # F.normalize's default
DISTANCE_CLAMP = 1e-12  # lenscloth's pdist clamp of squared distances


def _rows(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(acc)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """lenscloth's ``pdist(e, squared=False)``: clamped Euclidean distances with an exact zero diagonal."""
    square = x.pow(2).sum(dim=1)
    squared = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * x @ x.t()).clamp(min=DISTANCE_CLAMP)
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return squared.sqrt() * off_diagonal


def _normalized_distances(x: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(x)
    positive = distances > 0
    return distances / ((distances * positive).sum() / positive.sum())


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(student, teacher)
    return F.smooth_l1_loss(_normalized_distances(_rows(student, acc)), _normalized_distances(_rows(teacher, acc)))


def _unit_or_zero(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, v / norm.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))


def _angles(x: torch.Tensor) -> torch.Tensor:
    unit = _unit_or_zero(x.unsqueeze(0) - x.unsqueeze(1))  # [i, j] = x_j - x_i
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(student, teacher)
    return F.smooth_l1_loss(_angles(_rows(student, acc)), _angles(_rows(teacher, acc)))


def rkd(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
        angle_weight: float = 50.0) -> torch.Tensor:
    return distance_weight * rkd_distance(student, teacher) + angle_weight * rkd_angle(student, teacher)


def _similarity(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x @ x.t(), p=2, dim=1, eps=NORMALIZE_EPS)


def sp(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(student, teacher)
    batch = student.shape[0]
    difference = _similarity(_rows(teacher, acc)) - _similarity(_rows(student, acc))
    return (difference * difference).sum() / (batch * batch)


def _pkt_similarity(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)  # torch's norm: zero gradient at a zero row
    similarity = (x @ x.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    acc = accumulation_dtype(student, teacher)
    s, t = _pkt_similarity(_rows(student, acc), eps), _pkt_similarity(_rows(teacher, acc), eps)
    return torch.mean(t * torch.log((t + eps) / (s + eps)))


def cc_kernel_matrix(x: torch.Tensor, gamma: float, order: int, kernel: str) -> torch.Tensor:
    x = F.normalize(x, p=2, dim=-1, eps=NORMALIZE_EPS)
    similarity = x @ x.t()
    if kernel == "bilinear":
        return similarity
    result = torch.zeros_like(similarity)
    for p in range(order + 1):
        result = result + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * similarity.pow(p)
    return result


def cc(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2,
       kernel: str = "gaussian") -> torch.Tensor:
    acc = accumulation_dtype(student, teacher)
    return F.mse_loss(cc_kernel_matrix(_rows(student, acc), gamma, order, kernel),
                      cc_kernel_matrix(_rows(teacher, acc), gamma, order, kernel))


def relation_loss(relation: str, student: torch.Tensor, teacher: torch.Tensor, params: tuple = ()) -> torch.Tensor:
    """The op-level entry: ``relation`` in RELATIONS with its parameters (see kdkernels/ops/pairwise.py)."""
    if relation == "rkd_distance":
        return rkd_distance(student, teacher)
    if relation == "rkd_angle":
        return rkd_angle(student, teacher)
    if relation == "rkd":
        return rkd(student, teacher, *params)
    if relation == "sp":
        return sp(student, teacher)
    if relation == "pkt":
        return pkt(student, teacher, *params)
    if relation == "cc":
        gamma, order, bilinear = params
        return cc(student, teacher, gamma, int(order), "bilinear" if bilinear else "gaussian")
    raise ValueError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")


# The official formulas verbatim, in the inputs' dtype: the baselines of the benchmarks and of the equality tests.

def _eager_pdist(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def eager_rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t_d = _eager_pdist(teacher, squared=False)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = _eager_pdist(student, squared=False)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    return F.smooth_l1_loss(d, t_d, reduction="mean")


def eager_rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle, reduction="mean")


def eager_rkd(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
              angle_weight: float = 50.0) -> torch.Tensor:
    """RepDistiller's ``RKDLoss`` (w_d = 25, w_a = 50) on flattened features."""
    student, teacher = student.view(student.shape[0], -1), teacher.view(teacher.shape[0], -1)
    return distance_weight * eager_rkd_distance(student, teacher) + angle_weight * eager_rkd_angle(student, teacher)


def eager_sp(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    bsz = student.shape[0]
    f_s, f_t = student.view(bsz, -1), teacher.view(bsz, -1)
    G_s = torch.nn.functional.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = torch.nn.functional.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def eager_pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    output_net, target_net = student.view(student.shape[0], -1), teacher.view(teacher.shape[0], -1)
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0
    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def _eager_correlation(feat: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    feat = F.normalize(feat, p=2, dim=-1)
    sim_mat = torch.matmul(feat, feat.t())
    corr_mat = torch.zeros_like(sim_mat)
    for p in range(order + 1):
        corr_mat += math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * torch.pow(sim_mat, p)
    return corr_mat


def eager_cc(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """KD-Zoo's ``CC`` (Gaussian RBF, Taylor order P)."""
    student, teacher = student.view(student.shape[0], -1), teacher.view(teacher.shape[0], -1)
    return F.mse_loss(_eager_correlation(student, gamma, order), _eager_correlation(teacher, gamma, order))
