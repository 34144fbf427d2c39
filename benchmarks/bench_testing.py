"""Helpers of the pytest-benchmark files: the implementations a benchmark compares and its one checked call before
timing. A loss is named as ``kdkernels bench --loss`` names it (:func:`kdkernels.bench.impls.benched_loss`)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from kdkernels.bench.impls import benched_loss

IMPLS = ["kdkernels", "eager", "compile"]
_COMPILED: dict[str, Callable] = {}


def loss_fn(loss: str, impl: str, temperature: float = 1.0) -> Callable:
    """``fn(student, teacher)``: kdkernels (backend auto), the eager formula as the reference repositories write it,
    or ``torch.compile(eager, dynamic=False)`` of it, one compiled object per loss for the session (dynamo keeps one
    graph per shape and dtype; the few cases here stay under its recompile limit)."""
    benched = benched_loss(loss)
    if impl == "kdkernels":
        return lambda s, t: benched.fused(s, t, temperature, "auto")
    if impl == "eager":
        return lambda s, t: benched.eager(s, t, temperature)
    compiled = _COMPILED.setdefault(loss, torch.compile(benched.eager, dynamic=False))
    return lambda s, t: compiled(s, t, temperature)


def first_call(run: Callable, impl: str):
    """``run()`` once, outside the timer (also the compile / first-call warm-up). A torch.compile failure skips the
    test (no C++ compiler, an inductor bug: not a kdkernels failure); any other failure fails it."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001
        if impl != "compile":
            raise
        pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}")
