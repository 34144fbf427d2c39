"""A batch on its way to the models: moved to the run's device, counted, and grouped into the micro-batches of one
optimiser step."""
from __future__ import annotations

import itertools
from typing import Iterable

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def rows_of(batch: dict) -> int:
    """The batch's samples: rows of its ``"input"`` (of its ``"noise"`` or ``"index"`` for a source's request, before
    the inputs are generated)."""
    return int(batch[next(key for key in ("input", "noise", "index") if key in batch)].shape[0])


def grouped(items: Iterable, size: int):
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group
