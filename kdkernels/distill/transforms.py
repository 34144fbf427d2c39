"""Dataset-side image transforms (the standard CIFAR and ImageNet pipelines) without torchvision.

An image is a ``[C, H, W]`` tensor with values in [0, 255]: uint8 as decoded, float after a resize (the resize does
not round back to uint8). :class:`Normalize` ends every pipeline: ``(x / 255 − mean) / std`` in float32.

A transform is called as ``transform(image, rng)``. ``rng`` is the sample's :func:`sample_rng` (a numpy Generator
keyed by the run seed, the epoch and the sample's index) or None for evaluation, where the random transforms are the
identity. Hence a sample's augmentation in an epoch is fixed: a resumed run, any number of DataLoader workers and
any split over data-parallel ranks draw the same, and nothing global is read or advanced.

The algorithms follow torchvision's ``transforms.py`` (RandomCrop, RandomHorizontalFlip, RandomResizedCrop,
Resize, CenterCrop, Normalize); the draws come from the sample's Generator instead of torch's global one. Resizing
is bilinear with antialiasing (``torch.nn.functional.interpolate(mode="bilinear", antialias=True,
align_corners=False)``, what torchvision does on tensors), kept in float.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdkernels._validation import Checks

AUGMENTATION_STREAM = 5   # apart from the trainer's streams (environment.py: 1 to 4) and the samplers' (seed, epoch)

# Per-channel mean and std of the training pixels in [0, 1].
# CIFAR-10: the 50 000 training images (0.49139968, 0.48215841, 0.44653091) / (0.24703223, 0.24348513, 0.26158784)
# rounded to 4 digits, as CIFAR-10 training scripts commonly write them.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# CIFAR-100: RepDistiller dataset/cifar100.py and mdistiller mdistiller/dataset/cifar100.py.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
# ImageNet: torchvision's reference scripts, mdistiller mdistiller/dataset/imagenet.py.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# ImageNet evaluation resizes to crop / 0.875 (256 for 224), then takes the centre crop.
CENTRE_CROP_FRACTION = 0.875


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The Generator of one sample's augmentation in one epoch: a function of (seed, epoch, index) only."""
    return np.random.default_rng([seed, AUGMENTATION_STREAM, epoch, index])


def _image(name: str, image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        Checks(name).type_error("image", "a [C, H, W] tensor", image)
    return image


class Transform:
    """``transform(image, rng)``; ``random`` transforms draw from ``rng`` and are the identity when it is None."""

    random = False

    def __call__(self, image: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class Compose(Transform):
    """The transforms in order, each drawing from the same Generator."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)
        self.random = any(t.random for t in self.transforms)

    def __call__(self, image, rng=None):
        for transform in self.transforms:
            image = transform(image, rng)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomCrop(Transform):
    """Zero padding of ``padding`` pixels on every side, then a ``size``×``size`` crop at top ``i`` and left ``j``
    drawn uniformly in ``[0, H + 2·padding − size]`` and ``[0, W + 2·padding − size]`` (``i`` first)."""

    random = True

    def __init__(self, size: int, padding: int = 0):
        check = Checks("RandomCrop")
        self.size = check.integer("size", size, minimum=1)
        self.padding = check.integer("padding", padding, minimum=0)

    def __call__(self, image, rng=None):
        image = _image("RandomCrop", image)
        p = self.padding
        padded = F.pad(image, (p, p, p, p)) if p else image
        height, width = padded.shape[-2:]
        if height < self.size or width < self.size:
            Checks("RandomCrop").value_error("image", f"must be at least {self.size} pixels after padding {p}",
                                             f"{tuple(image.shape)}")
        if rng is None:
            top, left = (height - self.size) // 2, (width - self.size) // 2
        else:
            top = int(rng.integers(0, height - self.size + 1))
            left = int(rng.integers(0, width - self.size + 1))
        return padded[:, top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomHorizontalFlip(Transform):
    """Mirrors the image left to right when a uniform draw in [0, 1) is below ``p``."""

    random = True

    def __init__(self, p: float = 0.5):
        self.p = Checks("RandomHorizontalFlip").probability("p", p)

    def __call__(self, image, rng=None):
        image = _image("RandomHorizontalFlip", image)
        if rng is not None and rng.random() < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                        rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts of an area fraction uniform in ``scale``
    and a log-uniform aspect ratio (w/h) in ``ratio``; the first crop that fits gets a uniform position. Otherwise
    the centre crop of the whole image, clamped to the ratio range. Returns (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[C, H, W]`` to ``size`` = (height, width), antialiased when shrinking, in float32."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float()
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


class RandomResizedCrop(Transform):
    """A crop of random area and aspect ratio (:func:`resized_crop_params`) resized to ``size``×``size``; in
    evaluation (no Generator) the whole image resized."""

    random = True

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        check = Checks("RandomResizedCrop")
        self.size = check.integer("size", size, minimum=1)
        if not (0 < scale[0] <= scale[1]):
            check.value_error("scale", "must be (low, high) with 0 < low <= high", repr(scale))
        if not (0 < ratio[0] <= ratio[1]):
            check.value_error("ratio", "must be (low, high) with 0 < low <= high", repr(ratio))
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, image, rng=None):
        image = _image("RandomResizedCrop", image)
        if rng is not None:
            top, left, h, w = resized_crop_params(image.shape[-2], image.shape[-1], self.scale, self.ratio, rng)
            image = image[:, top:top + h, left:left + w]
        return resize(image, (self.size, self.size))

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class Resize(Transform):
    """Resizes the shorter side to ``size`` and the longer to ``⌊size · long / short⌋`` (torchvision's
    ``Resize(int)``)."""

    def __init__(self, size: int):
        self.size = Checks("Resize").integer("size", size, minimum=1)

    def __call__(self, image, rng=None):
        height, width = _image("Resize", image).shape[-2:]
        if height <= width:
            target = (self.size, int(self.size * width / height))
        else:
            target = (int(self.size * height / width), self.size)
        return resize(image, target)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop(Transform):
    """The central ``size``×``size`` crop: top ``round((H − size) / 2)``, left ``round((W − size) / 2)``; an image
    smaller than ``size`` is zero-padded first (evenly, the odd pixel on the bottom / right), as torchvision does."""

    def __init__(self, size: int):
        self.size = Checks("CenterCrop").integer("size", size, minimum=1)

    def __call__(self, image, rng=None):
        height, width = _image("CenterCrop", image).shape[-2:]
        pad_h, pad_w = max(self.size - height, 0), max(self.size - width, 0)
        if pad_h or pad_w:
            image = F.pad(image, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
            height, width = image.shape[-2:]
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        return image[:, top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class Normalize(Transform):
    """``(x / 255 − mean[c]) / std[c]`` per channel, float32: torchvision's ``ToTensor()`` then ``Normalize``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or any(s <= 0 for s in std):
            Checks("Normalize").value_error("std", "must be positive, one per mean", f"mean {mean}, std {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image, rng=None):
        image = _image("Normalize", image)
        if image.shape[0] != self.mean.shape[0]:
            Checks("Normalize").value_error("image", f"must have {self.mean.shape[0]} channels",
                                            f"{tuple(image.shape)}")
        return (image.float() / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def cifar_train_transform(mean: Sequence[float], std: Sequence[float]) -> Compose:
    """RandomCrop(32, padding=4), RandomHorizontalFlip(), Normalize(mean, std): the CIFAR training pipeline of
    RepDistiller and mdistiller."""
    return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), Normalize(mean, std)])


def cifar_test_transform(mean: Sequence[float], std: Sequence[float]) -> Compose:
    return Compose([Normalize(mean, std)])


def imagenet_train_transform(image_size: int = 224) -> Compose:
    """RandomResizedCrop(image_size), RandomHorizontalFlip(), Normalize(ImageNet mean, std)."""
    return Compose([RandomResizedCrop(image_size), RandomHorizontalFlip(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenet_eval_transform(image_size: int = 224) -> Compose:
    """Resize(⌊image_size / 0.875⌋) (256 for 224), CenterCrop(image_size), Normalize(ImageNet mean, std)."""
    resize_to = math.floor(image_size / CENTRE_CROP_FRACTION + 1e-9)
    return Compose([Resize(resize_to), CenterCrop(image_size), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
