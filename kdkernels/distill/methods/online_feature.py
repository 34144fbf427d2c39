"""Online feature-map distillation: networks trained together that exchange knowledge of their feature maps as well
as of their class probabilities: AFD (feature-map-level online adversarial distillation, Chung et al., ICML 2020).

The networks and their heads share the stage's optimisers as in :mod:`kdkernels.distill.methods.online`: each
network's loss reads the other networks detached, so summing the per-network losses gives each network exactly the
gradient of its own loss.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.methods._common import single_stage, stage_tap
from kdkernels.distill.methods.online import TowardsTerm, peer_names
from kdkernels.distill.optimisers import STEP_PLANS, Optimiser
from kdkernels.distill.recipe import Recipe, Setup, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, Term

PEER_MODELS = ("student", "assistant")

# ------------------------------------------------------------------------------------------------------------ AFD

AFD_PAPER = ("Chung, Park, Kim, Kwak. Feature-map-level Online Adversarial Knowledge Distillation. ICML 2020")
AFD_APPROXIMATION = (
    "approximation of Chung et al. (ICML 2020): no official code was found; the losses follow the paper (logit "
    "loss CE + T²·KL towards the peer, least-squares discriminator and network losses on the feature maps, each "
    "network's discriminator taking its own map for fake and its peer's for real, the cyclic scheme for more than "
    "two networks) while the discriminator's architecture, the transfer layers for unequal widths (conv 1×1 + BN + "
    "ReLU to the widest map), T = 3, the unweighted adversarial term, and the optimisation (one optimiser for the "
    "networks on CE + KL + adversarial loss and one for the discriminators, both stepping on each batch; the paper "
    "steps the networks once on the logit loss with SGD and again on the adversarial loss with a slower optimiser) "
    "are this implementation's choices")


def afd_discriminator(shape: Sequence[int], width: int) -> nn.Sequential:
    """A feature-map discriminator: ``[B, C, H, W]`` → conv 3×3 (C → width, padding 1) → BN → LeakyReLU(0.2) → conv
    1×1 (width → 1) → sigmoid, a probability per position (patch scores, ``[B, 1, H, W]``); ``[B, D]`` features get
    the same with linear layers (``[B, 1]``)."""
    if len(shape) == 4:
        layers = [nn.Conv2d(shape[1], width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
                  nn.Conv2d(width, 1, 1)]
    else:
        layers = [nn.Linear(shape[1], width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2), nn.Linear(width, 1)]
    return nn.Sequential(*layers, nn.Sigmoid())


def afd_transfer(shape: Sequence[int], channels: int) -> nn.Sequential:
    """AFD's transfer layer ``T_k`` for a network whose map is narrower than the widest: conv 1×1 (linear for
    ``[B, D]``) to ``channels``, BN, ReLU."""
    if len(shape) == 4:
        return nn.Sequential(nn.Conv2d(shape[1], channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
    return nn.Sequential(nn.Linear(shape[1], channels, bias=False), nn.BatchNorm1d(channels), nn.ReLU())


def _check_maps(term: str, names: Sequence[str], example: dict) -> list[torch.Size]:
    shapes = [example[key].shape for key in names]
    for key, shape in zip(names, shapes):
        if len(shape) not in (2, 4):
            raise ValueError(f"term {term!r}: {key} must be a [B, C, H, W] feature map or a [B, D] feature, got shape "
                             f"{tuple(shape)}")
    first = shapes[0]
    for key, shape in zip(names[1:], shapes[1:]):
        if len(shape) != len(first) or tuple(shape[2:]) != tuple(first[2:]):
            raise ValueError(f"term {term!r}: {names[0]} {tuple(first)} and {key} {tuple(shape)} must have the same "
                             "number of dimensions and spatial size (the transfer layers map channels only): pass a "
                             "layer=... whose maps agree")
    return shapes


class AFDNetworkTerm(Term):
    """Every network's adversarial loss ``Σ_k [1 − D_k(T_k(G_k(x)))]²`` (:func:`kdkernels.lsgan_generator_loss`).
    Owns the transfer layers ``T_k`` (identity for the widest maps), trained with the networks; reads the
    discriminators, which :class:`AFDDiscriminatorTerm` owns."""

    def __init__(self, networks: Sequence[str], layer: str, weight: float):
        super().__init__("afd_adv", [f"{name}:{layer}" for name in networks], weight)
        self.networks = tuple(networks)
        self.transfers = nn.ModuleDict({name: nn.Identity() for name in networks})
        self._discriminators: list[nn.ModuleDict] = []      # a reference: the owner is AFDDiscriminatorTerm

    def build(self, example):
        shapes = _check_maps(self.name, self.reads, example)
        widest = max(shape[1] for shape in shapes)
        for name, shape in zip(self.networks, shapes):
            if shape[1] != widest:
                self.transfers[name] = afd_transfer(shape, widest)

    def transferred(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.transfers[name](feature) for name, feature in zip(self.networks, features)]

    def loss(self, *features, context):
        discriminators = self._discriminators[0]
        return sum(kdkernels.lsgan_generator_loss(discriminators[name](mapped))
                   for name, mapped in zip(self.networks, self.transferred(features)))


class AFDDiscriminatorTerm(Term):
    """The discriminators' loss ``Σ_k [1 − D_k(T_j(G_j(x)))]² + [D_k(T_k(G_k(x)))]²`` with ``j = k − 1`` cyclically
    (the peer for two networks), maps detached (:func:`kdkernels.lsgan_discriminator_loss`). Owns the
    discriminators, sized on the transferred maps when the distiller builds."""

    def __init__(self, network_term: AFDNetworkTerm, width: int | None, weight: float = 1.0):
        super().__init__("afd_d", network_term.reads, weight)
        self.width = width
        self.discriminators = nn.ModuleDict()
        self._network_term = [network_term]
        network_term._discriminators[:] = [self.discriminators]

    def build(self, example):
        shapes = _check_maps(self.name, self.reads, example)
        widest = max(shape[1] for shape in shapes)
        shape = (shapes[0][0], widest, *shapes[0][2:])
        width = self.width if self.width is not None else max(widest // 2, 1)
        for name in self._network_term[0].networks:
            self.discriminators[name] = afd_discriminator(shape, width)

    def loss(self, *features, context):
        networks = self._network_term[0].networks
        mapped = [feature.detach() for feature in self._network_term[0].transferred(features)]
        return sum(kdkernels.lsgan_discriminator_loss(self.discriminators[name](mapped[index - 1]),
                                                      self.discriminators[name](mapped[index]))
                   for index, name in enumerate(networks))


@register("afd-online", category="online", paper=AFD_PAPER, approximation=AFD_APPROXIMATION, needs_teacher=False)
def afd_online(setup: Setup, networks: int = 2, peer_model: str = "student", temperature: float = 3.0,
               ce_weight: float = 1.0, kl_weight: float = 1.0, adv_weight: float = 1.0,
               discriminator_width: int | None = None, discriminator_lr_scale: float = 1.0,
               step_plan: str = "simultaneous", layer: str | None = None) -> Recipe:
    """AFD: each network k minimises ``CE_k + T²·KL(p_j ‖ p_k) + [1 − D_k(T_k(G_k))]²``, its discriminator D_k
    ``[1 − D_k(T_j(G_j))]² + [D_k(T_k(G_k))]²`` (own map fake, peer's real; j the peer, ``k − 1`` cyclically).

    Chung, Park, Kim and Kwak (ICML 2020) train networks online; each network k has a discriminator D_k on the
    feature map G_k(x) of its last convolution stage that labels the network's own map fake and its peer's map
    real, and the network learns to fool it (so it learns the peer's feature-map distribution), while the logit loss
    ``L_logit^k = CE(y, σ(z_k)) + T²·KL(σ(z_j/T) ‖ σ(z_k/T))`` is DML's; the adversarial losses are least-squares
    (:func:`kdkernels.lsgan_discriminator_loss`, :func:`kdkernels.lsgan_generator_loss`, means over the batch).
    ``T_k`` are the paper's transfer layers for maps of different widths. For more than two networks the paper's
    cyclic scheme: network k learns from network k − 1 (network 1 from the last), with K discriminators; for two
    networks this is the mutual pair. No official code was found: the paper's formulas are followed and the rest is
    flagged (``approximation``).

    Networks: ``networks`` (2) of them, ``student`` (exported) plus ``peer1``, …, fresh students
    (``peer_model="student"``) or fresh teacher assistants (``"assistant"``: the paper's small–large pairs). Peers
    read each other detached (KL targets, the discriminators' inputs). ``layer``: the feature tap (default the
    deepest stage of the student's feature points; every network must have it with the same spatial size);
    transfer layers (conv 1×1 + BN + ReLU, trained with their network) lift narrower maps to the widest width. D_k:
    conv 3×3 to ``discriminator_width`` channels (default half the map's), BN, LeakyReLU(0.2), conv 1×1, sigmoid:
    a score per position, the losses' means run over positions too (:func:`afd_discriminator`).

    Optimisation: two optimisers (``Stage.optimisers``): ``"networks"`` (every network and its transfer layer:
    CE, KL and ``adv_weight`` × the adversarial loss) and ``"discriminators"`` (``afd_d``, at
    ``discriminator_lr_scale`` × the stage's rate), both stepping on every batch from one forward
    (``step_plan="simultaneous"``; ``"alternate"`` gives each optimiser its own batch in turn). The paper updates
    the networks once with the logit loss and once more with the adversarial loss at a slower rate; here one
    optimiser owns the networks (a parameter belongs to one optimiser), so ``adv_weight`` sets the relative size.
    Defaults T 3 (as a public re-implementation uses; not confirmed in the paper), weights 1.
    """
    check = Checks("afd-online")
    names = peer_names(check.integer("networks", networks, minimum=2))
    peer_model = check.choice("peer_model", peer_model, PEER_MODELS)
    temperature = check.temperature(temperature)
    ce_weight = check.real("ce_weight", ce_weight, minimum=0.0)
    kl_weight = check.real("kl_weight", kl_weight, minimum=0.0)
    adv_weight = check.real("adv_weight", adv_weight, minimum=0.0)
    if discriminator_width is not None:
        discriminator_width = check.integer("discriminator_width", discriminator_width, minimum=1)
    discriminator_lr_scale = check.real("discriminator_lr_scale", discriminator_lr_scale, positive=True)
    if not isinstance(step_plan, str):
        check.type_error("step_plan", f"one of {STEP_PLANS}", step_plan)
    step_plan = check.choice("step_plan", step_plan, STEP_PLANS)
    if layer is None:
        layer = stage_tap("afd-online", setup.student, -1, "layer")
    layer = check.name("layer", layer, "feature tap")
    fresh = setup.fresh_student if peer_model == "student" else setup.fresh_assistant
    models = {"student": setup.student, **{name: fresh("afd-online") for name in names[1:]}}
    network_term = AFDNetworkTerm(names, layer, adv_weight)
    ce_terms = [CrossEntropyTerm(name, ce_weight) for name in names]
    kl_terms = [TowardsTerm(f"kl_{name}", kdkernels.kd_loss, name, [names[index - 1]], kl_weight,
                            temperature=temperature) for index, name in enumerate(names)]
    terms = [*ce_terms, *kl_terms, network_term, AFDDiscriminatorTerm(network_term, discriminator_width)]
    distiller = Distiller(models, terms, trainable=tuple(names), evaluate=tuple(names))
    optimisers = {"networks": Optimiser(models=tuple(names), terms_params=("afd_adv",),
                                        terms=(*[t.name for t in ce_terms], *[t.name for t in kl_terms], "afd_adv")),
                  "discriminators": Optimiser(terms_params=("afd_d",), terms=("afd_d",),
                                              lr_scale=discriminator_lr_scale)}
    return single_stage("afd-online", distiller, optimisers=optimisers, step_plan=step_plan)


# --------------------------------------------------------------------------------------------------------- OEC-KD

OKD_FEATURE_PAPER = ("Walawalkar, Shen, Savvides. Online Ensemble Model Compression using Knowledge Distillation. "
                     "ECCV 2020")
OKD_FEATURE_APPROXIMATION = (
    "approximation of Walawalkar et al. (ECCV 2020; Devwalkar/BOC-KD): the loss is the official Combined_Loss, but "
    "the ensemble is built from whole networks the setup provides: the uncompressed student 0 is a fresh "
    "teacher assistant (or a fresh student) and the compressed students all have the student's architecture, "
    "where the official code shares one stem (conv + BN + ReLU) between all students and compresses student j's "
    "stage widths to (K − j)/K of the original; the adaptation layers train from the first step (the official "
    "adds them to the optimiser after the first epoch)")


def oec_adaptation(shape: Sequence[int], target_channels: int) -> nn.Module:
    """BOC-KD ``Intermmediate_loss.adaptation_layer_init``: ``nn.Conv2d(student_channels, teacher_channels, 1)``
    (with bias; a ``Linear`` for ``[B, D]`` features)."""
    if len(shape) == 4:
        return nn.Conv2d(shape[1], target_channels, 1)
    return nn.Linear(shape[1], target_channels)


class OECTerm(Term):
    """:func:`kdkernels.oec_kd_loss` on the K networks' logits, the labels and their maps at ``layers``; owns the
    adaptation layers ``A_j^b`` (one per compressed network and layer)."""

    def __init__(self, networks: Sequence[str], layers: Sequence[str], temperature: float, weights: dict):
        super().__init__("oec", [*networks, "target", *[f"{n}:{layer}" for n in networks for layer in layers]])
        self.networks, self.layers = tuple(networks), tuple(layers)
        self.temperature, self.weights = temperature, weights
        self.adaptation = nn.ModuleDict()

    def build(self, example):
        for layer_index, layer in enumerate(self.layers):
            target = example[f"{self.networks[0]}:{layer}"]
            for name in self.networks[1:]:
                key = f"{name}:{layer}"
                feature = example[key]
                if feature.dim() not in (2, 4) or feature.dim() != target.dim() \
                        or tuple(feature.shape[2:]) != tuple(target.shape[2:]):
                    raise ValueError(f"term {self.name!r}: {key} {tuple(feature.shape)} must be a map of the spatial "
                                     f"size of {self.networks[0]}:{layer} {tuple(target.shape)} ([B, C, H, W] or "
                                     "[B, D]; the adaptation layers map channels only): pass layers=... that agree")
                self.adaptation[f"{name}_{layer_index}"] = oec_adaptation(feature.shape, target.shape[1])

    def loss(self, *values, context):
        count = len(self.networks)
        logits, target, maps = values[:count], values[count], values[count + 1:]
        per_network = [maps[index * len(self.layers):(index + 1) * len(self.layers)] for index in range(count)]
        adapted = [[self.adaptation[f"{name}_{b}"](feature) for b, feature in enumerate(per_network[index])]
                   for index, name in enumerate(self.networks) if index > 0]
        return kdkernels.oec_kd_loss(list(logits), target, list(per_network[0]), adapted, self.temperature,
                                     **self.weights)


@register("okd-feature", category="online", paper=OKD_FEATURE_PAPER, approximation=OKD_FEATURE_APPROXIMATION,
          presets={"cifar10": {"temperature": 3.0, "ce_weight": 1.0, "feature_weight": 1.0, "kl_weight": 1.0}},
          needs_teacher=False)
def okd_feature(setup: Setup, networks: int = 5, full_model: str = "assistant", temperature: float = 2.0,
                ce_weight: float = 0.7, feature_weight: float = 0.15, kl_weight: float = 0.15,
                adaptation_lr_scale: float = 0.5, layers: Sequence[str] | None = None) -> Recipe:
    """OEC-KD: K students minimise ``0.7·Σ_i CE_i + 0.15·Σ_{b,j≥1} mse(f_0^b, A_j^b(f_j^b)) + 0.15·Σ_i T²·KL(p_e ‖
    p_i)``, ``z_e`` the students' mean logits (Devwalkar/BOC-KD).

    Walawalkar, Shen and Savvides (ECCV 2020) train a student ensemble at once: an uncompressed student 0 and
    compressed students; their mean logits form the pseudo teacher ``z_e = (1/K) Σ_i z_i`` (fixed weights 1/K),
    whose detached tempered softmax every student matches (T², batchmean), and the feature maps of student 0
    (detached) at every block are the targets of the compressed students' maps through 1×1 adaptation
    convolutions (``nn.MSELoss``); every student has its label CE (the pseudo teacher has none). The loss is
    :func:`kdkernels.oec_kd_loss`, as Devwalkar/BOC-KD @a19bab4 ``utils/Losses.py`` ``Combined_Loss`` and
    ``models/ResNet_cifar.py`` ``BIO_ResNet._forward_student``; defaults from its CIFAR-100 ResNet configs
    (``configs/Cifar100_exp/Resnet32.py`` … ``Resnet110.py``: 5 students, ``contribution_ratios = [0.7, 0.15,
    0.15]``, ``KL_loss_temperature = 2``); preset ``cifar10``: its CIFAR-10 ResNet-110 config (weights 1, T 3).

    Networks: ``networks`` (K, 5) of them: ``full`` (student 0, a fresh teacher assistant with
    ``full_model="assistant"``, a fresh student with ``"student"``), then ``student`` (exported) and ``peer2``, …
    (fresh students). ``layers``: the taps compared (default every stage of the student's feature points, as the
    official three blocks); the maps must agree in spatial size across the networks. The adaptation layers are
    trained by their own optimiser at ``adaptation_lr_scale`` (0.5, the official ``lr*0.5``) × the stage's rate,
    stepping with the networks' optimiser on each batch (two optimisers, ``step_plan="simultaneous"``).
    Approximation (flagged): the official students share one stem and have widths (K − j)/K of the original
    network's; here the networks are whole models the setup builds (see ``approximation``).
    """
    check = Checks("okd-feature")
    count = check.integer("networks", networks, minimum=2)
    full_model = check.choice("full_model", full_model, PEER_MODELS)
    temperature = check.temperature(temperature)
    weights = {name: check.real(name, value, minimum=0.0) for name, value in (
        ("ce_weight", ce_weight), ("feature_weight", feature_weight), ("kl_weight", kl_weight))}
    adaptation_lr_scale = check.real("adaptation_lr_scale", adaptation_lr_scale, positive=True)
    if layers is None:
        stage_tap("okd-feature", setup.student, -1, "layers")     # a clear error where the student declares none
        layers = list(feature_points(setup.student).stages)
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)):
        check.type_error("layers", "a list of tap paths", layers)
    layers = [check.name(f"layers[{index}]", layer, "tap path") for index, layer in enumerate(layers)]
    if not layers:
        check.value_error("layers", "must name at least one tap", "[]")
    full = (setup.fresh_assistant if full_model == "assistant" else setup.fresh_student)("okd-feature")
    names = ["full", "student", *[f"peer{index}" for index in range(2, count)]]
    models = {"full": full, "student": setup.student,
              **{name: setup.fresh_student("okd-feature") for name in names[2:]}}
    distiller = Distiller(models, [OECTerm(names, layers, temperature, weights)], trainable=tuple(names),
                          evaluate=("student", *[name for name in names if name != "student"]))
    optimisers = {"networks": Optimiser(models=tuple(names), terms=("oec",)),
                  "adaptation": Optimiser(terms_params=("oec",), terms=("oec",), lr_scale=adaptation_lr_scale)}
    return single_stage("okd-feature", distiller, optimisers=optimisers, step_plan="simultaneous")
