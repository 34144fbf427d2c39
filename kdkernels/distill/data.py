"""Data for distillation runs: the built-in ``digits`` set and the batch samplers some methods need.

Samples are dicts ``{"input", "target", "index"}`` (the index is the sample's position in its dataset: CRD's memory
bank and cached teacher outputs are keyed by it). Any map-style dataset of such dicts, or of ``(input, target)``
tuples (see :class:`IndexedDataset`), works with the trainer.

Samplers are deterministic functions of ``(seed, epoch)`` and shard by ``(rank, world_size)``, so that a resumed
run and a data-parallel run see the same batches as an uninterrupted single-process one.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kdkernels._validation import Checks


class TensorDictDataset(Dataset):
    """Images [N, ...] and integer labels [N] as ``{"input", "target", "index"}`` samples."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets differ in length: {inputs.shape[0]} vs {targets.shape[0]}")
        self.inputs, self.targets = inputs, targets.long()

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input": self.inputs[index], "target": self.targets[index], "index": torch.tensor(index)}

    @property
    def labels(self) -> np.ndarray:
        return self.targets.numpy()


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(input, target)`` pairs (torchvision style) into ``{"input", "target", "index"}``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if isinstance(sample, dict):
            return {**sample, "index": torch.tensor(index)}
        inputs, target = sample[0], sample[1]
        return {"input": inputs, "target": torch.as_tensor(target), "index": torch.tensor(index)}

    @property
    def labels(self) -> np.ndarray | None:
        """The targets, or None for unlabelled data (dict samples without ``"target"``)."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            samples = (self.dataset[i] for i in range(len(self.dataset)))
            targets = [sample.get("target") if isinstance(sample, dict) else sample[1] for sample in samples]
            if any(target is None for target in targets):
                return None
        return np.asarray([int(target) for target in targets])


class SubsetSamples(Dataset):
    """Samples ``positions`` of a sample dataset, re-indexed ``0..len−1`` (a memory bank or a cache sized by the
    subset is indexed by it); ``labels`` follow, and ``set_epoch`` reaches the wrapped dataset (``.dataset``)."""

    def __init__(self, dataset: Dataset, positions):
        self.dataset = dataset
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[int(self.positions[index])], "index": torch.tensor(index)}

    @property
    def labels(self) -> np.ndarray | None:
        labels = dataset_labels(self.dataset)
        return None if labels is None else labels[self.positions]


def stratified_subset(dataset: Dataset, size: int, seed: int = 0) -> SubsetSamples:
    """``size`` samples of a labelled sample dataset, each class keeping its share (largest remainders), chosen by
    ``seed``, in dataset order and re-indexed (:class:`SubsetSamples`)."""
    labels = dataset_labels(dataset)
    check = Checks("stratified_subset")
    if labels is None:
        check.value_error("dataset", "must be labelled (samples with a 'target') to be subsampled per class",
                          type(dataset).__name__)
    classes = len(np.unique(labels))
    size = check.integer("size", size, minimum=classes, maximum=len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for label, count in _stratified_counts(labels, size).items():
        keep += rng.permutation(np.flatnonzero(labels == label))[:count].tolist()
    return SubsetSamples(dataset, sorted(keep))


def as_sample_dataset(dataset: Dataset) -> Dataset:
    """The dataset itself when it yields sample dicts with an index, else wrapped in :class:`IndexedDataset`.
    Samples without ``"target"`` are unlabelled data (label-free methods such as SSLD train on them)."""
    if isinstance(dataset, (TensorDictDataset, IndexedDataset)):
        return dataset
    first = dataset[0]
    if isinstance(first, dict) and {"input", "index"} <= set(first):
        return dataset
    return IndexedDataset(dataset)


def dataset_labels(dataset: Dataset) -> np.ndarray | None:
    """The labels of a sample dataset by index, or None when its samples carry no ``"target"``."""
    labels = getattr(dataset, "labels", None)
    if labels is not None or isinstance(dataset, (TensorDictDataset, IndexedDataset)):
        return None if labels is None else np.asarray(labels)
    samples = [dataset[i] for i in range(len(dataset))]
    if any("target" not in sample for sample in samples):
        return None
    return np.asarray([int(sample["target"]) for sample in samples])


@dataclasses.dataclass
class DigitsSplit:
    train: TensorDictDataset
    test: TensorDictDataset
    num_classes: int = 10


def long_tailed_counts(n_max: int, imbalance_ratio: float, num_classes: int) -> list[int]:
    """Class sizes decaying exponentially from ``n_max`` (class 0) to ``n_max / imbalance_ratio`` (the last class):
    ``n_c = ⌊n_max · ρ^(−c/(C−1))⌋``, the long-tailed CIFAR profile of Cui et al. 2019 and Cao et al. 2019 (LDAM-DRW
    ``imbalance_cifar.py``: ``int(img_max · imb_factor^(c/(C−1)))`` with ``imb_factor = 1/ρ``). The floor allows
    1e-9 of rounding error, so that an exact value such as 30/3 = 10 is not lost to floating point."""
    if num_classes < 2:
        return [int(n_max)] * num_classes
    return [int(math.floor(n_max * imbalance_ratio ** (-c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def load_digits(train_size: int | None = None, test_fraction: float = 0.3, seed: int = 0,
                imbalance_ratio: float | None = None) -> DigitsSplit:
    """The 8×8 handwritten digits bundled with scikit-learn (1797 images, no download), as 1×8×8 float tensors
    standardised with the training set's mean and std, split per class (stratified) into train and test.

    ``train_size`` keeps only that many training images (stratified, chosen by ``seed``): distillation pays most
    when labelled data is scarce. The test split does not depend on ``train_size``.

    ``imbalance_ratio`` (ρ ≥ 1) then makes the training set long-tailed: class ``c`` keeps
    :func:`long_tailed_counts` ``(n_max, ρ, 10)[c]`` of its images (chosen by ``seed``), ``n_max`` being the
    smallest class size of the balanced training set, so class 0 keeps ``n_max`` and class 9 ``⌊n_max/ρ⌋``
    (ρ = 1: every class cut to ``n_max``). The long-tailed set is a subset of the balanced one for the same seed,
    and it is standardised with the balanced set's mean and std, so the test split is exactly the same tensors as
    without ``imbalance_ratio``.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset comes with scikit-learn: pip install scikit-learn") from error
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if imbalance_ratio is not None:
        imbalance_ratio = Checks("load_digits").real("imbalance_ratio", imbalance_ratio, minimum=1.0)
    digits = sklearn_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(members) * test_fraction))
        test_idx += members[:cut].tolist()
        train_idx += members[cut:].tolist()
    train_idx, test_idx = np.array(sorted(train_idx)), np.array(sorted(test_idx))
    if train_size is not None:
        if not 10 <= train_size <= len(train_idx):
            raise ValueError(f"train_size must be in [10, {len(train_idx)}], got {train_size}")
        keep = []
        per_class = _stratified_counts(labels[train_idx], train_size)
        for label, count in per_class.items():
            members = rng.permutation(train_idx[labels[train_idx] == label])
            keep += members[:count].tolist()
        train_idx = np.array(sorted(keep))
    mean, std = images[train_idx].mean(), images[train_idx].std()
    if imbalance_ratio is not None:
        train_idx = _long_tailed(train_idx, labels, imbalance_ratio, rng)
    tensor = torch.from_numpy((images - mean) / std).unsqueeze(1)
    targets = torch.from_numpy(labels)
    return DigitsSplit(TensorDictDataset(tensor[train_idx], targets[train_idx]),
                       TensorDictDataset(tensor[test_idx], targets[test_idx]))


def _long_tailed(train_idx: np.ndarray, labels: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    classes, counts = np.unique(labels[train_idx], return_counts=True)
    sizes = long_tailed_counts(int(counts.min()), ratio, len(classes))
    if sizes[-1] < 1:
        raise ValueError(f"load_digits: imbalance_ratio {ratio:g} leaves the last class no image (n_max = "
                         f"{counts.min()}, n_max/imbalance_ratio < 1): use a ratio <= {counts.min()} or a larger "
                         "train_size")
    keep = []
    for label, size in zip(classes, sizes):
        keep += rng.permutation(train_idx[labels[train_idx] == label])[:size].tolist()
    return np.array(sorted(keep))


def _stratified_counts(labels: np.ndarray, total: int) -> dict[int, int]:
    classes, counts = np.unique(labels, return_counts=True)
    share = counts / counts.sum() * total
    result = np.floor(share).astype(int)
    for index in np.argsort(-(share - result))[: total - result.sum()]:
        result[index] += 1
    return {int(c): int(n) for c, n in zip(classes, result)}


class _EpochSampler(Sampler):
    """Base of the deterministic samplers: ``set_epoch`` changes the permutation; ranks take strided shares."""

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])


class ShuffleBatchSampler(_EpochSampler):
    """Shuffled batches of ``batch_size`` indices (the last short batch is dropped when ``drop_last``); each rank
    takes every ``world_size``-th batch."""

    def __init__(self, num_samples: int, batch_size: int, *, drop_last: bool = False, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_samples, self.batch_size, self.drop_last, self.shuffle = num_samples, batch_size, drop_last, shuffle

    def _batches(self) -> list[list[int]]:
        order = self._rng().permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, self.num_samples, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank:usable:self.world_size]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class ClassAwareBatchSampler(_EpochSampler):
    """BAKE's batches: ``batch_size / (intra + 1)`` anchors, each followed by ``intra`` other samples of its class
    (yxgeee/BAKE ``IdentityBatchSampler``)."""

    def __init__(self, labels, batch_size: int, intra: int = 1, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if intra < 1 or batch_size % (intra + 1):
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of intra + 1 ({intra + 1}), intra >= 1")
        self.labels, self.batch_size, self.intra = np.asarray(labels), batch_size, intra
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}

    def __iter__(self):
        rng = self._rng()
        anchors_per_batch = self.batch_size // (self.intra + 1)
        anchors = rng.permutation(len(self.labels))
        batches = []
        for start in range(0, len(anchors) - anchors_per_batch + 1, anchors_per_batch):
            batch = []
            for anchor in anchors[start:start + anchors_per_batch]:
                same = self.by_class[int(self.labels[anchor])]
                others = same[same != anchor] if len(same) > 1 else same
                batch += [int(anchor)] + rng.choice(others, self.intra, replace=len(others) < self.intra).tolist()
            batches.append(batch)
        usable = len(batches) - len(batches) % self.world_size
        return iter(batches[self.rank:usable:self.world_size])

    def __len__(self) -> int:
        return (len(self.labels) // (self.batch_size // (self.intra + 1))) // self.world_size


class PairBatchSampler(_EpochSampler):
    """CS-KD's batches (alinlab/cs-kd ``PairBatchSampler``): ``batch_size`` anchors followed by one random other
    sample of each anchor's class, ``2·batch_size`` indices per batch."""

    def __init__(self, labels, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        self.inner = ClassAwareBatchSampler(labels, 2 * batch_size, 1, seed=seed, rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def __iter__(self):
        for batch in self.inner:
            yield batch[0::2] + batch[1::2]

    def __len__(self) -> int:
        return len(self.inner)


def batch_sampler_for(batching: str, labels, batch_size: int, *, options: dict | None = None, seed: int = 0,
                      rank: int = 0, world_size: int = 1, drop_last: bool = False,
                      num_samples: int | None = None) -> _EpochSampler:
    """The batch sampler a stage asks for (``Stage.batching``): shuffle, class_aware or pairs. ``labels`` may be
    None for unlabelled data (then ``num_samples`` is needed), which only the shuffle batching accepts."""
    options = options or {}
    if batching == "shuffle":
        count = len(labels) if labels is not None else num_samples
        if count is None:
            raise ValueError("batch_sampler_for needs labels or num_samples")
        return ShuffleBatchSampler(count, batch_size, drop_last=drop_last, seed=seed, rank=rank,
                                   world_size=world_size)
    if labels is None:
        raise ValueError(f"{batching!r} batching groups samples of the same class: the training data has no "
                         "'target' labels")
    if batching == "class_aware":
        intra = int(options.get("intra", 1))
        batch_size -= batch_size % (intra + 1)
        return ClassAwareBatchSampler(labels, batch_size, intra, seed=seed, rank=rank, world_size=world_size)
    if batching == "pairs":
        return PairBatchSampler(labels, batch_size, seed=seed, rank=rank, world_size=world_size)
    raise ValueError(f"unknown batching {batching!r}")
