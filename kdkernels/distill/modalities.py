"""Modalities: paired views of each image that cross-modal and privileged distillation give different models.

Each modality is a deterministic :class:`~kdkernels.distill.views.Transform` (``random = False``): a view that
applies it (``View("input", "input_degraded", Degrade())``) adds a named input to every batch, and, unlike a random
augmentation, it applies identically at evaluation (:meth:`Distiller.evaluation_input`), so a model trained on a
modality is tested on it. A modality is a function of the image alone (and of a fixed seed): it does not depend on
the epoch, the step, the sample's index or the other samples of the batch, hence a resumed or data-parallel run sees
exactly the same values, and nothing is checkpointed.

The modalities (:data:`MODALITIES`, :func:`modality_view` builds the view of one by name, writing
``"input_<name>"``):

* ``"image"`` — :class:`Image`: the image itself (the privileged / teacher modality);
* ``"degraded"`` — :class:`Degrade`: the image down-sampled by ``factor`` (area: the mean of each block) and
  up-sampled back (bilinear), then optionally an ``occlude × occlude`` block set to ``fill``. The block's position is
  the same for every sample (a sensor's dead region): ``at=(row, col)``, or drawn once from ``seed`` (a
  ``torch.Generator``), never per sample, so the degraded view of a sample is the same at training and test time
  and the student can never see the hidden pixels;
* ``"profiles"`` — :class:`Profiles`: the row and column intensity profiles, the means of each row then of each
  column, ``[B, H + W]`` (16 values for 8×8 digits; the zoo's ``modal-mlp`` reads them);
* ``"projection"`` — :class:`RandomProjection`: ``flatten(x) @ R``, ``R`` a fixed Gaussian matrix
  ``[C·H·W, dim]`` with entries ``N(0, 1/dim)`` drawn in float64 on the CPU from ``seed`` (the same ``R`` on every
  device and process), ``[B, dim]`` (``dim`` 16 by default: ``modal-mlp`` reads it too).

Information: down-sampling by ``f`` keeps ``(H/f)·(W/f)`` numbers per channel (a linear map of that rank); the
occluded block is constant; the profiles keep ``H + W − 1`` independent sums of the ``H·W`` pixels and the
projection ``dim`` linear measurements — each a lossy view of the image (see ``python_tests/test_distill_modalities.py``
for the rank and invariance checks).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from kdkernels._validation import Checks
from kdkernels.distill.views import Downsample, Transform, View


def _images(check: Checks, x, dims: int = 3) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        check.type_error("the source", "a float tensor [B, C, H, W] (or [B, H, W])", x)
    if x.dim() < dims:
        check.value_error("the source", f"must have at least {dims} dims [B, ..., H, W]", x)
    return x


class Image(Transform):
    """The image itself (a copy of the source under the view's name)."""

    random = False

    def __call__(self, x, draws):
        return _images(Checks("Image"), x, dims=1), {}


class Degrade(Transform):
    """A degraded image: :class:`~kdkernels.distill.views.Downsample` by ``factor`` (``down`` then ``up`` modes,
    back to the original size; ``factor=1``: no down-sampling), then, when ``occlude > 0``, an ``occlude ×
    occlude`` block of every channel set to ``fill``, at ``at = (row, col)`` (its top-left pixel) or, when ``at``
    is None, at a position drawn once from ``seed`` (uniform over the positions where the block fits the image; the
    same for every sample). Deterministic: evaluation applies it too."""

    random = False

    def __init__(self, factor: int = 2, occlude: int = 0, at: Sequence[int] | None = None, seed: int = 0,
                 fill: float = 0.0, down: str = "area", up: str = "bilinear"):
        check = Checks("Degrade")
        self.factor = check.integer("factor", factor, minimum=1)
        self.occlude = check.integer("occlude", occlude, minimum=0)
        if at is not None:
            if isinstance(at, (str, bytes)) or not isinstance(at, Sequence) or len(at) != 2:
                check.type_error("at", "None or a (row, col) pair of ints", at)
            at = tuple(check.integer("at", value, minimum=0) for value in at)
        self.at = at
        self.seed = check.integer("seed", seed, minimum=0)
        self.fill = check.real("fill", fill)
        down, up = check.choice("down", down, Downsample.MODES), check.choice("up", up, Downsample.MODES)
        if self.factor == 1 and self.occlude == 0:
            check.value_error("factor", "or occlude must degrade the image (factor > 1 or occlude > 0)",
                              "factor=1, occlude=0")
        self._downsample = Downsample(self.factor, down, up) if self.factor > 1 else None

    def block(self, height: int, width: int) -> tuple[int, int]:
        """The occluded block's top-left (row, col) in an ``height × width`` image."""
        check = Checks("Degrade")
        if self.occlude > min(height, width):
            check.value_error("occlude", f"must be at most the image's H and W ({height}, {width})", self.occlude)
        if self.at is not None:
            row, col = self.at
            if row + self.occlude > height or col + self.occlude > width:
                check.value_error("at", f"must place the {self.occlude}×{self.occlude} block inside the "
                                        f"{height}×{width} image", self.at)
            return row, col
        generator = torch.Generator().manual_seed(self.seed)
        row = int(torch.randint(height - self.occlude + 1, (), generator=generator))
        col = int(torch.randint(width - self.occlude + 1, (), generator=generator))
        return row, col

    def __call__(self, x, draws):
        check = Checks("Degrade")
        _images(check, x)
        out = self._downsample(x, draws)[0] if self._downsample is not None else x.clone()
        if self.occlude:
            row, col = self.block(*x.shape[-2:])
            out = out.clone()
            out[..., row:row + self.occlude, col:col + self.occlude] = self.fill
        return out, {}

    def __repr__(self):
        return (f"Degrade(factor={self.factor}, occlude={self.occlude}, at={self.at}, seed={self.seed}, "
                f"fill={self.fill})")


class Profiles(Transform):
    """The row and column intensity profiles: ``cat(mean over (C, W) per row, mean over (C, H) per column)``,
    ``[B, H + W]`` (the source ``[B, C, H, W]`` or ``[B, H, W]``)."""

    random = False

    def __call__(self, x, draws):
        _images(Checks("Profiles"), x)
        flat = x.reshape(x.shape[0], -1, *x.shape[-2:])
        return torch.cat([flat.mean(dim=(1, 3)), flat.mean(dim=(1, 2))], dim=1), {}


class RandomProjection(Transform):
    """``flatten(x) @ R``: ``R`` ``[D, dim]`` (``D`` the source's features per sample) with entries ``N(0, 1/dim)``,
    drawn in float64 on the CPU from ``seed`` (``torch.Generator``) the first time a ``D`` is seen, cast to the
    source's dtype and device; ``[B, dim]``."""

    random = False

    def __init__(self, dim: int = 16, seed: int = 0):
        check = Checks("RandomProjection")
        self.dim = check.integer("dim", dim, minimum=1)
        self.seed = check.integer("seed", seed, minimum=0)
        self._matrices: dict[int, torch.Tensor] = {}

    def matrix(self, features: int) -> torch.Tensor:
        """The float64 CPU matrix ``R`` for ``features`` inputs per sample."""
        if features not in self._matrices:
            generator = torch.Generator().manual_seed(self.seed)
            self._matrices[features] = (torch.randn(features, self.dim, generator=generator, dtype=torch.float64)
                                        / self.dim ** 0.5)
        return self._matrices[features]

    def __call__(self, x, draws):
        _images(Checks("RandomProjection"), x, dims=2)
        flat = x.reshape(x.shape[0], -1)
        matrix = self.matrix(flat.shape[1]).to(device=x.device, dtype=x.dtype)
        # a per-sample product and sum, not a GEMM, whose blocking (and rounding) can depend on the batch size: a
        # sample's projection is bit-identical in any batch
        return (flat.unsqueeze(-1) * matrix).sum(dim=1), {}

    def __repr__(self):
        return f"RandomProjection(dim={self.dim}, seed={self.seed})"


MODALITIES = {"image": Image, "degraded": Degrade, "profiles": Profiles, "projection": RandomProjection}


def modality_key(name: str) -> str:
    """The batch key of modality ``name``'s view: ``"input"`` for the image itself, else ``"input_<name>"``."""
    return "input" if name == "image" else f"input_{name}"


def modality_transform(name: str, **options) -> Transform:
    """The transform of modality ``name`` (:data:`MODALITIES`) built with ``options``."""
    check = Checks("modality_transform")
    name = check.choice("modality", name, tuple(MODALITIES))
    cls = MODALITIES[name]
    known = set(inspect.signature(cls.__init__).parameters) - {"self"} if "__init__" in vars(cls) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        check.value_error("options", f"must be options of {cls.__name__} ({sorted(known)})", unknown)
    return cls(**options)


def modality_views(name: str, source: str = "input", **options) -> list[View]:
    """The views that put modality ``name`` in the batch under :func:`modality_key` (none for ``"image"``, which
    is the source itself)."""
    transform = modality_transform(name, **options)
    if name == "image":
        return []
    return [View(source, modality_key(name), transform)]

