"""Self-supervised and consistency distillation: a model taught by another view of the data and by its own moving
average (mean teacher, BYOL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import BATCH, Distiller
from kdkernels.distill.methods._common import single_stage
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term
from kdkernels.distill.updates import EMA
from kdkernels.distill.views import Draws, GaussianNoise, HorizontalFlip, RandomCrop, Transform, View

BYOL_PAPER = ("Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot, Kavukcuoglu, "
              "Munos, Valko. Bootstrap your own latent: A new approach to self-supervised learning. NeurIPS 2020")
MEAN_TEACHER_PAPER = ("Tarvainen, Valpola. Mean teachers are better role models: Weight-averaged consistency targets "
                      "improve semi-supervised deep learning results. NeurIPS 2017")


def sigmoid_rampup(epoch: float, rampup: float) -> float:
    """CuriousAI/mean-teacher ``pytorch/mean_teacher/ramps.py`` ``sigmoid_rampup``: ``exp(−5 (1 − e/R)²)`` with e
    clipped to [0, R]; 1 when R = 0 (Laine & Aila's ramp-up)."""
    if rampup == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), rampup) / rampup
    return math.exp(-5.0 * phase * phase)


class ConsistencyTerm(FunctionTerm):
    """``consistency · sigmoid_rampup(epoch − 1, rampup) · fn(*values)``: the mean teacher's ramped consistency cost
    (``get_current_consistency_weight`` of ``pytorch/main.py``, whose epochs count from 0 and are whole within an
    epoch; ours count from 1)."""

    def __init__(self, name, fn, reads, consistency: float, *, rampup: float):
        check = Checks(f"term {name!r}")
        super().__init__(name, fn, reads, check.real("consistency", consistency, minimum=0.0))
        self.rampup = check.real("rampup", rampup, minimum=0.0)

    def weight_at(self, context) -> float:
        return self.weight * sigmoid_rampup(context.epoch - 1, self.rampup)


def augmentation(source: str, output: str, translate: int, flip: bool) -> list[View]:
    """One random translation (zero padding) and, with ``flip``, a horizontal flip of ``source`` into ``output``."""
    views = [View(source, output, RandomCrop(padding=translate))] if translate else [View(source, output)]
    if flip:
        views.append(View(output, output, HorizontalFlip()))
    return views


@register("mean-teacher", category="self-supervised", needs_teacher=False, paper=MEAN_TEACHER_PAPER,
          presets={"digits": {"translate": 1, "flip": False}})
def mean_teacher(setup: Setup, consistency: float = 100.0, rampup: float = 5.0, ema_decay: float = 0.999,
                 translate: int = 4, flip: bool = True) -> Recipe:
    """Mean teacher: ``CE(s(x₁), y) + w(e) · Σ_b Σ_c (softmax(s(x₁)) − softmax(t(x₂)))² / C / B`` with t the EMA of s.

    As CuriousAI/mean-teacher ``pytorch/main.py`` trains (the CIFAR-10 configuration of
    ``pytorch/experiments/cifar10_test.py``: ``consistency`` 100, ``consistency_rampup`` 5 epochs, MSE consistency):

    * x₁ and x₂ are two independent augmentations of each image (``TransformTwice``: a random translation by up to
      ``translate`` pixels and a horizontal flip; the official translation pads by reflection, ours by zeros);
    * the consistency weight ``w(e) = consistency · exp(−5 (1 − min(e, R)/R)²)`` ramps up over the first R epochs
      (e counts epochs from 0, constant within an epoch);
    * the teacher is the EMA of the student's parameters, updated after every step with
      ``α = min(1 − 1/(step + 1), ema_decay)`` (``update_ema_variables``); it runs in train mode, so its batch norm
      keeps its own statistics from its own forward passes (only parameters are averaged), and gets no gradient;
    * the consistency is :func:`kdkernels.softmax_mse_loss` (``losses.py`` ``softmax_mse_loss`` divided by the
      minibatch size); the classification cost is the batch mean CE on the student's view (every sample is labelled
      here: the official semi-supervised setting ignores unlabelled samples in the CE).

    The CIFAR configuration's second "residual" head (``logit_distance_cost`` 0.01 on a two-output network) needs a
    two-output model; with one output it is off, as in the code's default (``--logit-distance-cost -1``). Preset
    ``digits``: a 1-pixel translation and no flip for 8×8 digit images (4/32 of CIFAR's side; digits are not
    mirror-symmetric). The exported model is the student; ``test_acc_teacher`` reports the EMA.
    """
    check = Checks("mean-teacher")
    consistency = check.real("consistency", consistency, minimum=0.0)
    rampup = check.real("rampup", rampup, minimum=0.0)
    ema_decay = check.real("ema_decay", ema_decay, minimum=0.0, maximum=1.0)
    translate = check.integer("translate", translate, minimum=0)
    if not isinstance(flip, bool):
        check.type_error("flip", "a bool", flip)
    views = augmentation("input", "input_teacher", translate, flip) + augmentation("input", "input", translate, flip)
    terms = [CrossEntropyTerm("student"),
             ConsistencyTerm("consistency", kdkernels.softmax_mse_loss, ("student", "teacher"), consistency,
                             rampup=rampup)]
    distiller = Distiller({"student": setup.student}, terms, frozen_train_mode=("teacher",),
                          evaluate=("student", "teacher"), inputs={"teacher": "input_teacher"}, views=views,
                          updates={"teacher": EMA("student", ema_decay, warmup=True, buffers="own")})
    return single_stage("mean-teacher", distiller)


# ---------------------------------------------------------------------------------------------------------- BYOL

BYOL_VIEWS = ("input", "input_view2")


class ProjectionMLP(nn.Sequential):
    """BYOL's projector and predictor (deepmind-research ``byol/utils/networks.py`` ``MLP``): ``Linear(hidden)`` →
    ``BatchNorm`` → ``ReLU`` → ``Linear(output, no bias)``. The official batch norm (decay 0.9, ε 1e-5) is torch's
    default (momentum 0.1, eps 1e-5)."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features, bias=False))


class BYOLNetwork(nn.Module):
    """BYOL's network around a classifier ``encoder`` (``byol_experiment.py`` ``_forward``): for each view of the
    batch, ``embedding → projector → predictor``, and the encoder's own classifier on the embedding with the gradient
    stopped (``classifier(stop_gradient(embedding))``: the labels train the classifier only, never the encoder).

    It reads the whole batch (the two views ``views``), runs them one at a time (each view's batch-norm statistics
    are its own, as ``apply_once_fn``), returns view 1's logits and passes the stacked ``[2, B, D]`` projections and
    predictions through the identity modules ``projections`` and ``predictions``, so that terms read them as taps
    (``"online:predictions"``, ``"target_network:projections"``). The embedding is the input of the encoder's
    classifier (``feature_points(encoder)``: ``embedding`` must be ``"<classifier>/input"``)."""

    distill_input = BATCH

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module,
                 views: tuple[str, str] = BYOL_VIEWS):
        super().__init__()
        self.encoder, self.projector, self.predictor = encoder, projector, predictor
        self.classifier_path = classifier_path(encoder)
        self.views = tuple(views)
        self.projections, self.predictions = nn.Identity(), nn.Identity()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, logits of the classifier on the detached embedding) of one view."""
        captured = []

        def stop_gradient(_module, inputs):
            captured.append(inputs[0])
            return (inputs[0].detach(), *inputs[1:])

        handle = self.encoder.get_submodule(self.classifier_path).register_forward_pre_hook(stop_gradient)
        try:
            logits = self.encoder(images)
        finally:
            handle.remove()
        return captured[-1].flatten(1), logits

    def forward(self, batch: dict) -> torch.Tensor:
        projections, predictions, logits = [], [], []
        for key in self.views:
            embedding, view_logits = self.encode(batch[key])
            projection = self.projector(embedding)
            projections.append(projection)
            predictions.append(self.predictor(projection))
            logits.append(view_logits)
        self.projections(torch.stack(projections))
        self.predictions(torch.stack(predictions))
        return logits[0]


def classifier_path(encoder: nn.Module, method: str = "byol") -> str:
    """The path of ``encoder``'s final linear layer, whose input must be its embedding (``feature_points``); the
    error names ``method``."""
    points = feature_points(encoder)
    if points.embedding != f"{points.classifier}/input":
        raise ValueError(f"{method}: the student's embedding {points.embedding!r} must be the input of its classifier "
                         f"{points.classifier!r} (the classifier trains on the stop-gradient embedding)")
    return points.classifier


def embedding_width(encoder: nn.Module, method: str) -> int:
    """The embedding's width: the ``in_features`` of the encoder's linear classifier (errors name ``method``)."""
    classifier = encoder.get_submodule(classifier_path(encoder, method))
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"{method}: the student's classifier must be an nn.Linear (its in_features size the projector), "
                         f"got {type(classifier).__name__}")
    return classifier.in_features


class BYOLTerm(Term):
    """``byol_loss(q₁, stop_gradient(z'₂)) + byol_loss(q₂, stop_gradient(z'₁))``, each a batch mean: the
    symmetrised regression loss of ``byol_experiment.py`` ``loss_fn`` (q: online predictions, z': target
    projections, both stacked per view)."""

    def __init__(self, weight: float = 1.0, *, online: str = "online", target: str = "target_network"):
        super().__init__("byol", (f"{online}:predictions", f"{target}:projections"), weight)

    def loss(self, predictions, projections, *, context):
        projections = projections.detach()
        return kdkernels.byol_loss(predictions[0], projections[1]) + kdkernels.byol_loss(predictions[1], projections[0])


def byol_views(translate: int, flip: bool, noise: float) -> list[View]:
    """Two independent augmentations of ``"input"``: ``"input_view2"`` and ``"input"`` itself, each a random
    translation by up to ``translate`` pixels, a horizontal flip (``flip``) and Gaussian noise of std ``noise``."""
    views = []
    for output in ("input_view2", "input"):
        views += augmentation("input", output, translate, flip)
        if noise > 0:
            views.append(View(output, output, GaussianNoise(noise)))
    return views


@register("byol", category="self-supervised", needs_teacher=False, paper=BYOL_PAPER,
          presets={"digits": {"projector_hidden": 64, "projection": 32, "predictor_hidden": 64, "base_ema": 0.97,
                              "translate": 1, "flip": False, "noise": 0.1}},
          approximation="the run's optimiser and schedule instead of LARS with warm-up; random translation, flip and "
                        "noise views instead of random-resized crops, colour jitter, blur and solarisation; the target "
                        "starts as a copy of the online network")
def byol(setup: Setup, projector_hidden: int = 4096, projection: int = 256, predictor_hidden: int = 4096,
         base_ema: float = 0.996, translate: int = 4, flip: bool = True, noise: float = 0.0) -> Recipe:
    """BYOL self-distillation: ``Σ_views (2 − 2·cos(q_θ(z_θ(v)), z_ξ(v')))`` + ``CE(classifier(sg(y_θ(v₁))), y)``,
    ξ the EMA of θ; evaluated by a linear probe of the student's embedding.

    As deepmind-research ``byol/byol_experiment.py`` trains (``configs/byol.py``: projector and predictor hidden
    4096, output 256, ``base_target_ema`` 0.996 for the 1000-epoch schedule):

    * the online network is the student's encoder (embedding y = its ``feature_points(student).embedding``, the
      classifier's input), the projector z and the predictor q, each ``Linear → BatchNorm → ReLU → Linear``
      (``utils/networks.py`` ``MLP``; :class:`ProjectionMLP`), applied to each view separately (:class:`BYOLNetwork`);
    * the target network ξ (``target_network``) is the exponential moving average of the whole online network
      (encoder, projector and predictor, as ``_update_fn`` averages every online parameter), updated after each
      optimiser step k with ``τ = 1 − (1 − base_ema)(cos(πk/K) + 1)/2`` (``utils/schedules.py`` ``target_ema``;
      :func:`kdkernels.distill.updates.cosine_momentum`). It runs in train mode (``is_training=True``): its batch
      norm keeps its own statistics, only parameters are averaged (``EMA(buffers="own")``), and gets no gradient;
    * the loss is :func:`kdkernels.byol_loss` of the online prediction of one view and the target projection of the
      other, symmetrised over the two views, each a batch mean (``loss_fn``'s ``repr_loss``);
    * the online classifier (here the student's own) trains on the stop-gradient embedding of view 1 with the batch
      mean CE, added to the loss with weight 1 (``classif_loss``): the labels never reach the encoder, and the
      exported student's test accuracy is that online linear classifier's. The method's evaluation adds the
      ``linear_probe`` metric (``probe_acc``: a logistic regression fitted on the frozen training embeddings).

    Differences, flagged as an approximation: the run's optimiser and learning-rate schedule are used (the official
    one is LARS with weight decay 1.5e-6 excluding biases and batch norm, lr 0.2·B/256, 10 warm-up epochs, cosine);
    the views are a random translation by up to ``translate`` pixels (zero padding), a horizontal flip and Gaussian
    noise (``utils/augmentations.py``: random-resized crops, flips, colour jitter, grayscale, blur and solarisation,
    not available as views); the target starts as a copy of the online network (the official one is initialised
    from another random key; its comment reports no significant difference with the same one); the heads use
    torch's default initialisation. Preset ``digits``: heads of hidden width 64 and output 32 for the digits
    models' 16-wide embeddings, ``base_ema`` 0.97 (``configs/byol.py``'s value for its shortest, 40-epoch
    schedule), and 1-pixel shifts with noise of std 0.1 and no flip (8×8 digits are not mirror-symmetric).
    """
    check = Checks("byol")
    projector_hidden = check.integer("projector_hidden", projector_hidden, minimum=1)
    projection = check.integer("projection", projection, minimum=1)
    predictor_hidden = check.integer("predictor_hidden", predictor_hidden, minimum=1)
    base_ema = check.probability("base_ema", base_ema)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    noise = check.real("noise", noise, nonnegative=True)
    width = embedding_width(setup.student, "byol")
    online = BYOLNetwork(setup.student, ProjectionMLP(width, projector_hidden, projection),
                         ProjectionMLP(projection, predictor_hidden, projection))
    terms = [BYOLTerm(), CrossEntropyTerm("online", name="ce_classifier")]
    distiller = Distiller({"student": setup.student, "online": online}, terms, trainable=("student", "online"),
                          frozen_train_mode=("target_network",), evaluate=("student",),
                          views=byol_views(translate, flip, noise),
                          updates={"target_network": EMA("online", base_ema, schedule="cosine", buffers="own")})
    return Recipe("byol", [Stage("byol", distiller)], metrics=("linear_probe",))


# ------------------------------------------------------------------------------------------------------- SimSiam

SIMSIAM_PAPER = "Chen, He. Exploring Simple Siamese Representation Learning. CVPR 2021"


class SimSiamProjector(nn.Sequential):
    """SimSiam's 3-layer projector (facebookresearch/simsiam ``simsiam/builder.py``): ``Linear(hidden, no bias)`` →
    ``BN`` → ``ReLU`` → ``Linear(hidden, no bias)`` → ``BN`` → ``ReLU`` → ``Linear(out)`` → ``BN(affine=False)``.
    The official last linear layer keeps a bias frozen at its initial value (``fc[6].bias.requires_grad = False``,
    "not use bias as it is followed by BN"): the batch norm subtracts it again in train mode and its running mean
    absorbs it in eval mode, so the layer here has no bias, which computes the same outputs."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__(nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features, bias=False), nn.BatchNorm1d(out_features, affine=False))


class SimSiamPredictor(nn.Sequential):
    """SimSiam's 2-layer bottleneck predictor (``simsiam/builder.py``): ``Linear(pred_dim, no bias)`` → ``BN`` →
    ``ReLU`` → ``Linear(dim)`` (with bias)."""

    def __init__(self, dim: int, pred_dim: int):
        super().__init__(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(),
                         nn.Linear(pred_dim, dim))


class SimSiamTerm(Term):
    """``½ (simsiam_loss(p₁, sg(z₂)) + simsiam_loss(p₂, sg(z₁)))``: ``main_simsiam.py``'s symmetrised negative
    cosine, each half a batch mean, the projections z of the same (online) network with the gradient stopped."""

    def __init__(self, weight: float = 1.0, *, network: str = "online"):
        super().__init__("simsiam", (f"{network}:predictions", f"{network}:projections"), weight)

    def loss(self, predictions, projections, *, context):
        projections = projections.detach()
        return 0.5 * (kdkernels.simsiam_loss(predictions[0], projections[1])
                      + kdkernels.simsiam_loss(predictions[1], projections[0]))


@register("simsiam", category="self-supervised", needs_teacher=False, paper=SIMSIAM_PAPER,
          presets={"digits": {"projector_hidden": 64, "dim": 32, "pred_dim": 8, "translate": 1, "flip": False,
                              "noise": 0.1}},
          approximation="the run's optimiser and schedule instead of SGD with a cosine schedule and a fixed predictor "
                        "learning rate; random translation, flip and noise views instead of random-resized crops, "
                        "colour jitter, grayscale and blur; an online classifier on the stop-gradient embedding "
                        "instead of a separate linear evaluation")
def simsiam(setup: Setup, dim: int = 2048, pred_dim: int = 512, projector_hidden: int | None = None,
            translate: int = 4, flip: bool = True, noise: float = 0.0) -> Recipe:
    """SimSiam self-distillation: ``−½ (cos(h(f(v₁)), sg(f(v₂))) + cos(h(f(v₂)), sg(f(v₁))))`` + ``CE(classifier(
    sg(y(v₁))), y)``, f the student's encoder with a projector, h a predictor, no momentum network; evaluated by a
    linear probe of the student's embedding.

    As facebookresearch/simsiam (commit a7bc177) ``simsiam/builder.py`` and ``main_simsiam.py`` train (defaults
    ``--dim 2048 --pred-dim 512``):

    * the encoder f is the student's encoder (embedding y = ``feature_points(student).embedding``, the input of its
      classifier) followed by the 3-layer projector (:class:`SimSiamProjector`: two ``Linear → BN → ReLU`` of width
      ``projector_hidden``, default the embedding's width as the official ``prev_dim``, then ``Linear(dim) → BN``
      without affine parameters), the predictor h the 2-layer bottleneck (:class:`SimSiamPredictor`: ``Linear(
      pred_dim) → BN → ReLU → Linear(dim)``); each view runs through the network separately (its own batch-norm
      statistics, as the official two encoder calls; :class:`BYOLNetwork`);
    * the loss is :func:`kdkernels.simsiam_loss` (``nn.CosineSimilarity(dim=1)``, negated) of each view's prediction
      and the other view's projection with the gradient stopped (``z1.detach(), z2.detach()``), symmetrised with the
      factor ½; there is no target network and no momentum: the stop-gradient alone prevents the collapse;
    * as in :func:`byol`, the student's own classifier trains on the stop-gradient embedding of view 1 with the batch
      mean CE (weight 1): the labels never reach the encoder, and the method adds the ``linear_probe`` metric.

    Differences, flagged as an approximation: the official linear evaluation is a separate training
    (``main_lincls.py``), here an online classifier on the stop-gradient embedding plus the ``linear_probe`` metric;
    the run's optimiser and schedule are used (the official one is SGD, lr 0.05·B/256, momentum 0.9, weight decay
    1e-4, cosine decay, with ``--fix-pred-lr`` keeping the predictor's learning rate constant); the views are a random
    translation by up to ``translate`` pixels (zero padding), a horizontal flip and Gaussian noise of std ``noise``
    (``main_simsiam.py``: random-resized crops, colour jitter, grayscale, blur and flips, not available as views); the
    heads use torch's default initialisation. Preset ``digits``: projector width 64, ``dim`` 32 and ``pred_dim`` 8
    (the official 4× bottleneck) for the digits models' 16-wide embeddings, 1-pixel shifts with noise of std 0.1 and
    no flip (8×8 digits are not mirror-symmetric).
    """
    check = Checks("simsiam")
    dim = check.integer("dim", dim, minimum=1)
    pred_dim = check.integer("pred_dim", pred_dim, minimum=1)
    if projector_hidden is not None:
        projector_hidden = check.integer("projector_hidden", projector_hidden, minimum=1)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    noise = check.real("noise", noise, nonnegative=True)
    width = embedding_width(setup.student, "simsiam")
    online = BYOLNetwork(setup.student, SimSiamProjector(width, projector_hidden or width, dim),
                         SimSiamPredictor(dim, pred_dim))
    terms = [SimSiamTerm(), CrossEntropyTerm("online", name="ce_classifier")]
    distiller = Distiller({"student": setup.student, "online": online}, terms, trainable=("student", "online"),
                          evaluate=("student",), views=byol_views(translate, flip, noise))
    return Recipe("simsiam", [Stage("simsiam", distiller)], metrics=("linear_probe",))


# ---------------------------------------------------------------------------------------------------------- MoCo

MOCO_PAPER = ("He, Fan, Wu, Xie, Girshick. Momentum Contrast for Unsupervised Visual Representation Learning. CVPR "
              "2020; Chen, Fan, Girshick, He. Improved Baselines with Momentum Contrastive Learning. arXiv:2003.04297")


class HeadNetwork(nn.Module):
    """A classifier ``encoder`` with a head on its embedding, on one view (the distiller's input for the model): the
    head's output passes through the identity module ``projections`` (a tap, ``"online:projections"``) and the
    model returns the encoder's classifier on the stop-gradient embedding (as :class:`BYOLNetwork`)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.classifier_path = classifier_path(encoder)
        self.projections = nn.Identity()

    encode = BYOLNetwork.encode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embedding, logits = self.encode(images)
        self.projections(self.head(embedding))
        return logits


def moco_head(width: int, dim: int, mlp: bool, hidden: int) -> nn.Module:
    """MoCo's head (``moco/builder.py``): the encoder's ``fc`` of output ``dim``, for v2 (``mlp``) after ``Linear(
    hidden) → ReLU`` (``dim_mlp`` the embedding's width officially), with torch's default initialisation."""
    if not mlp:
        return nn.Linear(width, dim)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class MoCoTerm(Term):
    """``moco_loss(q, sg(k), queue, T)`` of the query network's head on view 1 and the key network's on view 2, then
    (in training) the normalised keys replace the oldest ones of the queue (``_dequeue_and_enqueue``).

    The queue [K, dim] and its pointer are buffers of the term (the distiller's state: checkpoints hold them); the
    queue starts as ``normalize(randn(dim, K), dim=0)`` transposed (``moco/builder.py``, the official [dim, K]
    buffer). The keys are written at rows ``(ptr + i) mod K``: the same as the official slice when K is a multiple
    of the batch size (which it asserts), and any batch of at most K keys works."""

    def __init__(self, dim: int, queue_size: int, temperature: float, weight: float = 1.0, *, query: str = "online",
                 key: str = "target_network"):
        super().__init__("moco", (f"{query}:projections", f"{key}:projections"), weight)
        self.temperature = temperature
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, queue_size), dim=0).T.contiguous())
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def loss(self, query, key, *, context):
        key = nn.functional.normalize(key.detach(), dim=1)
        queue_size = self.queue.shape[0]
        if key.shape[0] > queue_size:
            raise ValueError(f"moco: a batch of {key.shape[0]} keys does not fit the queue of queue_size="
                             f"{queue_size}: use a queue at least as large as the batch")
        loss = kdkernels.moco_loss(query, key, self.queue.clone(), temperature=self.temperature)
        if context is None or context.training:
            with torch.no_grad():
                rows = (self.queue_ptr + torch.arange(key.shape[0], device=key.device)) % queue_size
                self.queue.index_copy_(0, rows, key.to(self.queue.dtype))
                self.queue_ptr.copy_((self.queue_ptr + key.shape[0]) % queue_size)
        return loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:g}, queue={tuple(self.queue.shape)}"


@register("moco", category="self-supervised", needs_teacher=False, paper=MOCO_PAPER,
          presets={"digits": {"dim": 32, "queue_size": 256, "momentum": 0.99, "translate": 1, "flip": False,
                              "noise": 0.1},
                   "v1": {"temperature": 0.07, "mlp": False}},
          approximation="the run's optimiser and schedule instead of SGD (lr 0.03, weight decay 1e-4, cosine for v2); "
                        "random translation, flip and noise views instead of random-resized crops, colour jitter, "
                        "grayscale and blur; no shuffling batch norm (a no-op on one device, not under DDP); an online "
                        "classifier on the stop-gradient embedding instead of a separate linear evaluation")
def moco(setup: Setup, dim: int = 128, queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.2,
         mlp: bool = True, mlp_hidden: int | None = None, translate: int = 4, flip: bool = True,
         noise: float = 0.0) -> Recipe:
    """MoCo v2 self-distillation: ``CE([q·k, q·queue] / T, 0)`` of the query network's normalised output q on view 1
    against the momentum key network's k on view 2 and a queue of earlier keys, + ``CE(classifier(sg(y(v₁))), y)``;
    evaluated by a linear probe of the student's embedding.

    As facebookresearch/moco (commit 132aea9, ``moco/builder.py``, ``main_moco.py``; v2: ``--mlp --moco-t 0.2
    --aug-plus --cos``) trains (``--moco-dim 128 --moco-k 65536 --moco-m 0.999``):

    * the query encoder is the student's encoder (embedding y = ``feature_points(student).embedding``, the input of
      its classifier) with MoCo's head (:func:`moco_head`: ``Linear(mlp_hidden) → ReLU → Linear(dim)`` for v2,
      ``mlp_hidden`` by default the embedding's width as the official ``dim_mlp``; ``Linear(dim)`` with
      ``mlp=False``, MoCo v1) (:class:`HeadNetwork`);
    * the key encoder (``target_network``) starts as a copy of the query encoder and follows it by
      ``θ_k = m θ_k + (1 − m) θ_q`` after every optimiser step (``_momentum_update_key_encoder``, which the official
      forward calls before computing the keys: the same sequence), parameters only: it runs in train mode with its
      own batch-norm statistics (``EMA(buffers="own")``), gets no gradient and reads view 2 only;
    * the loss is :func:`kdkernels.moco_loss` (InfoNCE at temperature ``temperature``, one positive and the K queued
      negatives, batch mean) of the query on view 1 and the key on view 2 (not symmetrised, as ``main_moco.py``);
      then the batch's normalised keys replace the oldest K-queue entries (:class:`MoCoTerm`; the queue and its
      pointer are term buffers, so a checkpoint holds them and a resumed run continues them exactly);
    * as in :func:`byol`, the student's own classifier trains on the stop-gradient embedding of view 1 with the batch
      mean CE (weight 1): the labels never reach the encoder, and the method adds the ``linear_probe`` metric.

    Differences, flagged as an approximation: shuffling batch norm (``_batch_shuffle_ddp``) exists only under DDP
    (on one device it would not change the keys: the batch norm sees the same batch); it is not done across ranks
    here; the official linear evaluation is a separate training (``main_lincls.py``); the run's optimiser and
    schedule are used (official: SGD lr 0.03, momentum 0.9, weight decay 1e-4, cosine for v2); the views are a random
    translation by up to ``translate`` pixels (zero padding), a horizontal flip and Gaussian noise of std ``noise``
    (``--aug-plus``: random-resized crops, colour jitter, grayscale, blur, flips); the heads use torch's default
    initialisation. The queue takes any batch of at most K keys (the official asserts K mod B = 0). Preset ``v1``:
    T 0.07 and a linear head. Preset ``digits``: ``dim`` 32, a queue of 256 keys (the digits runs see about 300
    images per epoch; the official queue holds 5 % of ImageNet), key momentum 0.99 (a few hundred steps instead of
    hundreds of thousands), 1-pixel shifts with noise of std 0.1 and no flip.
    """
    check = Checks("moco")
    dim = check.integer("dim", dim, minimum=1)
    queue_size = check.integer("queue_size", queue_size, minimum=1)
    momentum = check.probability("momentum", momentum)
    temperature = check.temperature(temperature)
    mlp = check.flag("mlp", mlp)
    if mlp_hidden is not None:
        mlp_hidden = check.integer("mlp_hidden", mlp_hidden, minimum=1)
        if not mlp:
            check.value_error("mlp_hidden", "must be None without the MLP head (mlp=False)", mlp_hidden)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    noise = check.real("noise", noise, nonnegative=True)
    width = embedding_width(setup.student, "moco")
    online = HeadNetwork(setup.student, moco_head(width, dim, mlp, mlp_hidden or width))
    terms = [MoCoTerm(dim, queue_size, temperature), CrossEntropyTerm("online", name="ce_classifier")]
    distiller = Distiller({"student": setup.student, "online": online}, terms, trainable=("student", "online"),
                          frozen_train_mode=("target_network",), evaluate=("student",),
                          inputs={"online": "input", "target_network": "input_view2"},
                          views=byol_views(translate, flip, noise),
                          updates={"target_network": EMA("online", momentum, buffers="own")})
    return Recipe("moco", [Stage("moco", distiller)], metrics=("linear_probe",))


# ---------------------------------------------------------------------------------------------------------- DINO

DINO_PAPER = ("Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. Emerging Properties in Self-Supervised "
              "Vision Transformers. ICCV 2021")
DINO_GLOBAL_VIEWS = ("input", "input_view2")


class ResizedCrop(Transform):
    """A square random-resized crop at the source's resolution: per sample an area fraction ``a ~ U(low, high)``
    (torchvision ``RandomResizedCrop``'s ``scale``), a square window of side ``√a`` of the image's at a uniformly
    drawn position inside it, resampled bilinearly back to ``H × W`` (``F.grid_sample``, ``align_corners=False``,
    zero padding never reached). Used for DINO's local crops on small images."""

    def __init__(self, low: float, high: float):
        check = Checks("ResizedCrop")
        self.low = check.real("low", low, positive=True, maximum=1.0)
        self.high = check.real("high", high, minimum=self.low, maximum=1.0)

    def __call__(self, x: torch.Tensor, draws: Draws):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3:
            Checks("ResizedCrop").type_error("the source", "a float tensor [B, ..., H, W]", x)
        area = self.low + (self.high - self.low) * draws.uniform()
        side = area.sqrt()
        centre = (2.0 * draws.uniform(2) - 1.0) * (1.0 - side)[:, None]
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1] = side, side
        theta[:, :, 2] = centre
        height, width = x.shape[-2:]
        flat = x.reshape(x.shape[0], -1, height, width)
        grid = F.affine_grid(theta.to(flat.dtype), list(flat.shape), align_corners=False)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.reshape(x.shape), {}


class WeightNormLinear(nn.Module):
    """DINO's last layer ``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` with ``weight_g`` filled with 1
    (``vision_transformer.py`` ``DINOHead``): ``x · (g ⊙ v/‖v‖_row)ᵀ``. With ``norm`` (``norm_last_layer``, the
    default) g stays 1 (the official ``weight_g.requires_grad = False``) and is not a parameter here; otherwise g is
    a trainable [out, 1] parameter starting at 1. ``v`` has nn.Linear's default initialisation."""

    def __init__(self, in_features: int, out_features: int, norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.weight_g = None if norm else nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        if self.weight_g is not None:
            weight = self.weight_g * weight
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO's projection head (``vision_transformer.py`` ``DINOHead``): ``nlayers`` linear layers (hidden width
    ``hidden``, GELU, optional batch norm; the last to ``bottleneck``; truncated-normal std 0.02 weights, zero
    biases), L2 normalisation, then the weight-normalised :class:`WeightNormLinear` to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, *, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck)
        else:
            layers = [nn.Linear(in_dim, hidden)]
            for index in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden, hidden if index < nlayers - 2 else bottleneck))
            self.mlp = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class DINONetwork(nn.Module):
    """DINO's network around a classifier ``encoder`` (``utils.py`` ``MultiCropWrapper``): the global views
    ``global_views`` concatenated along the batch go through the encoder in one forward, the local views
    ``local_views`` in another (the official wrapper groups the crops by resolution), the head runs on every
    embedding, and the stacked outputs ``[V, B, out_dim]`` (globals first) pass through the identity module
    ``outputs`` (a tap, ``"online:outputs"``). It returns the encoder's classifier on the stop-gradient embedding of
    the first global view (as :class:`BYOLNetwork`). The teacher is a copy with no local views."""

    distill_input = BATCH

    def __init__(self, encoder: nn.Module, head: nn.Module, global_views=DINO_GLOBAL_VIEWS, local_views=()):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.classifier_path = classifier_path(encoder)
        self.global_views, self.local_views = tuple(global_views), tuple(local_views)
        self.outputs = nn.Identity()

    encode = BYOLNetwork.encode

    def forward(self, batch: dict) -> torch.Tensor:
        outputs, first_logits = [], None
        for group in (self.global_views, self.local_views):
            if not group:
                continue
            images = torch.cat([batch[key] for key in group])
            embedding, logits = self.encode(images)
            outputs.append(self.head(embedding).reshape(len(group), images.shape[0] // len(group), -1))
            if first_logits is None:
                first_logits = logits[: images.shape[0] // len(group)]
        self.outputs(torch.cat(outputs))
        return first_logits


def dino_teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """The teacher temperature of 0-based ``epoch`` (``DINOLoss.teacher_temp_schedule``): ``np.linspace(warmup,
    final, warmup_epochs)[epoch]`` during the warm-up, ``final`` after it."""
    if epoch >= warmup_epochs:
        return final
    if warmup_epochs == 1:
        return warmup
    return warmup + (final - warmup) * epoch / (warmup_epochs - 1)


class DINOTerm(Term):
    """``dino_loss(student outputs on every view, teacher outputs on the global views, center)`` at the epoch's
    teacher temperature, then (in training) the center's update ``c ← m·c + (1 − m)·mean(teacher outputs)``
    (``DINOLoss.update_center``, the mean over the global views and the batch). The center [1, out_dim] is a buffer
    of the term (checkpointed: a resumed run continues it exactly)."""

    def __init__(self, out_dim: int, *, student_temperature: float, warmup_teacher_temperature: float,
                 teacher_temperature: float, warmup_teacher_epochs: int, center_momentum: float,
                 weight: float = 1.0, student: str = "online", teacher: str = "target_network"):
        super().__init__("dino", (f"{student}:outputs", f"{teacher}:outputs"), weight)
        self.student_temperature = student_temperature
        self.schedule = (warmup_teacher_temperature, teacher_temperature, warmup_teacher_epochs)
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature_at(self, context) -> float:
        return dino_teacher_temperature(context.epoch - 1, *self.schedule)

    def loss(self, student, teacher, *, context):
        teacher = teacher.detach()
        loss = kdkernels.dino_loss(student, teacher, self.center, student_temperature=self.student_temperature,
                                   teacher_temperature=self.teacher_temperature_at(context))
        if context is None or context.training:
            with torch.no_grad():
                batch_center = teacher.reshape(-1, teacher.shape[-1]).sum(dim=0, keepdim=True) / (
                    teacher.shape[0] * teacher.shape[1])
                self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype),
                                                            alpha=1.0 - self.center_momentum)
        return loss


@register("dino", category="self-supervised", needs_teacher=False, paper=DINO_PAPER,
          presets={"digits": {"out_dim": 128, "hidden": 64, "bottleneck": 32, "momentum_teacher": 0.97,
                              "warmup_teacher_epochs": 10, "local_crops": 4, "local_scale_min": 0.25,
                              "local_scale_max": 0.5, "translate": 1, "flip": False, "noise": 0.1}},
          approximation="the run's optimiser and schedule instead of AdamW with warm-up, cosine lr and weight decay "
                        "and gradient clipping 3.0; the last layer is not frozen in the first epoch "
                        "(freeze_last_layer); global views by translation, flip and noise and square local crops "
                        "resampled to the input's resolution instead of random-resized crops with colour jitter, "
                        "blur and solarisation at 224/96 pixels; an online classifier on the stop-gradient "
                        "embedding instead of a separate linear evaluation")
def dino(setup: Setup, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256, nlayers: int = 3,
         use_bn: bool = False, norm_last_layer: bool = True, momentum_teacher: float = 0.996,
         student_temperature: float = 0.1, warmup_teacher_temperature: float = 0.04,
         teacher_temperature: float = 0.07, warmup_teacher_epochs: int = 30, center_momentum: float = 0.9,
         local_crops: int = 8, local_scale_min: float = 0.05, local_scale_max: float = 0.4, translate: int = 4,
         flip: bool = True, noise: float = 0.0) -> Recipe:
    """DINO self-distillation: ``mean_{i ∈ globals, v ≠ i} CE(softmax((g_t(x_i) − c)/τ_t), softmax(g_s(x_v)/τ_s))``
    with the teacher t the EMA of the student s and the center c an EMA of the teacher's outputs, +
    ``CE(classifier(sg(y(x₁))), y)``; evaluated by a linear probe of the student's embedding.

    As facebookresearch/dino (commit 7c446df, ``main_dino.py``, ``vision_transformer.py``, ``utils.py``) trains
    (defaults of ``DINOHead``: hidden 2048, bottleneck 256, 3 layers, no batch norm, ``--out_dim 65536``,
    ``--norm_last_layer True``; ``--momentum_teacher 0.996``; ``DINOLoss``: student temperature 0.1, center
    momentum 0.9; the teacher temperature warm-up 0.04 → 0.07 over 30 epochs of the README's recommended runs
    ``--teacher_temp 0.07 --warmup_teacher_temp_epochs 30``, argparse's defaults being 0.04 without warm-up;
    ``--local_crops_number 8``, ``--local_crops_scale 0.05 0.4``):

    * the student network is the student's encoder (embedding = ``feature_points(student).embedding``, its
      classifier's input) with :class:`DINOHead` (``Linear → GELU → Linear → GELU → Linear(bottleneck)``, L2
      normalisation, weight-normalised ``Linear(out_dim)`` with its norm fixed at 1); it reads every view: the two
      global views concatenated in one forward, the local crops in another (:class:`DINONetwork`,
      ``MultiCropWrapper``);
    * the teacher (``target_network``) is the EMA of the whole student network, ``m`` from ``momentum_teacher`` to 1
      by a cosine over the run's steps (``utils.cosine_scheduler``; :class:`~kdkernels.distill.updates.EMA`
      ``schedule="cosine"``), parameters only: it runs in train mode with its own batch-norm statistics (the official
      teacher is never put in eval mode) on the two global views only, and gets no gradient;
    * the loss is :func:`kdkernels.dino_loss` (``DINOLoss.forward``): teacher outputs centred and sharpened at the
      epoch's teacher temperature (:func:`dino_teacher_temperature`), cross-entropy against the student's at 0.1 over
      every (teacher global view, other student view) pair, averaged; then the center's EMA update (:class:`DINOTerm`;
      a term buffer, checkpointed);
    * as in :func:`byol`, the student's own classifier trains on the stop-gradient embedding of the first global view
      with the batch mean CE (weight 1): the labels never reach the encoder, and the method adds ``linear_probe``.

    Multi-crop on small images (our choice): the two global views are a random translation by up to ``translate``
    pixels, a horizontal flip (``flip``) and Gaussian noise of std ``noise`` (:func:`byol_views`); the
    ``local_crops`` local views are square random-resized crops (:class:`ResizedCrop`: area fraction in
    ``[local_scale_min, local_scale_max]``, resampled bilinearly to the input's resolution, so any model reads them)
    with the same flip and noise. Differences, flagged as an approximation: the official crops are random-resized
    crops of any aspect ratio with colour jitter, grayscale, blur and solarisation, the local ones at 96 pixels
    against 224; the run's optimiser and schedule are used (official: AdamW, lr 5e-4·B/256 with a 10-epoch warm-up
    and cosine decay, weight decay 0.04 → 0.4, gradient clipping at norm 3); the last layer is not frozen in the
    first epoch (``--freeze_last_layer 1``); the official linear evaluation is a separate training
    (``eval_linear.py``). Preset ``digits``: head hidden 64, bottleneck 32, ``out_dim`` 128 for the 16-wide
    embeddings, teacher momentum 0.97 (a few hundred steps), the teacher-temperature warm-up over 10 epochs, 4 local
    crops of area 25–50 % (4 to 5.7 of 8 pixels a side: smaller crops of 8×8 digits hold almost nothing), 1-pixel
    shifts with noise of std 0.1 and no flip.
    """
    check = Checks("dino")
    out_dim = check.integer("out_dim", out_dim, minimum=1)
    hidden = check.integer("hidden", hidden, minimum=1)
    bottleneck = check.integer("bottleneck", bottleneck, minimum=1)
    nlayers = check.integer("nlayers", nlayers, minimum=1)
    use_bn = check.flag("use_bn", use_bn)
    norm_last_layer = check.flag("norm_last_layer", norm_last_layer)
    momentum_teacher = check.probability("momentum_teacher", momentum_teacher)
    student_temperature = check.temperature(student_temperature, "student_temperature")
    warmup_teacher_temperature = check.temperature(warmup_teacher_temperature, "warmup_teacher_temperature")
    teacher_temperature = check.temperature(teacher_temperature, "teacher_temperature")
    warmup_teacher_epochs = check.integer("warmup_teacher_epochs", warmup_teacher_epochs, minimum=0)
    center_momentum = check.probability("center_momentum", center_momentum)
    local_crops = check.integer("local_crops", local_crops, minimum=0)
    local_scale_min = check.real("local_scale_min", local_scale_min, positive=True, maximum=1.0)
    local_scale_max = check.real("local_scale_max", local_scale_max, minimum=local_scale_min, maximum=1.0)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    noise = check.real("noise", noise, nonnegative=True)
    width = embedding_width(setup.student, "dino")
    local_views = tuple(f"input_local{index}" for index in range(local_crops))
    views = byol_views(translate, flip, noise)
    for key in local_views:
        views.append(View("input", key, ResizedCrop(local_scale_min, local_scale_max)))
        if flip:
            views.append(View(key, key, HorizontalFlip()))
        if noise > 0:
            views.append(View(key, key, GaussianNoise(noise)))
    head = DINOHead(width, out_dim, use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers, hidden=hidden,
                    bottleneck=bottleneck)
    online = DINONetwork(setup.student, head, DINO_GLOBAL_VIEWS, local_views)
    terms = [DINOTerm(out_dim, student_temperature=student_temperature,
                      warmup_teacher_temperature=warmup_teacher_temperature, teacher_temperature=teacher_temperature,
                      warmup_teacher_epochs=warmup_teacher_epochs, center_momentum=center_momentum),
             CrossEntropyTerm("online", name="ce_classifier")]
    distiller = Distiller({"student": setup.student, "online": online}, terms, trainable=("student", "online"),
                          frozen_train_mode=("target_network",), evaluate=("student",), views=views,
                          updates={"target_network": EMA("online", momentum_teacher, schedule="cosine",
                                                         buffers="own")})
    distiller.models["target_network"].local_views = ()   # the teacher sees the global views only
    return Recipe("dino", [Stage("dino", distiller)], metrics=("linear_probe",))


# --------------------------------------------------------------------------------------------------------- SDSSL

SDSSL_PAPER = ("Jang, Kim, Yoo, Kong, Kim, Kwak. Self-Distilled Self-Supervised Representation Learning. WACV 2023")


class SDSSLMLP(nn.Sequential):
    """hagiss/SDSSL ``byol_pytorch/byol_pytorch.py`` ``MLP`` (``last_bn=True``, as ``NetWrapper`` builds both the
    projectors and the predictors): ``layers − 1`` times ``Linear(hidden, no bias) → BN → ReLU``, then
    ``Linear(out, no bias) → BN(affine=False)``."""

    def __init__(self, layers: int, in_features: int, out_features: int, hidden: int):
        modules = []
        for index in range(layers):
            last = index == layers - 1
            modules.append(nn.Linear(in_features if index == 0 else hidden, out_features if last else hidden,
                                     bias=False))
            modules += [nn.BatchNorm1d(out_features, affine=False)] if last else [nn.BatchNorm1d(hidden), nn.ReLU()]
        super().__init__(*modules)


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """A stage's output as one vector per sample: the mean over its spatial positions ([B, C, ...] → [B, C]), or
    the flattened vector of a [B, D] output."""
    return feature.flatten(2).mean(dim=2) if feature.dim() > 2 else feature.flatten(1)


class SDSSLNetwork(nn.Module):
    """SDSSL's student network around a classifier ``encoder`` (``NetWrapper`` with ``intermediate=True``): each
    view (``views``, run separately) gives the pooled outputs of the intermediate stages ``intermediate_paths`` and
    the embedding (the input of the encoder's classifier, the last layer), each through its own projector
    (``projectors``, the last one the final layer's) and its own predictor (``predictors``), once on the projection
    and once on the detached projection (the official predictor-only term). The stacked ``[V, L, B, D]``
    projections, predictions and detached-input predictions pass through the identity modules ``projections``,
    ``predictions`` and ``predictions_detached`` (taps). With ``intermediate`` False (the momentum teacher: the
    official ``NetWrapper(intermediate=False)``) only the embedding's projection by the last projector is computed
    (``[V, 1, B, D]``). Returns the encoder's classifier on the stop-gradient embedding of view 1."""

    distill_input = BATCH

    def __init__(self, encoder: nn.Module, projectors: nn.ModuleList, predictors: nn.ModuleList,
                 intermediate_paths, views: tuple[str, str] = BYOL_VIEWS):
        super().__init__()
        self.encoder, self.projectors, self.predictors = encoder, projectors, predictors
        self.classifier_path = classifier_path(encoder)
        self.intermediate_paths = tuple(intermediate_paths)
        self.views = tuple(views)
        self.intermediate = True
        self.projections, self.predictions, self.predictions_detached = nn.Identity(), nn.Identity(), nn.Identity()

    encode = BYOLNetwork.encode

    def layers(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([pooled intermediate outputs..., embedding], logits) of one view."""
        captured, handles = {}, []
        if self.intermediate:
            for path in self.intermediate_paths:
                def keep(_module, _inputs, output, path=path):
                    captured[path] = output
                handles.append(self.encoder.get_submodule(path).register_forward_hook(keep))
        try:
            embedding, logits = self.encode(images)
        finally:
            for handle in handles:
                handle.remove()
        return [pooled(captured[path]) for path in self.intermediate_paths if path in captured] + [embedding], logits

    def forward(self, batch: dict) -> torch.Tensor:
        projections, predictions, detached, first_logits = [], [], [], None
        for key in self.views:
            features, logits = self.layers(batch[key])
            first_logits = logits if first_logits is None else first_logits
            if not self.intermediate:
                projections.append(self.projectors[-1](features[-1])[None])
                continue
            z = [project(feature) for project, feature in zip(self.projectors, features)]
            detached.append(torch.stack([predict(p.detach()) for predict, p in zip(self.predictors, z)]))
            predictions.append(torch.stack([predict(p) for predict, p in zip(self.predictors, z)]))
            projections.append(torch.stack(z))
        self.projections(torch.stack(projections))
        if self.intermediate:
            self.predictions(torch.stack(predictions))
            self.predictions_detached(torch.stack(detached))
        return first_logits


def sdssl_ratio(ratio: float, epoch: int, epochs: int) -> float:
    """The intermediate layers' weight at 1-based ``epoch`` of ``epochs``: ``ratio · (1 − cos(π (epoch − 1) /
    epochs)) / 2``, from 0 towards ``ratio`` (``utils.cosine_scheduler(0, ratio, ...)``, per epoch here)."""
    return ratio * 0.5 * (1.0 - math.cos(math.pi * min(max(epoch - 1, 0), epochs) / max(epochs, 1)))


class SDSSLTerm(Term):
    """SDSSL's loss (``pl_train_moco.py`` ``training_step``), over the two (student view a, teacher view b ≠ a)
    pairs: ``sdssl_loss(P_a, sg(K_b), ratio(e)) + sdssl_loss(P̃_a, sg(K_b), L − 1)``, P the predictions of the L
    layers, P̃ the predictions of the detached projections (the official ``loss_output + ratio · loss_mid + 12 ·
    loss_detached`` with L = 12 layers), K the teacher's final projections."""

    def __init__(self, temperature: float, ratio: float, weight: float = 1.0, *, student: str = "online",
                 teacher: str = "target_network"):
        super().__init__("sdssl", (f"{student}:predictions", f"{student}:predictions_detached",
                                   f"{teacher}:projections"), weight)
        self.temperature, self.ratio = temperature, ratio

    def loss(self, predictions, detached, keys, *, context):
        keys = keys.detach()
        layers = predictions.shape[1]
        ratio = sdssl_ratio(self.ratio, context.epoch, context.epochs)
        total = 0.0
        for a, b in ((1, 0), (0, 1)):
            total = total + kdkernels.sdssl_loss(predictions[a], keys[b, -1], temperature=self.temperature,
                                                 ratio=ratio)
            total = total + kdkernels.sdssl_loss(detached[a], keys[b, -1], temperature=self.temperature,
                                                 ratio=float(layers - 1))
        return total


@register("sdssl", category="self-supervised", needs_teacher=False, paper=SDSSL_PAPER,
          presets={"digits": {"out_dim": 32, "mlp_hidden": 64, "momentum_teacher": 0.97, "translate": 1,
                              "flip": False, "noise": 0.1}},
          approximation="intermediate layers are the student's feature_points stages (spatially averaged) instead "
                        "of a ViT's normalised class tokens; the intermediate-loss ratio rises by a cosine per epoch "
                        "instead of per step; the run's optimiser and schedule instead of AdamW with warm-up and "
                        "weight decay 0.1; random translation, flip and noise views instead of BYOL's augmentations; "
                        "an online classifier on the stop-gradient embedding instead of a separate linear evaluation")
def sdssl(setup: Setup, out_dim: int = 256, mlp_hidden: int = 4096, temperature: float = 0.2, ratio: float = 1.0,
          momentum_teacher: float = 0.996, translate: int = 4, flip: bool = True, noise: float = 0.0) -> Recipe:
    """SDSSL (SD-MoCo v3) self-distillation: ``Σ_{a≠b} [I(q_L(v_a), k(v_b)) + r(e)·mean_{l<L} I(q_l(v_a), k(v_b))
    + Σ_l I(q_l(sg z_l(v_a)), k(v_b))]`` with ``I(q, k) = 2τ·CE(q̂ k̂ᵀ/τ, arange(B))``, every layer l of the
    student projected and predicted, k the momentum teacher's final projection, + ``CE(classifier(sg(y(v₁))), y)``;
    evaluated by a linear probe of the student's embedding.

    As hagiss/SDSSL (commit bbd34fa; ``pl_train_moco.py``, ``byol_pytorch/byol_pytorch.py`` ``NetWrapper`` and
    ``MLP``, ``SD_moco.json``: ``out_dim`` 256, ``mlp_hidden`` 4096, ``momentum_teacher`` 0.996, ``ratio`` 1,
    ``st_inter`` true) trains; the base objective is MoCo v3 as the official SD-MoCo (in-batch negatives, a
    predictor, no queue; not :func:`moco`'s v2 queue):

    * the student (``online``) is the student's encoder with, for each of its L layers (the intermediate stages of
      ``feature_points(student).stages`` except the deepest, spatially averaged, then the embedding, the
      classifier's input), a projector (:class:`SDSSLMLP`, 3 layers, hidden ``mlp_hidden / 2`` for the intermediate
      layers and ``mlp_hidden`` for the last, output ``out_dim``, last batch norm without affine) and a predictor
      (2 layers, hidden ``mlp_hidden``) (:class:`SDSSLNetwork`); each view runs separately;
    * the teacher (``target_network``) is the EMA of the student network with ``m`` from ``momentum_teacher`` to 1 by
      a cosine over the run's steps (``momentum_update``: the encoder and the last projector; the copy here averages
      the unused intermediate heads too), parameters only, in train mode with its own batch-norm statistics; it
      computes only the final projection k (``NetWrapper(intermediate=False)``), with no gradient;
    * the loss is :class:`SDSSLTerm` (:func:`kdkernels.sdssl_loss`, τ 0.2) over the two view pairs: the final
      layer's prediction against the other view's key, plus ``r(e)`` times the mean over the intermediate layers
      (``ratio`` reached by a cosine from 0, ``ratio_schedule``), plus the sum over all layers of the predictions
      of the detached projections (``12 · loss_detached``: it trains the predictors only);
    * as in :func:`byol`, the student's own classifier trains on the stop-gradient embedding of view 1 (weight 1):
      the labels never reach the encoder, and the method adds the ``linear_probe`` metric.

    Differences, flagged as an approximation: the official layers are a ViT's 12 blocks (the final layer norm of
    each block's class token, ``get_intermediate_layers``); here they are the student's declared stages, averaged
    over space (L = 3 for the digits CNN: stage1, stage2 and the embedding); the ratio's cosine advances per epoch
    (the step count of the run is not known to a term), the official one per step; the run's optimiser and
    schedule are used (official: AdamW, lr 1.5e-4·B/256 with 40 warm-up epochs, weight decay 0.1); the views are a
    random translation by up to ``translate`` pixels, a horizontal flip and Gaussian noise of std ``noise`` (the
    official: BYOL's crops, colour jitter, blur and solarisation). Not confirmed: the paper's SimCLR and BYOL
    variants (``pl_train_simclr.py``, ``pl_train_byol.py``) were not transcribed; only SD-MoCo v3 is. Preset
    ``digits``: ``out_dim`` 32 and ``mlp_hidden`` 64 for the 16-wide embeddings, teacher momentum 0.97, 1-pixel
    shifts with noise of std 0.1 and no flip.
    """
    check = Checks("sdssl")
    out_dim = check.integer("out_dim", out_dim, minimum=1)
    mlp_hidden = check.integer("mlp_hidden", mlp_hidden, minimum=2)
    temperature = check.temperature(temperature)
    ratio = check.real("ratio", ratio, nonnegative=True)
    momentum_teacher = check.probability("momentum_teacher", momentum_teacher)
    translate = check.integer("translate", translate, minimum=0)
    flip = check.flag("flip", flip)
    noise = check.real("noise", noise, nonnegative=True)
    width = embedding_width(setup.student, "sdssl")
    intermediate = list(feature_points(setup.student).stages)[:-1]
    widths = [intermediate_width(setup.student, path) for path in intermediate] + [width]
    projectors = nn.ModuleList(SDSSLMLP(3, w, out_dim, mlp_hidden if i == len(widths) - 1 else mlp_hidden // 2)
                               for i, w in enumerate(widths))
    predictors = nn.ModuleList(SDSSLMLP(2, out_dim, out_dim, mlp_hidden) for _ in widths)
    online = SDSSLNetwork(setup.student, projectors, predictors, intermediate)
    terms = [SDSSLTerm(temperature, ratio), CrossEntropyTerm("online", name="ce_classifier")]
    distiller = Distiller({"student": setup.student, "online": online}, terms, trainable=("student", "online"),
                          frozen_train_mode=("target_network",), evaluate=("student",),
                          views=byol_views(translate, flip, noise),
                          updates={"target_network": EMA("online", momentum_teacher, schedule="cosine",
                                                         buffers="own")})
    distiller.models["target_network"].intermediate = False   # the teacher computes the final projection only
    return Recipe("sdssl", [Stage("sdssl", distiller)], metrics=("linear_probe",))


def intermediate_width(encoder: nn.Module, path: str) -> int:
    """The pooled width of stage ``path``'s output (channels of a [B, C, ...] output, D of a [B, D] one), found by
    the module's own parameters: the out_channels/out_features of its last conv/linear layer, or the num_features of
    its last batch norm."""
    module = encoder.get_submodule(path)
    for inner in reversed(list(module.modules())):
        for attribute in ("num_features", "out_channels", "out_features"):
            if isinstance(getattr(inner, attribute, None), int):
                return getattr(inner, attribute)
    raise ValueError(f"sdssl: cannot tell the width of the student's stage {path!r}: it holds no conv, linear or "
                     "batch-norm layer")
