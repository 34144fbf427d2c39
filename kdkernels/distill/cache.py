"""Offline teacher: the teacher's outputs computed once per training sample, then distillation without it.

    teacher = distill.cache_teacher(trained_teacher, split.train)            # one pass over the data
    setup = distill.Setup(student=..., teacher=teacher, num_classes=10)      # no teacher forward while training

The cached module reads the whole batch (``distill_input = BATCH``, see :mod:`kdkernels.distill.distiller`): the
distiller calls it with the batch and it returns the rows of ``batch["index"]`` (the sample's position in the
training set, see :mod:`kdkernels.distill.data`). The cache holds the teacher's output for the *unaugmented*
sample, so it matches a live teacher only when the training data are not augmented per step (the trainer refuses
MixUp with a cached teacher; views change what the other models read, never what the cache serves).

With ``topk=k`` only the k largest log-probabilities (temperature 1) and their class indices are kept, the form in
which large-vocabulary teachers are stored. ``forward`` then rebuilds dense logits: the k log-probabilities at their
indices and ``-inf`` elsewhere. Any method built on ``kdkernels.kd_loss`` (forward KL) accepts them as teacher
logits: ``-inf`` classes have zero teacher probability, and since the log-probabilities differ from the logits by a
per-row constant, ``softmax(rebuilt / T)`` is the teacher renormalised over its top-k at temperature T. So
``kd_loss(s, rebuilt, T)`` equals ``kd_loss(s, teacher_topk_logprobs=lp, teacher_topk_indices=idx, temperature=T)``
(the ``"renormalize"`` convention). Methods whose formulas are not defined for ``-inf`` logits (DKD, DIST, …) need
the dense cache (``topk=None``). :meth:`CachedTeacher.topk` returns the sparse pair for terms that want it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdkernels.distill.batches import to_device
from kdkernels.distill.data import as_sample_dataset
from kdkernels.distill.distiller import BATCH, default_input, model_input
from kdkernels.distill.hooks import as_tensor


class CachedTeacher(nn.Module):
    """A teacher replaced by its precomputed outputs, looked up by ``batch["index"]``.

    Dense: ``logits`` [N, C]. Top-k: ``topk_logprobs`` [N, k] and ``topk_indices`` [N, k] plus ``num_classes``.
    The tables are non-persistent buffers: they move with ``.to(device)`` but are not written into checkpoints
    (rebuild the cache before resuming).
    """

    distill_input = BATCH

    def __init__(self, logits: torch.Tensor | None = None, *, topk_logprobs: torch.Tensor | None = None,
                 topk_indices: torch.Tensor | None = None, num_classes: int | None = None):
        super().__init__()
        sparse = topk_logprobs is not None or topk_indices is not None
        if sparse == (logits is not None):
            raise ValueError("CachedTeacher needs either logits or topk_logprobs with topk_indices")
        if sparse:
            if topk_logprobs is None or topk_indices is None or topk_logprobs.shape != topk_indices.shape:
                raise ValueError("topk_logprobs and topk_indices must both be given, with the same shape [N, k]")
            if num_classes is None or num_classes < topk_indices.shape[1]:
                raise ValueError(f"num_classes must be given and at least k = {topk_indices.shape[1]}, "
                                 f"got {num_classes}")
            self.register_buffer("topk_logprobs", topk_logprobs.float(), persistent=False)
            self.register_buffer("topk_indices", topk_indices.long(), persistent=False)
            self.num_classes = int(num_classes)
        else:
            self.register_buffer("logits", logits.float(), persistent=False)
            self.num_classes = int(logits.shape[1])
        self.sparse = sparse

    def __len__(self) -> int:
        return (self.topk_indices if self.sparse else self.logits).shape[0]

    def _rows(self, batch) -> torch.Tensor:
        if "index" not in batch:
            raise ValueError(f"a cached teacher looks samples up by batch['index']; the batch has {list(batch)}")
        index = torch.as_tensor(batch["index"]).long()
        return index.to((self.topk_indices if self.sparse else self.logits).device)

    def topk(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(teacher_topk_logprobs, teacher_topk_indices)`` of the batch's samples (top-k caches only)."""
        if not self.sparse:
            raise ValueError("this cache holds dense logits (it was built with topk=None)")
        rows = self._rows(batch)
        return self.topk_logprobs[rows], self.topk_indices[rows]

    def forward(self, batch) -> torch.Tensor:
        rows = self._rows(batch)
        if not self.sparse:
            return self.logits[rows]
        logprobs, indices = self.topk_logprobs[rows], self.topk_indices[rows]
        dense = logprobs.new_full((rows.shape[0], self.num_classes), float("-inf"))
        return dense.scatter_(1, indices, logprobs)

    def extra_repr(self) -> str:
        kind = f"top-{self.topk_indices.shape[1]}" if self.sparse else "dense"
        return f"samples={len(self)}, classes={self.num_classes}, {kind}"


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, dataset: Dataset, batch_size: int = 256,
                    device: str | torch.device | None = None) -> torch.Tensor:
    """The teacher's logits [N, C] for every sample of ``dataset``, in eval mode, row ``i`` for sample index ``i``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = as_sample_dataset(dataset)
    if device is None:
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    device = torch.device(device)
    was_training = teacher.training
    teacher.eval()
    table = None
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            batch = to_device(batch, device)
            output = teacher(model_input(batch, default_input(teacher), "teacher"))
            logits = as_tensor(output, "teacher").float()
            if table is None:
                table = logits.new_full((len(dataset), logits.shape[1]), float("nan"))
            table[batch["index"].to(device).long()] = logits
    finally:
        teacher.train(was_training)
    if table is None:
        raise ValueError("cannot cache a teacher on an empty dataset")
    if torch.isnan(table).any():
        raise ValueError("the dataset's 'index' values do not cover 0..N-1: some samples got no cached output")
    return table


def cache_teacher(teacher: nn.Module, dataset: Dataset, batch_size: int = 256, topk: int | None = None,
                  device: str | torch.device | None = None) -> CachedTeacher:
    """Runs ``teacher`` once over ``dataset`` (eval mode, no gradients, on ``device``: default the teacher's) and
    returns a :class:`CachedTeacher` serving its logits, or, with ``topk``, its top-k log-probabilities at
    temperature 1 rebuilt into ``-inf``-filled logits (see the module docstring)."""
    logits = teacher_outputs(teacher, dataset, batch_size, device)
    if topk is None:
        return CachedTeacher(logits)
    classes = logits.shape[1]
    if not 1 <= topk <= classes:
        raise ValueError(f"topk must be in [1, {classes}] (the number of classes), got {topk}")
    logprobs, indices = torch.log_softmax(logits, dim=1).topk(topk, dim=1)
    return CachedTeacher(topk_logprobs=logprobs, topk_indices=indices, num_classes=classes)
