"""Feature-based methods: losses on hooked intermediate features (../shared/reference/methods.md §2).

Taps default to the models' :func:`feature_points` (stages, pre-activation BNs, pooled embedding); every builder
takes explicit tap paths too, for models without ``kd_points``. Stage-wise losses are one term summing the stages
with the official stage weights; connectors (regressors, embeddings) are built from the first batch's shapes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.connectors import (ConvReg, Embed, Paraphraser, Translator, VIDRegressor, ab_connector,
                                          cd_connector, cwd_connector, ofd_connector, output_channels,
                                          ttkd_embedding)
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.hooks import find_module
from kdkernels.distill.methods._common import offline, single_stage, stage_tap
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.term_gradients import graph_leaves, term_gradients
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, StepContext, Term
from kdkernels.distill.views import Transform, View
from kdkernels.losses._common import pool_to_smaller
from kdkernels.losses.contrastive import sample_other_class_indices
from kdkernels.nn import CRDLoss

CIFAR_INIT_SHARE = 30 / 240   # RepDistiller's init_epochs 30 before the 240-epoch main run (FSP, AB, FT)


# ------------------------------------------------------------------------------------------------------- helpers

def _shapes(values: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(v.shape)) for v in values)


def check_term(term: Term, example: dict, compute) -> None:
    """Runs ``compute()`` (the term's loss on the example, no grad, eval mode) and re-raises a ValueError naming the
    term and the values it read with their shapes."""
    mode = term.training
    term.eval()
    try:
        with torch.no_grad():
            compute()
    except ValueError as error:
        described = ", ".join(f"{key} {tuple(example[key].shape)}" for key in term.reads
                              if isinstance(example[key], torch.Tensor))
        raise ValueError(f"term {term.name!r} cannot compare {described}: {error}") from error
    finally:
        term.train(mode)


def response_terms(ce_weight: float, kd_weight: float = 0.0, temperature: float = 4.0) -> list[Term]:
    """``ce_weight·CE`` plus, when ``kd_weight > 0``, Hinton KD (the ``γ·CE + α·KD`` part of RepDistiller's loss)."""
    terms: list[Term] = [CrossEntropyTerm("student", ce_weight)] if ce_weight > 0 else []
    if kd_weight > 0:
        terms.append(FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), kd_weight,
                                  temperature=temperature))
    return terms


def stage_taps(model: nn.Module, explicit: Sequence[str] | str | None, kind: str = "stages") -> list[str]:
    """Explicit taps, else the model's ``feature_points`` of ``kind`` (stages / pre_activation)."""
    if explicit is not None:
        return [explicit] if isinstance(explicit, str) else list(explicit)
    taps = list(getattr(feature_points(model), kind))
    if not taps:
        raise ValueError(f"{type(model).__name__} declares no {kind} feature points: pass the tap paths explicitly")
    return taps


def tapped(model_name: str, taps: Sequence[str]) -> list[str]:
    return [f"{model_name}:{tap}" for tap in taps]


class StageTerm(Term):
    """``Σ_i w_i · stage_loss(i, connector_i(s_i), t_i)`` over pairs of student and teacher taps.

    Subclasses give :meth:`stage_loss` and, when the method has one, :meth:`make_connector` (identity otherwise).
    ``pool`` pools the larger map of each pair to the smaller before the connector (VID). :meth:`build` creates the
    connectors once and checks that every pair works, raising a ValueError naming the term, the values and shapes.
    """

    def __init__(self, name: str, student_keys: Sequence[str], teacher_keys: Sequence[str], weight: float = 1.0,
                 stage_weights: Sequence[float] | None = None, pool: bool = False):
        if len(student_keys) != len(teacher_keys) or not student_keys:
            raise ValueError(f"term {name!r} pairs student and teacher taps, got {len(student_keys)} student and "
                             f"{len(teacher_keys)} teacher taps: {list(student_keys)} vs {list(teacher_keys)}")
        super().__init__(name, [*student_keys, *teacher_keys], weight)
        self.num_stages = len(student_keys)
        self.stage_weights = [1.0] * self.num_stages if stage_weights is None else [float(w) for w in stage_weights]
        self.pool = pool
        self.connectors = nn.ModuleList()

    def make_connector(self, index: int, student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
        return nn.Identity()

    def stage_loss(self, index: int, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pairs(self, values: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = list(zip(values[: self.num_stages], values[self.num_stages:]))
        return [pool_to_smaller(s, t) for s, t in pairs] if self.pool else pairs

    def build(self, example: dict) -> None:
        values = [example[key] for key in self.reads]
        if not len(self.connectors):
            self.connectors = nn.ModuleList(self.make_connector(i, s, t) for i, (s, t) in enumerate(self.pairs(values)))
        check_term(self, example, lambda: self.loss(*values, context=None))

    def loss(self, *values, context):
        losses = [w * self.stage_loss(i, self.connectors[i](s), t)
                  for i, (w, (s, t)) in enumerate(zip(self.stage_weights, self.pairs(values)))]
        return torch.stack(losses).sum()


class FunctionStageTerm(StageTerm):
    """A stage term whose per-stage loss is a public loss ``fn(student, teacher, **kwargs)`` (no connector)."""

    def __init__(self, name, student_keys, teacher_keys, fn, weight=1.0, stage_weights=None, **kwargs):
        super().__init__(name, student_keys, teacher_keys, weight, stage_weights)
        self.fn, self.kwargs = fn, kwargs

    def stage_loss(self, index, student, teacher):
        return self.fn(student, teacher, **self.kwargs)


# -------------------------------------------------------------------------------------------------------- FitNet

class HintTerm(StageTerm):
    """FitNet's hint: ``MSE(ConvReg(f_s), f_t)``, or the bare MSE without a regressor (equal shapes required)."""

    def __init__(self, student_key: str, teacher_key: str, weight: float, regressor: bool = True):
        super().__init__("hint", [student_key], [teacher_key], weight)
        self.regressor = regressor

    def make_connector(self, index, student, teacher):
        return ConvReg(student.shape, teacher.shape) if self.regressor else nn.Identity()

    def stage_loss(self, index, student, teacher):
        return kdkernels.fitnet_loss(student, teacher)


@register("fitnet", category="feature",
          paper="Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep Nets. ICLR 2015",
          presets={"two-stage": {"hint_stage_epochs": CIFAR_INIT_SHARE, "ce_weight": 0.1, "kd_weight": 0.9}})
def fitnet(setup: Setup, hint_weight: float = 100.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
           temperature: float = 4.0, hint_stage_epochs: int | float | None = None, regressor: bool = True,
           student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """FitNet: ``ce·CE + kd·KD + 100·MSE(ConvReg(f_s), f_t)`` on the middle stage, RepDistiller ``FitNet.py``.

    Default: single stage, as RepDistiller (``-a 0 -b 100``) and mdistiller. ``hint_stage_epochs`` (preset
    ``two-stage``, the paper's procedure) first trains the student up to the hint plus the regressor on the hint loss
    alone for that many epochs (a float: share of the run), then trains with ``ce·CE + kd·KD`` (no hint).
    """
    teacher = setup.require_teacher("fitnet")
    student_tap = student_layer or stage_tap("fitnet", setup.student, 1, "student_layer")
    teacher_tap = teacher_layer or stage_tap("fitnet", teacher, 1, "teacher_layer")
    hint = HintTerm(f"student:{student_tap}", f"teacher:{teacher_tap}", hint_weight, regressor)
    if hint_stage_epochs is None:
        return offline("fitnet", setup, [*response_terms(ce_weight, kd_weight, temperature), hint])
    hint_stage = Stage("fitnet-hint", Distiller({"student": setup.student, "teacher": teacher}, [hint]),
                       epochs=hint_stage_epochs)
    main_terms = response_terms(ce_weight, kd_weight, temperature)
    if not main_terms:
        raise ValueError("fitnet with a hint stage: the second stage needs ce_weight > 0 or kd_weight > 0")
    return Recipe("fitnet", [hint_stage, *offline("fitnet", setup, main_terms).stages])


# ------------------------------------------------------------------------------------------------ AT, NST, PKT

def _stagewise(method: str, setup: Setup, fn, weight: float, ce_weight: float, student_layers, teacher_layers,
               **kwargs) -> Recipe:
    """``ce·CE + weight·Σ_stages fn(f_s, f_t)`` over the paired stage taps (AT, NST)."""
    teacher = setup.require_teacher(method)
    term = FunctionStageTerm(method, tapped("student", stage_taps(setup.student, student_layers)),
                             tapped("teacher", stage_taps(teacher, teacher_layers)), fn, weight, **kwargs)
    return offline(method, setup, [*response_terms(ce_weight), term])


@register("at", category="feature",
          paper="Zagoruyko, Komodakis. Paying More Attention to Attention: Improving the Performance of "
                "Convolutional Neural Networks via Attention Transfer. ICLR 2017")
def at(setup: Setup, weight: float = 1000.0, p: float = 2.0, ce_weight: float = 1.0,
       student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None) -> Recipe:
    """AT: ``CE + 1000·Σ_stages mean (a(f_s) − a(f_t))²``, ``a = normalize(mean_c f^p)``, RepDistiller ``AT.py``."""
    return _stagewise("at", setup, kdkernels.at_loss, weight, ce_weight, student_layers, teacher_layers, p=p)


@register("nst", category="feature",
          paper="Huang, Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. "
                "arXiv:1707.01219, 2017")
def nst(setup: Setup, weight: float = 50.0, ce_weight: float = 1.0, student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None) -> Recipe:
    """NST: ``CE + 50·Σ_stages MMD²_poly(F_s, F_t)`` (c = 0, detached K_tt), RepDistiller ``NST.py`` with bmm."""
    return _stagewise("nst", setup, kdkernels.nst_loss, weight, ce_weight, student_layers, teacher_layers)


@register("pkt", category="feature",
          paper="Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer. ECCV 2018")
def pkt(setup: Setup, weight: float = 30000.0, ce_weight: float = 1.0, student_layer: str | None = None,
        teacher_layer: str | None = None) -> Recipe:
    """PKT: ``CE + 30000·PKT(f_s, f_t)`` on the pooled embeddings, probabilistic_kt ``cosine_similarity_loss``."""
    teacher = setup.require_teacher("pkt")
    student_tap = student_layer or feature_points(setup.student).embedding
    teacher_tap = teacher_layer or feature_points(teacher).embedding
    term = FunctionTerm("pkt", kdkernels.pkt_loss, (f"student:{student_tap}", f"teacher:{teacher_tap}"), weight)
    return offline("pkt", setup, [*response_terms(ce_weight), term])


# ------------------------------------------------------------------------------------------------------------ CWD

class ChannelWiseTerm(StageTerm):
    """CWD on one pair of maps: ``cwd_loss(connector(f_s), f_t, τ)``, the connector a conv 1×1 + BN + ReLU when the
    channel counts differ (:func:`~kdkernels.distill.connectors.cwd_connector`)."""

    def __init__(self, student_key: str, teacher_key: str, weight: float, temperature: float):
        super().__init__("cwd", [student_key], [teacher_key], weight)
        self.temperature = temperature

    def make_connector(self, index, student, teacher):
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"term 'cwd' compares [B, C, H, W] maps of one spatial size, got "
                             f"{self.reads[0]} {tuple(student.shape)} and {self.reads[1]} {tuple(teacher.shape)}: "
                             f"pass student_layer / teacher_layer naming such maps")
        return cwd_connector(student.shape[1], teacher.shape[1])

    def stage_loss(self, index, student, teacher):
        return kdkernels.cwd_loss(student, teacher, self.temperature)


@register("cwd", category="feature",
          paper="Shu, Liu, Gao, Yan, Shen. Channel-wise Knowledge Distillation for Dense Prediction. ICCV 2021",
          approximation="the paper's dense-prediction loss applied to a classifier's last stage map: the paper and "
                        "its code have no classification setting, so the tap, and CE + 3·CWD there, are our choice",
          presets={"mmrazor": {"temperature": 1.0, "weight": 5.0}})
def cwd(setup: Setup, weight: float = 3.0, temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
        kd_temperature: float = 4.0, student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """CWD: ``ce·CE (+ kd·KD) + weight·τ²·Σ_{n,c} KL(softmax_HW(f_t/τ) ‖ softmax_HW(conn(f_s)/τ)) / (N·C)`` on the
    last stage maps (:func:`kdkernels.cwd_loss`).

    Provenance: irfanICMLL/TorchDistiller @78bac7c, ``SemSeg-distill/utils/criterion.py`` (``CriterionCWD``) and its
    README command ``exp_cwd.sh channel kl 3 4`` (weight 3, τ 4, on the segmentation logits map); the connector is
    its ``--cwd-feat`` conv 1×1 + BN + ReLU, used here when the channel counts differ. Preset ``mmrazor``: τ 1,
    weight 5 (open-mmlab/mmrazor @90c7af1 ``configs/distill/mmseg/cwd``; the same loss, ``models/losses/cwd.py``).
    On classification the taps default to the student's and the teacher's deepest ``kd_points`` stage.
    """
    teacher = setup.require_teacher("cwd")
    student_tap = student_layer or stage_tap("cwd", setup.student, -1, "student_layer")
    teacher_tap = teacher_layer or stage_tap("cwd", teacher, -1, "teacher_layer")
    term = ChannelWiseTerm(f"student:{student_tap}", f"teacher:{teacher_tap}", weight, temperature)
    return offline("cwd", setup, [*response_terms(ce_weight, kd_weight, kd_temperature), term])


# ------------------------------------------------------------------------------------------------------------- CD

class EarlyDecayTeacher:
    """The official "early decay teacher" (``utils/util.py`` ``adjust_loss_alpha``, ``lrdv2``) on the run's length:
    a factor ``decay^k``, k the number of ``milestones`` (fractions of the epochs) reached (``epoch ≥ m·epochs``);
    ``delayed`` terms (CE and guided KD in the official code) are 0 while ``epoch ≤ milestones[0]·epochs``."""

    def __init__(self, milestones: Sequence[float], decay: float, delayed: bool):
        milestones = [float(m) for m in milestones]
        if not milestones or any(not 0 < m <= 1 for m in milestones) or milestones != sorted(milestones):
            raise ValueError(f"cd: edt_milestones must be increasing fractions of the epochs in (0, 1], got "
                             f"{milestones!r}")
        self.milestones, self.decay, self.delayed = milestones, float(decay), delayed

    def __call__(self, context: StepContext) -> float:
        if self.delayed and context.epoch <= self.milestones[0] * context.epochs:
            return 0.0
        return self.decay ** sum(context.epoch >= m * context.epochs for m in self.milestones)


class ScheduledCrossEntropyTerm(CrossEntropyTerm):
    """CE on the student's logits, its weight times an :class:`EarlyDecayTeacher` factor (when given)."""

    def __init__(self, weight: float, schedule: EarlyDecayTeacher | None):
        super().__init__("student", weight)
        self.schedule = schedule

    def weight_at(self, context):
        return self.weight * (self.schedule(context) if self.schedule else 1.0)


class GuidedKDTerm(Term):
    """Guided KD (official ``KDLossv2``): KD at T only on the samples whose teacher argmax is the label,
    ``T²·Σ_{i correct} KL(p_t,i ‖ p_s,i) / #correct`` (0 when none), through ``kd_loss(labels=…)``."""

    def __init__(self, weight: float, temperature: float, schedule: EarlyDecayTeacher | None):
        super().__init__("gkd", ("student", "teacher", "target"), weight)
        self.temperature, self.schedule = temperature, schedule

    def loss(self, student, teacher, target, context):
        guided = torch.where(teacher.argmax(dim=1) == target, target, torch.full_like(target, -100))
        return kdkernels.kd_loss(student, teacher, self.temperature, labels=guided, ignore_index=-100)

    def weight_at(self, context):
        return self.weight * (self.schedule(context) if self.schedule else 1.0)


class ChannelDistillationTerm(StageTerm):
    """CD over the stage pairs: ``cd_loss([conn_i(s_i)], [t_i])``, every student stage through the official
    conv 1×1 + BN + ReLU connector (:func:`~kdkernels.distill.connectors.cd_connector`)."""

    def __init__(self, student_keys, teacher_keys, weight: float, schedule: EarlyDecayTeacher | None):
        super().__init__("cd", student_keys, teacher_keys, weight)
        self.schedule = schedule

    def make_connector(self, index, student, teacher):
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError(f"term 'cd' pools [B, C, H, W] maps, got {self.reads[index]} {tuple(student.shape)} "
                             f"and {self.reads[self.num_stages + index]} {tuple(teacher.shape)}: pass "
                             f"student_layers / teacher_layers naming such maps")
        return cd_connector(student.shape[1], teacher.shape[1])

    def stage_loss(self, index, student, teacher):
        return kdkernels.cd_loss(student, teacher)

    def weight_at(self, context):
        return self.weight * (self.schedule(context) if self.schedule else 1.0)


CD_PRESETS = {"imagenet": {"gkd_weight": 1.0, "edt_milestones": (0.3, 0.6, 0.9)},
              "no-edt": {"edt": False}}   # the ablation: CE and GKD from the first epoch, CD undecayed


@register("cd", category="feature",
          paper="Zhou, Zhou, Zheng. Channel Distillation: Channel-Wise Attention for Knowledge Distillation. 2020",
          approximation="the early-decay-teacher milestones are the official epochs (CIFAR 60/160 of 200) taken as "
                        "fractions of the run, so that a short run keeps the schedule's shape",
          presets=CD_PRESETS)
def cd(setup: Setup, weight: float = 6.0, gkd_weight: float = 0.1, gkd_temperature: float = 1.0,
       ce_weight: float = 1.0, edt: bool = True, edt_decay: float = 0.9,
       edt_milestones: Sequence[float] = (0.3, 0.8), student_layers: Sequence[str] | None = None,
       teacher_layers: Sequence[str] | None = None) -> Recipe:
    """CD + GKD + EDT: ``ce·δ·CE + gkd·δ·GKD_T + weight·decay^k·Σ_stages mean_{n,c}(GAP(conn(f_s)) − GAP(f_t))²``
    (:func:`kdkernels.cd_loss`), GKD the KD (T 1) of the samples the teacher classifies right; with ``edt`` δ is 0
    until the first milestone and k counts the milestones reached (fractions of the epochs), else δ 1, k 0.

    Provenance: zhouzaida/channel-distillation @2464d30: ``losses/cd_loss.py`` (``CDLoss``), ``losses/kd_loss.py``
    (``KDLossv2``), ``models/channel_distillation.py`` (``conv1x1_bn`` on every student stage), ``utils/util.py``
    (``adjust_loss_alpha``) and ``cifar_config.py`` (CE 1, GKD 0.1 at T 1, CD 6 with factor 0.9, ``lrdv2``: CE and
    GKD off for epochs ≤ 60, CD ×0.9 from epoch 60 and ×0.81 from 160, of 200). Preset ``imagenet``
    (``imagenet_config.py``: GKD 1; milestones every 30 of 100 epochs); preset ``no-edt``: the ablation without the
    early decay teacher. Taps: every ``kd_points`` stage.
    """
    teacher = setup.require_teacher("cd")
    student_taps = stage_taps(setup.student, student_layers)
    teacher_taps = stage_taps(teacher, teacher_layers)
    if len(student_taps) != len(teacher_taps):
        raise ValueError(f"cd pairs the stages one to one, got {len(student_taps)} student and {len(teacher_taps)} "
                         f"teacher stages: pass student_layers / teacher_layers of one length")
    delayed = EarlyDecayTeacher(edt_milestones, 1.0, delayed=True) if edt else None
    decayed = EarlyDecayTeacher(edt_milestones, edt_decay, delayed=False) if edt else None
    terms: list[Term] = [ScheduledCrossEntropyTerm(ce_weight, delayed),
                         ChannelDistillationTerm(tapped("student", student_taps), tapped("teacher", teacher_taps),
                                                 weight, decayed)]
    if gkd_weight > 0:
        terms.insert(1, GuidedKDTerm(gkd_weight, gkd_temperature, delayed))
    return offline("cd", setup, terms)


# ------------------------------------------------------------------------------------------------------------ PAD

class PADConnector(nn.Module):
    """PAD's map of the student's embedding onto the teacher's width: none when the widths are equal (the official
    ResNet-18 from ResNet-34 pair: 512 and 512), else a linear layer (ours). A model of both PAD stages (trained
    with the student, checkpointed as a model so that it crosses the stage boundary); sized from the first
    features (:meth:`size`), or from a checkpoint's weights when one is loaded first (a resumed run)."""

    def __init__(self):
        super().__init__()
        self.linear: nn.Linear | None = None

    def size(self, student: torch.Tensor, teacher: torch.Tensor, term: str) -> None:
        widths = (student.shape[1], teacher.shape[1])
        if self.linear is None and widths[0] != widths[1]:
            self.linear = nn.Linear(*widths).to(student.device)
        elif self.linear is not None and (self.linear.in_features, self.linear.out_features) != widths:
            raise ValueError(f"term {term!r}: the connector maps {self.linear.in_features} to "
                             f"{self.linear.out_features} features, but the embeddings have {widths[0]} and "
                             f"{widths[1]}")

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        return student if self.linear is None else self.linear(student)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight = state_dict.get(prefix + "linear.weight")
        if self.linear is None and weight is not None:
            self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PADEmbeddingTerm(Term):
    """A term on the flattened embeddings ``e_s`` [B, D_s] (through the shared :class:`PADConnector`) and ``e_t``
    [B, D_t]; the connector is held by reference (it is a model of the distiller, not a submodule of the term)."""

    def __init__(self, name: str, student_key: str, teacher_key: str, weight: float, connector: PADConnector):
        super().__init__(name, (student_key, teacher_key), weight)
        self._connector = [connector]

    @property
    def connector(self) -> PADConnector:
        return self._connector[0]

    def build(self, example):
        student, teacher = (example[key].flatten(1) for key in self.reads)
        self.connector.size(student, teacher, self.name)
        self.build_own(student, teacher)
        check_term(self, example, lambda: self.loss(*(example[key] for key in self.reads), context=None))

    def build_own(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Creates the term's own modules (none here)."""


class PADHintTerm(PADEmbeddingTerm):
    """PAD's first stage (torchdistill ``pad/resnet18_from_resnet34.yaml`` ``stage1``, ``l2based``):
    ``MSE(conn(e_s), e_t)``, the mean over B·D (:func:`kdkernels.fitnet_loss`)."""

    def loss(self, student, teacher, *, context):
        return kdkernels.fitnet_loss(self.connector(student.flatten(1)), teacher.flatten(1))


class PADTerm(PADEmbeddingTerm):
    """PAD's second stage: ``pad_l2_loss(conn(e_s), e_t, v(e_s))``, ``v`` the variance branch (torchdistill
    ``VarianceBranch4PAD.var_estimator``: ``Linear(D_s, D_t)`` + ``BatchNorm1d(D_t)`` on the student's embedding,
    whose gradient reaches the student too), a submodule of the term. As there, the batch norm needs batches of at
    least two samples in training (drop a last batch of one: ``drop_last``)."""

    def __init__(self, student_key, teacher_key, weight, connector, eps: float):
        super().__init__("pad", student_key, teacher_key, weight, connector)
        self.eps = eps
        self.variance_branch: nn.Sequential | None = None

    def build_own(self, student, teacher):
        if self.variance_branch is None:
            self.variance_branch = nn.Sequential(nn.Linear(student.shape[1], teacher.shape[1]),
                                                 nn.BatchNorm1d(teacher.shape[1])).to(student.device)

    def loss(self, student, teacher, *, context):
        student = student.flatten(1)
        return kdkernels.pad_l2_loss(self.connector(student), teacher.flatten(1), self.variance_branch(student),
                                     self.eps)


@register("pad", category="feature",
          paper="Zhang, Lan, Dai, Zeng, Bai, Chang, Wei. Prime-Aware Adaptive Distillation. ECCV 2020",
          approximation="a linear connector maps the student's embedding to the teacher's width when they differ "
                        "(the official ResNet-18/34 pair has 512 and 512, and no connector)")
def pad(setup: Setup, first_stage_share: float = 0.5, ce_weight: float = 1.0, l2_weight: float = 1.0,
        pad_weight: float = 1.0, eps: float = 1e-6, student_layer: str | None = None,
        teacher_layer: str | None = None) -> Recipe:
    """PAD (L2): a first stage ``ce·CE + l2·MSE(conn(e_s), e_t)``, then ``ce·CE + pad·pad_l2_loss(conn(e_s), e_t,
    v(e_s))`` with ``v`` the variance branch (``Linear`` + ``BatchNorm1d`` on the student's embedding, trained with
    the student) predicting each sample's per-dimension log-variance (:func:`kdkernels.pad_l2_loss`); ``e`` the
    pooled embeddings (``kd_points.embedding``, the classifier's input).

    Provenance: yoshitomo-matsubara/torchdistill @3e4373c, ``torchdistill/losses/mid_level.py`` (``PADL2Loss``),
    ``torchdistill/models/wrapper.py`` (``VarianceBranch4PAD``) and ``configs/sample/ilsvrc2012/pad/
    resnet18_from_resnet34.yaml``: stage 1 (10 epochs) CE 1 + ``MSELoss`` 1 on the ``avgpool`` outputs, stage 2
    (10 epochs) CE 1 + ``PADL2Loss`` 1 (eps 1e-6, mean) with a fresh variance branch; the official
    ``rrpr2020/pad_l2-resnet18_from_resnet34.yaml`` starts stage 2 from such a first-stage (``ce_l2``) student.
    ``first_stage_share`` is the first stage's share of the run's epochs (the sample config's 10 of 20: 0.5; each
    stage at least one epoch); 0 skips it (a student already trained by a first stage: the rrpr2020 setup). The
    connector (ours, only when the widths differ) is shared by both stages.
    """
    teacher = setup.require_teacher("pad")
    if isinstance(first_stage_share, bool) or not isinstance(first_stage_share, (int, float)) \
            or not 0.0 <= first_stage_share < 1.0:
        raise ValueError(f"pad: first_stage_share must be a share of the epochs in [0, 1), got "
                         f"{first_stage_share!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"pad: eps must be a number ≥ 0, got {eps!r}")
    student_key = f"student:{student_layer or feature_points(setup.student).embedding}"
    teacher_key = f"teacher:{teacher_layer or feature_points(teacher).embedding}"
    connector = PADConnector()
    models = {"student": setup.student, "teacher": teacher, "pad_connector": connector}
    trainable = ("student", "pad_connector")
    second = Distiller(models, [*response_terms(ce_weight),
                                PADTerm(student_key, teacher_key, pad_weight, connector, float(eps))],
                       trainable=trainable)
    if first_stage_share == 0:
        return Recipe("pad", [Stage("pad", second)])
    first = Distiller(models, [*response_terms(ce_weight),
                               PADHintTerm("l2", student_key, teacher_key, l2_weight, connector)], trainable=trainable)
    return Recipe("pad", [Stage("pad-l2", first, epochs=float(first_stage_share)),
                          Stage("pad", second, epochs=1.0 - float(first_stage_share))])


# ----------------------------------------------------------------------------------------------------------- TTKD

class TargetAwareTerm(Term):
    """TaT on one pair of maps: ``weight·ttkd_loss(query(f_s), value(f_s), f_t, heads=heads, patches=patches)``
    plus, when ``anchor_weight > 0``, ``anchor_weight·ttkd_loss(…, anchors=anchors)`` (1 head), query and value the
    official conv 3×3 + BN embeddings of the student map (:func:`~kdkernels.distill.connectors.ttkd_embedding`),
    the key the teacher map itself."""

    def __init__(self, student_key: str, teacher_key: str, weight: float, heads: int, patches, anchors,
                 anchor_weight: float):
        super().__init__("ttkd", (student_key, teacher_key), 1.0)
        self.main_weight, self.anchor_weight = float(weight), float(anchor_weight)
        self.heads, self.patches, self.anchors = heads, patches, anchors
        self.query: nn.Module | None = None
        self.value: nn.Module | None = None

    def build(self, example):
        student, teacher = example[self.reads[0]], example[self.reads[1]]
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"term 'ttkd' attends between [B, C, H, W] maps of one spatial size, got "
                             f"{self.reads[0]} {tuple(student.shape)} and {self.reads[1]} {tuple(teacher.shape)}: "
                             f"pass student_layer / teacher_layer naming such maps")
        groups = self.patches[0] * self.patches[1] if self.patches else 1
        if (groups * teacher.shape[1]) % self.heads:
            raise ValueError(f"ttkd: heads must divide the teacher's channels ({teacher.shape[1]} at "
                             f"{self.reads[1]}{f', times {groups} patches' if self.patches else ''}), got "
                             f"{self.heads}")
        if self.query is None:
            self.query = ttkd_embedding(student.shape[1], teacher.shape[1])
            self.value = ttkd_embedding(student.shape[1], teacher.shape[1])
        check_term(self, example, lambda: self.loss(student, teacher, context=None))

    def loss(self, student, teacher, context):
        query, value = self.query(student), self.value(student)
        loss = self.main_weight * kdkernels.ttkd_loss(query, value, teacher, heads=self.heads, patches=self.patches)
        if self.anchor_weight > 0:
            loss = loss + self.anchor_weight * kdkernels.ttkd_loss(query, value, teacher, anchors=self.anchors)
        return loss


@register("ttkd", category="feature",
          paper="Lin, Xie, Wang, Yao, Chen, Wang, Qin, Liu. Knowledge Distillation via the Target-aware Transformer. "
                "CVPR 2022",
          presets={"scratch": {"ce_weight": 1.0}})
def ttkd(setup: Setup, weight: float = 0.2, heads: int = 1, ce_weight: float = 0.1, kd_weight: float = 0.0,
         kd_temperature: float = 1.0, patches: Sequence[int] | None = None, anchors: Sequence[int] | None = None,
         anchor_weight: float = 0.0, student_layer: str | None = None,
         teacher_layer: str | None = None) -> Recipe:
    """TaT: ``ce·CE (+ kd·KD) + weight·mean(softmax_j(q_i·t_j) v − t)²`` on the deepest stage maps
    (:func:`kdkernels.ttkd_loss`), q = conv3×3+BN(f_s), v = conv3×3+BN(f_s) (C_s → C_t), the key the teacher map t.

    Provenance: sihaoevery/TaT @a6cc329 (the authors' ImageNet code): ``torchdistill/losses/single.py``
    (``MaskedFM``, heads 1, ``nn.MSELoss``), ``torchdistill/models/special.py`` (``AttnEmbed``: student query and value
    ``Embed`` conv 3×3 + BN, teacher key ``nn.Identity``), ``configs/sample/ilsvrc2012/single_stage/tat/
    resnet18_from_resnet34_attn.yaml`` (taps ``layer4`` of both; ``MaskedFM`` factor 0.2; ``KDLoss`` T 1, alpha 0.1,
    beta 0.0: 0.1·CE and no KD term; the official student starts from ImageNet weights). Taps: the student's and the
    teacher's deepest ``kd_points`` stage (one spatial size).

    The segmentation code's variants (sihaoevery/TaT-seg @9e34e0e ``distiller_tat.py``), off by default:
    ``patches=(n, m)`` replaces the global loss by the patch-group loss (attention within each of n × m patches,
    stacked along the channels, ``heads`` heads); ``anchor_weight > 0`` adds ``anchor_weight·`` the anchor-point loss
    (the maps average-pooled to ``anchors=(a, b)``, 1 head). TaT-seg uses β 1, γ 0.4, 16 × 16 patches, 64 heads and
    32 × 32 anchors, with conv 1×1 + BN query / key / value embeddings and the distillation loss ×0.1; here they
    combine with the classification code's embeddings and weights (not an official combination).

    Preset ``scratch`` (our choice, not official): CE weight 1, for a student trained from scratch; the official 0.1
    assumes a pretrained student (from scratch on digits it reached 50.3 %, and 90.7 % with CE weight 1; 1 seed).
    """
    teacher = setup.require_teacher("ttkd")
    check = Checks("ttkd")
    check.integer("heads", heads, minimum=1)
    anchor_weight = check.real("anchor_weight", anchor_weight, nonnegative=True)
    for name, grid in (("patches", patches), ("anchors", anchors)):
        if grid is not None:
            if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) != 2:
                check.type_error(name, "a pair of ints (rows, columns) or None", grid)
            for index, count in enumerate(grid):
                check.integer(f"{name}[{index}]", count, minimum=1)
    if anchor_weight > 0 and anchors is None:
        check.value_error("anchors", "must be a pair (rows, columns) when anchor_weight > 0", "None")
    student_tap = student_layer or stage_tap("ttkd", setup.student, -1, "student_layer")
    teacher_tap = teacher_layer or stage_tap("ttkd", teacher, -1, "teacher_layer")
    term = TargetAwareTerm(f"student:{student_tap}", f"teacher:{teacher_tap}", weight, heads,
                           tuple(patches) if patches is not None else None,
                           tuple(anchors) if anchors is not None else None, anchor_weight)
    return offline("ttkd", setup, [*response_terms(ce_weight, kd_weight, kd_temperature), term])


# --------------------------------------------------------------------------------------------------------- KD-SVD

def clip_gradient_by(loss: torch.Tensor, reference: torch.Tensor, params: Sequence[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """``loss`` with the same value and, for each tensor of ``params``, the gradient ``clip_by_norm(∇_p loss,
    scale·‖∇_p reference‖)`` (TensorFlow's ``t·c / max(‖t‖, c)``; a tensor ``loss`` does not reach keeps its zero
    gradient), through a detached linear correction: one extra backward per loss, no second forward."""
    grads = term_gradients({"loss": loss, "reference": reference}, params)
    correction = loss.new_zeros(())
    for param, grad, ref in zip(params, grads["loss"], grads["reference"]):
        norm, clip = grad.norm(), scale * ref.norm()
        factor = torch.where(norm > 0, clip / torch.maximum(norm, clip).clamp_min(1e-30), torch.ones_like(norm))
        correction = correction + (((factor - 1.0) * grad).detach() * param).sum()
    return loss + (correction - correction.detach())


class KDSVDTerm(StageTerm):
    """KD-SVD over the stage maps: ``kd_svd_loss([conn_i(s_i)], [t_i], k=k)``, conn_i a conv 1×1 + BN + ReLU when the
    channel counts differ (identity otherwise); with ``clip`` the distillation gradient of every student parameter
    tensor is clipped to ``σ(epoch − 1)·‖∇ CE‖`` of that tensor (the official ``Optimizer_w_Distillation``)."""

    def __init__(self, student_keys, teacher_keys, weight: float, k: int, clip: bool):
        super().__init__("kd_svd", student_keys, teacher_keys, weight)
        self.k, self.clip = k, clip
        if clip:
            self.reads = (*self.reads, "student", "target")

    def make_connector(self, index, student, teacher):
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError(f"term 'kd_svd' decomposes [B, C, H, W] maps, got {self.reads[index]} "
                             f"{tuple(student.shape)} and {self.reads[self.num_stages + index]} "
                             f"{tuple(teacher.shape)}: pass student_layers / teacher_layers naming such maps")
        return cwd_connector(student.shape[1], teacher.shape[1])

    def build(self, example):
        stage_values = [example[key] for key in self.reads[: 2 * self.num_stages]]
        if not len(self.connectors):
            self.connectors = nn.ModuleList(self.make_connector(i, s, t)
                                            for i, (s, t) in enumerate(self.pairs(stage_values)))
        check_term(self, example, lambda: self.distillation(stage_values))

    def distillation(self, stage_values):
        pairs = self.pairs(stage_values)
        return kdkernels.kd_svd_loss([c(s) for c, (s, _) in zip(self.connectors, pairs)], [t for _, t in pairs],
                                     k=self.k)

    def loss(self, *values, context):
        loss = self.distillation(values[: 2 * self.num_stages])
        if not self.clip or context is None or not torch.is_grad_enabled() or not loss.requires_grad:
            return loss
        logits, target = values[2 * self.num_stages:]
        params = [p for p in graph_leaves(logits) if p.requires_grad]
        if not params:
            return loss
        scale = 1.0 / (1.0 + math.exp(-(context.epoch - 1)))      # op_util.sigmoid(epoch, 0), epoch from 0
        weight = self.weight_at(context)
        if weight == 0:
            return loss
        clipped = clip_gradient_by(weight * loss, F.cross_entropy(logits, target), params, scale)
        return clipped / weight


@register("kd-svd", category="feature",
          paper="Lee, Kim, Song. Self-supervised Knowledge Distillation Using Singular Value Decomposition. ECCV 2018",
          approximation="the official networks have the teacher's widths; here a conv 1x1 + BN + ReLU connector maps "
                        "each student stage to the teacher's channels when they differ, and the gradient-clip factor "
                        "sigmoid(epoch) uses the whole epochs done (the official feeds the fractional epoch)")
def kd_svd(setup: Setup, weight: float = 1.0, k: int = 1, ce_weight: float = 1.0, clip_gradients: bool = True,
           student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None) -> Recipe:
    """KD-SVD: ``ce·CE + weight·Σ_{consecutive stages} Σ (G_s − G_t)²`` (:func:`kdkernels.kd_svd_loss`): per stage the
    teacher's first k right singular vectors of the map ``[H·W, C]``, the student's best-aligned of its first k + 3
    (sign-flipped), both scaled by the teacher's normalised singular values, G the RBF ``exp(−(v_a − v_b)²/8)`` of the
    entries of consecutive stages' vectors. With ``clip_gradients`` (the official) the distillation gradient of each
    student parameter tensor is clipped to ``σ(epoch)·‖∇ CE‖`` of that tensor, σ the logistic function, epoch from 0.

    Provenance: sseung0703/KD_methods_with_TF @9fb5414: ``nets/Shared.py`` (``KD_SVD``: K 1, student K + 3, RBF / 8,
    ``reduce_sum``), ``nets/SVP.py`` (``SVD``, ``Align_rsv``), ``nets/ResNet.py`` (the last block output of every
    stage, after ReLU; ``Distillation='KD-SVD'``), ``op_util.py`` (``Optimizer_w_Distillation``: CE + dist, the dist
    gradients clipped by norm per variable to the CE gradient's norm × ``sigmoid(epoch, 0)``). Taps: every ``kd_points``
    stage of both models; connectors where widths differ (approximation flag, the official widths agree).
    """
    teacher = setup.require_teacher("kd-svd")
    Checks("kd-svd").integer("k", k, minimum=1)
    Checks("kd-svd").flag("clip_gradients", clip_gradients)
    student_taps = stage_taps(setup.student, student_layers)
    teacher_taps = stage_taps(teacher, teacher_layers)
    if len(student_taps) != len(teacher_taps) or len(student_taps) < 2:
        raise ValueError(f"kd-svd pairs at least two stages one to one, got {len(student_taps)} student and "
                         f"{len(teacher_taps)} teacher taps: pass student_layers / teacher_layers")
    term = KDSVDTerm(tapped("student", student_taps), tapped("teacher", teacher_taps), weight, k, clip_gradients)
    return offline("kd-svd", setup, [*response_terms(ce_weight), term])


# ------------------------------------------------------------------------------------------------------- Jacobian

class RequiresGrad(Transform):
    """The input as a fresh leaf that requires grad (``x.detach().requires_grad_()``), so that the models' outputs
    can be differentiated with respect to it; evaluation: the input unchanged."""

    def __call__(self, x, draws):
        return x.detach().requires_grad_(), {}


def _kd_on_detached_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD with the teacher's logits detached (with a grad-requiring input they carry a graph)."""
    return kdkernels.kd_loss(student, teacher.detach(), temperature)


class JacobianMatchingTerm(Term):
    """``jacobian_matching_loss(∂z_s[c]/∂x, ∂z_t[c]/∂x)``, c the label (``classes="target"``) or the teacher's top
    class (``"teacher"``); the student's gradient with ``create_graph=True`` (double back-propagation), the
    teacher's detached. Reads the input, which the method's :class:`RequiresGrad` view makes require grad."""

    def __init__(self, input_key: str, weight: float, classes: str):
        super().__init__("jacobian", (input_key, "student", "teacher", "target"), weight)
        self.classes = classes

    def loss(self, inputs, student, teacher, target, context):
        if not (torch.is_grad_enabled() and inputs.requires_grad and student.requires_grad):
            raise ValueError(f"term 'jacobian' differentiates the outputs with respect to {self.reads[0]!r}, which "
                             f"does not require grad here: the method's RequiresGrad view makes it require grad "
                             f"before the models run (Distiller.apply_views; the trainer applies it)")
        chosen = (target if self.classes == "target" else teacher.detach().argmax(dim=1)).unsqueeze(1)
        student_jacobian, = torch.autograd.grad(student.gather(1, chosen).sum(), inputs, create_graph=True)
        teacher_jacobian, = torch.autograd.grad(teacher.gather(1, chosen).sum(), inputs, retain_graph=True)
        return kdkernels.jacobian_matching_loss(student_jacobian, teacher_jacobian.detach())


@register("jacobian", category="feature",
          paper="Srinivas, Fleuret. Knowledge Transfer with Jacobian Matching. ICML 2018",
          approximation="no official code: the normalised-gradient loss of the output of the label's class, mean "
                        "over the N*D elements with weight 20, is AberHu/Knowledge-Distillation-Zoo sobolev.py; the "
                        "paper's class choice, weight and KD settings are not confirmed; KD takes the kd method's "
                        "defaults (0.1 CE + 0.9 KD at T 4)")
def jacobian(setup: Setup, weight: float = 20.0, classes: str = "target", ce_weight: float = 0.1,
             kd_weight: float = 0.9, temperature: float = 4.0) -> Recipe:
    """Jacobian matching with KD: ``ce·CE + kd·T²·KL(p_t ‖ p_s) + weight·mean_{n,d}(Ĵ_s − Ĵ_t)²``, Ĵ the L2-normalised
    gradient of the logit of class c with respect to the input (:func:`kdkernels.jacobian_matching_loss`), c the label
    (``classes="target"``) or the teacher's top class (``"teacher"``).

    Provenance: the paper (Srinivas & Fleuret, ICML 2018, arXiv:1803.00443: the normalised Jacobian difference, the
    equivalence with distillation under input noise; Jacobian matching added to KD) has no released code; the loss
    transcribes AberHu/Knowledge-Distillation-Zoo @65470c8 ``kd_losses/sobolev.py`` (``Sobolev``: the target class's
    logit, ``F.normalize`` of the flattened input gradients, ``F.mse_loss`` with the teacher's detached) and its
    ``example_train_script.sh`` (``--kd_mode sobolev --lambda_kd 20``), ``train_kd.py`` (``img.requires_grad =
    True`` before both forwards). KD with the ``kd`` method's defaults (the reference runs Sobolev without KD, the
    paper with it): approximation flag. Each step costs a teacher backward and a student double backward to the input.
    """
    check = Checks("jacobian")
    classes = check.choice("classes", classes, ("target", "teacher"))
    terms: list[Term] = [CrossEntropyTerm("student", ce_weight)] if ce_weight > 0 else []
    if kd_weight > 0:
        terms.append(FunctionTerm("kd", _kd_on_detached_teacher, ("student", "teacher"), kd_weight,
                                  temperature=check.temperature(temperature)))
    terms.append(JacobianMatchingTerm("input", weight, classes))
    teacher = setup.require_teacher("jacobian")
    distiller = Distiller({"student": setup.student, "teacher": teacher}, terms, trainable=("student",),
                          views=[View("input", "input", RequiresGrad())])
    return single_stage("jacobian", distiller)


# ------------------------------------------------------------------------------------------------------------ VID

class VIDTerm(StageTerm):
    """VID per stage: ``vid_loss(regressor(f_s), f_t, log_scale)`` after pooling the larger map to the smaller."""

    def __init__(self, student_keys, teacher_keys, weight, init_var: float, eps: float):
        super().__init__("vid", student_keys, teacher_keys, weight, pool=True)
        self.init_var, self.eps = init_var, eps

    def make_connector(self, index, student, teacher):
        return VIDRegressor(student.shape[1], teacher.shape[1], self.init_var, self.eps)

    def stage_loss(self, index, student, teacher):
        return kdkernels.vid_loss(student, teacher, self.connectors[index].log_scale, self.eps)


@register("vid", category="feature",
          paper="Ahn, Hu, Damianou, Lawrence, Dai. Variational Information Distillation for Knowledge Transfer. "
                "CVPR 2019")
def vid(setup: Setup, weight: float = 1.0, init_var: float = 5.0, eps: float = 1e-5, ce_weight: float = 1.0,
        student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None) -> Recipe:
    """VID: ``CE + Σ_stages mean ½((μ(f_s) − f_t)²/σ² + log σ²)``, learned softplus variance, RepDistiller ``VID.py``.

    The per-channel ``log_scale`` is a registered, optimised parameter (as RepDistiller; mdistiller's copy leaves it
    unregistered, so its variance stays at ``init_var``)."""
    if init_var <= eps:
        raise ValueError(f"vid: init_var ({init_var}) must exceed eps ({eps})")
    teacher = setup.require_teacher("vid")
    term = VIDTerm(tapped("student", stage_taps(setup.student, student_layers)),
                   tapped("teacher", stage_taps(teacher, teacher_layers)), weight, init_var, eps)
    return offline("vid", setup, [*response_terms(ce_weight), term])


# ------------------------------------------------------------------------------------------------------------ OFD

def bn_margins(teacher: nn.Module, paths: Sequence[str]) -> list[torch.Tensor]:
    """OFD margins of the BN modules at ``paths`` of the teacher (the BNs before the ReLUs)."""
    margins = []
    for path in paths:
        module = find_module(teacher, path.removesuffix("/input"), "teacher")
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
            raise ValueError(f"ofd takes its margins from the teacher's BN before ReLU, but teacher tap {path!r} is "
                             f"a {type(module).__name__}: pass teacher_layers naming affine BatchNorm modules")
        margins.append(kdkernels.ofd_margins(module.weight, module.bias))
    return margins


class OFDTerm(StageTerm):
    """OFD's partial L2 over the stages, ``Σ_i ofd_loss(conn_i(s_i), t_i, m_i)/B / 2^(n−i−1)``."""

    def __init__(self, student_keys, teacher_keys, weight, margins: Sequence[torch.Tensor]):
        n = len(student_keys)
        super().__init__("ofd", student_keys, teacher_keys, weight, [1.0 / 2 ** (n - i - 1) for i in range(n)])
        for index, margin in enumerate(margins):
            self.register_buffer(f"margin{index}", margin)

    def make_connector(self, index, student, teacher):
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError(f"ofd compares [B, C, H, W] maps, got {tuple(student.shape)} and {tuple(teacher.shape)}")
        return ofd_connector(student.shape[1], teacher.shape[1])

    def stage_loss(self, index, student, teacher):
        return kdkernels.ofd_loss(student, teacher, getattr(self, f"margin{index}"), reduction="batchmean")


@register("ofd", category="feature",
          paper="Heo, Kim, Yun, Park, Kwak, Choi. A Comprehensive Overhaul of Feature Distillation. ICCV 2019",
          presets={"imagenet": {"normalizer": 10000.0}})
def ofd(setup: Setup, normalizer: float = 1000.0, ce_weight: float = 1.0,
        student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None) -> Recipe:
    """OFD: ``CE + Σ_i partialL2(conn(s_i), max(t_i, m))/2^(n−i−1)/B/1000``, clovaai/overhaul-distillation.

    Pre-ReLU features of both nets (the ``pre_activation`` taps: the BNs before ReLU, or the residual sums after them),
    margins from the teacher's BN before ReLU (γ, β: the taps themselves, or the ``margin_norms`` of its feature
    points, as mdistiller's ``get_bn_before_relu`` for the CIFAR ResNets and MobileNetV2), connectors conv1×1 + BN with the official init, the teacher frozen but in train mode (BN batch statistics,
    as the official code). ``normalizer`` 1000 (CIFAR) or 10000 (preset ``imagenet``)."""
    teacher = setup.require_teacher("ofd")
    teacher_taps = stage_taps(teacher, teacher_layers, "pre_activation")
    norms = feature_points(teacher).margin_norms if teacher_layers is None else []
    term = OFDTerm(tapped("student", stage_taps(setup.student, student_layers, "pre_activation")),
                   tapped("teacher", teacher_taps), 1.0 / normalizer, bn_margins(teacher, norms or teacher_taps))
    return offline("ofd", setup, [*response_terms(ce_weight), term], frozen_train_mode=True)


# ------------------------------------------------------------------------------------------ init-stage methods

def init_then_train(method: str, setup: Setup, init_term: Term, init_epochs: int | float, ce_weight: float,
                    kd_weight: float = 0.0, temperature: float = 4.0) -> Recipe:
    """An init stage (only ``init_term`` trains the student's layers it reaches and the term's connectors) for
    ``init_epochs`` (a float: share of the run), then ``ce·CE (+ kd·KD)`` training (RepDistiller ``init``)."""
    teacher = setup.require_teacher(method)
    init = Stage(f"{method}-init", Distiller({"student": setup.student, "teacher": teacher}, [init_term]),
                 epochs=init_epochs)
    terms = response_terms(ce_weight, kd_weight, temperature)
    if not terms:
        raise ValueError(f"{method}: the training stage needs ce_weight > 0 or kd_weight > 0")
    models = {"student": setup.student, "teacher": teacher} if kd_weight > 0 else {"student": setup.student}
    return Recipe(method, [init, Stage(method, Distiller(models, terms))])


class ABTerm(StageTerm):
    """AB's alternative L2 over the stages: ``Σ_i 2^(i−n+1)·alt_L2(C_i(s_i), t_i)/B``."""

    def __init__(self, student_keys, teacher_keys, weight, margin: float):
        n = len(student_keys)
        super().__init__("ab", student_keys, teacher_keys, weight, [2.0 ** (i - n + 1) for i in range(n)])
        self.margin = margin

    def make_connector(self, index, student, teacher):
        return ab_connector(student.shape, teacher.shape)

    def stage_loss(self, index, student, teacher):
        return kdkernels.ab_loss(student, teacher, self.margin, reduction="batchmean")


@register("ab", category="feature",
          paper="Heo, Lee, Yun, Choi. Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden "
                "Neurons. AAAI 2019")
def ab(setup: Setup, weight: float = 3.0 / 1000.0, margin: float = 1.0, init_epochs: int | float = CIFAR_INIT_SHARE,
       ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
       student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None) -> Recipe:
    """AB: init stage on ``3/1000·Σ_i 2^(i−n+1)·alt_L2(C_i(s_i), t_i)/B`` (margin 1), then CE, bhheo/AB_distillation.

    Pre-ReLU stage features; connectors as RepDistiller ``Connector`` (identity when shapes agree, else conv+BN).
    The init stage lasts ``init_epochs`` (RepDistiller: 30 before the 240-epoch run, hence the 1/8 share); the main
    stage is CE only (RepDistiller), optionally plus KD (``kd_weight``, the paper's AB + KD)."""
    teacher = setup.require_teacher("ab")
    term = ABTerm(tapped("student", stage_taps(setup.student, student_layers, "pre_activation")),
                  tapped("teacher", stage_taps(teacher, teacher_layers, "pre_activation")), weight, margin)
    return init_then_train("ab", setup, term, init_epochs, ce_weight, kd_weight, temperature)


class FSPTerm(Term):
    """FSP over consecutive stage pairs: ``fsp_loss(student maps, teacher maps)``."""

    def __init__(self, student_keys: Sequence[str], teacher_keys: Sequence[str], weight: float):
        if len(student_keys) != len(teacher_keys) or len(student_keys) < 2:
            raise ValueError(f"term 'fsp' needs the same number (>= 2) of student and teacher stages, got "
                             f"{list(student_keys)} and {list(teacher_keys)}")
        super().__init__("fsp", [*student_keys, *teacher_keys], weight)
        self.num_stages = len(student_keys)

    def build(self, example):
        values = [example[key] for key in self.reads]
        check_term(self, example, lambda: self.loss(*values, context=None))

    def loss(self, *values, context):
        return kdkernels.fsp_loss(values[: self.num_stages], values[self.num_stages:])


@register("fsp", category="feature", teacher_architecture="same-widths",
          paper="Yim, Joo, Bae, Kim. A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and "
                "Transfer Learning. CVPR 2017")
def fsp(setup: Setup, weight: float = 1.0, init_epochs: int | float = CIFAR_INIT_SHARE, ce_weight: float = 1.0,
        student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None) -> Recipe:
    """FSP: init stage on ``Σ_pairs mean (G_s − G_t)²`` (G = flow matrices of consecutive stages), then CE only,
    RepDistiller ``FSP.py`` + ``helper/pretrain.py``.

    Student and teacher need equal channel counts at every stage (RepDistiller's rule; a ValueError otherwise).
    The init stage lasts ``init_epochs`` (RepDistiller: 30 before the 240-epoch run, hence the 1/8 share)."""
    teacher = setup.require_teacher("fsp")
    term = FSPTerm(tapped("student", stage_taps(setup.student, student_layers)),
                   tapped("teacher", stage_taps(teacher, teacher_layers)), weight)
    return init_then_train("fsp", setup, term, init_epochs, ce_weight)


# ------------------------------------------------------------------------------------------------------------ CRD

class CRDTerm(Term):
    """CRD: embedding heads for both sides, then :class:`kdkernels.nn.CRDLoss` (memory banks and Z as buffers,
    ``kdkernels.crd_loss`` then ``crd_update_memory_`` on every training call)."""

    def __init__(self, student_key: str, teacher_key: str, weight: float, criterion: CRDLoss,
                 bank_labels: torch.Tensor | None = None):
        super().__init__("crd", (student_key, teacher_key, "index"), weight)
        self.criterion = criterion
        self.register_buffer("bank_labels", None if bank_labels is None else bank_labels.long().clone())
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None

    def build(self, example):
        student, teacher = example[self.reads[0]], example[self.reads[1]]
        if self.embed_student is None:
            dim = self.criterion.feat_dim
            self.embed_student = Embed(student[0].numel(), dim)
            self.embed_teacher = Embed(teacher[0].numel(), dim)

    def loss(self, student, teacher, index, *, context):
        index = index.long()
        contrast = None
        if self.bank_labels is not None:
            contrast = sample_other_class_indices(index, self.bank_labels, self.criterion.num_negatives)
        return self.criterion(self.embed_student(student), self.embed_teacher(teacher), index, contrast)


@register("crd", category="feature",
          paper="Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020",
          presets={"crd+kd": {"kd_weight": 1.0}})
def crd(setup: Setup, weight: float = 0.8, ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
        feat_dim: int = 128, num_negatives: int = 16384, nce_temperature: float = 0.07, momentum: float = 0.5,
        student_layer: str | None = None, teacher_layer: str | None = None) -> Recipe:
    """CRD: ``CE + kd·KD + 0.8·NCE(embed_s, embed_t; memory banks)``, RepDistiller ``crd/criterion.py``.

    Embeddings Linear(d, 128) + L2 norm of the pooled features of both nets, two memory banks of one slot per
    training sample (``setup.num_train``; batches carry ``"index"``), Z set on the first step, momentum 0.5, T 0.07.
    Defaults are plain CRD (RepDistiller ``-a 0 -b 0.8``); preset ``crd+kd`` adds KD with weight 1 (``-a 1``).
    Negatives: with ``setup.train_labels``, K = 16384 drawn with replacement from the other classes
    (``CIFAR100InstanceSample`` "exact" mode); without labels, drawn uniformly from the whole bank (RepDistiller's
    fallback ``AliasMethod`` sampler, which may pick the sample's own class), K clamped to ``num_train − 1``."""
    teacher = setup.require_teacher("crd")
    if not setup.num_train:
        raise ValueError("crd keeps one memory-bank slot per training sample: set Setup.num_train")
    if setup.num_train < 2:
        raise ValueError(f"crd needs at least 2 training samples, got num_train={setup.num_train}")
    labels = setup.train_labels
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != setup.num_train):
        raise ValueError(f"crd: train_labels must hold one label per training sample ({setup.num_train}), got "
                         f"shape {tuple(labels.shape)}")
    if labels is not None and int(torch.unique(labels).numel()) < 2:
        raise ValueError("crd draws negatives from other classes: train_labels has a single class")
    negatives = num_negatives if labels is not None else min(num_negatives, setup.num_train - 1)
    criterion = CRDLoss(setup.num_train, feat_dim, negatives, nce_temperature, momentum)
    student_tap = student_layer or feature_points(setup.student).embedding
    teacher_tap = teacher_layer or feature_points(teacher).embedding
    term = CRDTerm(f"student:{student_tap}", f"teacher:{teacher_tap}", weight, criterion, labels)
    return offline("crd", setup, [*response_terms(ce_weight, kd_weight, temperature), term])


# ------------------------------------------------------------------------------------------------------------- FT

class ParaphraserTerm(Term):
    """FT's paraphraser pre-training: ``L1(P(f_t), f_t)`` (reconstruction of the teacher's feature)."""

    def __init__(self, teacher_key: str, paraphraser: Paraphraser):
        super().__init__("paraphraser", (teacher_key,), 1.0)
        self.paraphraser = paraphraser

    def loss(self, teacher, *, context):
        return F.l1_loss(self.paraphraser(teacher), teacher)


class FactorTransferTerm(Term):
    """FT: ``ft_loss(translator(f_s), paraphraser.encoder(f_t))``; the (pre-trained) paraphraser stays frozen and in
    eval mode here."""

    def __init__(self, student_key: str, teacher_key: str, weight: float, paraphraser: Paraphraser, rate: float):
        super().__init__("ft", (student_key, teacher_key), weight)
        self.paraphraser, self.rate = paraphraser, rate
        self.translator: nn.Module | None = None

    def build(self, example):
        student, teacher = example[self.reads[0]], example[self.reads[1]]
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"term 'ft' needs [B, C, H, W] maps of the same size: {self.reads[0]} "
                             f"{tuple(student.shape)}, {self.reads[1]} {tuple(teacher.shape)}")
        if self.translator is None:
            self.translator = Translator(student.shape[1], teacher.shape[1], self.rate)

    def train(self, mode: bool = True):
        super().train(mode)
        self.paraphraser.eval()
        return self

    def loss(self, student, teacher, *, context):
        with torch.no_grad():
            factor_teacher = self.paraphraser.encoder(teacher)
        return kdkernels.ft_loss(self.translator(student), factor_teacher)


@register("ft", category="feature",
          paper="Kim, Park, Kwak. Paraphrasing Complex Network: Network Compression via Factor Transfer. "
                "NeurIPS 2018")
def ft(setup: Setup, beta: float = 500.0, rate: float = 0.5, paraphraser_epochs: int | float = CIFAR_INIT_SHARE,
       ce_weight: float = 1.0, teacher_channels: int | None = None, student_layer: str | None = None,
       teacher_layer: str | None = None) -> Recipe:
    """FT: paraphraser pre-training (L1 reconstruction), then ``CE + 500·L1(FT(T(f_s)), FT(P_enc(f_t)))`` with
    ``FT(x) = normalize(x.view(B, −1))``, Jangho-Kim/Factor-Transfer-pytorch (= KD-Zoo ``ft.py``).

    Last stage of both nets, paraphrase rate 0.5. The first stage trains only the paraphraser on the frozen teacher
    for ``paraphraser_epochs`` (a float: share of the run; RepDistiller uses 30 epochs before its 240); the
    paraphraser is then frozen. RepDistiller's ``FactorTransfer`` is a different variant (factor =
    ``normalize(mean_c F²)``, an AT-like map, β = 200, MSE reconstruction): not this method.
    ``teacher_channels`` is read from the teacher's last conv/BN at the tap unless given."""
    teacher = setup.require_teacher("ft")
    student_tap = student_layer or stage_tap("ft", setup.student, -1, "student_layer")
    teacher_tap = teacher_layer or stage_tap("ft", teacher, -1, "teacher_layer")
    channels = teacher_channels or output_channels(find_module(teacher, teacher_tap, "teacher"))
    if not channels:
        raise ValueError(f"ft cannot tell the channel count of teacher tap {teacher_tap!r}: pass teacher_channels")
    paraphraser = Paraphraser(channels, rate)
    pretrain = Distiller({"teacher": teacher}, [ParaphraserTerm(f"teacher:{teacher_tap}", paraphraser)],
                         trainable=(), evaluate=("teacher",))
    transfer = FactorTransferTerm(f"student:{student_tap}", f"teacher:{teacher_tap}", beta, paraphraser, rate)
    main = offline("ft", setup, [*response_terms(ce_weight), transfer]).stages[0]
    main.before = lambda: paraphraser.requires_grad_(False)
    return Recipe("ft", [Stage("ft-paraphraser", pretrain, epochs=paraphraser_epochs,
                               before=lambda: paraphraser.requires_grad_(True)), main])
