"""Mixed precision: ``torch.autocast`` around the models only (the loss terms always run in fp32), and a
``GradScaler`` that is active for fp16 alone."""
from __future__ import annotations

import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, dtype: torch.dtype | None):
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(amp: str, device_type: str) -> torch.amp.GradScaler:
    """The loss scaler of an ``amp`` setting (a pass-through unless ``amp == "fp16"``)."""
    return torch.amp.GradScaler(device_type, enabled=amp == "fp16")


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, *, report_skip: bool = False) -> bool:
    """``scaler.step(optimizer)`` then ``scaler.update()``. Returns False when the scaler skipped the step (fp16
    gradients with an inf or NaN), detected, when ``report_skip`` and the scaler is active, as ``update()`` backing
    the scale off (one device synchronisation per step; it never lowers the scale otherwise)."""
    before = scaler.get_scale() if report_skip and scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return before is None or scaler.get_scale() >= before
