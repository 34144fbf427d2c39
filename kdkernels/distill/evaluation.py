"""Evaluation on the test set: the task metrics (:mod:`kdkernels.distill.task_metrics`, chosen by
``TrainConfig.metrics``) of each evaluated model of a stage, reported as ``test_<key>_<model>``: by default
``test_acc_<model>`` (top-1 %), ``test_nll_<model>``, ``test_ece_<model>`` and, with a teacher,
``test_agreement_<model>`` and ``test_teacher_kl_<model>``.

The teacher: the stage's model named ``"teacher"``, if there is one (multi-teacher stages name theirs
``teacher1``, … and have none), unless it is a :class:`~kdkernels.distill.cache.CachedTeacher` (it serves the
training set's rows by index, not the test samples). The teacher is compared with every other evaluated model, not
with itself.

One pass over the test set per evaluation, every model in eval mode under the run's autocast (the metrics compute in
float64). Each rank evaluates every ``world_size``-th sample; the metrics' sums are all-reduced before they are
computed, so every rank reports the whole test set's values exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdkernels.distill import metrics
from kdkernels.distill import task_metrics
from kdkernels.distill.batches import to_device
from kdkernels.distill.cache import CachedTeacher
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.environment import Environment, all_gather_objects, all_reduce_tensors
from kdkernels.distill.hooks import FeatureTaps, as_tensor
from kdkernels.distill.precision import autocast
from kdkernels.distill.recipe import feature_points

TEACHER = "teacher"


def teacher_of(distiller: Distiller) -> str | None:
    """The name of the model the teacher metrics compare with: ``"teacher"`` when the distiller has a model of that
    name that is not a cached teacher, else None."""
    model = distiller.models[TEACHER] if TEACHER in distiller.models else None
    return TEACHER if model is not None and not isinstance(model, CachedTeacher) else None


def reduce_metrics(states: Sequence[task_metrics.TaskMetric], env: Environment) -> None:
    """Replaces every metric's sums by their sums over the data-parallel ranks (one all-reduce). A rank that never
    saw a sum (no test samples, or a sum sized by the first batch) takes part with zeros of the other ranks' shape."""
    if env.world_size == 1:
        return
    layouts = all_gather_objects([{key: tuple(value.shape) for key, value in metric.sums.items()}
                                  for metric in states], env.world_size)
    keys = []
    for index, metric in enumerate(states):
        shapes: dict[str, tuple] = {}
        for layout in layouts:
            for key, shape in layout[index].items():
                if shapes.setdefault(key, shape) != shape:
                    raise ValueError(f"task metric {metric.name!r}: the ranks' sums {key!r} differ in shape "
                                     f"({shapes[key]} and {shape})")
        for key in sorted(shapes):
            if key not in metric.sums:
                metric.sums[key] = torch.zeros(shapes[key], dtype=torch.float64, device=env.device)
            keys.append((metric, key))
    reduced = all_reduce_tensors([metric.sums[key].to(env.device) for metric, key in keys], env.world_size)
    for (metric, key), value in zip(keys, reduced):
        metric.sums[key] = value


class Evaluator:
    """Evaluates models on ``test_set`` in batches of ``batch_size``, under the run's autocast, with the task
    metrics named in ``metrics``."""

    def __init__(self, test_set: Dataset, env: Environment, *, batch_size: int, num_workers: int,
                 amp_dtype: torch.dtype | None, metrics: Sequence[str] = task_metrics.DEFAULT,
                 train_set: Dataset | None = None):
        self.test_set, self.env, self.train_set = test_set, env, train_set
        self.batch_size, self.num_workers, self.amp_dtype = batch_size, num_workers, amp_dtype
        self.metrics = task_metrics.check_names(metrics)

    def __call__(self, distiller: Distiller) -> dict[str, float | None]:
        """``test_<key>_<model>`` of each of the distiller's evaluated models, model after model."""
        names = list(distiller.evaluate)
        states = {name: task_metrics.build(self.metrics) for name in names}
        teacher = teacher_of(distiller)
        if teacher is not None and not any(metric.uses_teacher for name in names if name != teacher
                                           for metric in states[name]):
            teacher = None
        models = {name: distiller.models[name] for name in names + ([teacher] if teacher else [])}
        modes = {name: model.training for name, model in models.items()}
        embedded = [name for name in names if any(metric.reads == "embedding" for metric in states[name])]
        taps = {name: self._embedding_tap(distiller, name) for name in embedded}
        for model in models.values():
            model.eval()
        try:
            with torch.no_grad(), autocast(self.env.device.type, self.amp_dtype):
                for name in embedded:
                    features, labels = self._training_embeddings(distiller, name, taps[name])
                    for metric in states[name]:
                        if metric.reads == "embedding":
                            metric.fit(features, labels)
                for batch in self._loader(self.test_set):
                    batch = to_device(batch, self.env.device)
                    if "target" not in batch:
                        raise ValueError(f"the test set's samples have no 'target' (their keys are {list(batch)}): "
                                         "the task metrics compare the models' outputs with it")
                    outputs = {name: self._output(model, distiller.evaluation_input(name, batch), name)
                               for name, model in models.items()}
                    embeddings = {name: self._embedding(taps[name], name) for name in embedded}
                    for name in names:
                        for metric in states[name]:
                            given = outputs[teacher] if metric.uses_teacher and teacher and name != teacher else None
                            output = embeddings[name] if metric.reads == "embedding" else outputs[name]
                            metric.update(output, batch["target"], given)
        finally:
            for name, model in models.items():
                model.train(modes[name])
            for tap in taps.values():
                tap[1].remove()
        reduce_metrics([metric for name in names for metric in states[name]], self.env)
        return {metrics.test_key(key, name): value for name in names for metric in states[name]
                for key, value in metric.compute().items()}

    def _loader(self, dataset: Dataset) -> DataLoader:
        """This rank's share of ``dataset``: every ``world_size``-th sample from its rank."""
        env, size = self.env, self.batch_size
        indices = list(range(env.rank, len(dataset), env.world_size))
        return DataLoader(dataset, batch_sampler=[indices[i:i + size] for i in range(0, len(indices), size)],
                          num_workers=self.num_workers)

    def _embedding_tap(self, distiller: Distiller, name: str) -> tuple[str, FeatureTaps]:
        """A forward hook on model ``name``'s embedding (``feature_points(model).embedding``) for the
        representation metrics."""
        if self.train_set is None:
            raise ValueError(f"the representation metrics ({', '.join(m for m in self.metrics)}) need the training "
                             "set: give the Evaluator train_set")
        model = distiller.models[name]
        try:
            path = feature_points(model).embedding
        except ValueError as error:
            raise ValueError(f"representation metrics of model {name!r}: {error}") from None
        return path, FeatureTaps(model, [path], name)

    @staticmethod
    def _embedding(tap: tuple[str, FeatureTaps], name: str) -> torch.Tensor:
        path, taps = tap
        values = taps.pop()
        if path not in values:
            raise ValueError(f"model {name!r}: its embedding {path!r} was not reached by the forward")
        return as_tensor(values[path], f"{name}:{path}")

    def _training_embeddings(self, distiller: Distiller, name: str, tap) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings (float64) and labels of the whole training set, each rank computing its share and every
        rank receiving all of them (in rank order)."""
        model, features, labels = distiller.models[name], [], []
        for batch in self._loader(self.train_set):
            batch = to_device(batch, self.env.device)
            model(distiller.evaluation_input(name, batch))
            features.append(self._embedding(tap, name).to(torch.float64).flatten(1).cpu())
            labels.append(batch["target"].cpu())
        local = (torch.cat(features) if features else torch.zeros(0, 0, dtype=torch.float64),
                 torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
        shares = [share for share in all_gather_objects(local, self.env.world_size) if share[0].numel()]
        if not shares:
            raise ValueError("the representation metrics need a non-empty training set")
        return (torch.cat([f for f, _ in shares]).to(self.env.device),
                torch.cat([y for _, y in shares]).to(self.env.device))

    @staticmethod
    def _output(model: nn.Module, inputs, name: str) -> torch.Tensor:
        return as_tensor(model(inputs), name)
