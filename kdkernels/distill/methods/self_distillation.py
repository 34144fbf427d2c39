"""Self-distillation: the network teaches itself (BAKE, CS-KD, BYOT, SAD, DKS, DDGSD, MixSKD), its own earlier
snapshots (snapshot distillation) or its own reborn copies (BAN) (../shared/reference/methods.md §1.14–1.15)."""
from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import BATCH, Distiller
from kdkernels.distill.hooks import find_module, split_tap
from kdkernels.distill.methods._common import single_stage
from kdkernels.distill.methods.response import HardLabelTerm
from kdkernels.distill.methods.self_supervised import byol_views
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term
from kdkernels.distill.views import MixUp, View
from kdkernels.losses.self_distillation import mixup_interpolate


def positive_int(method: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming the method and the hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def tap_or_default(model_name: str, explicit: str | None, default) -> str:
    """``"<model>:<tap>"`` for an explicit tap, else for the one ``default()`` picks from the model's kd_points."""
    return f"{model_name}:{explicit if explicit is not None else default()}"


# ------------------------------------------------------------------------------------------------------------ BAKE

@register("bake", category="self", needs_teacher=False,
          paper="Ge, Zhang, Choi, Cheung, Zhao, Zhu, Wang, Zhao, Li. Self-Distillation with Batch Knowledge "
                "Ensembling Improves ImageNet Classification. arXiv:2104.13298, 2021",
          presets={"cifar": {"intra": 3}, "tinyimagenet": {"omega": 0.9}})
def bake(setup: Setup, temperature: float = 4.0, omega: float = 0.5, kd_weight: float = 1.0, intra: int = 1,
         embedding: str | None = None) -> Recipe:
    """BAKE: ``CE + λ·T²·KL(Q ‖ softmax(z/T))`` with Q the batch-propagated soft targets (yxgeee/BAKE).

    ``Q = (1−ω)(I − ωA)⁻¹ softmax(z/T)`` over the affinities A of the pooled embeddings (``kdkernels.bake_loss``).
    Batches are class-aware: each anchor is followed by ``intra`` samples of its class (ImageNet/TinyImageNet:
    intra 1; preset ``cifar``: intra 3). No teacher: the student's own logits and embedding, detached.
    """
    intra = positive_int("bake", "intra", intra)
    features = tap_or_default("student", embedding, lambda: feature_points(setup.student).embedding)
    terms = [CrossEntropyTerm("student", 1.0),
             FunctionTerm("bake", kdkernels.bake_loss, ("student", features), kd_weight, temperature=temperature,
                          omega=omega)]
    return single_stage("bake", Distiller({"student": setup.student}, terms), batching="class_aware",
                        batching_options={"intra": intra})


# ----------------------------------------------------------------------------------------------------------- CS-KD

def anchor_rows(term: str, rows: int) -> int:
    """The number of anchors of a "pairs" batch (B anchors then their B partners)."""
    if rows % 2:
        raise ValueError(f"term {term!r} reads a 'pairs' batch of B anchors followed by B partners, but the batch "
                         f"has an odd number of rows ({rows})")
    return rows // 2


class AnchorCrossEntropyTerm(Term):
    """``CE(z[:B], y[:B])``: cross-entropy on the anchor half of a "pairs" batch (the batch size is dynamic)."""

    def __init__(self, logits: str = "student", weight: float = 1.0, *, target: str = "target",
                 name: str | None = None):
        super().__init__(name or f"ce_{logits}", (logits, target), weight)

    def loss(self, logits, target, *, context):
        anchors = anchor_rows(self.name, logits.shape[0])
        return F.cross_entropy(logits[:anchors], target[:anchors])


def class_consistency_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """CS-KD's ``T²·Σ KL(softmax(z_pair/T).detach() ‖ softmax(z_anchor/T)) / B`` on a "pairs" batch."""
    anchors = anchor_rows("cs-kd", logits.shape[0])
    return kdkernels.kd_loss(logits[:anchors], logits[anchors:].detach(), temperature)


@register("cs-kd", category="self", needs_teacher=False,
          paper="Yun, Park, Lee, Shin. Regularizing Class-wise Predictions via Self-knowledge Distillation. "
                "CVPR 2020",
          presets={"cub": {"kd_weight": 3.0}})
def cs_kd(setup: Setup, temperature: float = 4.0, kd_weight: float = 1.0) -> Recipe:
    """CS-KD: ``CE(z[:B]) + λ·T²·KL(softmax(z_pair/T).detach() ‖ softmax(z[:B]/T))`` (batchmean), alinlab/cs-kd.

    Batches are B anchors followed by one random same-class partner each (``batching="pairs"``). The official
    code runs the partners in a second, no-grad forward; here one forward covers anchors and partners (batch-norm
    statistics over 2B samples), and the partner logits are detached, so the gradient is the same path.
    """
    terms = [AnchorCrossEntropyTerm("student", 1.0),
             FunctionTerm("cls", class_consistency_loss, ("student",), kd_weight, temperature=temperature)]
    return single_stage("cs-kd", Distiller({"student": setup.student}, terms), batching="pairs")


# ------------------------------------------------------------------------------------------------------------ BYOT

class BottleneckHead(nn.Module):
    """BYOT's auxiliary head (``branchBottleNeck`` + pool + fc): 1×1 conv to width/4, a k×k stride-k conv that
    brings the map to the final stage's size, 1×1 conv to the final width (each with BN and ReLU), global average
    pooling, and a linear classifier. Returns (pooled feature [B, width], logits [B, C])."""

    def __init__(self, in_channels: int, width: int, stride: int, num_classes: int):
        super().__init__()
        middle = max(1, width // 4)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, middle, 1), nn.BatchNorm2d(middle), nn.ReLU(),
            nn.Conv2d(middle, middle, stride, stride=stride), nn.BatchNorm2d(middle), nn.ReLU(),
            nn.Conv2d(middle, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(self.bottleneck(feature_map)).flatten(1)
        return pooled, self.fc(pooled)


class AuxiliaryHeadsTerm(Term):
    """BYOT's whole loss (``kdkernels.byot_loss``) with one :class:`BottleneckHead` per shallow stage.

    Reads the logits, the labels, the pooled final feature, the deepest stage map (for its spatial size) and the
    shallow stage maps; the heads are built from their shapes.
    """

    def __init__(self, name: str, *, logits: str, target: str, embedding: str, final_stage: str,
                 stages: list[str], temperature: float, alpha: float, beta: float):
        super().__init__(name, (logits, target, embedding, final_stage, *stages))
        self.stage_keys = list(stages)
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.heads = nn.ModuleList()

    def build(self, example):
        logits, embedding, final_map = (example[key] for key in self.reads[:1] + self.reads[2:4])
        maps = [example[key] for key in self.stage_keys]
        for key, value in zip(self.reads[3:], [final_map, *maps]):
            if value.dim() != 4:
                raise ValueError(f"term {self.name!r}: BYOT's heads need convolutional stage maps [B, C, H, W]; "
                                 f"{key!r} has shape {tuple(value.shape)}")
        width, final_size = embedding.reshape(embedding.shape[0], -1).shape[1], final_map.shape[-1]
        self.heads = nn.ModuleList(
            BottleneckHead(m.shape[1], width, max(1, m.shape[-1] // final_size), logits.shape[1]) for m in maps
        ).to(logits.device)

    def loss(self, logits, target, embedding, final_map, *maps, context):
        outputs = [head(feature_map) for head, feature_map in zip(self.heads, maps)]
        return kdkernels.byot_loss(logits, [o[1] for o in outputs], target, embedding, [o[0] for o in outputs],
                                   self.temperature, self.alpha, self.beta)


@register("byot", category="self", needs_teacher=False,
          paper="Zhang, Song, Gao, Chen, Bao, Ma. Be Your Own Teacher: Improve the Performance of Convolutional "
                "Neural Networks via Self Distillation. ICCV 2019")
def byot(setup: Setup, temperature: float = 3.0, alpha: float = 0.1, beta: float = 1e-6,
         stages: list[str] | None = None, embedding: str | None = None) -> Recipe:
    """BYOT: ``(1−α)ΣCE + α·T²·Σ softCE(heads, deepest.detach()) + β·Σ feature L2`` (pytorch-be-your-own-teacher).

    Auxiliary bottleneck heads (term submodules) sit on every stage but the deepest; the deepest is the network's
    own classifier. The feature term compares each head's pooled feature with the detached final pooled feature
    where either is positive, summed. ``stages`` (shallow to deep, the last being the deepest) and ``embedding``
    override the model's kd_points. Unofficial reference code (the paper has none public).
    """
    points = None if stages is not None and embedding is not None else feature_points(setup.student)
    stage_taps = list(stages) if stages is not None else list(points.stages)
    if len(stage_taps) < 2:
        raise ValueError(f"byot: needs at least two stages (auxiliary heads on all but the deepest), got {stage_taps}")
    pooled = tap_or_default("student", embedding, lambda: points.embedding)
    term = AuxiliaryHeadsTerm("byot", logits="student", target="target", embedding=pooled,
                              final_stage=f"student:{stage_taps[-1]}",
                              stages=[f"student:{tap}" for tap in stage_taps[:-1]],
                              temperature=temperature, alpha=alpha, beta=beta)
    return single_stage("byot", Distiller({"student": setup.student}, [term]))


# ------------------------------------------------------------------------------------------------------------- SAD

SAD_APPROXIMATION = ("the official schedule switches SAD on after 40k of 60k iterations (ENet-SAD_Pytorch "
                     "experiments/exp1/cfg.json sad_start_iter); here after a share `start` of the epochs (2/3); the "
                     "lane-detection losses (segmentation CE, IoU, lane existence) become the classification CE; the "
                     "deeper map is detached as the paper's distillation target, the PyTorch port does not detach it; "
                     "the official Lua release carries SAD only in commented-out code with MSE weights set to 0 "
                     "(0.1 when enabled, as the port's scale_sad_distill)")


class SelfAttentionTerm(Term):
    """SAD's ``Σ_m MSE(Ψ(A_m), Ψ(A_{m+1}))`` over consecutive stages (``kdkernels.sad_loss``), weight 0 before
    the share ``start`` of the stage's epochs has passed."""

    def __init__(self, stages: list[str], weight: float, start: float, p: float, detach_target: bool):
        super().__init__("sad", stages, weight)
        self.start, self.p, self.detach_target = start, p, detach_target

    def build(self, example):
        for key in self.reads:
            if example[key].dim() != 4:
                raise ValueError(f"term {self.name!r}: SAD's attention maps need convolutional stage maps "
                                 f"[B, C, H, W]; {key!r} has shape {tuple(example[key].shape)}")

    def weight_at(self, context):
        return self.weight if context.epoch - 1 >= self.start * context.epochs else 0.0

    def loss(self, *maps, context):
        return kdkernels.sad_loss(list(maps), self.p, self.detach_target)


@register("sad", category="self", needs_teacher=False,
          paper="Hou, Ma, Liu, Loy. Learning Lightweight Lane Detection CNNs by Self Attention Distillation. "
                "ICCV 2019",
          approximation=SAD_APPROXIMATION)
def sad(setup: Setup, sad_weight: float = 0.1, start: float = 2.0 / 3.0, p: float = 2.0, detach_target: bool = True,
        stages: list[str] | None = None) -> Recipe:
    """SAD: ``CE + λ·Σ_m MSE(Ψ(A_m), Ψ(A_{m+1}).detach())`` with ``Ψ(A) = softmax_hw(B(Σ_c |A_c|^p))``, λ = 0.1.

    Each stage's attention map learns the next (deeper) stage's map of the network itself; ``B`` resizes the deeper
    map bilinearly to the shallower one's size (``at_gen`` of InhwanBae/ENet-SAD_Pytorch ``model_ENET_SAD.py`` @
    d612a957, the PyTorch port the official cardwing/Codes-for-Lane-Detection points to; ``kdkernels.sad_loss``).
    λ = 0.1 is the port's ``scale_sad_distill`` (and the official Lua ``init.lua`` comment). SAD is off for the
    first share ``start`` of the epochs (official: from iteration 40k of 60k, 2/3). ``stages`` (shallow to deep,
    convolutional) override the model's kd_points. Approximation: see ``SAD_APPROXIMATION``.
    """
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start < 1.0:
        raise ValueError(f"sad: start must be a share of the run in [0, 1), got {start!r}")
    if isinstance(sad_weight, bool) or not isinstance(sad_weight, (int, float)) or not sad_weight >= 0:
        raise ValueError(f"sad: sad_weight must be a number >= 0, got {sad_weight!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"sad: p must be a number > 0, got {p!r}")
    if not isinstance(detach_target, bool):
        raise TypeError(f"sad: detach_target must be a bool, got {detach_target!r}")
    stage_taps = list(stages) if stages is not None else list(feature_points(setup.student).stages)
    if len(stage_taps) < 2:
        raise ValueError(f"sad: stages must hold at least two stages (each learns the next one's attention), got "
                         f"{stage_taps}")
    terms = [CrossEntropyTerm("student", 1.0),
             SelfAttentionTerm([f"student:{tap}" for tap in stage_taps], sad_weight, float(start), float(p),
                               detach_target)]
    return single_stage("sad", Distiller({"student": setup.student}, terms))


# ------------------------------------------------------------------------------------------------------------- DKS

DKS_APPROXIMATION = ("the official branches are copies of the network's later stages (wrn_DKS/resnet.py: from "
                     "group0 a new group1 and half a group2, from group1 a group2 of twice the width, each with BN, "
                     "ReLU, pooling and fc); here every shallow stage gets BYOT's bottleneck head (1×1 conv, k×k "
                     "stride-k conv to the deepest stage's size, 1×1 conv to its width, pooling, fc), which fits "
                     "any zoo model")


class KnowledgeSynergyTerm(Term):
    """DKS's ``Σ_i CE(z_i) + Σ_{i≠j} KL(p_j.detach() ‖ p_i)`` (``kdkernels.dks_loss``) over one
    :class:`BottleneckHead` per shallow stage and the network's own classifier.

    Reads the logits, the labels, the deepest stage map (for the heads' output size and width) and the shallow
    stage maps; the heads are built from their shapes."""

    def __init__(self, name: str, *, logits: str, target: str, final_stage: str, stages: list[str],
                 epsilon: float):
        super().__init__(name, (logits, target, final_stage, *stages))
        self.epsilon = epsilon
        self.heads = nn.ModuleList()

    def build(self, example):
        logits, final_map = example[self.reads[0]], example[self.reads[2]]
        maps = [example[key] for key in self.reads[3:]]
        for key, value in zip(self.reads[2:], [final_map, *maps]):
            if value.dim() != 4:
                raise ValueError(f"term {self.name!r}: DKS's auxiliary branches need convolutional stage maps "
                                 f"[B, C, H, W]; {key!r} has shape {tuple(value.shape)}")
        width, final_size = final_map.shape[1], final_map.shape[-1]
        self.heads = nn.ModuleList(
            BottleneckHead(m.shape[1], width, max(1, m.shape[-1] // final_size), logits.shape[1]) for m in maps
        ).to(logits.device)

    def loss(self, logits, target, final_map, *maps, context):
        branches = [head(feature_map)[1] for head, feature_map in zip(self.heads, maps)]
        return kdkernels.dks_loss([*branches, logits], target, self.epsilon)


@register("dks", category="self", needs_teacher=False,
          paper="Sun, Yao, Zhou, Wang. Deeply-supervised Knowledge Synergy. CVPR 2019",
          approximation=DKS_APPROXIMATION)
def dks(setup: Setup, epsilon: float = 1e-8, stages: list[str] | None = None) -> Recipe:
    """DKS: ``Σ_i CE(z_i, y) + Σ_i Σ_{j≠i} KL(p̂_j.detach() ‖ p̂_i)`` over the auxiliary branches and the main
    classifier, every ordered pair, weights 1, T = 1, ``p̂ = (softmax(z) + ε)/(1 + Cε)`` (sundw2014/DKS @ 285354171
    ``wrn_DKS/main.py`` ``h`` and ``wrn_DKS/KL_divergence.py``; ``kdkernels.dks_loss``).

    One auxiliary branch (a term submodule, BYOT's bottleneck head) sits on every stage but the deepest, as the
    official branches leave from the outputs of the first two of three WRN groups; the deepest feeds the network's
    own classifier, the evaluated model. ``stages`` (shallow to deep, the last being the deepest) override the
    model's kd_points. Approximation: see ``DKS_APPROXIMATION``.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise ValueError(f"dks: epsilon must be a number >= 0, got {epsilon!r}")
    stage_taps = list(stages) if stages is not None else list(feature_points(setup.student).stages)
    if len(stage_taps) < 2:
        raise ValueError(f"dks: stages must hold at least two stages (branches on all but the deepest), got "
                         f"{stage_taps}")
    term = KnowledgeSynergyTerm("dks", logits="student", target="target", final_stage=f"student:{stage_taps[-1]}",
                                stages=[f"student:{tap}" for tap in stage_taps[:-1]], epsilon=float(epsilon))
    return single_stage("dks", Distiller({"student": setup.student}, [term]))


# ----------------------------------------------------------------------------------------------------------- DDGSD

DDGSD_VIEWS = ("input", "input_view2")
DDGSD_APPROXIMATION = ("no official code: the loss is transcribed from the paper's description (CE on both "
                       "views, symmetric KL between their posteriors without stopping gradients, linear-kernel MMD "
                       "between their mean pooled features, weights 1); the distortions for 8×8 digits are a "
                       "random shift by up to 1 pixel and Gaussian noise (std 0.1) instead of the paper's image "
                       "distortions; each view runs through the network in its own forward (own batch-norm "
                       "statistics)")


class DistortedPair(nn.Module):
    """The network on two distorted views of the batch (``views``), one forward each: returns view 1's logits and
    passes the stacked ``[2, B, C]`` logits and ``[2, B, D]`` pooled features (the ``embedding`` tap of
    ``network``, flattened per sample) through the identity modules ``logits`` and ``embeddings``, so that terms
    read them as taps (``"ddgsd:logits"``, ``"ddgsd:embeddings"``)."""

    distill_input = BATCH

    def __init__(self, network: nn.Module, embedding: str, views: tuple[str, str] = DDGSD_VIEWS):
        super().__init__()
        self.network, self.views = network, tuple(views)
        self.embedding_path, self.embedding_is_input = split_tap(embedding)
        find_module(network, self.embedding_path, "ddgsd's network")
        self.logits, self.embeddings = nn.Identity(), nn.Identity()

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled feature [B, D], logits) of one view."""
        captured = []
        module = self.network.get_submodule(self.embedding_path)
        if self.embedding_is_input:
            handle = module.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        else:
            handle = module.register_forward_hook(lambda _m, _inputs, output: captured.append(output))
        try:
            logits = self.network(images)
        finally:
            handle.remove()
        return captured[-1].flatten(1), logits

    def forward(self, batch: dict) -> torch.Tensor:
        embeddings, logits = zip(*(self.run(batch[key]) for key in self.views))
        self.logits(torch.stack(logits))
        self.embeddings(torch.stack(embeddings))
        return logits[0]


class DistortionTerm(Term):
    """The whole DDGSD loss (``kdkernels.ddgsd_loss``) on the two views' stacked logits and pooled features."""

    def __init__(self, kl_weight: float, mmd_weight: float, *, model: str = "ddgsd", target: str = "target"):
        super().__init__("ddgsd", (f"{model}:logits", target, f"{model}:embeddings"))
        self.kl_weight, self.mmd_weight = kl_weight, mmd_weight

    def loss(self, logits, target, embeddings, *, context):
        return kdkernels.ddgsd_loss(logits[0], logits[1], target, embeddings[0], embeddings[1], self.kl_weight,
                                    self.mmd_weight)


@register("ddgsd", category="self", needs_teacher=False,
          paper="Xu, Liu. Data-Distortion Guided Self-Distillation for Deep Neural Networks. AAAI 2019",
          presets={"cifar": {"translate": 4, "flip": True, "noise": 0.0}},
          approximation=DDGSD_APPROXIMATION)
def ddgsd(setup: Setup, kl_weight: float = 1.0, mmd_weight: float = 1.0, translate: int = 1, flip: bool = False,
          noise: float = 0.1, embedding: str | None = None) -> Recipe:
    """DDGSD: ``CE(z_a) + CE(z_b) + λ_kl·[KL(p_a ‖ p_b) + KL(p_b ‖ p_a)] + λ_mmd·‖mean f_a − mean f_b‖²``.

    Two independently distorted views of each image run through the same network (``kdkernels.ddgsd_loss``; z the
    logits, p their softmax, f the pooled features at the model's embedding tap or ``embedding``). No official
    code: transcribed from the paper (Xu & Liu, AAAI 2019). The views (``kdkernels.distill.views``) are a random
    shift by up to ``translate`` pixels (zero padding), a horizontal flip (``flip``) and Gaussian noise of std
    ``noise``: 1 pixel and noise 0.1 for 8×8 digits (not mirror-symmetric); preset ``cifar``: 4 pixels and a flip.
    The evaluated model is the network on clean inputs. Approximation: see ``DDGSD_APPROXIMATION``.
    """
    check = Checks("ddgsd")
    kl_weight = check.real("kl_weight", kl_weight, nonnegative=True)
    mmd_weight = check.real("mmd_weight", mmd_weight, nonnegative=True)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    noise = check.real("noise", noise, nonnegative=True)
    tap = embedding if embedding is not None else feature_points(setup.student).embedding
    pair = DistortedPair(setup.student, tap)
    distiller = Distiller({"student": setup.student, "ddgsd": pair}, [DistortionTerm(kl_weight, mmd_weight)],
                          trainable=("student", "ddgsd"), evaluate=("student",),
                          views=byol_views(translate, flip, noise))
    return single_stage("ddgsd", distiller)


# ---------------------------------------------------------------------------------------------------------- MixSKD

MIXSKD_APPROXIMATION = ("the official auxiliary branches are copies of the backbone's later stages "
                        "(models/resnet_mixskd.py Auxiliary_Classifier: from layer k the layers k+1.. of a fresh "
                        "ResNet, pooling and fc); here every shallow stage gets BYOT's bottleneck branch (1×1 conv, "
                        "k×k stride-k conv to the deepest stage's size, 1×1 conv to its width, each with BN and ReLU), "
                        "which fits any zoo model; the mixup partners are a cycle of the batch (no sample is its own "
                        "partner) instead of torch.randperm; one lam per (micro-)batch as coded, drawn from the views' "
                        "counter-based stream")


class BatchMixUp(MixUp):
    """MixUp with one ``lam ~ Beta(alpha, alpha)`` for the whole (micro-)batch, as MixSKD's ``mixup_data`` draws it:
    the draw of the batch's sample with the smallest dataset index (``mix_lam`` holds it once per sample)."""

    def __call__(self, x, draws):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            Checks("BatchMixUp").type_error("the source", "a float tensor [B, ...]", x)
        permutation = draws.partners()
        lam = draws.beta(self.alpha)
        lam = lam[torch.argmin(draws.index)].expand_as(lam).clone()
        weight = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return weight * x + (1 - weight) * x[permutation], {self.lam: lam, self.perm: permutation}


class MixupPair(nn.Module):
    """The network on the clean batch and its mixup images in one forward (``torch.cat``, as the official
    ``net(torch.cat([inputs, mix_inputs]))``: shared batch-norm statistics over the 2B rows). Returns the clean
    rows' logits and passes the 2B logits and the 2B stage maps (``stages`` of ``network``) through the identity
    modules ``logits`` and ``maps.k``, so that terms read them as taps (``"mixskd:logits"``, ``"mixskd:maps.0"``)."""

    distill_input = BATCH

    def __init__(self, network: nn.Module, stages: list[str], clean: str = "input", mixed: str = "input_mix"):
        super().__init__()
        self.network, self.clean, self.mixed = network, clean, mixed
        self.stage_paths = []
        for tap in stages:
            path, is_input = split_tap(tap)
            find_module(network, path, "mixskd's network")
            self.stage_paths.append((path, is_input))
        self.logits = nn.Identity()
        self.maps = nn.ModuleList(nn.Identity() for _ in stages)

    def forward(self, batch: dict) -> torch.Tensor:
        if self.mixed not in batch:
            raise ValueError(f"mixskd reads the mixup images {self.mixed!r}, which the batch does not have: apply "
                             "the distiller's views first (Distiller.apply_views)")
        clean = batch[self.clean]
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for position, (path, is_input) in enumerate(self.stage_paths):
            module = self.network.get_submodule(path)
            if is_input:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, inputs, position=position: captured.__setitem__(position, inputs[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _inputs, output, position=position: captured.__setitem__(position, output)))
        try:
            logits = self.network(torch.cat([clean, batch[self.mixed]]))
        finally:
            for handle in handles:
                handle.remove()
        self.logits(logits)
        for position, identity in enumerate(self.maps):
            identity(captured[position])
        return logits[: clean.shape[0]]


class BranchHead(BottleneckHead):
    """A MixSKD auxiliary branch: BYOT's bottleneck (to the deepest stage's width and size), then pooling and a
    linear classifier. Returns (feature map [B, width, H, W], logits [B, C])."""

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branch_map = self.bottleneck(feature_map)
        return branch_map, self.fc(self.pool(branch_map).flatten(1))


class SelfTeacher(nn.Module):
    """MixSKD's self-teacher (``ResNet_Final_Auxiliary_Classifer``): the K feature maps concatenated over channels,
    a 1×1 convolution (no bias) to ``width`` channels, global average pooling and a linear classifier."""

    def __init__(self, maps: int, width: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(maps * width, width, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.pool(self.conv(torch.cat(feature_maps, dim=1))).flatten(1))


def feature_discriminator(width: int) -> nn.Module:
    """MixSKD's ``Discriminator``: ``Linear(width, 128) → ReLU → Linear(128, 2)`` on a pooled feature map."""
    return nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 2))


class MixupDistillationTerm(Term):
    """The whole MixSKD loss (``kdkernels.mixskd_loss``) with its modules: one :class:`BranchHead` per shallow
    stage, the :class:`SelfTeacher` and one discriminator per feature map (K = the stages), built from the shapes;
    the discriminators stay at their random initialisation unless ``train_discriminators``.

    Reads the 2B logits and stage maps of :class:`MixupPair` (clean rows first, then the mixup rows), the labels
    and the mixing view's ``lam`` and partners."""

    def __init__(self, temperature: float, *, model: str = "mixskd", stages: int, target: str = "target",
                 lam: str = "mix_lam", perm: str = "mix_perm", train_discriminators: bool = False):
        super().__init__("mixskd", (f"{model}:logits", target, lam, perm,
                                    *(f"{model}:maps.{k}" for k in range(stages))))
        self.temperature, self.train_discriminators = temperature, train_discriminators
        self.heads, self.discriminators = nn.ModuleList(), nn.ModuleList()
        self.teacher = nn.Identity()

    def build(self, example):
        logits, maps = example[self.reads[0]], [example[key] for key in self.reads[4:]]
        for key, value in zip(self.reads[4:], maps):
            if value.dim() != 4:
                raise ValueError(f"term {self.name!r}: MixSKD's branches and self-teacher need convolutional stage "
                                 f"maps [B, C, H, W]; {key!r} has shape {tuple(value.shape)}")
        final = maps[-1]
        width, size = final.shape[1], tuple(final.shape[-2:])
        heads = []
        for key, value in zip(self.reads[4:-1], maps[:-1]):
            stride = max(1, value.shape[-1] // size[1])
            if (value.shape[-2] // stride, value.shape[-1] // stride) != size:
                raise ValueError(f"term {self.name!r}: a stride-{stride} branch on {key!r} "
                                 f"{tuple(value.shape[-2:])} does not reach the deepest stage's size {size}")
            heads.append(BranchHead(value.shape[1], width, stride, logits.shape[1]))
        device = logits.device
        self.heads = nn.ModuleList(heads).to(device)
        self.teacher = SelfTeacher(len(maps), width, logits.shape[1]).to(device)
        self.discriminators = nn.ModuleList(feature_discriminator(width) for _ in maps).to(device)
        self.discriminators.requires_grad_(self.train_discriminators)

    def loss(self, logits, target, lam, perm, *maps, context):
        rows = target.shape[0]
        outputs = [head(feature_map) for head, feature_map in zip(self.heads, maps[:-1])]
        features = [o[0] for o in outputs] + [maps[-1]]
        all_logits = [o[1] for o in outputs] + [logits]
        clean, mixed = [f[:rows] for f in features], [f[rows:] for f in features]
        interpolated = [mixup_interpolate(f, lam, perm) for f in clean]
        judged = [d(f.flatten(2).mean(2)) for d, f in zip(self.discriminators, interpolated)]
        judged_mixed = [d(f.flatten(2).mean(2)) for d, f in zip(self.discriminators, mixed)]
        return kdkernels.mixskd_loss([z[:rows] for z in all_logits], [z[rows:] for z in all_logits], clean, mixed,
                                     self.teacher(interpolated), self.teacher(mixed), judged, judged_mixed, target,
                                     lam, perm, self.temperature)


@register("mixskd", category="self", needs_teacher=False,
          paper="Yang, An, Zhou, Cai, Zhi, Wu, Xu, Zhang. MixSKD: Self-Knowledge Distillation from Mixup for Image "
                "Recognition. ECCV 2022",
          presets={"imagenet": {"alpha": 0.2}},
          approximation=MIXSKD_APPROXIMATION)
def mixskd(setup: Setup, alpha: float = 0.4, temperature: float = 3.0, train_discriminators: bool = False,
           stages: list[str] | None = None) -> Recipe:
    """MixSKD: each image and its mixup image teach each other, with auxiliary branches and a self-teacher.

    ``x̃ = lam·x + (1 − lam)·x[perm]`` (``lam ~ Beta(α, α)``, one per batch, α = 0.4; preset ``imagenet``: 0.2) runs
    with the clean batch in one forward. One auxiliary branch (a term submodule) sits on every stage but the deepest
    and maps it to the deepest stage's width and size; the K feature maps (branches, then the network's deepest
    stage) and K classifiers (branches, then the network's own) of the clean rows are interpolated with the same
    lam and partners and compared with those of the mixup rows: feature-map MSE and a discriminator per map (BCE,
    interpolated → [1, 0], mixup → [0, 1]); KL both ways between the branches' interpolated and mixup logits; a
    self-teacher (the K maps concatenated, 1×1 conv, pooling, fc) on the interpolated maps teaches the network's
    mixup logits and on the mixup maps its interpolated logits (KL at T = 3); CE on every clean classifier and
    mixup CE on every mixup classifier and both self-teacher outputs; weights 1 (``kdkernels.mixskd_loss``;
    winycg/Self-KD-Lib @ ede3062 ``main_mixskd_imagenet.py``, ``models/resnet_mixskd.py``,
    ``methods/adversarial.py``). As coded, the network minimises the discriminators' BCE (no min–max) and the
    discriminators themselves never learn: ``discriminatorLoss`` keeps them in a Python list, so they are in no
    optimiser and stay at their random initialisation; ``train_discriminators=True`` puts them in the optimiser
    (minimising the same BCE). The CIFAR script computes but drops the mixup CE terms; this follows the ImageNet script,
    which adds them. The evaluated model is the network's own classifier on clean inputs (the official test reports
    the best of all classifiers). ``stages`` (shallow to deep, convolutional) override the model's kd_points.
    Approximation: see ``MIXSKD_APPROXIMATION``.
    """
    check = Checks("mixskd")
    alpha = check.real("alpha", alpha, positive=True)
    temperature = check.temperature(temperature)
    train_discriminators = check.flag("train_discriminators", train_discriminators)
    stage_taps = list(stages) if stages is not None else list(feature_points(setup.student).stages)
    if len(stage_taps) < 1:
        raise ValueError(f"mixskd: stages must hold at least one stage, got {stage_taps}")
    pair = MixupPair(setup.student, stage_taps)
    term = MixupDistillationTerm(temperature, stages=len(stage_taps), train_discriminators=train_discriminators)
    distiller = Distiller({"student": setup.student, "mixskd": pair}, [term],
                          trainable=("student", "mixskd"), evaluate=("student",),
                          views=[View("input", "input_mix", BatchMixUp(alpha))])
    return single_stage("mixskd", distiller)


# ------------------------------------------------------------------------------------------- Snapshot distillation

SNAPSHOT_APPROXIMATION = ("no official code (the authors' project page links none): built from the paper's "
                          "description (a cyclic learning rate: with the run's default cosine schedule, from the "
                          "run's LR to 0 in every cycle; the last snapshot of each cycle, frozen, teaches every "
                          "iteration of the next; the first cycle CE only). The paper's text was not available here "
                          "to confirm its numbers: the defaults (4 equal cycles, Hinton KD at T = 3, CE and KD "
                          "weights 1) are not the paper's confirmed values, nor is it confirmed whether the paper "
                          "softens the student's output too (here both, as in Hinton KD); each cycle is a stage with "
                          "a fresh optimiser (SGD momentum restarts with the learning rate)")


@dataclasses.dataclass
class CycleStage(Stage):
    """A stage that is cycle ``cycle`` (0-based) of ``cycles`` equal shares of the run: cycle k trains
    ``⌊(k+1)·E/N⌋ − ⌊k·E/N⌋`` of the run's E epochs, so that the N cycles add up to E exactly."""

    cycle: int = 0
    cycles: int = 1

    def epochs_of(self, run_epochs: int) -> int:
        return (self.cycle + 1) * run_epochs // self.cycles - self.cycle * run_epochs // self.cycles


def take_snapshot(teacher: nn.Module, student: nn.Module) -> None:
    """``teacher ← student`` (parameters and buffers): the snapshot that teaches the next cycle."""
    teacher.load_state_dict(student.state_dict())


@register("snapshot-distillation", category="self", needs_teacher=False,
          paper="Yang, Xie, Su, Yuille. Snapshot Distillation: Teacher-Student Optimization in One Generation. "
                "CVPR 2019",
          approximation=SNAPSHOT_APPROXIMATION)
def snapshot_distillation(setup: Setup, cycles: int = 4, temperature: float = 3.0, ce_weight: float = 1.0,
                          kd_weight: float = 1.0) -> Recipe:
    """Snapshot distillation: one training run in ``cycles`` cycles; the snapshot at the end of each teaches the next.

    Cycle 1: ``CE``. Cycle k ≥ 2: ``ce_weight·CE + kd_weight·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (batchmean,
    ``kdkernels.snapshot_distillation_loss``; under the trainer's MixUp the mixup criterion over both labels) with
    ``z_t`` the network frozen as it was at the end of cycle k − 1 (one teacher model ``"teacher"``, set to the student's parameters and buffers when each cycle starts; checkpoints hold it, so a run
    resumed inside a cycle keeps its teacher). Each cycle is a stage of an equal share of the run's epochs with its
    own optimiser and learning-rate schedule: with the default cosine schedule the LR restarts at the run's LR and
    decays to 0 in every cycle (the paper's cyclic learning rate). No official code: see
    ``SNAPSHOT_APPROXIMATION`` for what is not confirmed.
    """
    check = Checks("snapshot-distillation")
    cycles = check.integer("cycles", cycles, minimum=2)
    temperature = check.temperature(temperature)
    ce_weight = check.real("ce_weight", ce_weight, nonnegative=True)
    kd_weight = check.real("kd_weight", kd_weight, nonnegative=True)
    student = setup.student
    teacher = copy.deepcopy(student)
    stages = [CycleStage("cycle-1", Distiller({"student": student}, [CrossEntropyTerm("student", 1.0)]),
                         cycle=0, cycles=cycles)]
    for cycle in range(1, cycles):
        terms = [HardLabelTerm("snapshot", kdkernels.snapshot_distillation_loss, ("student", "teacher", "target"),
                               1.0, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)]
        stages.append(CycleStage(f"cycle-{cycle + 1}", Distiller({"student": student, "teacher": teacher}, terms),
                                 before=functools.partial(take_snapshot, teacher, student), cycle=cycle,
                                 cycles=cycles))
    return Recipe("snapshot-distillation", stages)


# ------------------------------------------------------------------------------------------------------------- BAN

def ban_generation(index: int, student: nn.Module, teacher: nn.Module, temperature: float,
                   label_weight: float) -> Stage:
    terms: list[Term] = [FunctionTerm("ban", kdkernels.soft_cross_entropy_loss, ("student", "teacher"), 1.0,
                                      temperature=temperature)]
    if label_weight > 0:
        terms.append(CrossEntropyTerm("student", label_weight))
    return Stage(f"generation-{index}", Distiller({"student": student, "teacher": teacher}, terms))


@register("ban", category="self",
          paper="Furlanello, Lipton, Tschannen, Itti, Anandkumar. Born-Again Neural Networks. ICML 2018",
          presets={"with-labels": {"label_weight": 1.0}})
def ban(setup: Setup, generations: int = 3, temperature: float = 1.0, label_weight: float = 0.0) -> Recipe:
    """BAN: generations of identical students, each trained only on ``softCE(student, previous generation)``.

    Generation 1 learns from the given teacher, generation k from the frozen generation k−1 (a fresh, untrained
    copy of the student's architecture each time; the last generation is ``setup.student``). The loss is the
    paper's BAN objective: the cross-entropy between the student's and the teacher's output distributions, no
    label term (``kdkernels.soft_cross_entropy_loss``, T = 1). Preset ``with-labels`` adds the CE on the labels
    (the paper's "BAN+L"). The paper's CWTM/DKPP variants and the final ensemble of generations are not included.
    """
    generations = positive_int("ban", "generations", generations)
    teacher = setup.require_teacher("ban")
    students = [setup.fresh_student("ban") for _ in range(generations - 1)] + [setup.student]
    stages = []
    for index, student in enumerate(students, start=1):
        stages.append(ban_generation(index, student, teacher, temperature, label_weight))
        teacher = student
    return Recipe("ban", stages)
