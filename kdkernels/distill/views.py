"""Views: per-step batch transforms that add named inputs to the batch.

A :class:`View` reads one batch key (``source``), transforms it and writes the result under ``output`` (a new key
such as ``"input_rot"``, or the source itself to augment it in place); some transforms also write labels (the
rotation of :class:`Rotate90`, the mixing weight and partner of :class:`MixUp` and :class:`CutMix`). A distiller
carries its views (``Distiller(..., views=[...])``); the trainer applies them to every training micro-batch on the
device, after moving it there and before the models run (:meth:`Distiller.apply_views`), in list order, so a later
view may read an earlier one's output. Models read a view through the distiller's ``inputs``; terms read views and
labels by key like any batch value::

    views = [View("input", "input_clean"),                               # keep the unaugmented input
             View("input", "input", RandomCrop(padding=1)),              # augment the input itself ...
             View("input", "input", HorizontalFlip()),                   # ... crop, then flip
             View("input", "input_rot", Rotate90(label="rot_label"))]    # SSKD-style rotation + its label
    distiller = Distiller({"student": s, "teacher": t}, terms, views=views,
                          inputs={"teacher": "input_clean"})             # the student reads "input" (default)

Transforms (images ``[B, ..., H, W]``; every draw is per sample): :class:`Rotate90` (quarter turns, the turn's
position in ``turns`` as a label), :class:`RandomCrop` (zero padding then a crop of the original size: a random
shift), :class:`HorizontalFlip`, :class:`GaussianNoise`, :class:`Downsample` (down-sampling, then up-sampling back
unless ``restore=False``: low-resolution KD) and the mixing transforms :class:`MixUp` and :class:`CutMix`. A view
without a transform copies its source.

**Randomness.** Every random number of a view is a counter-based hash of (run seed, epoch, optimiser step, the
view's position in the list, the sample's ``batch["index"]`` (its position in the dataset: every dataset of the
trainer yields one), the draw's number within the view); :class:`Draws` computes it on the batch's device with
integer arithmetic. Hence

* a resumed run draws what the uninterrupted run drew: the key holds no state, nothing is saved in checkpoints;
* a sample's view does not depend on the other samples of its batch, on its position there, nor on how a step's
  samples are split into micro-batches or data-parallel ranks (2 DDP ranks equal one process with the whole batch);
* ranks, holding different samples, draw differently; epochs and steps draw anew; the global torch, numpy and
  ``random`` generators are neither read nor advanced;
* a sample that appears twice in one step (class-aware or pair batching) gets the same view both times.

The epoch counts across stages (as the samplers'), the step is the stage's optimiser step.

**Mixing.** :class:`MixUp` and :class:`CutMix` mix each sample ``b`` with a partner ``perm[b]`` of the same
(micro-)batch and weight ``lam[b]`` (drawn per sample: ``lam ~ Beta(alpha, alpha)``), and store both in the batch
(default keys ``"mix_lam"``, float32 ``[B]``, and ``"mix_perm"``, int64 ``[B]``): a label term computes
``lam·loss(y) + (1 − lam)·loss(y[perm])`` per sample (``CrossEntropyTerm(mixed_by=("mix_lam", "mix_perm"))``). The partners are the batch's samples in the order of a hash
of their index, each taking the next (a cycle: no sample is its own partner in a batch of two or more). Unlike the
other draws, the partner depends on which samples share the batch, so under DDP each rank mixes within its share
and the run differs from one process with the whole batch; resume stays exact. The trainer's own MixUp
(``TrainConfig.mixup_alpha``: one ``lam`` per batch, drawn from the numpy stream of :mod:`kdkernels.distill.mixing`)
runs after the views and mixes ``"input"`` only.

**Evaluation.** A test batch passes through the views in evaluation mode (:func:`apply_views` with
``training=False``, as :meth:`Distiller.evaluation_input` does): the random transforms are the identity with
neutral labels (no turn, no flip, no shift, no noise, ``lam = 1`` with every sample its own partner), the
deterministic ones (:class:`Downsample`) apply, so a model reading a low-resolution view is tested at low
resolution.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks
from kdkernels.distill.environment import VIEW_STREAM, stream_seed

RESERVED_KEYS = ("index", "target")   # views draw from "index" and never rewrite the labels
MASK32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------- randomness

def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x · constant) mod 2^32`` for 32-bit words held in int64, in 16-bit halves: no intermediate overflows."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit hash with strong avalanche (``lowbias32`` of C. Wellons' hash-prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def view_key(seed: int, epoch: int, step: int, position: int) -> int:
    """The 63-bit key of view ``position``'s draws in one step (see the module doc)."""
    return stream_seed(seed, VIEW_STREAM, epoch, step, position)


class Draws:
    """The random numbers of one view in one step: row ``b`` of every draw is a function of ``key``, ``index[b]``
    and the draw's counter only (successive calls take successive counters), computed on ``index``'s device."""

    def __init__(self, key: int, index: torch.Tensor | None):
        self.index = index
        self.counter = 0
        if index is None:
            return
        index = index.reshape(-1).long()
        self.index = index
        low, high = index & MASK32, (index >> 32) & MASK32
        self.sample = _mix32(_mix32(_mix32(low ^ (key & MASK32)) ^ high) ^ ((key >> 32) & MASK32))
        self.sample2 = _mix32(self.sample ^ 0x9E3779B9)

    @property
    def rows(self) -> int:
        return self._index().shape[0]

    def _index(self) -> torch.Tensor:
        if self.index is None:
            raise ValueError("views draw their randomness from batch['index'] (each sample's position in the "
                             "dataset); this batch has no 'index'")
        return self.index

    def words(self, *shape: int) -> torch.Tensor:
        """Uniform 32-bit words (int64 in [0, 2^32)), ``[B, *shape]`` (``[B]`` without a shape)."""
        index = self._index()
        count = math.prod(shape)
        counters = torch.arange(self.counter, self.counter + count, device=index.device, dtype=torch.int64)
        self.counter += count
        words = _mix32(_mix32(counters[None, :] ^ self.sample[:, None]) ^ self.sample2[:, None])
        return words.view(index.shape[0], *shape)

    def uniform(self, *shape: int) -> torch.Tensor:
        """float32 in the open interval (0, 1) (23 random bits), ``[B, *shape]``."""
        return ((self.words(*shape) >> 9).float() + 0.5) * 2.0 ** -23

    def integers(self, high: int | torch.Tensor, *shape: int) -> torch.Tensor:
        """int64 in [0, high), ``[B, *shape]`` (``high`` may be a tensor broadcasting against it)."""
        return (self.uniform(*shape) * high).floor().long()

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard normal float32 (Box–Muller on two uniforms), ``[B, *shape]``."""
        radius = torch.sqrt(-2.0 * torch.log(self.uniform(*shape)))
        return radius * torch.cos(2.0 * math.pi * self.uniform(*shape))

    def gamma(self, concentration: float, candidates: int = 16) -> torch.Tensor:
        """Gamma(concentration, 1) per sample, ``[B]``: Marsaglia & Tsang's method on ``candidates`` proposals
        (the first accepted; acceptance >= 95% each, so all fail with probability < 1e-20, then the mode is used),
        boosted by ``U^(1/a)`` for a concentration a < 1."""
        shape = concentration + 1.0 if concentration < 1.0 else concentration
        d = shape - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        x, u = self.normal(candidates), self.uniform(candidates)
        v = (1.0 + c * x) ** 3
        accepted = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        first = accepted.int().argmax(dim=1, keepdim=True)
        value = torch.where(accepted.any(dim=1), d * v.gather(1, first).squeeze(1), torch.full_like(x[:, 0], d))
        if concentration < 1.0:
            value = value * self.uniform() ** (1.0 / concentration)
        return value

    def beta(self, alpha: float) -> torch.Tensor:
        """Beta(alpha, alpha) per sample, float32 ``[B]``, as a ratio of two gammas (0.5 if both underflow)."""
        first, second = self.gamma(alpha), self.gamma(alpha)
        total = first + second
        return torch.where(total > 0, first / total.clamp_min(1e-30), torch.full_like(total, 0.5))

    def partners(self) -> torch.Tensor:
        """A cyclic permutation of the batch: samples ordered by a hash of their index, each paired with the next."""
        index = self._index()
        order = torch.argsort((self.words() << 31) | (index & 0x7FFFFFFF))
        permutation = torch.empty_like(order)
        permutation[order] = order.roll(-1)
        return permutation


# ------------------------------------------------------------------------------------------------ transforms

def _check_key(check: Checks, name: str, value) -> str:
    check.name(name, value, "batch key", "a str (a batch key)")
    if value in RESERVED_KEYS:
        check.value_error(name, f"must not be one of {RESERVED_KEYS} (views draw from 'index' and never rewrite "
                                "'target')", repr(value))
    return value


def _optional_key(check: Checks, name: str, value) -> str | None:
    return None if value is None else _check_key(check, name, value)


def _spatial(check: Checks, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        check.type_error("the source", "a tensor [B, ..., H, W]", x)
    if x.dim() < 3:
        check.value_error("the source", "must have at least 3 dims [B, ..., H, W]", x)
    return x


def _per_sample(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [B] mask broadcast over x's other dims."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


class Transform:
    """What a :class:`View` does to its source. ``__call__(x, draws)`` returns the transformed tensor and the labels
    it writes (``{key: tensor [B, ...]}``, the keys of :meth:`label_keys`); ``evaluate(x)`` is the evaluation-mode
    transform: by default the identity with :meth:`neutral_labels`. Transforms without randomness set
    ``random = False`` and evaluate as they train."""

    random = True

    def label_keys(self) -> tuple[str, ...]:
        return ()

    def __call__(self, x: torch.Tensor, draws: Draws) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def neutral_labels(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.random:
            return self(x, Draws(0, None))
        return x, self.neutral_labels(x)

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Rotate90(Transform):
    """Rotates each sample by ``k`` quarter turns (``torch.rot90(x, k, dims=(-2, -1))``), ``k`` drawn uniformly
    from ``turns``; ``label`` (optional) is the key that receives the position of ``k`` in ``turns`` (int64 [B]:
    the rotation class of SSKD-style rotation prediction; with the default turns it equals ``k``). Odd turns need
    square images."""

    def __init__(self, turns: Sequence[int] = (0, 1, 2, 3), label: str | None = None):
        check = Checks("Rotate90")
        if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
            check.type_error("turns", "a sequence of ints in [0, 3]", turns)
        self.turns = tuple(check.integer("turns", k, minimum=0, maximum=3) for k in turns)
        if not self.turns or len(set(self.turns)) != len(self.turns):
            check.value_error("turns", "must be distinct quarter turns, at least one", repr(tuple(turns)))
        self.label = _optional_key(check, "label", label)

    def label_keys(self):
        return (self.label,) if self.label else ()

    def __call__(self, x, draws):
        check = Checks("Rotate90")
        _spatial(check, x)
        if any(k % 2 for k in self.turns) and x.shape[-1] != x.shape[-2]:
            check.value_error("the source", "must be square [..., H, H] for odd quarter turns", x)
        position = draws.integers(len(self.turns))
        out = x
        for which, k in enumerate(self.turns):
            if k:
                out = torch.where(_per_sample(position == which, x), torch.rot90(x, k, dims=(-2, -1)), out)
        return out, ({self.label: position} if self.label else {})

    def neutral_labels(self, x):
        if not self.label:
            return {}
        position = self.turns.index(0) if 0 in self.turns else 0
        return {self.label: torch.full((x.shape[0],), position, dtype=torch.int64, device=x.device)}

    def evaluate(self, x):
        if 0 in self.turns:
            return x, self.neutral_labels(x)
        return torch.rot90(x, self.turns[0], dims=(-2, -1)), self.neutral_labels(x)


class RandomCrop(Transform):
    """Pads each sample with ``padding`` zeros on every side of its last two dims, then crops the original size at a
    random offset ``(dy, dx)`` in ``[0, 2·padding]²``: ``out[..., i, j] = padded[..., i + dy, j + dx]``, the sample
    shifted by ``(padding − dy, padding − dx)`` with zeros shifted in (CIFAR's ``RandomCrop(32, padding=4)``).
    ``label`` (optional) receives the shift ``(padding − dy, padding − dx)`` as int64 ``[B, 2]``."""

    def __init__(self, padding: int = 4, label: str | None = None):
        check = Checks("RandomCrop")
        self.padding = check.integer("padding", padding, minimum=0)
        self.label = _optional_key(check, "label", label)

    def label_keys(self):
        return (self.label,) if self.label else ()

    def __call__(self, x, draws):
        _spatial(Checks("RandomCrop"), x)
        p, (height, width) = self.padding, x.shape[-2:]
        offsets = draws.integers(2 * p + 1, 2)
        flat = x.reshape(x.shape[0], -1, height, width)
        padded = F.pad(flat, (p, p, p, p))
        rows = offsets[:, :1] + torch.arange(height, device=x.device)
        cols = offsets[:, 1:] + torch.arange(width, device=x.device)
        batch = torch.arange(x.shape[0], device=x.device)
        out = padded[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]   # [B, H, W, channels]
        out = out.permute(0, 3, 1, 2).reshape(x.shape)
        return out, ({self.label: p - offsets} if self.label else {})

    def neutral_labels(self, x):
        return {self.label: torch.zeros(x.shape[0], 2, dtype=torch.int64, device=x.device)} if self.label else {}


class HorizontalFlip(Transform):
    """Mirrors each sample's last dim with probability ``p``; ``label`` (optional) receives the flips (int64 [B],
    1 = flipped)."""

    def __init__(self, p: float = 0.5, label: str | None = None):
        check = Checks("HorizontalFlip")
        self.p = check.probability("p", p)
        self.label = _optional_key(check, "label", label)

    def label_keys(self):
        return (self.label,) if self.label else ()

    def __call__(self, x, draws):
        _spatial(Checks("HorizontalFlip"), x)
        flip = draws.uniform() < self.p
        out = torch.where(_per_sample(flip, x), x.flip(-1), x)
        return out, ({self.label: flip.long()} if self.label else {})

    def neutral_labels(self, x):
        return {self.label: torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)} if self.label else {}


class GaussianNoise(Transform):
    """``x + std · z`` with ``z`` standard normal per element (float32 draws cast to x's dtype); any float
    ``[B, ...]``."""

    def __init__(self, std: float = 0.1):
        self.std = Checks("GaussianNoise").real("std", std, nonnegative=True)

    def __call__(self, x, draws):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            Checks("GaussianNoise").type_error("the source", "a float tensor [B, ...]", x)
        noise = draws.normal(*x.shape[1:])
        return x + (self.std * noise).to(x.dtype), {}


class Downsample(Transform):
    """Low resolution: ``F.interpolate`` to ``(H // factor, W // factor)`` with mode ``down`` (``"area"``: the
    mean of each ``factor × factor`` block), then, when ``restore``, back to ``(H, W)`` with mode ``up``. No
    randomness: evaluation applies it too."""

    random = False
    MODES = ("area", "nearest", "bilinear", "bicubic")

    def __init__(self, factor: int = 2, down: str = "area", up: str = "bilinear", restore: bool = True):
        check = Checks("Downsample")
        self.factor = check.integer("factor", factor, minimum=1)
        self.down = check.choice("down", down, self.MODES)
        self.up = check.choice("up", up, self.MODES)
        self.restore = check.flag("restore", restore)

    @staticmethod
    def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
        corners = False if mode in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=size, mode=mode, align_corners=corners)

    def __call__(self, x, draws):
        check = Checks("Downsample")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            check.type_error("the source", "a float tensor [B, ..., H, W]", x)
        _spatial(check, x)
        height, width = x.shape[-2:]
        if min(height, width) < self.factor:
            check.value_error("factor", f"must be at most the source's H and W ({height}, {width})", self.factor)
        flat = x.reshape(x.shape[0], -1, height, width)
        low = self._resize(flat, (height // self.factor, width // self.factor), self.down)
        out = self._resize(low, (height, width), self.up) if self.restore else low
        return out.reshape(*x.shape[:-2], *out.shape[-2:]), {}


class _Mixing(Transform):
    def __init__(self, name: str, alpha: float, lam: str, perm: str):
        check = Checks(name)
        self.alpha = check.real("alpha", alpha, positive=True)
        self.lam, self.perm = _check_key(check, "lam", lam), _check_key(check, "perm", perm)
        if self.lam == self.perm:
            check.value_error("perm", "must differ from lam", repr(perm))

    def label_keys(self):
        return (self.lam, self.perm)

    def neutral_labels(self, x):
        rows = x.shape[0]
        return {self.lam: torch.ones(rows, device=x.device),
                self.perm: torch.arange(rows, device=x.device)}


class MixUp(_Mixing):
    """``out[b] = lam[b]·x[b] + (1 − lam[b])·x[perm[b]]`` with ``lam[b] ~ Beta(alpha, alpha)`` per sample and
    ``perm`` the batch's partner cycle (see the module doc); writes ``lam`` (float32 [B]) and ``perm`` (int64 [B])
    under the keys given (default ``"mix_lam"``, ``"mix_perm"``)."""

    def __init__(self, alpha: float = 1.0, lam: str = "mix_lam", perm: str = "mix_perm"):
        super().__init__("MixUp", alpha, lam, perm)

    def __call__(self, x, draws):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            Checks("MixUp").type_error("the source", "a float tensor [B, ...]", x)
        permutation = draws.partners()
        lam = draws.beta(self.alpha)
        weight = _per_sample(lam, x).to(x.dtype)
        return weight * x + (1 - weight) * x[permutation], {self.lam: lam, self.perm: permutation}


class CutMix(_Mixing):
    """CutMix (Yun et al., 2019; clovaai/CutMix-PyTorch ``rand_bbox``) per sample: ``lam0 ~ Beta(alpha, alpha)``,
    a box of ``floor(H·sqrt(1 − lam0)) × floor(W·sqrt(1 − lam0))`` centred at a uniform pixel ``(cy, cx)``, rows
    ``[clip(cy − h//2), clip(cy + h//2))`` and columns likewise (clipped to the image), filled from the partner
    ``x[perm[b]]``; ``lam[b] = 1 − box area / (H·W)``, the share of the sample's own pixels. Writes ``lam`` and
    ``perm`` as :class:`MixUp` does."""

    def __init__(self, alpha: float = 1.0, lam: str = "mix_lam", perm: str = "mix_perm"):
        super().__init__("CutMix", alpha, lam, perm)

    def __call__(self, x, draws):
        _spatial(Checks("CutMix"), x)
        height, width = x.shape[-2:]
        permutation = draws.partners()
        ratio = torch.sqrt(1.0 - draws.beta(self.alpha))
        centre = draws.integers(torch.tensor([height, width], device=x.device), 2)
        half = torch.stack([(height * ratio).floor().long(), (width * ratio).floor().long()], dim=1) // 2
        start = (centre - half).clamp(min=0)
        end = torch.minimum(centre + half, torch.tensor([height, width], device=x.device))
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        inside_rows = (rows >= start[:, :1]) & (rows < end[:, :1])                  # [B, H]
        inside_cols = (cols >= start[:, 1:]) & (cols < end[:, 1:])                  # [B, W]
        box = inside_rows[:, :, None] & inside_cols[:, None, :]                     # [B, H, W]
        box = box.view(x.shape[0], *([1] * (x.dim() - 3)), height, width)
        area = ((end - start).clamp(min=0).prod(dim=1)).float()
        lam = 1.0 - area / (height * width)
        return torch.where(box, x[permutation], x), {self.lam: lam, self.perm: permutation}


# ------------------------------------------------------------------------------------------------------ views

class View:
    """``batch[output] = transform(batch[source])`` (plus the transform's labels); without a transform, a copy of
    the source under another name."""

    def __init__(self, source: str, output: str, transform: Transform | None = None):
        check = Checks("View")
        self.source = check.name("source", source, "batch key", "a str (a batch key)")
        self.output = _check_key(check, "output", output)
        if transform is not None and not isinstance(transform, Transform):
            check.type_error("transform", "a kdkernels.distill.views.Transform or None", transform)
        self.transform = transform

    def keys(self) -> tuple[str, ...]:
        """Every batch key this view writes: its output, then its labels."""
        return (self.output, *(self.transform.label_keys() if self.transform is not None else ()))

    def _source(self, batch: Mapping[str, object]):
        if self.source not in batch:
            raise ValueError(f"view {self!r} reads batch key {self.source!r}, which the batch does not have; "
                             f"the batch's keys are {sorted(batch)}")
        return batch[self.source]

    def __call__(self, batch: Mapping[str, object], draws: Draws) -> dict[str, object]:
        x = self._source(batch)
        if self.transform is None:
            return {self.output: x}
        out, labels = self.transform(x, draws)
        return {self.output: out, **labels}

    def evaluate(self, batch: Mapping[str, object]) -> dict[str, object]:
        x = self._source(batch)
        if self.transform is None:
            return {self.output: x}
        out, labels = self.transform.evaluate(x)
        return {self.output: out, **labels}

    def __repr__(self) -> str:
        return f"View({self.source!r} -> {self.output!r}, {self.transform!r})"


def check_views(views, reserved: Sequence[str] = ()) -> tuple[View, ...]:
    """``views`` as a tuple, checked: View instances (TypeError), label keys distinct and never an output, and no
    key among ``reserved`` (the distiller's model names and :data:`~kdkernels.distill.distiller.BATCH`:
    ValueError)."""
    check = Checks("Distiller")
    if isinstance(views, (View, str, bytes)) or not isinstance(views, Sequence):
        check.type_error("views", "a sequence of kdkernels.distill.View", views)
    for view in views:
        if not isinstance(view, View):
            check.type_error("views", "a sequence of kdkernels.distill.View", view)
    outputs = {view.output for view in views}
    labels = [key for view in views for key in view.keys()[1:]]
    for key in labels:
        if labels.count(key) > 1 or key in outputs:
            check.value_error("views", "must write each label key once and never as a view's output",
                              f"{key!r} twice")
    clashes = sorted({key for view in views for key in view.keys()} & set(reserved))
    if clashes:
        check.value_error("views", f"must not write the keys {sorted(reserved)} (the models' outputs and the "
                                   "BATCH sentinel use them)", repr(clashes))
    return tuple(views)


def apply_views(views: Sequence[View], batch: Mapping[str, object], *, seed: int = 0, epoch: int = 0,
                step: int = 0, training: bool = True) -> dict:
    """A new batch: ``batch`` plus every view's output and labels, the views applied in order (each reads the
    batch as the earlier views left it). ``training=False``: evaluation mode (see the module doc; no draws)."""
    batch = dict(batch)
    index = batch.get("index")
    for position, view in enumerate(views):
        if training:
            key = view_key(seed, epoch, step, position)
            batch.update(view(batch, Draws(key, index if isinstance(index, torch.Tensor) else None)))
        else:
            batch.update(view.evaluate(batch))
    return batch
