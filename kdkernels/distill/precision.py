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
