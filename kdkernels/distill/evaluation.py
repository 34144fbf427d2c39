"""Evaluation on the test set: top-1 accuracy (%) of each evaluated model of a stage, reported as
``test_acc_<model>``. Each rank evaluates every ``world_size``-th sample; counts are summed over the ranks, so every
rank reports the whole test set's accuracy."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdkernels.distill import metrics
from kdkernels.distill.batches import rows_of, to_device
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.environment import Environment, all_reduce_sum
from kdkernels.distill.hooks import as_tensor
from kdkernels.distill.precision import autocast


class Evaluator:
    """Evaluates models on ``test_set`` in batches of ``batch_size``, under the run's autocast."""

    def __init__(self, test_set: Dataset, env: Environment, *, batch_size: int, num_workers: int,
                 amp_dtype: torch.dtype | None):
        self.test_set, self.env = test_set, env
        self.batch_size, self.num_workers, self.amp_dtype = batch_size, num_workers, amp_dtype

    def __call__(self, distiller: Distiller) -> dict[str, float]:
        """``test_acc_<model>`` of each of the distiller's evaluated models."""
        return {f"{metrics.ACCURACY_PREFIX}{name}": self.accuracy(distiller.models[name])
                for name in distiller.evaluate}

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy (%) of ``model`` on the test set (each rank evaluates its share; counts are summed)."""
        env = self.env
        indices = list(range(env.rank, len(self.test_set), env.world_size))
        size = self.batch_size
        loader = DataLoader(self.test_set, batch_sampler=[indices[i:i + size] for i in range(0, len(indices), size)],
                            num_workers=self.num_workers)
        was_training = model.training
        model.eval()
        correct = seen = 0
        try:
            with torch.no_grad(), autocast(env.device.type, self.amp_dtype):
                for batch in loader:
                    batch = to_device(batch, env.device)
                    output = model(batch) if getattr(model, "takes_batch", False) else model(batch["input"])
                    correct += int((as_tensor(output, "model").argmax(dim=1) == batch["target"]).sum())
                    seen += rows_of(batch)
        finally:
            model.train(was_training)
        correct, seen = all_reduce_sum([correct, seen], env.device, env.world_size)
        return 100.0 * correct / max(seen, 1)
