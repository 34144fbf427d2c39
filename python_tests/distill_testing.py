"""Shared helpers of the trainer-layer tests: digits batches, a few optimiser steps of a recipe."""
from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader

from kdkernels.distill import data as distill_data
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.terms import StepContext


@functools.lru_cache(maxsize=None)
def digits_split(train_size: int = 200):
    return distill_data.load_digits(train_size=train_size, seed=0)


def digits_setup(student: str = "student-cnn", teacher: str | None = "teacher-cnn", teachers: int = 1,
                 seed: int = 0) -> Setup:
    """Untrained zoo models (losses are checked on their values, not on a trained teacher's accuracy)."""
    torch.manual_seed(seed)
    split = digits_split()
    built_teachers = [digits_model(teacher) for _ in range(teachers)] if teacher else []
    return Setup(student=digits_model(student), num_classes=10, teachers=built_teachers,
                 num_train=len(split.train), train_labels=split.train.targets, new_student=lambda: digits_model(student),
                 new_assistant=lambda: digits_model("assistant-cnn"))


def batches_for(stage, batch_size: int = 32, seed: int = 0):
    """Batches of the digits training split in the order the stage's batching gives."""
    train = digits_split().train
    sampler = distill_data.batch_sampler_for(stage.batching, train.labels, batch_size,
                                             options=stage.batching_options, seed=seed)
    return DataLoader(train, batch_sampler=sampler)


def run_steps(recipe: Recipe, steps: int = 3, lr: float = 0.01, batch_size: int = 32) -> list[dict]:
    """Trains every stage of ``recipe`` for ``steps`` SGD steps; returns each step's term values (floats).
    Asserts that every loss is finite and that the trainable parameters moved."""
    history = []
    for stage in recipe.stages:
        if stage.before is not None:
            stage.before()
        distiller = stage.distiller
        loader = iter(batches_for(stage, batch_size))
        first = next(loader)
        distiller.build(first).activate().train()
        parameters = distiller.trainable_parameters()
        before = [p.detach().clone() for p in parameters]
        optimizer = torch.optim.SGD(parameters, lr=lr)
        batch = first
        for step in range(steps):
            output = distiller(batch, StepContext(epoch=1, epochs=1, step=step, batch=batch))
            assert torch.isfinite(output.loss), f"{recipe.method}/{stage.name}: loss {output.loss}"
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            history.append({name: float(value) for name, value in output.terms.items()})
            batch = next(loader)
        moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, parameters))
        assert moved, f"{recipe.method}/{stage.name}: no trainable parameter changed"
    return history


def first_step(recipe: Recipe, stage_index: int = -1, batch_size: int = 32, epoch: int = 1):
    """(distiller, batch, values, output) of one forward of a stage on its first digits batch, in train mode, with no
    optimiser step: tests recompute the official formulas from ``values`` and compare with ``output.terms``."""
    stage = recipe.stages[stage_index]
    batch = next(iter(batches_for(stage, batch_size)))
    distiller = stage.distiller
    distiller.build(batch).activate().train()
    values = distiller.run_models(batch)
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=max(epoch, 1), batch=batch))
    return distiller, batch, values, output


def viewed_step(recipe: Recipe, step: int = 2, batch_size: int = 16, epochs: int = 10):
    """(viewed batch, output) of one forward of a single-stage recipe's distiller on its first digits batch with the
    stage's views applied (``first_step`` reads the plain batch), in train mode, no optimiser step."""
    distiller = recipe.stages[0].distiller
    batch = next(iter(batches_for(recipe.stages[0], batch_size=batch_size)))
    distiller.build(batch).activate().train()
    viewed = distiller.apply_views(batch, seed=0, epoch=1, step=step)
    values = distiller.run_models(viewed)
    output = distiller.compute_terms(values, StepContext(epoch=1, epochs=epochs, step=step, batch=viewed))
    return viewed, output


def generated_step(recipe: Recipe):
    """(batch, output) of one forward of a data-free recipe's first stage on a batch of its generated source (the
    distiller built on a first, gradient-free generated example)."""
    stage = recipe.stages[0]
    distiller = stage.distiller
    request = stage.source.request(seed=0, epoch=1, step=0)
    with torch.no_grad():
        example = stage.source.generate(distiller, request)
    distiller.build(example).activate()
    distiller.train()
    batch = stage.source.generate(distiller, request)
    return batch, distiller(batch, StepContext(batch=batch))
