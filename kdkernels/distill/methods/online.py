"""Online methods: networks that learn from each other while they train (../shared/reference/methods.md §1.9–1.11,
§4): DML with N peers, DML + feature loss (PP-OCRv2 / PaddleClas UDML), SwitOKD (its pair and its 2T1S / 1T2S
three-network topologies), SOKD, BD-KD, MMT (mutual mean-teaching), ONE (on-the-fly native ensemble, with
:class:`MultiBranchNetwork`, a multi-branch model built from any zoo backbone), PCL (peer collaborative learning:
peers on their own views, a peer ensemble teacher and the temporal-mean network, :class:`PeerCollaborativeNetwork`)
and MCL (mutual contrastive learning between m networks).

All trainable networks share one optimiser. Where the official code gives each network its own loss and optimiser
with the other networks' outputs detached, the distiller sums those losses: a network's parameters then appear only
in its own loss (as the learner; as a target they are detached), so each receives exactly the gradient of its own
loss, as with separate backward passes. The online "teacher" of SwitOKD and BD-KD trains from scratch: it is built
untrained by ``setup.new_assistant`` (the larger network; ``new_student`` when none is given).
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import BATCH, Distiller
from kdkernels.distill.hooks import find_module
from kdkernels.distill.methods._common import single_stage, stage_tap
from kdkernels.distill.methods.self_supervised import augmentation, sigmoid_rampup
from kdkernels.distill.recipe import Recipe, Setup, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term
from kdkernels.distill.updates import EMA


class TowardsTerm(Term):
    """``Σ_j fn(learner, target_j.detach(), **kwargs)``: the learner moves towards the other networks, which receive
    no gradient from this term."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], learner: str, targets: Sequence[str],
                 weight: float = 1.0, **kwargs):
        super().__init__(name, (learner, *targets), weight)
        self.fn = fn
        self.kwargs = kwargs

    def loss(self, learner, *targets, context):
        return sum(self.fn(learner, target.detach(), **self.kwargs) for target in targets)


def online_recipe(method: str, models: dict[str, nn.Module], terms: Sequence[Term], ce_weight: float = 1.0,
                  **distiller_options) -> Recipe:
    """Every model trainable with its own label CE; all of them evaluated (the first is the exported student)."""
    ce_terms = [CrossEntropyTerm(name, ce_weight) for name in models]
    distiller = Distiller(models, [*ce_terms, *terms], trainable=tuple(models), evaluate=tuple(models),
                          **distiller_options)
    return single_stage(method, distiller)


def student_and_online_teacher(setup: Setup, method: str) -> dict[str, nn.Module]:
    return {"student": setup.student, "teacher": setup.fresh_assistant(method)}


# ------------------------------------------------------------------------------------------------------------ DML

def peer_names(peers) -> list[str]:
    if isinstance(peers, bool) or not isinstance(peers, int) or peers < 2:
        raise ValueError(f"peers must be an integer >= 2 (the student and at least one peer), got {peers!r}")
    return ["student"] + [f"peer{index}" for index in range(1, peers)]


@register("dml", category="online", paper="Zhang, Xiang, Hospedales, Lu. Deep Mutual Learning. CVPR 2018",
          needs_teacher=False)
def dml(setup: Setup, peers: int = 2, temperature: float = 1.0, kl_weight: float = 1.0,
        ce_weight: float = 1.0) -> Recipe:
    """DML: each of N peers minimises ``CE_i + Σ_{j≠i} KL(p_j.detach() ‖ p_i)`` (KD-Zoo ``train_dml.py``).

    Batchmean, T 1, λ 1, no 1/(N−1) (as the official TF code).

    The peers are ``setup.student`` plus ``peers − 1`` fresh students (``student``, ``peer1``, …). The joint sum of the
    per-peer losses gives each peer exactly its own loss's gradient, because the other peers enter it detached; the
    one difference from KD-Zoo is one optimiser instead of one per peer (identical for identical settings). The
    official TF code updates the peers one after another; like KD-Zoo, this takes one forward per step.
    """
    names = peer_names(peers)
    models = {"student": setup.student, **{name: setup.fresh_student("dml") for name in names[1:]}}
    terms = [TowardsTerm(f"dml_{name}", kdkernels.kd_loss, name, [other for other in names if other != name],
                         kl_weight, temperature=temperature) for name in names]
    return online_recipe("dml", models, terms, ce_weight)


def check_same_shape(term: str, example: dict) -> None:
    """The two values of ``term`` must have one shape (there is no connector)."""
    (first, a), (second, b) = example.items()
    if a.shape != b.shape:
        raise ValueError(f"term {term!r}: {first} {tuple(a.shape)} and {second} {tuple(b.shape)} differ in shape; "
                         "the peers need identical architectures (or pass a layer whose outputs match)")


class FeatureDistanceTerm(FunctionTerm):
    """PaddleClas ``DistanceLoss(mode='l2')``: ``nn.MSELoss()`` (mean over every element) between two peers' maps,
    both receiving gradients."""

    def __init__(self, reads: Sequence[str], weight: float):
        super().__init__("feature_l2", F.mse_loss, reads, weight)

    def build(self, example):
        check_same_shape(self.name, example)


@register("dml-feature", category="online",
          paper="Du, Li, Guo, Liu, Liu, Bai, Ma, Yu. PP-OCRv2: Bag of Tricks for Ultra Lightweight OCR System. "
                "arXiv:2109.03144, 2021 (PaddleClas UDML)",
          needs_teacher=False)
def dml_feature(setup: Setup, dml_weight: float = 1.0, feature_weight: float = 1.0, ce_weight: float = 1.0,
                layer: str | None = None) -> Recipe:
    """UDML: two peers, ``CE_1 + CE_2 + symmetric KL/2 + mse(f_1, f_2)``, no detach (PaddleClas ``*_udml.yaml``).

    Two identical trainable peers, as PaddleClas ``PPLCNet_x2_5_udml.yaml`` (DistillationGTCELoss,
    DistillationDMLLoss, DistillationDistanceLoss l2 on ``blocks5``); ``(KL(p_1‖p_2) + KL(p_2‖p_1)) / 2`` batchmean.

    The feature is the ``layer`` tap of both peers; by default the second-to-last stage (the last when the model has
    one), as ``blocks5`` is in PP-LCNet. PaddleClas's DMLLoss adds 1e-12 inside its logarithms; this is exact.
    """
    peer = setup.fresh_student("dml-feature")
    if layer is None:
        stages = feature_points(setup.student).stages
        if not stages:
            raise ValueError("dml-feature: the student's feature points list no stages; pass layer=...")
        layer = stages[-2] if len(stages) > 1 else stages[-1]
    terms = [FunctionTerm("dml", kdkernels.kd_loss, ("student", "peer"), dml_weight, divergence="symmetric"),
             FeatureDistanceTerm((f"student:{layer}", f"peer:{layer}"), feature_weight)]
    return online_recipe("dml-feature", {"student": setup.student, "peer": peer}, terms, ce_weight)


# -------------------------------------------------------------------------------------------------------- SwitOKD

def _distance_to_labels(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖onehot(y) − softmax(z)‖₁`` per sample."""
    one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    return (one_hot - logits.softmax(dim=-1)).abs().sum(dim=-1)


def _global_means(*per_sample: torch.Tensor) -> list[torch.Tensor]:
    """Batch means of per-sample values, over every data-parallel rank's batch when a process group runs (so
    that all ranks take the same decision from the same statistics)."""
    sums = torch.stack([values.sum() for values in per_sample] + [per_sample[0].new_tensor(per_sample[0].numel())])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return list(sums[:-1] / sums[-1])


def switokd_expert_mode(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> bool:
    """SwitOKD's switch (hfutqian/SwitOKD ``main.py``): with ``s = mean‖y − p_s‖₁``, ``t = mean‖y − p_t‖₁`` and the
    gap ``G = mean‖p_s − p_t‖₁`` (T = 1), ``ε = exp(−t/(t + s))`` and ``δ = s − ε·t``, expert mode when ``G > δ`` and
    ``t < s``. Under data parallelism the means are over the global batch, so every rank switches alike."""
    with torch.no_grad():
        s_label, t_label, gap = _global_means(
            _distance_to_labels(student_logits, target), _distance_to_labels(teacher_logits, target),
            (student_logits.softmax(dim=-1) - teacher_logits.softmax(dim=-1)).abs().sum(dim=-1))
        epsilon = torch.exp(-t_label / (t_label + s_label))
        delta = s_label - epsilon * t_label
        return bool(gap > delta) and bool(t_label < s_label)


class SwitOKDTeacherTerm(Term):
    """An online teacher's SwitOKD loss: for each student ``s_k`` a switch (:func:`switokd_expert_mode` of that
    pair), ``w_k = 0`` in expert mode and 1 in learning mode; the teacher minimises
    ``CE_t + Σ_k w_k KL(p_{s_k}.detach() ‖ p_t) + Σ_j KL(p_{peer_j}.detach() ‖ p_t)`` (``peers``: the other
    teachers, 2T1S), and nothing (no gradient, no update of the teacher) when every pair is in expert mode. With
    one student and no peer: SwitOKD's pair (the teacher's ``CE_t + KL(p_s.detach() ‖ p_t)`` in learning mode)."""

    def __init__(self, temperature: float, teacher: str = "teacher", students: Sequence[str] = ("student",),
                 peers: Sequence[str] = (), name: str = "switokd_teacher"):
        super().__init__(name, (teacher, *students, *peers, "target"))
        self.temperature = temperature
        self.students, self.peers = len(students), len(peers)

    def loss(self, teacher, *values, context):
        *others, target = values
        students, peers = others[:self.students], others[self.students:]
        learning = [not switokd_expert_mode(student, teacher, target) for student in students]
        if not any(learning):
            return torch.zeros((), device=teacher.device)
        kl = lambda other: kdkernels.kd_loss(teacher, other.detach(), self.temperature)  # noqa: E731
        return (F.cross_entropy(teacher, target) + sum(kl(student) for student, on in zip(students, learning) if on)
                + sum(kl(peer) for peer in peers))


TOPOLOGIES = ("1T1S", "2T1S", "1T2S")


@register("switokd", category="online",
          paper="Qian, Wang, Li, Hong, Wang. Switchable Online Knowledge Distillation. ECCV 2022",
          presets={"2T1S": {"topology": "2T1S"}, "1T2S": {"topology": "1T2S"}}, needs_teacher=False)
def switokd(setup: Setup, temperature: float = 1.0, teacher_lr_scale: float = 10.0,
            topology: str = "1T1S") -> Recipe:
    """SwitOKD: online pair; the teacher pauses in expert mode, learns DML-style otherwise (hfutqian/SwitOKD).

    The student always minimises ``CE_s + KL(p_t.detach() ‖ p_s)``; the teacher minimises
    ``CE_t + KL(p_s.detach() ‖ p_t)`` only in learning mode and pauses in expert mode (``G > δ`` and ``t < s``, see
    :func:`switokd_expert_mode`), as hfutqian/SwitOKD ``CIFAR-100/.../main.py`` (batchmean, T 1).

    The teacher is an untrained ``setup.new_assistant`` network trained alongside. In expert mode the teacher term
    is a constant 0 with no graph, so the teacher's parameters get no gradient and the optimiser skips them, as the
    official code skips ``optimizer.step()``. The official code gives the teacher lr 0.1 and the student 0.01: the
    teacher trains at ``teacher_lr_scale`` (10) times the run's (the student's) learning rate.

    ``topology``: the paper's basis topologies for three networks (``SwitOKD_code/multi-net results (table 7)``,
    ``2T1S/.../main.py`` and ``1T2S/.../main.py``), besides the pair ``"1T1S"`` (default):

    * ``"2T1S"`` (preset ``2T1S``): two teachers ``teacher`` and ``teacher2`` (fresh assistants), one student. The
      student minimises ``CE_s + KL(p_t1‖p_s) + KL(p_t2‖p_s)``; each teacher k, unless its pair with the student is
      in expert mode, ``CE_tk + KL(p_s‖p_tk) + KL(p_t(other)‖p_tk)`` (it also learns from the other teacher).
    * ``"1T2S"`` (preset ``1T2S``): one teacher, two students ``student`` and ``student2`` (a fresh student). Each
      student minimises ``CE + KL(p_other student‖p_s) + KL(p_t‖p_s)``; the teacher
      ``w0·CE_t + w1·KL(p_s1‖p_t) + w2·KL(p_s2‖p_t)`` with ``w_k = 0`` when its pair with student k is in expert
      mode and ``w0 = 0`` when both are (it then pauses).

    Every KL target is detached (T ``temperature``, batchmean). Each pair's switch uses that pair's own label
    distances in ``ε = exp(−t/(t + s))`` (the paper's threshold); the official scripts compute the second pair's
    ε from the first pair's distances in 2T1S (``epsilon2`` from ``t_label``, ``s_label``) and the first pair's
    from the second's in 1T2S: copy slips, not followed. Teachers train at ``teacher_lr_scale`` times the run's
    learning rate, students at the run's (the official scripts mix optimisers: SGD 0.1 for the WRN networks, Adam
    0.01 for the MobileNet student).
    """
    check = Checks("switokd")
    topology = check.choice("topology", topology, TOPOLOGIES)
    if topology == "1T1S":
        terms = [CrossEntropyTerm("student"),
                 TowardsTerm("switokd_student", kdkernels.kd_loss, "student", ["teacher"], temperature=temperature),
                 SwitOKDTeacherTerm(temperature)]
        models = student_and_online_teacher(setup, "switokd")
        teachers = ["teacher"]
    elif topology == "2T1S":
        models = {"student": setup.student, "teacher": setup.fresh_assistant("switokd"),
                  "teacher2": setup.fresh_assistant("switokd")}
        teachers = ["teacher", "teacher2"]
        terms = [CrossEntropyTerm("student"),
                 TowardsTerm("switokd_student", kdkernels.kd_loss, "student", teachers, temperature=temperature),
                 SwitOKDTeacherTerm(temperature, "teacher", ["student"], ["teacher2"]),
                 SwitOKDTeacherTerm(temperature, "teacher2", ["student"], ["teacher"], name="switokd_teacher2")]
    else:
        models = {"student": setup.student, "student2": setup.fresh_student("switokd"),
                  "teacher": setup.fresh_assistant("switokd")}
        teachers = ["teacher"]
        terms = [CrossEntropyTerm("student"), CrossEntropyTerm("student2"),
                 TowardsTerm("switokd_student", kdkernels.kd_loss, "student", ["student2", "teacher"],
                             temperature=temperature),
                 TowardsTerm("switokd_student2", kdkernels.kd_loss, "student2", ["student", "teacher"],
                             temperature=temperature),
                 SwitOKDTeacherTerm(temperature, "teacher", ["student", "student2"])]
    distiller = Distiller(models, terms, trainable=tuple(models), evaluate=tuple(models))
    return single_stage("switokd", distiller, model_lr_scales={name: teacher_lr_scale for name in teachers})


# ----------------------------------------------------------------------------------------------------------- SOKD

class GlobalPool(nn.Module):
    """Global average pooling of a ``[B, C, ...]`` map to ``[B, C]`` (identity on ``[B, C]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def auxiliary_branch(teacher: nn.Module, stages: Sequence[str], classifier: str, init: str) -> nn.Sequential:
    """Copies of the teacher's ``stages`` and ``classifier`` with global pooling between them; ``init`` is
    ``"teacher"`` (the teacher's weights) or ``"random"`` (re-initialised)."""
    if init not in ("teacher", "random"):
        raise ValueError(f"branch_init must be 'teacher' or 'random', got {init!r}")
    modules = [copy.deepcopy(find_module(teacher, path, "teacher")) for path in [*stages, classifier]]
    branch = nn.Sequential(*modules[:-1], GlobalPool(), modules[-1])
    branch.requires_grad_(True)
    if init == "random":
        for module in branch.modules():
            if module is not branch and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return branch


def branch_layout(teacher: nn.Module, split: str | None, stages: Sequence[str] | None) -> tuple[str, list[str], str]:
    """(split tap, branch stages, classifier path): by default the second-to-last stage and the stages after it."""
    points = feature_points(teacher)
    if split is None:
        if len(points.stages) < 2:
            raise ValueError(f"sokd needs two stages of the teacher, its feature points list {points.stages}: pass "
                             "branch_from=... and branch_stages=...")
        split = points.stages[-2]
    if stages is None:
        if split not in points.stages:
            raise ValueError(f"sokd: branch_from {split!r} is not one of the teacher's stages {points.stages}; pass "
                             "branch_stages=... too")
        stages = points.stages[points.stages.index(split) + 1:]
    return split, list(stages), points.classifier


class SOKDTerm(Term):
    """SOKD's auxiliary branch on a teacher feature and its three distillation pieces (plus its CE); with a
    ``student_layer``, also ``at_loss(f_s, f_a.detach())`` (weight ``weights["feature"]``) between that student map
    and the branch's last stage map."""

    def __init__(self, branch: nn.Module, split: str, temperature: float, weights: dict[str, float],
                 student_layer: str | None = None):
        extra = (f"student:{student_layer}",) if student_layer is not None else ()
        super().__init__("sokd", ("student", "teacher", f"teacher:{split}", "target", *extra))
        self.branch = branch
        self.temperature = temperature
        self.weights = weights

    def loss(self, student, teacher, feature, target, *student_map, context):
        branch_map = self.branch[:-2](feature.detach())              # the branch's stages; then pool, classifier
        auxiliary = self.branch[-1](self.branch[-2](branch_map))
        kl = lambda learner, towards: kdkernels.kd_loss(learner, towards.detach(), self.temperature)  # noqa: E731
        w = self.weights
        loss = (w["branch_ce"] * F.cross_entropy(auxiliary, target) + w["branch_teacher"] * kl(auxiliary, teacher)
                + w["branch_student"] * kl(auxiliary, student) + w["student"] * kl(student, auxiliary))
        if student_map:
            loss = loss + w["feature"] * kdkernels.at_loss(student_map[0], branch_map.detach())
        return loss


@register("sokd", category="online",
          paper="Liu, Liu, Huang. Semi-Online Knowledge Distillation. BMVC 2021",
          presets={"official-code": {"branch_init": "random"}, "feature": {"feature_weight": 1000.0}})
def sokd(setup: Setup, temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
         branch_ce_weight: float = 1.0, branch_teacher_weight: float = 1.0, branch_student_weight: float = 1.0,
         branch_from: str | None = None, branch_stages: Sequence[str] | None = None,
         branch_init: str = "teacher", feature_weight: float = 0.0, feature_layer: str | None = None) -> Recipe:
    """SOKD: frozen teacher plus a trainable teacher branch distilling both ways (swlzq/Semi-Online-KD).

    The branch ``a`` (copies of the teacher's stages after ``branch_from`` and its classifier) reads the detached
    teacher feature; ``CE_a + KL_T(p_t‖p_a) + KL_T(p_s.detach()‖p_a)`` for the branch,
    ``CE_s + KL_T(p_a.detach()‖p_s)`` for the student (T 4, T² batchmean), as swlzq/Semi-Online-KD
    ``trainer/sokd.py``.

    Defaults: the branch starts from the teacher's second-to-last stage (``feature_T[-3]``); the teacher's forward
    after the split must be the branch stages, global average pooling and the classifier (true of the digits zoo and
    ResNets). As in the official code the teacher runs in train mode (batch-norm batch statistics) with frozen
    weights. The official code's branch is randomly initialised (preset ``official-code``); by default it starts
    from the teacher's weights. The official config trains the branch at the student's lr (0.1), as here.

    Feature-based extension (the paper: the framework "can be easily extended to feature-based distillation
    methods"; the official ``calculate_kd`` receives the student's, the branch's and the teacher's features but
    implements only ``soft_target``): with ``feature_weight`` > 0 (default 0: the official soft-target SOKD) the
    student also learns the branch's last stage map by attention transfer, ``feature_weight ·
    at_loss(f_s, f_a.detach())`` (:func:`kdkernels.at_loss`, p 2, mean; RepDistiller's β 1000 in preset
    ``feature``), ``f_s`` the student's ``feature_layer`` (default its deepest stage). Which feature loss the paper
    pairs with SOKD, and whether the branch also learns the student's features, could not be read: AT, student
    side only, is this implementation's choice.
    """
    teacher = setup.require_teacher("sokd")
    check = Checks("sokd")
    feature_weight = check.real("feature_weight", feature_weight, minimum=0.0)
    if feature_layer is not None:
        feature_layer = check.name("feature_layer", feature_layer, "student tap path")
    student_layer = None
    if feature_weight > 0:
        student_layer = feature_layer or stage_tap("sokd", setup.student, -1, "feature_layer")
    split, stages, classifier = branch_layout(teacher, branch_from, branch_stages)
    branch = auxiliary_branch(teacher, stages, classifier, branch_init)
    weights = {"branch_ce": branch_ce_weight, "branch_teacher": branch_teacher_weight,
               "branch_student": branch_student_weight, "student": kd_weight, "feature": feature_weight}
    terms = [CrossEntropyTerm("student", ce_weight), SOKDTerm(branch, split, temperature, weights, student_layer)]
    distiller = Distiller({"student": setup.student, "teacher": teacher}, terms, trainable=("student",),
                          frozen_train_mode=("teacher",))
    return single_stage("sokd", distiller)


# ---------------------------------------------------------------------------------------------------------- BD-KD

BDKD_APPROXIMATION = ("approximation of Amara et al., BD-KD (arXiv:2212.12965): the paper's per-sample weighting "
                      "rule could not be read (no code found; only the beginning of the paper, abstract and "
                      "introduction, was retrievable); each network mixes forward and reverse KL towards the other "
                      "with the entropy weight w = H_target / (H_target + H_learner) (kdkernels.bdkd_loss)")


@register("bd-kd", category="online",
          paper="Amara, Sepahvand, Meyer, Gross, Clark. BD-KD: Balancing the Divergences for Online Knowledge "
                "Distillation. arXiv:2212.12965, 2022",
          approximation=BDKD_APPROXIMATION, needs_teacher=False)
def bd_kd(setup: Setup, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 1.0) -> Recipe:
    """BD-KD (approximation): student and online teacher each minimise ``CE + bdkd_loss(self, other.detach())``.

    ``kdkernels.bdkd_loss`` is a per-sample entropy-weighted mix of forward and reverse KL.

    Approximation of arXiv:2212.12965: the paper balances forward and reverse KL per sample for both networks (the
    student-centred weighting comes from the teacher/student entropy gap); its exact rule could not be pinned down,
    so the weight ``H_target / (H_target + H_learner)`` is ours. What was looked for: an official repository
    (repository names with bd-kd / bdkd, code search for the title, the authors and per-sample forward/reverse-KL
    balancing, GitHub issues): none found; the paper itself: the page store returns the beginning of the arXiv
    v1/v2 pages only (abstract and introduction), not the loss equations (v2's abstract: sample-wise weighting of
    forward and reverse KL on both the student's and the teacher's losses; v1's: the balancing at the level of the
    student's distillation loss). The teacher is an untrained ``setup.new_assistant`` network trained alongside.
    The two weights mirror each other, so both terms have the same value; their gradients reach different networks.
    """
    terms = [TowardsTerm("bdkd_student", kdkernels.bdkd_loss, "student", ["teacher"], kd_weight,
                         temperature=temperature),
             TowardsTerm("bdkd_teacher", kdkernels.bdkd_loss, "teacher", ["student"], kd_weight,
                         temperature=temperature)]
    return online_recipe("bd-kd", student_and_online_teacher(setup, "bd-kd"), terms, ce_weight)



# ------------------------------------------------------------------------------------------------------------ MMT

MMT_APPROXIMATION = ("classification adaptation of MMT (Ge, Chen, Li, ICLR 2020): the re-ID terms, the hard triplet "
                     "loss and the soft triplet loss on features of pseudo-label clusters (soft_tri_weight 0.8), are "
                     "omitted; the peers learn from the dataset's labels (not re-clustered pseudo-labels); the "
                     "second peer is a fresh student instead of a second pre-trained model")


class GlobalStepEMA(EMA):
    """MMT's ``_update_ema_variables`` (yxgeee/MMT ``mmt/trainers.py``): ``α = min(1 − 1/(global_step + 1), α₀)`` with
    the 0-based ``global_step`` of the step just taken, so the n-th update (1-based) uses ``min(1 − 1/n, α₀)``: the
    first update copies the peer, and until ``1/(1 − α₀)`` updates the copy is the plain mean of the peer's states.
    (Mean teacher's warm-up, :class:`EMA` ``warmup=True``, uses ``min(1 − 1/(n + 1), α₀)``.) Only parameters are
    averaged (``buffers="own"``): the copy runs in train mode and its batch norm keeps its own statistics, as
    MMT's ``model_*_ema.train()``."""

    def __init__(self, source: str, momentum: float):
        super().__init__(source, momentum, buffers="own")

    def momentum_at(self, step: int, total_steps: int, update: int) -> float:
        return min(1.0 - 1.0 / update, self.momentum)


class MMTTerm(FunctionTerm):
    """:func:`kdkernels.mmt_loss` on the two peers, their EMA models and the labels."""

    def __init__(self, soft_ce_weight: float, label_smoothing: float):
        super().__init__("mmt", kdkernels.mmt_loss, ("student", "peer", "student_ema", "peer_ema", "target"),
                         soft_ce_weight=soft_ce_weight, epsilon=label_smoothing)


@register("mmt", category="online",
          paper="Ge, Chen, Li. Mutual Mean-Teaching: Pseudo Label Refinery for Unsupervised Domain Adaptation on "
                "Person Re-identification. ICLR 2020",
          presets={"digits": {"translate": 1, "flip": False, "ema_decay": 0.9}}, approximation=MMT_APPROXIMATION,
          needs_teacher=False)
def mmt(setup: Setup, soft_ce_weight: float = 0.5, ema_decay: float = 0.999, label_smoothing: float = 0.1,
        translate: int = 4, flip: bool = True) -> Recipe:
    """MMT: ``(1 − w)(CE_ε(z₁) + CE_ε(z₂)) + w(SCE(z₁, ẑ₂) + SCE(z₂, ẑ₁))``, ẑ the EMA of the other peer.

    yxgeee/MMT (commit 057e1ea) ``mmt/trainers.py`` ``MMTTrainer`` with ``examples/mmt_train_kmeans.py``'s defaults:

    * two peers, ``student`` (z₁) and ``peer`` (z₂, a fresh student), each with a temporal-average copy
      ``student_ema`` (ẑ₁) and ``peer_ema`` (ẑ₂): ``θ_ema = α θ_ema + (1 − α) θ`` after every step with
      ``α = min(1 − 1/(global_step + 1), ema_decay)`` (:class:`GlobalStepEMA`, ``--alpha`` 0.999); the EMA models
      run in train mode (batch norm on batch statistics, their own running statistics), get no gradient;
    * each peer learns from the OTHER peer's EMA: ``SoftEntropy(p_out_t1, p_out_t2_ema) +
      SoftEntropy(p_out_t2, p_out_t1_ema)`` (soft cross-entropy, T 1), weight ``soft_ce_weight`` w (0.5), and from
      the labels with ``CrossEntropyLabelSmooth`` (ε 0.1) at weight ``1 − w`` (:func:`kdkernels.mmt_loss`);
    * each peer and its EMA read their own random augmentation of the batch (MMT's ``Preprocessor(mutual=True)``
      gives ``inputs_1``, ``inputs_2``): here independent translations by up to ``translate`` pixels (zero padding)
      and horizontal flips, ``"input"`` for the student pair, ``"input_peer"`` for the other.

    The exported model is ``student_ema``: MMT evaluates and saves the temporal-average models (the paper tests
    with one of them); ``test_acc_peer_ema``, ``test_acc_student`` and ``test_acc_peer`` report the others.
    Approximation (flagged): MMT is a re-ID method; its hard and soft triplet terms (features of pseudo-label
    clusters) are omitted for classification, the labels are the dataset's (no k-means pseudo-labels, so no
    classifier re-initialisation from cluster centres), and the second peer is a fresh student rather than a
    second pre-trained network. Preset ``digits``: a 1-pixel translation and no flip for 8×8 digits, and
    ``ema_decay`` 0.9: the demo's runs take ~150 steps from scratch, where 0.999 (MMT: ~1000-step horizon in 32000
    steps from pre-trained peers) would average in the untrained start.
    """
    check = Checks("mmt")
    soft_ce_weight = check.probability("soft_ce_weight", soft_ce_weight)
    ema_decay = check.probability("ema_decay", ema_decay)
    label_smoothing = check.probability("label_smoothing", label_smoothing, upper_open=True)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    views = augmentation("input", "input_peer", translate, flip) + augmentation("input", "input", translate, flip)
    models = {"student": setup.student, "peer": setup.fresh_student("mmt")}
    distiller = Distiller(models, [MMTTerm(soft_ce_weight, label_smoothing)], trainable=("student", "peer"),
                          frozen_train_mode=("student_ema", "peer_ema"),
                          evaluate=("student_ema", "peer_ema", "student", "peer"),
                          updates={"student_ema": GlobalStepEMA("student", ema_decay),
                                   "peer_ema": GlobalStepEMA("peer", ema_decay)},
                          inputs={"peer": "input_peer", "peer_ema": "input_peer"}, views=views)
    return single_stage("mmt", distiller)


# ------------------------------------------------------------------------------------------------------------ ONE

DEPLOY = ("branch", "ensemble")


class SharedFeature(nn.Module):
    """Stands in the trunk for the first branched stage: passes its input (the shared feature) through and keeps it
    for :class:`MultiBranchNetwork` until that forward takes it."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x
        return x


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Puts ``module`` at ``path`` (dotted) inside ``model``."""
    parent, _, name = path.rpartition(".")
    owner = find_module(model, parent, "backbone") if parent else model
    owner._modules[name] = module


def input_width(module: nn.Module, what: str) -> int:
    """The input channels / features of the first convolution or linear layer inside ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            return layer.in_channels
        if isinstance(layer, nn.Linear):
            return layer.in_features
    raise ValueError(f"cannot tell the width of the shared feature from {what}: it holds no convolution or linear "
                     "layer; pass gate_channels=...")


def check_branch_point(check: Checks, student: nn.Module, branch_from: str | None) -> None:
    """``branch_from`` (where the branches of a multi-branch student split off) is None or one of the student's
    stages before the last."""
    if branch_from is None:
        return
    check.name("branch_from", branch_from, "stage path")
    stages = feature_points(student).stages
    if branch_from not in stages[:-1]:
        check.value_error("branch_from", f"must be one of the student's stages before the last {stages[:-1]}",
                          repr(branch_from))


class MultiBranchNetwork(nn.Module):
    """ONE's multi-branch network built from a backbone (Lan1991Xu/ONE_NeurIPS2018 ``models/cifar/resnet.py``
    ``ONE_ResNet``): the backbone's layers up to ``split`` are shared, its stages after ``split`` and its classifier
    are repeated in ``branches`` branches, and a gate ``softmax(relu(BN(Linear(GAP(shared)))))`` gives each sample's
    branch weights (``control_v1``, ``bn_v1``; ``avgpool_c`` is the global average pooling of the shared map).

    ``backbone`` must carry feature points (:func:`~kdkernels.distill.feature_points`: the zoo models and ResNets)
    and run, after ``split``, its later stages, global average pooling and its classifier (true of the digits zoo,
    the CIFAR ResNets and ShuffleNets; as SOKD's branch): the first forward checks it (:meth:`check_layout`) and
    raises a ValueError otherwise (WRN, MobileNetV2 and VGG have more layers after their last stage). The trunk is ``backbone`` itself with the branched stages
    and classifier replaced (in a copy: ``backbone`` is not changed; the first by :class:`SharedFeature`, which keeps the shared map; the others by
    identities), so its forward stops being useful after the split and costs only a pooling. Branch 0 takes the
    backbone's own stages and classifier; branch k ≥ 1 those of ``new_backbone()`` (an untrained model of the same
    architecture, so that every branch has the architecture's own initialisation, each drawn independently, as the
    official ``layer3_1..3`` are), or, without a factory, re-initialised copies (``reset_parameters``).

    The forward computes every branch; it passes the stacked branch logits ``[m, B, C]`` through the identity
    ``branch_logits`` and the gate ``[B, m]`` through ``gate_weights`` (taps ``"<model>:branch_logits"``,
    ``"<model>:gate_weights"``; no gate with ``gate=False``, PCL's) and returns branch 0's logits
    (``deploy="branch"``) or the gated ensemble ``Σ_i g_i z_i`` (``deploy="ensemble"``). The deployed single
    branch, without the other branches and the gate, is :meth:`single_branch`: the backbone's own class with
    branch 0's weights (same outputs).
    """

    def __init__(self, backbone: nn.Module, branches: int = 3, *, split: str | None = None,
                 new_backbone: Callable[[], nn.Module] | None = None, deploy: str = "branch",
                 gate_channels: int | None = None, gate: bool = True):
        super().__init__()
        check = Checks("MultiBranchNetwork")
        self.branch_count = check.integer("branches", branches, minimum=2)
        self.deploy = check.choice("deploy", deploy, DEPLOY)
        if not check.flag("gate", gate) and self.deploy == "ensemble":
            check.value_error("deploy", "must be 'branch' without a gate (gate=False)", repr(deploy))
        original, backbone = copy.deepcopy(backbone), copy.deepcopy(backbone)     # the caller's is left as it is
        points = feature_points(backbone)
        if split is None:
            if len(points.stages) < 2:
                check.value_error("backbone", "must list at least two stages in its feature points (the branches "
                                  "repeat the last one), or pass split=...", f"stages {points.stages}")
            split = points.stages[-2]
        if split not in points.stages or split == points.stages[-1]:
            check.value_error("split", f"must be one of the backbone's stages before the last {points.stages[:-1]}",
                              repr(split))
        self.split = split
        self.stage_paths = points.stages[points.stages.index(split) + 1:]
        self.classifier_path = points.classifier
        paths = [*self.stage_paths, self.classifier_path]
        sources = [backbone] + [new_backbone() if new_backbone is not None else None
                                for _ in range(self.branch_count - 1)]
        branch_list = []
        for index, source in enumerate(sources):
            modules = [copy.deepcopy(find_module(source if source is not None else backbone, path, "backbone"))
                       for path in paths]
            branch = nn.Sequential(*modules[:-1], GlobalPool(), modules[-1])
            if source is None:
                for module in branch.modules():
                    if module is not branch and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            branch_list.append(branch)
        self.branches = nn.ModuleList(branch_list)
        self.gate: nn.Module | None = None
        if gate:
            width = gate_channels if gate_channels is not None else input_width(
                self.branches[0][0], f"the first branched stage {self.stage_paths[0]!r}")
            width = check.integer("gate_channels", width, minimum=1)
            self.gate = nn.Sequential(GlobalPool(), nn.Linear(width, self.branch_count),
                                      nn.BatchNorm1d(self.branch_count), nn.ReLU(), nn.Softmax(dim=1))
        self.shared = SharedFeature()
        replace_module(backbone, self.stage_paths[0], self.shared)
        for path in paths[1:]:
            replace_module(backbone, path, nn.Identity())
        self.trunk = backbone
        self.branch_logits = nn.Identity()
        self.gate_weights = nn.Identity()
        # (the original, the trunk, branch 0) as built, outside the module tree: the first forward checks the layout
        self._layout_check = [original, copy.deepcopy(self.trunk), copy.deepcopy(self.branches[0])]

    @torch.no_grad()
    def check_layout(self, x: torch.Tensor) -> None:
        """That the backbone's forward after the split is its later stages, global pooling and classifier: the
        shared layers and branch 0, as built, must give the backbone's outputs on (two samples of) ``x`` in eval
        mode. Runs once, at the first forward, on the copies made when the network was built."""
        original, trunk, branch = self._layout_check
        self._layout_check = []
        for model in (original, trunk, branch):
            model.eval()
        problem = None
        try:
            trunk(x[:2])
            shared = next(m for m in trunk.modules() if isinstance(m, SharedFeature))
            feature, shared.value = shared.value, None
            ours, expected = branch(feature), original(x[:2])
            if ours.shape != expected.shape or not torch.allclose(ours, expected, rtol=1e-4, atol=1e-5):
                problem = "the shared layers and one branch do not reproduce its outputs"
        except RuntimeError as error:
            problem = f"running the shared layers and one branch fails ({error})"
        if problem:
            raise ValueError(f"MultiBranchNetwork: {type(original).__name__}'s forward after {self.split!r} is not "
                             f"its stages {self.stage_paths}, global average pooling and {self.classifier_path!r}: "
                             f"{problem}; pass split=... (a stage after which it is)")

    def shared_feature(self, x: torch.Tensor) -> torch.Tensor:
        self.trunk(x)
        feature, self.shared.value = self.shared.value, None
        return feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._layout_check:
            self.check_layout(x)
        feature = self.shared_feature(x)
        logits = self.branch_logits(torch.stack([branch(feature) for branch in self.branches]))
        if self.gate is None:
            return logits[0]
        gate = self.gate_weights(self.gate(feature))
        if self.deploy == "ensemble":
            return torch.einsum("bm,mbc->bc", gate, logits)
        return logits[0]

    def single_branch(self, index: int = 0) -> nn.Module:
        """A copy of the backbone (its own architecture and forward) whose later stages and classifier are branch
        ``index``'s: what ONE deploys."""
        index = Checks("MultiBranchNetwork.single_branch").integer("index", index, minimum=0,
                                                                    maximum=self.branch_count - 1)
        model = copy.deepcopy(self.trunk)
        branch = self.branches[index]
        stages = [module for module in branch if not isinstance(module, GlobalPool)]
        for path, module in zip([*self.stage_paths, self.classifier_path], stages):
            replace_module(model, path, copy.deepcopy(module))
        return model


class ONETerm(Term):
    """:func:`kdkernels.one_loss` on the branches and the gate, with ``kl_weight`` ramped by epoch."""

    def __init__(self, temperature: float, consistency: float, rampup: float):
        super().__init__("one", ("student:branch_logits", "student:gate_weights", "target"))
        self.temperature, self.consistency, self.rampup = temperature, consistency, rampup

    def loss(self, branch_logits, gate_weights, target, *, context):
        kl_weight = self.consistency * sigmoid_rampup(context.epoch - 1, self.rampup)
        return kdkernels.one_loss(list(branch_logits.unbind(0)), gate_weights, target, self.temperature, kl_weight)


@register("one", category="online",
          paper="Lan, Zhu, Gong. Knowledge Distillation by On-the-Fly Native Ensemble. NeurIPS 2018",
          presets={"digits": {"rampup": 8.0}}, needs_teacher=False)
def one(setup: Setup, branches: int = 3, temperature: float = 3.0, consistency: float = 1.0, rampup: float = 80.0,
        branch_from: str | None = None, deploy: str = "branch") -> Recipe:
    """ONE: ``Σ_i CE(z_i) + CE(z_e) + w(e) Σ_i T² KL(p_e.detach() ‖ p_i)``, ``z_e = Σ_i g_i z_i`` (gated branches).

    Lan1991Xu/ONE_NeurIPS2018 (commit 54afde3): the student becomes a :class:`MultiBranchNetwork` (``m`` =
    ``branches`` 3 copies of its stages after ``branch_from``, by default its last stage, and of its classifier,
    sharing the layers before; the gate ``softmax(relu(BN(Linear(GAP(shared)))))`` of ``ONE_ResNet``), trained with
    :func:`kdkernels.one_loss` as ``cifar_one.py`` ``train``: CE on every branch and on the gated ensemble, plus the
    ``KLLoss`` (T 3, T², batchmean) of every branch towards the ensemble's detached softened output, weighted by
    ``w(e) = consistency · sigmoid_rampup(e, rampup)`` (``get_current_consistency_weight``: ``exp(−5(1 − e/R)²)``,
    e the 0-based epoch, R = ``--consistency_rampup`` 80 of its 300 epochs). The gate gets its gradient through the
    ensemble's CE only.

    Deployment: the paper's main results deploy one branch (the ensemble-free model, the backbone's own size); so
    does ``deploy="branch"`` (default): the evaluated and exported model outputs branch 0's logits
    (:meth:`MultiBranchNetwork.single_branch` gives that network alone, as the backbone's class). ``deploy="ensemble"`` evaluates
    the gated ensemble of all branches (the paper's ONE-E). The exported state dict is the whole multi-branch
    network's. Branches 1..m−1 are initialised from fresh students (``setup.new_student``) when it exists. KLLoss
    adds 1e-7 to the target probabilities; the loss is the exact KL. Preset ``digits``: ``rampup`` 8 epochs (80/300
    of a 30-epoch run).
    """
    check = Checks("one")
    temperature = check.temperature(temperature)
    consistency = check.real("consistency", consistency, minimum=0.0)
    rampup = check.real("rampup", rampup, minimum=0.0)
    branches = check.integer("branches", branches, minimum=2)
    deploy = check.choice("deploy", deploy, DEPLOY)
    check_branch_point(check, setup.student, branch_from)
    network = MultiBranchNetwork(setup.student, branches, split=branch_from, new_backbone=setup.new_student,
                                 deploy=deploy)
    distiller = Distiller({"student": network}, [ONETerm(temperature, consistency, rampup)])
    return single_stage("one", distiller)


# ------------------------------------------------------------------------------------------------------------ PCL

PCL_APPROXIMATION = ("no official code of PCL (Wu & Gong, AAAI 2021) was found; the objective and the network follow "
                     "the paper's abstract and the third-party reproduction shaoeric/Peer-Collaborative-Learning-for-"
                     "Online-Knowledge-Distillation (commit 6afb473): the peer ensemble teacher is a linear "
                     "classifier on the concatenated pooled peer features, the peer mean teachers are the peers of "
                     "the temporal-mean (EMA) network, and the ramp-up is ONE's sigmoid ramp-up (the reproduction's "
                     "compute_rampup_weight intends it but divides by lambda instead of the 80-epoch length); the "
                     "deployed model is peer 0 of the temporal-mean network; branches start from independent "
                     "initialisations (the reproduction deep-copies one)")


class PeerCollaborativeNetwork(nn.Module):
    """PCL's multi-branch network: the layers of ``backbone`` up to ``split`` shared, ``peers`` branches (its later
    stages and classifier; :class:`MultiBranchNetwork` without a gate), each branch reading its own augmentation of
    the batch (the batch keys ``views``, one per peer, each through the shared layers in its own forward, so each has
    its own batch-norm statistics), and the peer ensemble teacher: a linear classifier on the concatenated pooled
    features of the peers (shaoeric/... ``src/models/resnet.py``: ``en_fc`` on ``cat([feat1, feat2, feat3])``).

    It reads the whole batch; a plain tensor is read by every peer. The forward returns peer 0's logits and passes
    the stacked peer logits ``[m, B, C]`` through the identity ``peer_logits`` and the ensemble's ``[B, C]`` through
    ``ensemble_logits`` (taps ``"<model>:peer_logits"``, ``"<model>:ensemble_logits"``). The backbone's classifier
    must be an ``nn.Linear``; :meth:`single_peer` gives one peer alone as the backbone's own class."""

    distill_input = BATCH

    def __init__(self, backbone: nn.Module, peers: int = 3, *, views: Sequence[str], split: str | None = None,
                 new_backbone: Callable[[], nn.Module] | None = None):
        super().__init__()
        check = Checks("PeerCollaborativeNetwork")
        peers = check.integer("peers", peers, minimum=2)
        self.views = tuple(views)
        if len(self.views) != peers or not all(isinstance(key, str) and key for key in self.views):
            check.value_error("views", f"must name one batch key per peer ({peers})", repr(views))
        self.network = MultiBranchNetwork(backbone, peers, split=split, new_backbone=new_backbone, gate=False)
        classifier = self.network.branches[0][-1]
        if not isinstance(classifier, nn.Linear):
            check.value_error("backbone", "must end in an nn.Linear classifier (the ensemble classifier takes the "
                              "concatenated inputs of the peers' classifiers)",
                              f"{self.network.classifier_path!r} is {type(classifier).__name__}")
        self.ensemble_classifier = nn.Linear(peers * classifier.in_features, classifier.out_features)
        self.peer_logits = nn.Identity()
        self.ensemble_logits = nn.Identity()

    def forward(self, batch) -> torch.Tensor:
        network = self.network
        inputs = [batch[key] for key in self.views] if isinstance(batch, Mapping) else [batch] * len(self.views)
        if network._layout_check:
            network.check_layout(inputs[0])
        logits, pooled = [], []
        for x, branch in zip(inputs, network.branches):
            feature = branch[:-1](network.shared_feature(x))
            pooled.append(feature.flatten(1))
            logits.append(branch[-1](feature))
        self.ensemble_logits(self.ensemble_classifier(torch.cat(pooled, dim=1)))
        return self.peer_logits(torch.stack(logits))[0]

    def single_peer(self, index: int = 0) -> nn.Module:
        """Peer ``index`` alone: a copy of the backbone with the peer's later stages and classifier."""
        return self.network.single_branch(index)


class PCLTerm(Term):
    """:func:`kdkernels.pcl_loss` on the peers, the peer ensemble teacher and the temporal-mean network's peers,
    with ``kl_weight`` ramped by epoch."""

    def __init__(self, temperature: float, consistency: float, rampup: float):
        super().__init__("pcl", ("student:peer_logits", "student:ensemble_logits", "student_ema:peer_logits",
                                 "target"))
        self.temperature, self.consistency, self.rampup = temperature, consistency, rampup

    def loss(self, peer_logits, ensemble_logits, mean_logits, target, *, context):
        kl_weight = self.consistency * sigmoid_rampup(context.epoch - 1, self.rampup)
        return kdkernels.pcl_loss(list(peer_logits.unbind(0)), ensemble_logits, list(mean_logits.unbind(0)), target,
                                  self.temperature, kl_weight)


@register("pcl", category="online",
          paper="Wu, Gong. Peer Collaborative Learning for Online Knowledge Distillation. AAAI 2021",
          presets={"digits": {"rampup": 8.0, "translate": 1, "flip": False, "ema_decay": 0.9}},
          approximation=PCL_APPROXIMATION, needs_teacher=False)
def pcl(setup: Setup, peers: int = 3, temperature: float = 3.0, consistency: float = 1.0, rampup: float = 80.0,
        ema_decay: float = 0.999, translate: int = 4, flip: bool = True, branch_from: str | None = None) -> Recipe:
    """PCL: ``Σ_i CE(z_i) + CE(z_e) + w(e) Σ_i [T² KL(p_e‖p_i) + 1/(m−1) Σ_{j≠i} T² KL(p̃_j‖p_i)]``.

    No official code exists (flagged approximation); the paper's abstract and the reproduction
    shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation (commit 6afb473: ``src/controller.py``,
    ``src/losses/loss_wrapper.py``, ``src/losses/kd_loss.py``, ``src/models/resnet.py``, ``src/trainer.py``):

    * the student becomes a :class:`PeerCollaborativeNetwork`: ``peers`` m (3) branches, the student's stages after
      ``branch_from`` (by default its last stage) and classifier, sharing the layers before; each peer ``i`` reads
      its own random augmentation of the batch (``input_peer{i}``: a translation by up to ``translate`` pixels, zero
      padding, and with ``flip`` a horizontal flip; RandomCrop(32, 4) and flips in the reproduction) through the
      shared layers; its logits ``z_i``;
    * the peer ensemble teacher ``z_e``: a linear classifier on the concatenated pooled features of the m peers,
      trained by its CE (the KL targets are detached);
    * the temporal-mean network ``student_ema``: the EMA of the whole network's parameters, ``α = min(1 − 1/(n),
      ema_decay)`` at the n-th update (:class:`GlobalStepEMA`, ``update_ema_variables`` with 0.999), run in train mode
      on the same views (its batch norm keeps its own statistics); its peer j's logits ``z̃_j`` are the peer mean
      teachers;
    * :func:`kdkernels.pcl_loss` (T 3, T² batchmean KL, the mean teachers of the OTHER peers averaged) with
      ``w(e) = consistency · sigmoid_rampup(e, rampup)`` (ONE's ``exp(−5(1 − e/R)²)``, e the 0-based epoch,
      R 80).

    Deployment: peer 0 of the temporal-mean network (``student_ema``, the exported model, evaluated first; the
    reproduction validates and saves the mean model); ``test_acc_student`` reports the trained network's peer 0.
    :meth:`PeerCollaborativeNetwork.single_peer` gives one peer as the backbone's class. Preset ``digits``: ramp-up
    8 epochs, a 1-pixel translation, no flip, ``ema_decay`` 0.9 (as ``mmt``'s: ~150 steps from scratch).
    """
    check = Checks("pcl")
    peers = check.integer("peers", peers, minimum=2)
    temperature = check.temperature(temperature)
    consistency = check.real("consistency", consistency, minimum=0.0)
    rampup = check.real("rampup", rampup, minimum=0.0)
    ema_decay = check.probability("ema_decay", ema_decay)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    check_branch_point(check, setup.student, branch_from)
    keys = [f"input_peer{index}" for index in range(peers)]
    views = [view for key in keys for view in augmentation("input", key, translate, flip)]
    network = PeerCollaborativeNetwork(setup.student, peers, views=keys, split=branch_from,
                                       new_backbone=setup.new_student)
    distiller = Distiller({"student": network}, [PCLTerm(temperature, consistency, rampup)],
                          frozen_train_mode=("student_ema",), evaluate=("student_ema", "student"),
                          updates={"student_ema": GlobalStepEMA("student", ema_decay)}, views=views)
    return single_stage("pcl", distiller)


# ------------------------------------------------------------------------------------------------------------ MCL

MCL_APPROXIMATION = ("winycg/MCL's CIFAR batches come from MPerClassSampler (m = 2: batch/2 distinct classes, two "
                     "samples each); here the class_aware batching (each anchor followed by one other sample of its "
                     "class; a class may appear more than twice); with more than 2 networks the official models "
                     "(ResNet_b) share the stem and first stage, here the networks are independent (as its 2-network "
                     "ResNet_n)")


class MCLHead(nn.Sequential):
    """MCL's projection head ``Embed`` (``losses/cifar_sup_mcl_loss.py``): ``Linear(d, dim) → ReLU → Linear(dim,
    dim)``; the L2 normalisation is :func:`kdkernels.mcl_loss`'s."""

    def __init__(self, in_features: int, dim: int):
        super().__init__(nn.Linear(in_features, dim), nn.ReLU(), nn.Linear(dim, dim))


class MCLTerm(Term):
    """One projection head per network on its embedding (``"<network>:<embedding tap>"``), then
    :func:`kdkernels.mcl_loss` with the labels; the heads are built from the embeddings' widths."""

    def __init__(self, embedding_keys: Sequence[str], feat_dim: int, **loss_options):
        super().__init__("mcl", (*embedding_keys, "target"))
        self.feat_dim = feat_dim
        self.loss_options = loss_options
        self.heads: nn.ModuleList | None = None

    def build(self, example):
        if self.heads is None:
            self.heads = nn.ModuleList(MCLHead(example[key].flatten(1).shape[1], self.feat_dim)
                                       for key in self.reads[:-1])

    def loss(self, *values, context):
        *embeddings, target = values
        projected = [head(embedding.flatten(1)) for head, embedding in zip(self.heads, embeddings)]
        return kdkernels.mcl_loss(projected, target, **self.loss_options)


class EnsembleLogitTerm(Term):
    """MCL's ``--logit-distill``: ``KL_T(mean_i(z_i).detach() ‖ z)`` (``DistillKL``, T², batchmean) for both networks
    when there are two, for the last one only otherwise (``main_cifar.py`` ``train``)."""

    def __init__(self, names: Sequence[str], temperature: float):
        super().__init__("mcl_logit_kd", tuple(names))
        self.temperature = temperature

    def loss(self, *logits, context):
        ensemble = (sum(logits) / len(logits)).detach()
        learners = logits if len(logits) == 2 else logits[-1:]
        return sum(kdkernels.kd_loss(z, ensemble, self.temperature) for z in learners)


@register("mcl", category="online",
          paper="Yang, An, Xu, Xu. Mutual Contrastive Learning for Visual Representation Learning. AAAI 2022",
          presets={"logit-distill": {"networks": 4, "logit_distill": True}}, approximation=MCL_APPROXIMATION,
          needs_teacher=False)
def mcl(setup: Setup, networks: int = 2, temperature: float = 0.1, kl_temperature: float = 3.0,
        vcl_weight: float = 0.1, soft_vcl_weight: float = 1.0, icl_weight: float = 0.1, soft_icl_weight: float = 1.0,
        feat_dim: int = 128, logit_distill: bool = False, ce_weight: float = 1.0) -> Recipe:
    """MCL: ``Σ_i CE_i + α VCL + γ soft VCL + β ICL + λ soft ICL`` (:func:`kdkernels.mcl_loss`) over m networks.

    winycg/MCL (commit 236da2f) ``main_cifar.py`` (``train``: ``loss_cls + loss_logit_kd + loss_mcl``) with
    ``losses/cifar_sup_mcl_loss.py`` (``Sup_MCL_Loss``, ``SupMCL``, ``Embed``) and ``scripts/train_cifar_mcl.sh``:

    * ``networks`` m (``--number-net`` 2) networks, ``setup.student`` and m − 1 fresh students (``student``,
      ``peer1``, …), each with its CE (weight 1) and all trained jointly by one optimiser (as the official
      ``trainable_list``), all evaluated, the first exported;
    * each network's embedding (the input of its classifier, the pooled feature) goes through its own projection
      head ``Linear(d, 128) → ReLU → Linear(128, 128)`` (:class:`MCLHead`, ``--feat-dim`` 128) and L2
      normalisation;
    * the in-batch supervised contrastive terms (no memory bank in the CIFAR code): vanilla (VCL, within each
      network) and interactive (ICL, across each pair of networks) contrastive losses with τ 0.1, and their soft
      versions (KL between the networks' contrastive distributions, T 3), weights α 0.1, γ 1, β 0.1, λ 1;
    * ``logit_distill`` (``--logit-distill``, preset ``logit-distill`` with 4 networks as
      ``scripts/train_cifar_mcl_logit.sh``): ``KL_T(mean_i(z_i).detach() ‖ z)`` (T ``kl_temperature``) for both
      networks when m = 2, else for the last network only, as the official code does.

    Batches: ``class_aware`` (each anchor with one other sample of its class) so that every anchor has a positive,
    as the official ``MPerClassSampler(m=2)`` ensures (approximation flagged: the samplers differ; and with m > 2 the
    official ``ResNet_b`` shares the stem and first stage between the networks, here they are independent).
    """
    check = Checks("mcl")
    names = peer_names(check.integer("networks", networks, minimum=2))
    temperature = check.temperature(temperature)
    kl_temperature = check.temperature(kl_temperature, "kl_temperature")
    weights = {name: check.real(name, value, minimum=0.0) for name, value in
               (("vcl_weight", vcl_weight), ("soft_vcl_weight", soft_vcl_weight), ("icl_weight", icl_weight),
                ("soft_icl_weight", soft_icl_weight))}
    feat_dim = check.integer("feat_dim", feat_dim, minimum=1)
    logit_distill = check.flag("logit_distill", logit_distill)
    ce_weight = check.real("ce_weight", ce_weight, minimum=0.0)
    embedding = feature_points(setup.student).embedding
    if embedding is None:
        check.value_error("setup.student", "must declare an embedding feature point (the input of its classifier)",
                          type(setup.student).__name__)
    models = {"student": setup.student, **{name: setup.fresh_student("mcl") for name in names[1:]}}
    terms: list[Term] = [CrossEntropyTerm(name, ce_weight) for name in names]
    terms.append(MCLTerm([f"{name}:{embedding}" for name in names], feat_dim, temperature=temperature,
                         kl_temperature=kl_temperature, **weights))
    if logit_distill:
        terms.append(EnsembleLogitTerm(names, kl_temperature))
    distiller = Distiller(models, terms, trainable=tuple(names), evaluate=tuple(names))
    return single_stage("mcl", distiller, batching="class_aware")
