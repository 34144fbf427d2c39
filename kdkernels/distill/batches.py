"""A batch on its way to the models: moved to the run's device, counted, and grouped into the micro-batches of one
optimiser step."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from kdkernels.distill.config import TrainConfig


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """The batch's tensors on ``device`` (4-D floating ones in the channels-last memory format if asked)."""
    def moved(value):
        value = value.to(device, non_blocking=True)
        if channels_last and value.dim() == 4 and value.is_floating_point():
            value = value.contiguous(memory_format=torch.channels_last)
        return value

    return {key: moved(value) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def uses_channels_last(config: TrainConfig, device: torch.device) -> bool:
    """Whether a run uses the channels-last memory format (``TrainConfig.channels_last``; ``"auto"``: on CUDA under
    AMP)."""
    if config.channels_last == "auto":
        return device.type == "cuda" and config.amp != "off"
    return bool(config.channels_last)


def rows_of(batch: dict) -> int:
    """The batch's samples: rows of its ``"input"`` (of its ``"noise"`` or ``"index"`` for a source's request, before
    the inputs are generated)."""
    return int(batch[next(key for key in ("input", "noise", "index") if key in batch)].shape[0])


def grouped(items: Iterable, size: int):
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group
