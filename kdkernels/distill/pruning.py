"""Pruned weights (``torch.nn.utils.prune``) kept consistent across checkpoints and pruning rounds.

prune replaces a parameter ``w`` by ``w_orig`` and a buffer ``w_mask`` and keeps ``w = w_orig · w_mask`` as a plain
attribute that only a forward recomputes: after an optimiser step or a checkpoint load it is stale until the next
forward, and the next pruning round ranks weights by it.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import prune


def prepare_pruned_parameters(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """An identity pruning on each parameter the state holds as ``<name>_orig``/``<name>_mask`` but the model holds
    as a plain parameter (a pruned teacher saved, a fresh one loading), so that the keys match."""
    for key in state:
        if not key.endswith("_orig") or key[: -len("_orig")] + "_mask" not in state:
            continue
        path, _, name = key[: -len("_orig")].rpartition(".")
        module = model.get_submodule(path)
        if isinstance(module._parameters.get(name), nn.Parameter):
            prune.identity(module, name)


def refresh_pruned_weights(model: nn.Module) -> None:
    """Recomputes ``weight = weight_orig · weight_mask`` of every pruned module: prune keeps the product as a plain
    attribute that only a forward refreshes, and the next pruning step ranks weights by it."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))
