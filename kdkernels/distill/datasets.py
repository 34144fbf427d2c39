"""Local image datasets for distillation runs: CIFAR-10/100 in torchvision's on-disk python format, an ImageNet-style
image folder, and user factories, all behind :func:`load_dataset`.

    split = load_dataset("cifar100", "data")                   # data/cifar-100-python/{train,test,meta}
    split = load_dataset("imagefolder", "imagenet", image_size=224)   # imagenet/{train,val}/<class>/*.JPEG
    split = load_dataset("my_project.data:make_datasets", "data")     # my_project.data.make_datasets("data")

Samples are ``{"input", "target", "index"}`` dicts; ``dataset.labels`` holds the labels by index (BAKE's and
CS-KD's class-aware samplers read them, CRD keys its memory bank by the index). Neither torchvision nor any download
is involved: the CIFAR pickles are read by a restricted unpickler (numpy arrays, lists, numbers and strings only),
images are decoded by Pillow (the ``train`` extra).

**Augmentation and the epoch.** A training set's random transforms draw from a Generator keyed by (seed, epoch,
sample index) (:func:`kdkernels.distill.transforms.sample_rng`), so the trainer must tell it the epoch before each
epoch's batches are loaded: ``set_dataset_epoch(train_set, epoch)`` (the epoch counted across stages, as the
samplers' ``set_epoch``). DataLoader workers copy the dataset when an epoch's iteration starts, so the epoch reaches
them unless the workers are persistent. A bad directory raises :class:`DatasetError` (a ValueError) naming the path
and the layout expected.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkernels.distill import transforms as T
from kdkernels.distill.data import as_sample_dataset, dataset_labels

# torchvision's IMG_EXTENSIONS (datasets/folder.py), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILT_IN = ("cifar10", "cifar100", "imagefolder")


class DatasetError(ValueError):
    """A dataset directory that is missing, empty or not in the expected layout (or a factory that returned no
    datasets): the message names the path and the layout expected."""


@dataclasses.dataclass
class DatasetSplit:
    """What :func:`load_dataset` returns: the train and test sets (sample dicts), the number of classes, the shape
    of one input, and the class names when the data has them."""

    train: Dataset
    test: Dataset | None
    num_classes: int
    input_shape: tuple[int, ...]
    classes: list[str] | None = None
    name: str = ""


def _absent(path: Path) -> str:
    return "is a file, not a directory" if path.exists() else "does not exist"


def set_dataset_epoch(dataset: Dataset, epoch: int) -> bool:
    """Calls ``set_epoch(epoch)`` on the dataset or on the first dataset it wraps (``.dataset``) that has one;
    returns whether one had it (datasets without random transforms need no epoch)."""
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        if callable(getattr(dataset, "set_epoch", None)):
            dataset.set_epoch(epoch)
            return True
        dataset = getattr(dataset, "dataset", None)
    return False


class AugmentedImages(Dataset):
    """Base of the image datasets: sample ``i`` is ``transform(image i, sample_rng(seed, epoch, i))`` with its
    label and index. ``augment=False`` (the test split) passes no Generator: the random transforms are the
    identity."""

    def __init__(self, labels: np.ndarray, transform: T.Transform, *, augment: bool, seed: int,
                 classes: Sequence[str] | None):
        self._labels = np.asarray(labels, dtype=np.int64)
        self.transform, self.augment, self.seed, self.epoch = transform, augment, int(seed), 0
        self.classes = list(classes) if classes is not None else None

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the augmentation draws (the trainer sets it before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def targets(self) -> list[int]:
        return self._labels.tolist()

    def image(self, index: int) -> torch.Tensor:
        """The decoded image ``index`` as a uint8 ``[C, H, W]`` tensor."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        rng = T.sample_rng(self.seed, self.epoch, index) if self.augment and self.transform.random else None
        return {"input": self.transform(self.image(index), rng), "target": torch.tensor(self._labels[index]),
                "index": torch.tensor(index)}


# ----------------------------------------------------------------------------------------------------------- CIFAR

@dataclasses.dataclass(frozen=True)
class CifarFormat:
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR = {
    "cifar10": CifarFormat("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                           "batches.meta", "labels", "label_names", 10, T.CIFAR10_MEAN, T.CIFAR10_STD),
    "cifar100": CifarFormat("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100,
                            T.CIFAR100_MEAN, T.CIFAR100_STD),
}
CIFAR_PIXELS = 3 * 32 * 32


def cifar_layout(name: str) -> str:
    spec = CIFAR[name]
    files = [f"{spec.train_files[0]} … {spec.train_files[-1]}" if len(spec.train_files) > 1 else spec.train_files[0],
             spec.test_file, spec.meta_file]
    lines = [f"  DIR/{spec.folder}/"] + [f"    {file}" for file in files]
    return (f"the {name} python version as torchvision stores it (pickled dicts: 'data' uint8 [N, 3072] as R, G, "
            f"B planes, '{spec.label_key}', and '{spec.names_key}' in {spec.meta_file}):\n" + "\n".join(lines))


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, lists, dicts, numbers and strings; refuses every other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("builtins", "bytearray")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never holds")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]
            try:
                importlib.import_module(module)
            except ImportError:   # numpy 1.x
                module = "numpy.core." + module[len("numpy._core."):]
        return super().find_class(module, name)


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_cifar_pickle(path: Path, layout: str = "a CIFAR python-version file") -> dict:
    """A CIFAR pickle as a dict with str keys. The files were written by Python 2's cPickle: loaded as torchvision
    does (``encoding="latin1"``) their keys are str; a Python 3 rewrite keyed by bytes works too."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing; expected {layout}")
    try:
        with open(path, "rb") as file:
            content = _CifarUnpickler(file, encoding="latin1").load()
    except Exception as error:  # any unpickling failure: truncated, not a pickle, foreign objects
        raise DatasetError(f"{path} is not a readable CIFAR pickle ({type(error).__name__}: {error}); expected "
                           f"{layout}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path} holds a {type(content).__name__}, not a dict; expected {layout}")
    return {_text(key): value for key, value in content.items()}


def _cifar_batch(path: Path, spec: CifarFormat, layout: str) -> tuple[np.ndarray, np.ndarray]:
    content = read_cifar_pickle(path, layout)
    data, labels = content.get("data"), content.get(spec.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array [N, {CIFAR_PIXELS}], got {got}; expected {layout}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        labels = None
    if labels is None or len(labels) != len(data) or (len(labels) and not
                                                       (0 <= labels.min() and labels.max() < spec.num_classes)):
        raise DatasetError(f"{path}: '{spec.label_key}' must hold {len(data)} labels in [0, {spec.num_classes}); "
                           f"expected {layout}")
    return data, labels


class CifarDataset(AugmentedImages):
    """One split of CIFAR-10 or CIFAR-100 held in memory as uint8 ``[N, 3, 32, 32]`` (``data`` rows are the R, G
    and B planes, each row-major: pixel (y, x) of channel c is ``row[1024·c + 32·y + x]``)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform: T.Transform, *, augment: bool,
                 seed: int, classes: Sequence[str] | None):
        super().__init__(labels, transform, augment=augment, seed=seed, classes=classes)
        self.images = images

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]


def _cifar_folder(name: str, data_dir: Path) -> Path:
    spec = CIFAR[name]
    layout = cifar_layout(name)
    if not data_dir.is_dir():
        raise DatasetError(f"{name}: the data directory {data_dir} {_absent(data_dir)}; expected {layout}")
    if (data_dir / spec.folder).is_dir():
        return data_dir / spec.folder
    if (data_dir / spec.train_files[0]).is_file() or data_dir.name == spec.folder:
        return data_dir
    found = sorted(entry.name for entry in data_dir.iterdir())[:8]
    what = f"it holds {', '.join(found)}{' …' if len(found) == 8 else ''}" if found else "it is empty"
    raise DatasetError(f"{name}: no {spec.folder}/ in {data_dir} ({what}); expected {layout}")


def load_cifar(name: str, data_dir, *, seed: int = 0, augment: bool = True) -> DatasetSplit:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) from ``data_dir``, the folder
    holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or that folder itself). Training samples get the
    standard augmentation (:func:`~kdkernels.distill.transforms.cifar_train_transform`) unless ``augment=False``;
    both splits are normalised with the dataset's per-channel mean and std."""
    spec = CIFAR[name]
    folder = _cifar_folder(name, Path(data_dir))
    layout = cifar_layout(name)
    meta = read_cifar_pickle(folder / spec.meta_file, layout)
    names = meta.get(spec.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        raise DatasetError(f"{folder / spec.meta_file}: '{spec.names_key}' must list {spec.num_classes} class names; "
                           f"expected {layout}")
    classes = [_text(n) for n in names]

    def split(files: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
        batches = [_cifar_batch(folder / file, spec, layout) for file in files]
        data = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if not len(data):
            raise DatasetError(f"{folder}: {', '.join(files)} hold no image; expected {layout}")
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels

    train_images, train_labels = split(spec.train_files)
    test_images, test_labels = split((spec.test_file,))
    train = CifarDataset(train_images, train_labels,
                         T.cifar_train_transform(spec.mean, spec.std) if augment else
                         T.cifar_test_transform(spec.mean, spec.std), augment=augment, seed=seed, classes=classes)
    test = CifarDataset(test_images, test_labels, T.cifar_test_transform(spec.mean, spec.std), augment=False,
                        seed=seed, classes=classes)
    return DatasetSplit(train, test, spec.num_classes, (3, 32, 32), classes, name)


# ----------------------------------------------------------------------------------------------------- ImageFolder

IMAGEFOLDER_LAYOUT = ("an ImageNet-style folder, one sub-folder per class (val's classes among train's), "
                      f"images with extension {', '.join(IMAGE_EXTENSIONS)}:\n"
                      "  DIR/train/<class>/<image>\n"
                      "  DIR/val/<class>/<image>")


def _pillow():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("reading image folders needs Pillow: pip install 'kdkernels[train]' (or pillow)") from None
    return Image


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision's ``ImageFolder`` order: class folders sorted by name (indices in that order, or ``classes``'
    order when given), each walked in sorted order (sub-folders included, links followed), files with an image
    extension in sorted order. Returns (classes, [(path, class index)])."""
    if not root.is_dir():
        raise DatasetError(f"imagefolder: {root} {_absent(root)}; expected {IMAGEFOLDER_LAYOUT}")
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not found:
        raise DatasetError(f"imagefolder: {root} has no class folder; expected {IMAGEFOLDER_LAYOUT}")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"imagefolder: {root} has classes that the training split lacks: "
                           f"{', '.join(unknown[:10])}; expected {IMAGEFOLDER_LAYOUT}")
    class_index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in found:
        count = len(samples)
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(folder, file), class_index[name]) for file in sorted(files) if _is_image(file)]
        if len(samples) == count:
            raise DatasetError(f"imagefolder: the class folder {root / name} holds no image; expected "
                               f"{IMAGEFOLDER_LAYOUT}")
    return list(classes), samples


class ImageFolderDataset(AugmentedImages):
    """Images listed by :func:`find_images`, decoded by Pillow as RGB when a sample is loaded."""

    def __init__(self, samples: list[tuple[str, int]], transform: T.Transform, *, augment: bool, seed: int,
                 classes: Sequence[str]):
        super().__init__(np.array([label for _, label in samples], dtype=np.int64), transform, augment=augment,
                         seed=seed, classes=classes)
        self.paths = [path for path, _ in samples]

    def image(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with _pillow().open(path) as image:
                pixels = np.array(image.convert("RGB"))
        except OSError as error:
            raise DatasetError(f"imagefolder: cannot read the image {path}: {error}") from None
        return torch.from_numpy(pixels).permute(2, 0, 1)


def load_image_folder(data_dir, *, image_size: int = 224, seed: int = 0, augment: bool = True) -> DatasetSplit:
    """``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` with the ImageNet transforms at ``image_size``:
    training RandomResizedCrop(image_size) and a horizontal flip, evaluation Resize(⌊image_size/0.875⌋) and
    CenterCrop(image_size); both normalised with the ImageNet mean and std. Class indices follow the training
    split's sorted class folders."""
    _pillow()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"imagefolder: the data directory {data_dir} {_absent(data_dir)}; expected "
                           f"{IMAGEFOLDER_LAYOUT}")
    for split in ("train", "val"):
        if not (data_dir / split).is_dir():
            found = sorted(entry.name for entry in data_dir.iterdir())[:8]
            what = f"it holds {', '.join(found)}" if found else "it is empty"
            raise DatasetError(f"imagefolder: {data_dir} has no {split}/ folder ({what}); expected "
                               f"{IMAGEFOLDER_LAYOUT}")
    classes, train_samples = find_images(data_dir / "train")
    _, val_samples = find_images(data_dir / "val", classes)
    train_transform = T.imagenet_train_transform(image_size) if augment else T.imagenet_eval_transform(image_size)
    train = ImageFolderDataset(train_samples, train_transform, augment=augment, seed=seed, classes=classes)
    test = ImageFolderDataset(val_samples, T.imagenet_eval_transform(image_size), augment=False, seed=seed,
                              classes=classes)
    return DatasetSplit(train, test, len(classes), (3, image_size, image_size), classes, "imagefolder")


# -------------------------------------------------------------------------------------------------------- factories

def _factory(spec: str) -> Callable:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise DatasetError(f"dataset {spec!r}: a factory is written 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DatasetError(f"dataset {spec!r}: cannot import module {module_name!r} ({error})") from None
    function = module
    for part in function_name.split("."):
        function = getattr(function, part, None)
    if not callable(function):
        raise DatasetError(f"dataset {spec!r}: module {module_name!r} has no callable {function_name!r}")
    return function


def _checked_dataset(spec: str, role: str, dataset) -> Dataset:
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DatasetError(f"dataset {spec!r}: the {role} set must be a map-style dataset (__getitem__ and "
                           f"__len__), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise DatasetError(f"dataset {spec!r}: the {role} set is empty")
    return as_sample_dataset(dataset)


def load_factory(spec: str, data_dir=None) -> DatasetSplit:
    """``module:function`` (``function`` may be a dotted attribute path): the function is called with ``data_dir``
    as its one argument when given, else with none, and returns ``(train, test)`` or an object with ``train`` and
    ``test`` attributes (``test`` may be None; ``num_classes`` and ``classes`` attributes are used when present).
    Each set is a map-style dataset of ``(input, target)`` pairs or sample dicts."""
    function = _factory(spec)
    result = function(data_dir) if data_dir is not None else function()
    if isinstance(result, (tuple, list)) and len(result) == 2:
        train, test, owner = result[0], result[1], None
    elif hasattr(result, "train") and hasattr(result, "test"):
        train, test, owner = result.train, result.test, result
    else:
        raise DatasetError(f"dataset {spec!r}: the factory must return (train, test) or an object with train and "
                           f"test attributes, got {type(result).__name__}")
    train = _checked_dataset(spec, "training", train)
    test = _checked_dataset(spec, "test", test) if test is not None else None
    num_classes = getattr(owner, "num_classes", None)
    if num_classes is None:
        labels = dataset_labels(train)
        num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    classes = getattr(owner, "classes", None) or getattr(train, "classes", None)
    input_shape = tuple(train[0]["input"].shape) if isinstance(train[0].get("input"), torch.Tensor) else ()
    return DatasetSplit(train, test, int(num_classes), input_shape, list(classes) if classes else None, spec)


# ----------------------------------------------------------------------------------------------------------- entry

def load_dataset(name: str, data_dir=None, *, image_size: int | None = None, seed: int = 0,
                 augment: bool = True) -> DatasetSplit:
    """The dataset ``name`` from ``data_dir``: ``"cifar10"``, ``"cifar100"`` (:func:`load_cifar`),
    ``"imagefolder"`` (:func:`load_image_folder`; ``image_size`` defaults to 224) or ``"module:function"``
    (:func:`load_factory`). ``seed`` keys the training augmentation (pass the run's seed), ``augment=False`` gives
    the training set the evaluation transforms. Raises :class:`DatasetError` for a bad directory or factory."""
    if not isinstance(name, str) or not name:
        raise DatasetError(f"dataset must be a non-empty str: one of {', '.join(BUILT_IN)} or 'module:function', "
                           f"got {name!r}")
    if ":" in name:
        return load_factory(name, data_dir)
    if name not in BUILT_IN:
        raise DatasetError(f"unknown dataset {name!r}: the known datasets are {', '.join(BUILT_IN)}, or "
                           "'module:function' for a Python factory of (train, test) datasets")
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} is read from a local directory: give data_dir")
    if name == "imagefolder":
        if image_size is None:
            image_size = 224
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DatasetError(f"image_size must be a positive int, got {image_size!r}")
        return load_image_folder(data_dir, image_size=image_size, seed=seed, augment=augment)
    if image_size not in (None, 32):
        raise DatasetError(f"image_size applies to imagefolder: {name} images are 32×32, got {image_size!r}")
    return load_cifar(name, data_dir, seed=seed, augment=augment)
