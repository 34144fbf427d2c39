"""Learning-rate schedules and optimisers of a stage.

The LR of optimiser step ``s`` (0-based) of a stage of ``E`` epochs of ``S`` steps is ``lr · factor(s)``: after a
linear warm-up of ``W = round(warmup_epochs · S)`` steps (``factor = (s + 1) / W``),

    cosine     0.5 · (1 + cos(π · (s − W) / (E·S − W)))     to 0 over the stage
    step       gamma ^ (epoch // step_size)                  step_size defaults to a third of the stage
    multistep  gamma ^ #{milestones m : epoch ≥ m}
    constant   1

with ``epoch = s // S`` (0-based).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from kdkernels.distill.config import TrainConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "multistep", "constant")


def lr_lambda(config: TrainConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The LR multiplier at optimiser step ``step`` (0-based) of a stage of ``epochs`` epochs."""
    total = max(1, epochs * steps_per_epoch)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    step_size = config.step_size or max(1, epochs // 3)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        epoch_index = step // steps_per_epoch
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if config.schedule == "step":
            return config.gamma ** (epoch_index // step_size)
        if config.schedule == "multistep":
            return config.gamma ** sum(epoch_index >= milestone for milestone in config.milestones)
        return 1.0

    return factor


def make_optimizer(config: TrainConfig, parameters: list, lr: float) -> torch.optim.Optimizer:
    """The configured optimiser over parameters or parameter groups (groups may carry their own ``lr``)."""
    if not parameters:
        raise ValueError("the stage has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return optimizer(parameters, lr=lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, epochs: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of :func:`lr_lambda` on ``optimizer`` (stepped once per optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, epochs, steps_per_epoch))
