"""Feature capture by module path: forward hooks on any ``nn.Module``, no rewrite of the model.

A tap names a submodule by its dotted path in ``model.named_modules()`` (``"layer3"``, ``"blocks.5"``, ``"fc"``) and
captures that module's output; ``"fc/input"`` captures its first positional input instead (the pooled feature that
enters a classifier head). ``""`` is the model itself.
"""
from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

INPUT_SUFFIX = "/input"


def split_tap(tap: str) -> tuple[str, bool]:
    """``"fc/input"`` -> (``"fc"``, True); ``"layer3"`` -> (``"layer3"``, False)."""
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    return tap, False


def find_module(model: nn.Module, path: str, model_name: str = "model") -> nn.Module:
    """The submodule at ``path``, or a ValueError naming the path, the model and the closest existing paths."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    close = difflib.get_close_matches(path, [name for name in modules if name], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(name) for name in close)}?" if close else ""
    top_level = ", ".join(name for name, _ in model.named_children()) or "(none)"
    raise ValueError(f"{model_name} ({type(model).__name__}) has no submodule {path!r}{hint} "
                     f"Its top-level submodules are: {top_level}.")


class FeatureTaps:
    """Forward hooks on ``model`` that store the tapped tensors of the latest forward in ``self.values``.

    The hooks stay registered until :meth:`remove`. Values are kept as the module produced them (a tensor, or a
    tuple for modules that return several): the reader decides what to take.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str], model_name: str = "model"):
        self.values: dict[str, object] = {}
        self._handles = []
        for tap in sorted(set(taps)):
            path, wants_input = split_tap(tap)
            module = find_module(model, path, model_name)
            if wants_input:
                self._handles.append(module.register_forward_pre_hook(self._store_input(tap)))
            else:
                self._handles.append(module.register_forward_hook(self._store_output(tap)))

    def _store_output(self, tap: str):
        def hook(_module, _inputs, output):
            self.values[tap] = output
        hook.feature_tap = True
        return hook

    def _store_input(self, tap: str):
        def hook(_module, inputs):
            if not inputs:
                raise ValueError(f"tap {tap!r}: the module was called without positional inputs")
            self.values[tap] = inputs[0]
        hook.feature_tap = True
        return hook

    def pop(self) -> dict[str, object]:
        """The values of the latest forward; clears them so that a stale value is never read twice."""
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def is_feature_tap(hook) -> bool:
    """Whether a module hook is one of :class:`FeatureTaps`' (a deep copy of the model must not keep it: it would
    store the copy's values in the original's taps)."""
    return getattr(hook, "feature_tap", False) is True


def as_tensor(value, key: str) -> torch.Tensor:
    """A captured value as one tensor: a tensor as is; a tuple/list or a dict with ``"logits"``/first entry."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        if "logits" in value:
            return as_tensor(value["logits"], key)
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"{key}: expected a tensor (or a tuple/dict holding one), got {type(value).__name__}")
