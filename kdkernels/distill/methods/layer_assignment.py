"""Layer-assignment methods (issue 16): which teacher layer teaches which student layer, learned by attention over
every (student layer, teacher layer) pair (SemCKD, AFD) or by meta-networks updated by a meta-step (L2T-ww).

Every method taps all of the models' ``feature_points`` stages by default (``student_layers`` / ``teacher_layers``
name other taps); the learned parts (embeddings, projections, meta-networks) are modules of the methods' terms, built
from the first batch's shapes, so the distiller optimises and checkpoints them. The losses are the public
:mod:`kdkernels.losses.layer_assignment` functions.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.distill.connectors import output_channels
from kdkernels.distill.hooks import find_module, split_tap
from kdkernels.distill.meta_steps import MetaStep
from kdkernels.distill.methods._common import offline
from kdkernels.distill.methods.feature import check_term, response_terms, stage_taps, tapped
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, Term
from kdkernels.losses._common import pool_to_smaller


def _check_maps(term: Term, example: dict) -> None:
    """Every tapped value is a [B, C, H, W] map (a ValueError naming the term and the values otherwise)."""
    bad = [f"{key} {tuple(example[key].shape)}" for key in term.reads
           if not isinstance(example[key], torch.Tensor) or example[key].dim() != 4]
    if bad:
        raise ValueError(f"term {term.name!r} reads [B, C, H, W] maps, got {', '.join(bad)}: pass student_layers / "
                         f"teacher_layers naming such maps")


# --------------------------------------------------------------------------------------------------------- SemCKD

class MLPEmbed(nn.Module):
    """SemCKD ``models/util.py`` ``MLPEmbed``: flatten, Linear(d_in, 2·d_out), ReLU, Linear(2·d_out, d_out), L2
    normalisation of each row (``x / ‖x‖₂``, no epsilon, as the official ``Normalize``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, x):
        x = self.linear2(F.relu(self.linear1(x.reshape(x.shape[0], -1))))
        return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def aa_embed(in_channels: int, out_channels: int) -> nn.Sequential:
    """SemCKD ``models/util.py`` ``AAEmbed``: conv 1×1 → BN → ReLU → conv 3×3 (padding 1) → BN → ReLU → conv 1×1,
    no conv bias, mid channels ``2·out_channels``, default init."""
    mid = 2 * out_channels
    return nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, out_channels, 1, bias=False))


class SemCKDTerm(Term):
    """SemCKD's cross-layer attention (official ``SelfA``) and loss (:func:`kdkernels.semckd_loss`).

    Per layer the batch's similarity matrix ``G = f fᵀ`` [B, B] (each sample's flattened map); queries
    ``q_i = MLPEmbed_i(G^s_i)`` and keys ``k_j = MLPEmbed_j(G^t_j)`` (input B, output B // factor, L2-normalised);
    attention ``α_b = softmax_j(q_bi · k_bj)`` [B, S, T]; for every pair the larger map is average-pooled to the
    smaller one's size and the student map projected by ``AAEmbed_ij`` to the teacher's channels. The embeddings are
    sized by the first batch (``batch_size``); a batch of another size (the last, short one) gives 0 (the official
    code skips that step).
    """

    def __init__(self, student_keys: Sequence[str], teacher_keys: Sequence[str], weight: float, factor: int):
        super().__init__("semckd", [*student_keys, *teacher_keys], weight)
        self.num_student, self.num_teacher = len(student_keys), len(teacher_keys)
        self.factor = factor
        self.queries, self.keys, self.regressors = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()

    def build(self, example):
        _check_maps(self, example)
        values = [example[key] for key in self.reads]
        students, teachers = values[: self.num_student], values[self.num_student:]
        batch = students[0].shape[0]
        if batch // self.factor < 1:
            raise ValueError(f"term 'semckd' embeds the batch similarity matrices into batch_size // factor "
                             f"dimensions: a batch of {batch} with factor {self.factor} leaves none")
        if not len(self.regressors):
            dim = batch // self.factor
            self.keys = nn.ModuleList(MLPEmbed(batch, dim) for _ in teachers)
            self.queries = nn.ModuleList(MLPEmbed(batch, dim) for _ in students)
            self.regressors = nn.ModuleList(aa_embed(s.shape[1], t.shape[1]) for s in students for t in teachers)
        check_term(self, example, lambda: self.loss(*values, context=None))

    @property
    def batch_size(self) -> int | None:
        """The batch size the embeddings take (their input width), None before :meth:`build`."""
        return self.keys[0].linear1.in_features if len(self.keys) else None

    def attention(self, students, teachers):
        """[B, S, T]: softmax over the teacher layers of the query·key products."""
        def similarity(f):
            f = f.reshape(f.shape[0], -1)
            return f @ f.t()
        queries = torch.stack([q(similarity(f)) for q, f in zip(self.queries, students)], dim=1)   # B × S × d
        keys = torch.stack([k(similarity(f)) for k, f in zip(self.keys, teachers)], dim=2)         # B × d × T
        return F.softmax(torch.bmm(queries, keys), dim=-1)

    def loss(self, *values, context):
        students, teachers = values[: self.num_student], values[self.num_student:]
        if students[0].shape[0] != self.batch_size:
            return students[0].new_zeros(())
        projected, targets = [], []
        for i, student in enumerate(students):
            projected.append([])
            targets.append([])
            for j, teacher in enumerate(teachers):
                s, t = pool_to_smaller(student, teacher)
                projected[i].append(self.regressors[i * self.num_teacher + j](s))
                targets[i].append(t)
        return kdkernels.semckd_loss(projected, targets, self.attention(students, teachers))


@register("semckd", category="feature",
          paper="Chen, Mei, Zhang, Wang, Wang, Feng, Chen. Cross-Layer Distillation with Semantic Calibration. "
                "AAAI 2021",
          approximation="the official code skips the whole training step of a batch smaller than --batch_size (its "
                        "query/key embeddings take the B×B similarity matrix); here that short batch still trains "
                        "on CE + KD and the SemCKD term is 0 (enable drop_last to skip such batches entirely)")
def semckd(setup: Setup, weight: float = 400.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
           temperature: float = 4.0, factor: int = 4, student_layers: Sequence[str] | None = None,
           teacher_layers: Sequence[str] | None = None) -> Recipe:
    """SemCKD: ``ce·CE + kd·KD_T + 400·Σ_{b,i,j} α_bij·mean((AAEmbed_ij(s_i) − t_j)²_b) / (B·S)`` over every
    (student stage i, teacher stage j) pair (:func:`kdkernels.semckd_loss`), ``α_b = softmax_j(q_bi·k_bj)``.

    Queries and keys: each layer's batch similarity matrix ``f fᵀ`` [B, B] through its own ``MLPEmbed`` (Linear
    B→2B/f, ReLU, Linear 2B/f→B/f, L2 normalisation; f = ``factor`` 4); per pair the larger map is adaptive-average
    pooled to the smaller's size (student pooled when larger, else the teacher) and the student map goes through
    ``AAEmbed`` (conv1×1–BN–ReLU–conv3×3–BN–ReLU–conv1×1, mid 2·C_t) to the teacher's channels. The attention
    module's gradients reach the student through its similarity matrices (not detached, as the official code).

    Provenance: DefangChen/SemCKD @ebe5db1: ``models/util.py`` (``SelfA``, ``MLPEmbed``, ``AAEmbed``,
    ``Normalize``), ``distiller_zoo/SemCKD.py`` (``SemCKDLoss``), ``helper/loops.py`` (``loss = γ·CE + α·KD + β·
    SemCKD`` on ``feat[1:-1]``, the stage outputs), ``train_student.py`` (``SelfA(..., opt.batch_size, ...)``, KD T 4)
    and ``scripts/run_cifar_distill.sh`` (``-r 1 -a 1 -b 400``). The official pools to ``(H, H)`` (square maps);
    here to the smaller map's (H, W), the same on square maps. Taps: every ``kd_points`` stage of both models.
    """
    teacher = setup.require_teacher("semckd")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"semckd: factor must be an int >= 1 (embedding size batch_size // factor), got {factor!r}")
    if not weight >= 0:
        raise ValueError(f"semckd: weight must be >= 0, got {weight!r}")
    term = SemCKDTerm(tapped("student", stage_taps(setup.student, student_layers)),
                      tapped("teacher", stage_taps(teacher, teacher_layers)), weight, factor)
    return offline("semckd", setup, [*response_terms(ce_weight, kd_weight, temperature), term])


# ------------------------------------------------------------------------------------------------------------ AFD

def linear_bn(dim_in: int, dim_out: int) -> nn.Sequential:
    """AFD ``distill/AFD.py`` ``nn_bn_relu`` without its ReLU: Linear(dim_in, dim_out) then BatchNorm1d(dim_out)
    (the ReLU is applied by the caller where the official passes ``relu=True``)."""
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.BatchNorm1d(dim_out))


class AFDTerm(Term):
    """AFD's attention meta-network (official ``Attention``, ``LinearTransformTeacher``, ``LinearTransformStudent``)
    and loss (:func:`kdkernels.afd_loss`).

    Queries from the teacher: ``q_t = BN(W_t·GAP(f_t))`` [B, T, d]; keys from the student:
    ``k_s = ReLU(BN(W_s·GAP(f_s)))``, then the bilinear map ``BN(W_b·k_s)`` viewed [B, S, T, d]; positional
    encodings ``p_t`` [T, d], ``p_s`` [S, d] (Xavier-normal init); attention
    ``α_bts = softmax_s((bilinear_bst·q_bt + p_t·p_s) / √d)`` [B, T, S].
    """

    def __init__(self, student_keys: Sequence[str], teacher_keys: Sequence[str], weight: float, qk_dim: int):
        super().__init__("afd", [*student_keys, *teacher_keys], weight)
        self.num_student, self.num_teacher = len(student_keys), len(teacher_keys)
        self.qk_dim = qk_dim
        self.p_t = nn.Parameter(torch.empty(self.num_teacher, qk_dim))
        self.p_s = nn.Parameter(torch.empty(self.num_student, qk_dim))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)
        self.query_layers, self.key_layers = nn.ModuleList(), nn.ModuleList()
        self.bilinear = nn.Identity()

    def build(self, example):
        _check_maps(self, example)
        values = [example[key] for key in self.reads]
        if not len(self.key_layers):
            self.query_layers = nn.ModuleList(linear_bn(t.shape[1], self.qk_dim) for t in values[self.num_student:])
            self.key_layers = nn.ModuleList(linear_bn(s.shape[1], self.qk_dim) for s in values[: self.num_student])
            self.bilinear = linear_bn(self.qk_dim, self.qk_dim * self.num_teacher)
        check_term(self, example, lambda: self.loss(*values, context=None))

    def attention(self, students, teachers):
        """[B, T, S]: each teacher layer's softmax over the student layers."""
        batch = students[0].shape[0]
        query = torch.stack([layer(t.mean(dim=(2, 3))) for layer, t in zip(self.query_layers, teachers)], dim=1)
        key = torch.stack([F.relu(layer(s.mean(dim=(2, 3)))) for layer, s in zip(self.key_layers, students)], dim=1)
        bilinear = self.bilinear(key.reshape(batch * self.num_student, -1)).reshape(
            batch, self.num_student, self.num_teacher, -1)
        logits = (torch.einsum("bstq,btq->bts", bilinear, query) + self.p_t @ self.p_s.t()) / self.qk_dim ** 0.5
        return F.softmax(logits, dim=2)

    def loss(self, *values, context):
        students, teachers = list(values[: self.num_student]), list(values[self.num_student:])
        return kdkernels.afd_loss(students, teachers, self.attention(students, teachers))


@register("afd", category="feature",
          paper="Ji, Heo, Park. Show, Attend and Distill: Knowledge Distillation via Attention-based Feature "
                "Matching. AAAI 2021",
          approximation="the official code matches the output of every residual block (utils.py LAYER: e.g. 18 "
                        "teacher and 6 student blocks for WRN-40-2 → WRN-16-2); the default taps here are the "
                        "models' stage outputs (pass every block's path as student_layers / teacher_layers for the "
                        "official pairing)",
          presets={"digits": {"weight": 20.0}})
def afd(setup: Setup, weight: float = 200.0, ce_weight: float = 1.0, kd_weight: float = 0.9,
        temperature: float = 4.0, qk_dim: int = 128, student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None) -> Recipe:
    """AFD: ``ce·CE + 0.9·KD_4 + 200·Σ_t mean_b Σ_s α_bts·mean_hw(v_st − v_t)²`` (:func:`kdkernels.afd_loss`),
    ``v = normalize(mean_c f²)`` (the student's pooled to the teacher layer's size), ``α`` the attention of
    :class:`AFDTerm` (queries from the teacher's channel means, bilinear keys from the student's, positional
    encodings ``p_t``, ``p_s``, ``qk_dim`` 128, softmax over the student layers).

    Provenance: clovaai/attention-feature-distillation @dd990d0: ``distill/AFD.py`` (``AFD``, ``Attention``,
    ``LinearTransformTeacher``, ``LinearTransformStudent``, ``Sample``, ``nn_bn_relu``), ``utils.py``
    (``train_kl``: ``loss = CE + α·KL + β·AFD``), ``main.py`` (``--alpha 0.9 --temperature 4 --beta 200 --qk_dim
    128``), ``distill/KD.py`` (``DistillKL``: batchmean·T²). The meta-network trains with the student (train-mode
    batch norms). Taps: every ``kd_points`` stage of both models (approximation flag: the official taps every block).

    Preset ``digits`` (our choice, not official): β 20. The normalised maps have H·W entries, so their mean squared
    distance scales as 1/(H·W): β 200 is tuned for CIFAR's 32×32…8×8 maps, and on the digits models' 8×8…2×2 stage
    maps it dominates CE (the student reached 75.5 % at β 200 and 95.4 % at β 20 on digits, 1 seed, 30 epochs).
    """
    teacher = setup.require_teacher("afd")
    if isinstance(qk_dim, bool) or not isinstance(qk_dim, int) or qk_dim < 1:
        raise ValueError(f"afd: qk_dim must be an int >= 1, got {qk_dim!r}")
    if not weight >= 0:
        raise ValueError(f"afd: weight must be >= 0, got {weight!r}")
    term = AFDTerm(tapped("student", stage_taps(setup.student, student_layers)),
                   tapped("teacher", stage_taps(teacher, teacher_layers)), weight, qk_dim)
    return offline("afd", setup, [*response_terms(ce_weight, kd_weight, temperature), term])


# --------------------------------------------------------------------------------------------------------- L2T-ww

class L2TWWTerm(Term):
    """L2T-ww's feature matching (official ``FeatureMatching``) with its meta-networks (``WeightNetwork``,
    ``LossWeightNetwork``), :func:`kdkernels.l2t_ww_loss`.

    For every pair p = (teacher tap i, student tap j): ``connectors[p]`` a 1×1 conv (with bias) from the student's
    channels to the teacher's (built from the first batch); ``channel_weights[p]`` Linear(C_i, C_i), zero init,
    ``w = softmax(Linear(GAP(t_i)))`` (what); ``pair_weights[p]`` Linear(C_i, 1), bias ``pair_weight_init``,
    ``λ = relu6(Linear(GAP(t_i)))`` (where). The meta-networks' parameters are the meta-step's hyperparameters
    (:meth:`meta_parameters`); they exist from the start (sized by the teacher's channel counts).
    """

    def __init__(self, student_keys: Sequence[str], teacher_keys: Sequence[str], teacher_channels: Sequence[int],
                 pairs: Sequence[tuple[int, int]], weight: float, pair_weight_init: float):
        super().__init__("l2t_ww", [*student_keys, *teacher_keys], weight)
        self.num_student = len(student_keys)
        self.pairs = [tuple(pair) for pair in pairs]
        self.channel_weights = nn.ModuleList()
        self.pair_weights = nn.ModuleList()
        for i, _ in self.pairs:
            what = nn.Linear(teacher_channels[i], teacher_channels[i])
            nn.init.zeros_(what.weight)
            nn.init.zeros_(what.bias)
            where = nn.Linear(teacher_channels[i], 1)
            nn.init.constant_(where.bias, pair_weight_init)
            self.channel_weights.append(what)
            self.pair_weights.append(where)
        self.connectors = nn.ModuleList()

    def meta_parameters(self) -> tuple[str, ...]:
        """The meta-networks' parameters as ``MetaStep`` hyperparameter names (``"l2t_ww.<parameter>"``)."""
        return tuple(f"{self.name}.{name}" for name, _ in self.named_parameters()
                     if name.startswith(("channel_weights.", "pair_weights.")))

    def build(self, example):
        _check_maps(self, example)
        values = [example[key] for key in self.reads]
        students, teachers = values[: self.num_student], values[self.num_student:]
        for p, (i, _) in enumerate(self.pairs):
            if teachers[i].shape[1] != self.channel_weights[p].in_features:
                raise ValueError(f"term 'l2t_ww': {self.reads[self.num_student + i]} has {teachers[i].shape[1]} "
                                 f"channels, but its meta-networks were sized for "
                                 f"{self.channel_weights[p].in_features}: pass teacher_channels")
        if not len(self.connectors):
            self.connectors = nn.ModuleList(nn.Conv2d(students[j].shape[1], teachers[i].shape[1], 1)
                                            for i, j in self.pairs)
        check_term(self, example, lambda: self.loss(*values, context=None))

    def loss(self, *values, context):
        students, teachers = values[: self.num_student], values[self.num_student:]
        pooled = [t.mean(dim=(2, 3)) for t in teachers]
        what = [F.softmax(net(pooled[i]), dim=1) for net, (i, _) in zip(self.channel_weights, self.pairs)]
        where = [F.relu6(net(pooled[i])) for net, (i, _) in zip(self.pair_weights, self.pairs)]
        return kdkernels.l2t_ww_loss([conv(students[j]) for conv, (_, j) in zip(self.connectors, self.pairs)],
                                     [teachers[i] for i, _ in self.pairs], what, where)


def _tap_channels(model: nn.Module, taps: Sequence[str], method: str) -> list[int]:
    """The channel count each tapped module produces (its last conv or batch norm)."""
    channels = []
    for tap in taps:
        path, wants_input = split_tap(tap)
        count = None if wants_input else output_channels(find_module(model, path, "teacher"))
        if count is None:
            raise ValueError(f"{method}: cannot tell the channels of teacher tap {tap!r} (no conv or batch norm "
                             f"in it): pass teacher_channels")
        channels.append(count)
    return channels


L2T_WW_APPROXIMATION = (
    "the official bilevel update (train_l2t_ww.py with train/meta_optimizers.py MetaSGD) is mapped onto the trainer's "
    "MetaStep: before each student step one plain-SGD look-ahead (the model's current lr, no momentum or weight decay) "
    "on the matching loss, then the cross-entropy on a held-out batch (10 % of the training set kept out, eval-mode "
    "batch norm) drives the meta-networks through Adam (lr 1e-4, no weight decay); the official takes the real "
    "CE + matching step first, then T = 2 matching-only steps and one CE step of its momentum SGD, the CE on the same "
    "training batch after them (train mode) drives Adam (lr 1e-4, weight decay 1e-4), and rolls the look-ahead back")


@register("l2t-ww", category="feature",
          paper="Jang, Lee, Hwang, Shin. Learning What and Where to Transfer. ICML 2019",
          approximation=L2T_WW_APPROXIMATION)
def l2t_ww(setup: Setup, beta: float = 0.5, ce_weight: float = 1.0, meta_lr: float = 1e-4, held_out: float = 0.1,
           pair_weight_init: float = 1.0, pairs: Sequence[tuple[int, int]] | None = None,
           student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None,
           teacher_channels: Sequence[int] | None = None) -> Recipe:
    """L2T-ww: ``ce·CE + β·Σ_p mean_b λ_pb·Σ_c w_pbc·mean_hw(resize(t_i) − conv_p(s_j))²_bc`` over the pairs
    p = (teacher tap i, student tap j) (:func:`kdkernels.l2t_ww_loss`), β = 0.5, the teacher map bilinearly resized
    to the student's size, ``w = softmax(W_p·GAP(t_i))`` (what, zero init), ``λ = relu6(V_p·GAP(t_i))`` (where,
    bias 1); the meta-networks W, V are learned by a meta-step (:class:`~kdkernels.distill.meta_steps.MetaStep`):
    the student looked ahead one SGD step on the matching loss, ``θ' = θ − η·∇_θ L_match(θ; W, V)``, and
    ``CE(f(x_h; θ'), y_h)`` on a held-out batch differentiated through it (second order), Adam at ``meta_lr``.

    ``pairs``: (teacher index, student index) into the taps; default every teacher tap with every student tap (the
    official default ``--pairs`` of ResNet-34 → ResNet-18: all 4 × 4 stage outputs). ``teacher_channels``: the
    teacher taps' channel counts when they cannot be read from the tapped modules (the meta-networks must exist
    before the first batch, as the meta-step's hyperparameters).

    Provenance: alinlab/L2T-ww @f4dde04 ``train_l2t_ww.py`` (``FeatureMatching``, ``WeightNetwork``,
    ``LossWeightNetwork`` with ``--loss-weight-type relu6 --loss-weight-init 1.0``, ``--beta 0.5``, ``--meta-lr
    1e-4``, ``--optimizer adam``, ``--T 2``, the loop ``inner_objective``/``outer_objective``) and
    ``train/meta_optimizers.py`` (``MetaSGD``). Approximation: see ``L2T_WW_APPROXIMATION`` (the bilevel schedule as
    the trainer's one-step meta-step).
    """
    teacher = setup.require_teacher("l2t-ww")
    if not beta >= 0:
        raise ValueError(f"l2t-ww: beta must be >= 0, got {beta!r}")
    student_taps = stage_taps(setup.student, student_layers)
    teacher_taps = stage_taps(teacher, teacher_layers)
    if pairs is None:
        pairs = [(i, j) for i in range(len(teacher_taps)) for j in range(len(student_taps))]
    pairs = [tuple(pair) for pair in pairs]
    bad = [pair for pair in pairs if len(pair) != 2 or not all(isinstance(k, int) for k in pair)
           or not (0 <= pair[0] < len(teacher_taps) and 0 <= pair[1] < len(student_taps))]
    if not pairs or bad:
        raise ValueError(f"l2t-ww: pairs must be (teacher index < {len(teacher_taps)}, student index < "
                         f"{len(student_taps)}) pairs, got {bad or pairs}")
    if teacher_channels is None:
        teacher_channels = _tap_channels(teacher, teacher_taps, "l2t-ww")
    elif len(teacher_channels) != len(teacher_taps):
        raise ValueError(f"l2t-ww: teacher_channels must give one count per teacher tap ({len(teacher_taps)}), got "
                         f"{list(teacher_channels)}")
    term = L2TWWTerm(tapped("student", student_taps), tapped("teacher", teacher_taps), teacher_channels, pairs, beta,
                     pair_weight_init)
    terms = [CrossEntropyTerm("student", ce_weight), term] if ce_weight > 0 else [term]
    meta_step = MetaStep(hyperparameters=term.meta_parameters(), held_out=held_out, lr=meta_lr,
                         terms=(term.name,))
    return offline("l2t-ww", setup, terms, meta_step=meta_step)
