"""Load published weights into a model: the checkpoint formats of the distillation repositories, on any device.

:func:`load_weights` accepts

* a bare state dict (``torch.save(model.state_dict())``);
* a dict holding it under ``"model"``, ``"state_dict"``, ``"net"`` or ``"model_state_dict"`` beside other entries
  (RepDistiller and mdistiller save ``{"epoch", "model", "accuracy", "optimizer"}``; Lightning-style files use
  ``"state_dict"``);
* a whole saved model (``torch.save(model)``): its state dict is taken.

Keys saved from ``nn.DataParallel`` / DDP (``"module."`` prefixes) or a ``torch.compile`` wrapper (``"_orig_mod."``)
are stripped when the model has none. Tensors are mapped to the CPU first, so checkpoints written on a GPU load on a
CPU-only machine. The load is strict: a missing or unexpected key, or a shape mismatch, is a ValueError listing the
first mismatches. Files are read with ``torch.load(weights_only=True)`` (no code runs); a whole saved model needs
full unpickling, which runs code from the file and is done only with ``allow_pickle=True`` (the default of the
command line, whose user names their own file).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kdkernels._validation import Checks

STATE_DICT_KEYS = ("model", "state_dict", "net", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN_MISMATCHES = 5


def _unreadable(path: Path, error: Exception) -> ValueError:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return ValueError(f"weights {path}: cannot be read as a PyTorch checkpoint ({type(error).__name__}: "
                      f"{first_line})")


def _read(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise ValueError(f"weights {path}: not a plain state-dict file (it needs full unpickling, e.g. a whole "
                             "saved model); pass allow_pickle=True if you trust the file") from None
        weights_only_error = error
    except Exception as error:   # a truncated or foreign file: say which and why, not a loader traceback
        raise _unreadable(path, error) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise _unreadable(path, error) from weights_only_error


def is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())


def state_dict_of(checkpoint, path: Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint (see the module doc for the formats)."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping):
        for key in STATE_DICT_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if is_state_dict(inner):
                return dict(inner)
        found = sorted(str(key) for key in checkpoint)[:10]
        raise ValueError(f"weights {path}: no state dict found; expected a state dict, or one under one of "
                         f"{list(STATE_DICT_KEYS)}, or a saved model; the file holds a dict with keys {found}")
    raise ValueError(f"weights {path}: expected a state dict, a dict holding one under {list(STATE_DICT_KEYS)}, or "
                     f"a saved nn.Module; got {type(checkpoint).__name__}")


def _without_wrapper_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if not any(key.startswith(prefix) for key in expected) and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    problems = [f"missing {key} {tuple(own[key].shape)}" for key in own if key not in state]
    problems += [f"unexpected {key} {tuple(state[key].shape)}" for key in state if key not in own]
    problems += [f"shape of {key}: checkpoint {tuple(state[key].shape)}, model {tuple(own[key].shape)}"
                 for key in own if key in state and state[key].shape != own[key].shape]
    return problems


def load_weights(model: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False) -> nn.Module:
    """Loads the weights at ``path`` into ``model`` strictly (on the model's device and dtype); returns the model.

    A ValueError names the path and, for a mismatch, the number of mismatched entries and the first of them
    (missing keys, unexpected keys, shape differences)."""
    check = Checks("load_weights")
    if not isinstance(model, nn.Module):
        check.type_error("model", "an nn.Module", model)
    if not isinstance(path, (str, os.PathLike)):
        check.type_error("path", "a path", path)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights {path}: no such file")
    state = state_dict_of(_read(path, allow_pickle), path)
    state = _without_wrapper_prefixes(state, set(model.state_dict()))
    problems = _mismatches(model, state)
    if problems:
        shown = "; ".join(problems[:SHOWN_MISMATCHES])
        more = f" (and {len(problems) - SHOWN_MISMATCHES} more)" if len(problems) > SHOWN_MISMATCHES else ""
        raise ValueError(f"weights {path} do not fit {type(model).__name__}: {len(problems)} mismatches: "
                         f"{shown}{more}")
    model.load_state_dict(state, strict=True)
    return model
