"""Local datasets (kdkernels/distill/datasets.py) and their transforms (transforms.py): CIFAR pickles and an
ImageFolder of PNGs written in the exact on-disk formats in a temporary directory and read back, every transform
against a hand computation, factories, bad directories, and short training runs with the index- and class-aware
methods (CRD, BAKE, CS-KD), resumed exactly."""
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdkernels import distill
from kdkernels.distill import loop as loop_module
from kdkernels.distill import transforms as T
from kdkernels.distill.data import ShuffleBatchSampler, as_sample_dataset, dataset_labels
from kdkernels.distill.datasets import (DatasetError, ImageFolderDataset, load_dataset, read_cifar_pickle,
                                        set_dataset_epoch)
from kdkernels.distill.recipe import FeaturePoints, Setup
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import assert_same_run

PIL = pytest.importorskip("PIL.Image")

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------------ file writers

class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR files: every string as a byte string (BINSTRING) and
    numpy's globals under ``numpy.core``, so that reading them exercises ``encoding="latin1"`` as for the real files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, value):
        if len(value) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(value)]) + value)
        else:
            self.write(pickle.BINSTRING + len(value).to_bytes(4, "little") + value)
        self.memoize(value)

    def save_str(self, value):
        self.save_bytes(value.encode("latin1"))

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def write_pickle(path, content: dict, style: str) -> None:
    with open(path, "wb") as file:
        if style == "python2":
            Python2Pickler(file, protocol=2).dump(content)
        else:   # a Python 3 rewrite keyed by bytes, as pickle.load(..., encoding="bytes") returns the originals
            pickle.dump({key.encode(): value for key, value in content.items()}, file)


def cifar_rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)


def write_cifar10(root, per_batch: int = 4, test: int = 6, style: str = "python2"):
    """cifar-10-batches-py/ with five training batches of ``per_batch`` images, ``test`` test images, batches.meta;
    labels cycle through the 10 classes (each class at least twice in the training set)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data, labels = cifar_rows(5 * per_batch, 0), [i % 10 for i in range(5 * per_batch)]
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        write_pickle(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                                      "labels": labels[rows], "data": data[rows],
                                                      "filenames": [f"img_{i}.png" for i in range(per_batch)]},
                     style)
    test_data, test_labels = cifar_rows(test, 1), [(3 * i) % 10 for i in range(test)]
    write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels,
                                         "data": test_data, "filenames": ["t.png"] * test}, style)
    write_pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES,
                                           "num_vis": 3072}, style)
    return data, np.array(labels), test_data, np.array(test_labels)


def write_cifar100(root, train: int = 20, test: int = 10, style: str = "python2"):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    data, fine = cifar_rows(train, 2), [(7 * i) % 100 for i in range(train)]
    write_pickle(folder / "train", {"filenames": ["a.png"] * train, "batch_label": "training batch 1 of 1",
                                    "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data},
                 style)
    test_data, test_fine = cifar_rows(test, 3), [99 - i for i in range(test)]
    write_pickle(folder / "test", {"filenames": ["b.png"] * test, "batch_label": "testing batch 1 of 1",
                                   "fine_labels": test_fine, "coarse_labels": [f // 5 for f in test_fine],
                                   "data": test_data}, style)
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                                   "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]}, style)
    return data, np.array(fine), test_data, np.array(test_fine)


def write_image_folder(root, classes=("cat", "ant", "bee"), train_per_class: int = 4, val_per_class: int = 2,
                       size: tuple[int, int] = (12, 12)):
    """DIR/{train,val}/<class>/*.png of random RGB pixels (height, width = size); returns {path: pixels}."""
    rng = np.random.default_rng(4)
    pixels = {}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                path = folder / f"{i:02d}.png"
                PIL.fromarray(image).save(path)
                pixels[str(path)] = image
    return pixels


# -------------------------------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("style", ["python2", "bytes-keys"])
def test_cifar10_is_read_back_in_pixel_order_with_labels_and_names(tmp_path, style):
    data, labels, test_data, test_labels = write_cifar10(tmp_path, style=style)
    split = load_dataset("cifar10", tmp_path)
    assert (split.num_classes, split.input_shape, split.classes) == (10, (3, 32, 32), CIFAR10_NAMES)
    assert len(split.train) == 20 and len(split.test) == 6
    np.testing.assert_array_equal(split.train.labels, labels)
    np.testing.assert_array_equal(dataset_labels(split.train), labels)
    np.testing.assert_array_equal(split.test.labels, test_labels)
    # Row r holds the R, G, B planes, each row-major: pixel (y, x) of channel c is data[r, 1024·c + 32·y + x].
    for row, channel, y, x in [(0, 0, 0, 0), (7, 1, 5, 30), (19, 2, 31, 1)]:
        assert split.train.image(row)[channel, y, x] == data[row, 1024 * channel + 32 * y + x]
    sample = split.test[4]
    assert sorted(sample) == ["index", "input", "target"] and int(sample["index"]) == 4
    assert int(sample["target"]) == test_labels[4]
    expected = (torch.from_numpy(test_data[4].reshape(3, 32, 32)).float() / 255
                - torch.tensor(T.CIFAR10_MEAN)[:, None, None]) / torch.tensor(T.CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(sample["input"], expected, rtol=0, atol=1e-6)


def test_cifar100_reads_the_fine_labels_and_names_also_from_the_folder_itself(tmp_path):
    data, fine, _, test_fine = write_cifar100(tmp_path, style="bytes-keys")
    for data_dir in (tmp_path, tmp_path / "cifar-100-python"):
        split = load_dataset("cifar100", data_dir)
        assert split.num_classes == 100 and split.classes[7] == "fine07"
        np.testing.assert_array_equal(split.train.labels, fine)
        np.testing.assert_array_equal(split.test.labels, test_fine)
        assert split.train.image(3)[1, 2, 3] == data[3, 1024 + 64 + 3]
    content = read_cifar_pickle(tmp_path / "cifar-100-python" / "train")
    assert content["coarse_labels"] == [f // 5 for f in fine]


def test_cifar_training_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, seed=3).train
    plain = load_dataset("cifar10", tmp_path, seed=3, augment=False).train
    first = torch.stack([train[i]["input"] for i in range(20)])
    assert torch.equal(first, torch.stack([train[i]["input"] for i in reversed(range(20))]).flip(0))
    train.set_epoch(1)
    second = torch.stack([train[i]["input"] for i in range(20)])
    assert not torch.equal(first, second)
    train.set_epoch(0)
    assert torch.equal(first, torch.stack([train[i]["input"] for i in range(20)]))
    assert not torch.equal(first, torch.stack([load_dataset("cifar10", tmp_path, seed=4).train[i]["input"]
                                               for i in range(20)]))
    # each augmented image is the hand-made crop of the zero-padded image, mirrored or not, then normalised
    for index in range(20):
        rng = T.sample_rng(3, 0, index)
        top, left, flip = int(rng.integers(0, 9)), int(rng.integers(0, 9)), rng.random() < 0.5
        padded = np.pad(plain.image(index).numpy(), ((0, 0), (4, 4), (4, 4)))
        crop = torch.from_numpy(padded[:, top:top + 32, left:left + 32].copy())
        crop = crop.flip(-1) if flip else crop
        torch.testing.assert_close(first[index], T.Normalize(T.CIFAR10_MEAN, T.CIFAR10_STD)(crop))


def test_augmented_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path).train
    set_dataset_epoch(train, 2)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(train, batch_sampler=ShuffleBatchSampler(20, 8, seed=1), num_workers=workers)
        batches[workers] = [batch["input"] for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


# --------------------------------------------------------------------------------------------------- transforms

class FixedDraws:
    """A stand-in Generator returning given values (integers and uniforms in the order asked)."""

    def __init__(self, integers=(), uniforms=()):
        self._integers, self._uniforms = list(integers), list(uniforms)

    def integers(self, low, high):
        value = self._integers.pop(0)
        assert low <= value < high
        return value

    def uniform(self, low, high):
        value = self._uniforms.pop(0)
        assert low <= value <= high
        return value

    def random(self):
        return self._uniforms.pop(0)


def test_random_crop_pads_with_zeros_and_crops_at_the_drawn_offset():
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 4, 4)
    out = T.RandomCrop(4, padding=2)(image, FixedDraws(integers=[0, 3]))
    # top 0, left 3 of the 8×8 padded image: rows −2..1 and columns 1..4 of the original (0 outside)
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0]], dtype=torch.uint8)
    assert torch.equal(out[0], expected)
    assert torch.equal(T.RandomCrop(4, padding=2)(image), image)           # evaluation: the centre, no shift


def test_horizontal_flip_mirrors_below_p_and_normalize_scales_then_standardises():
    image = torch.tensor([[[1, 2, 3]]], dtype=torch.uint8)
    assert torch.equal(T.RandomHorizontalFlip()(image, FixedDraws(uniforms=[0.49])), image.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip()(image, FixedDraws(uniforms=[0.5])), image)
    assert torch.equal(T.RandomHorizontalFlip()(image), image)
    pixel = torch.tensor([[[255]], [[0]], [[51]]], dtype=torch.uint8)
    out = T.Normalize(T.CIFAR100_MEAN, T.CIFAR100_STD)(pixel).flatten().tolist()
    expected = [(1 - 0.5071) / 0.2675, (0 - 0.4867) / 0.2565, (0.2 - 0.4408) / 0.2761]
    assert out == pytest.approx(expected, abs=1e-6)


def test_random_resized_crop_parameters_stay_in_range_and_repeat_per_key():
    height, width = 60, 90
    for index in range(200):
        top, left, h, w = T.resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3),
                                                T.sample_rng(0, 1, index))
        assert 0 <= top <= height - h and 0 <= left <= width - w and 0 < h <= height and 0 < w <= width
        assert 0.08 * height * width * 0.8 <= h * w <= height * width       # the area before rounding is in range
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
        again = T.resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), T.sample_rng(0, 1, index))
        assert again == (top, left, h, w)
    # the first attempt: area 0.5·5400 = 2700, ratio 1.2: w = round(√3240) = 57, h = round(√2250) = 47
    draws = FixedDraws(integers=[13, 33], uniforms=[0.5, math.log(1.2)])
    assert T.resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), draws) == (13, 33, 47, 57)
    # ten misses (h = 27 > 10 each time), then the centre crop clamped to ratio 4/3: h 10, w round(40/3) = 13
    misses = FixedDraws(uniforms=[1.0, math.log(4 / 3)] * 10)
    assert T.resized_crop_params(10, 100, (0.08, 1.0), (3 / 4, 4 / 3), misses) == (0, 43, 10, 13)


def test_bilinear_resize_matches_a_hand_computation():
    a, b, c, d = 10.0, 20.0, 40.0, 80.0
    up = T.resize(torch.tensor([[[a, b]]]), (1, 4))[0, 0]
    assert up.tolist() == pytest.approx([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b])
    # halving with antialiasing: the triangle filter widened to 2 pixels, weights 3/4, 3/4, 1/4 (renormalised;
    # the one outside the image dropped) around each output pixel's centre
    down = T.resize(torch.tensor([[[a, b, c, d]]]), (1, 2))[0, 0]
    assert down.tolist() == pytest.approx([(3 * a + 3 * b + c) / 7, (b + 3 * c + 3 * d) / 7])
    flat = T.resize(torch.full((3, 12, 16), 77, dtype=torch.uint8), (5, 7))
    assert flat.dtype == torch.float32 and torch.allclose(flat, torch.full((3, 5, 7), 77.0))
    # Pillow's antialiased bilinear resize (uint8, rounded) agrees to within one grey level
    pixels = np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for height, width in [(16, 20), (9, 9), (60, 80)]:
        pillow = np.array(PIL.fromarray(pixels).resize((width, height), PIL.BILINEAR)).astype(np.float32)
        ours = T.resize(torch.from_numpy(pixels).permute(2, 0, 1), (height, width)).permute(1, 2, 0).numpy()
        assert np.abs(ours - pillow).max() <= 1.0


def test_resize_shorter_side_and_centre_crop():
    image = torch.arange(12 * 16, dtype=torch.float32).view(1, 12, 16)
    assert T.Resize(8)(image).shape == (1, 8, 10)                             # ⌊8·16/12⌋ = 10
    assert T.Resize(8)(image.transpose(1, 2)).shape == (1, 10, 8)
    crop = T.CenterCrop(8)(torch.arange(9 * 10).view(1, 9, 10))
    assert torch.equal(crop, torch.arange(9 * 10).view(1, 9, 10)[:, 0:8, 1:9])  # top round(0.5) = 0, left 1
    padded = T.CenterCrop(4)(torch.ones(1, 2, 3))                              # the odd column on the right
    assert padded[0].tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    evaluation = T.imagenet_eval_transform(8).transforms
    assert (evaluation[0].size, evaluation[1].size) == (9, 8)                  # ⌊8 / 0.875⌋ = 9
    assert T.imagenet_eval_transform(224).transforms[0].size == 256


# -------------------------------------------------------------------------------------------------- ImageFolder

def test_image_folder_is_read_back_with_sorted_classes_and_small_images(tmp_path):
    pixels = write_image_folder(tmp_path)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    nested = tmp_path / "train" / "bee" / "more"
    nested.mkdir()
    extra = np.full((10, 14, 3), 9, dtype=np.uint8)
    PIL.fromarray(extra).save(nested / "X.PNG")
    split = load_dataset("imagefolder", tmp_path, image_size=8)
    assert split.classes == ["ant", "bee", "cat"] and split.num_classes == 3 and split.input_shape == (3, 8, 8)
    train, val = split.train, split.test
    assert isinstance(train, ImageFolderDataset) and len(train) == 13 and len(val) == 6
    assert train.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4 and val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.paths[4].endswith("bee/00.png") and train.paths[8].endswith("bee/more/X.PNG")
    assert torch.equal(train.image(0), torch.from_numpy(pixels[train.paths[0]]).permute(2, 0, 1))
    assert torch.equal(train.image(8), torch.from_numpy(extra).permute(2, 0, 1))
    for dataset in (train, val):
        assert all(dataset[i]["input"].shape == (3, 8, 8) for i in range(len(dataset)))
    # validation: resize 12×12 → 9×9, centre crop 8 (top = left = round(0.5) = 0), ImageNet normalisation
    raw = torch.from_numpy(pixels[val.paths[3]]).permute(2, 0, 1)
    expected = T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)(T.resize(raw, (9, 9))[:, 0:8, 0:8])
    torch.testing.assert_close(val[3]["input"], expected)
    assert torch.equal(train[5]["input"], train[5]["input"])
    train.set_epoch(1)
    assert not torch.equal(train[5]["input"], load_dataset("imagefolder", tmp_path, image_size=8).train[5]["input"])


# ---------------------------------------------------------------------------------------------------- factories

FACTORY_MODULE = '''
import torch
from torch.utils.data import TensorDataset

def pairs(data_dir=None):
    x, y = torch.randn(12, 3, 4, 4), torch.arange(12) % 4
    return TensorDataset(x, y), TensorDataset(x[:6], y[:6])

class Split:
    def __init__(self, data_dir):
        self.data_dir = data_dir
        self.train, self.test = pairs()
        self.num_classes, self.classes = 5, list("abcde")

def nothing():
    return 42
'''


def test_factory_returns_a_pair_or_a_split_object(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    split = load_dataset("my_data:pairs")
    assert split.num_classes == 4 and split.input_shape == (3, 4, 4) and len(split.train) == 12
    assert sorted(split.train[3]) == ["index", "input", "target"] and int(split.train[3]["index"]) == 3
    split = load_dataset("my_data:Split", tmp_path / "somewhere")
    assert split.num_classes == 5 and split.classes == list("abcde") and len(split.test) == 6
    for name, message in [("my_data:nothing", r"must return \(train, test\)"), ("my_data:missing", "no callable"),
                          ("no_such_module_here:f", "cannot import module"), (":f", "module:function")]:
        with pytest.raises(DatasetError, match=message):
            load_dataset(name)


def test_an_unknown_name_lists_the_known_datasets(tmp_path):
    with pytest.raises(DatasetError, match="cifar10, cifar100, imagefolder.*module:function"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="give data_dir"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="image_size applies to imagefolder"):
        load_dataset("cifar10", tmp_path, image_size=64)


# ------------------------------------------------------------------------------------------------ bad directories

def _cifar_missing_batch(root):
    write_cifar10(root)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    return root / "cifar-10-batches-py" / "data_batch_3"


def _cifar_truncated(root):
    write_cifar10(root)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:100])
    return path


def _cifar_foreign_object(root):
    write_cifar10(root)
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": print}))
    return path


def _cifar_wrong_shape(root):
    write_cifar10(root)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    write_pickle(path, {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, "python2")
    return path


def _cifar_bad_labels(root):
    write_cifar100(root)
    path = root / "cifar-100-python" / "train"
    write_pickle(path, {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, "bytes-keys")
    return path


def _cifar_empty(root):
    root.mkdir(exist_ok=True)
    return root


def _folder_without_val(root):
    write_image_folder(root)
    for path in (root / "val").rglob("*.png"):
        path.unlink()
    for folder in sorted((root / "val").iterdir()):
        folder.rmdir()
    (root / "val").rmdir()
    return root


def _folder_without_classes(root):
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "train" / "loose.png").write_bytes(b"")
    return root / "train"


def _class_without_images(root):
    write_image_folder(root)
    empty = root / "train" / "dog"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    return empty


def _val_class_unknown_to_train(root):
    write_image_folder(root)
    (root / "val" / "cat").rename(root / "val" / "cow")
    return root / "val"


BAD = {"cifar10: missing directory": ("cifar10", lambda root: root / "nowhere", "cifar-10-batches-py"),
       "cifar10: empty directory": ("cifar10", _cifar_empty, "cifar-10-batches-py"),
       "cifar10: missing batch": ("cifar10", _cifar_missing_batch, "data_batch_1 … data_batch_5"),
       "cifar10: truncated pickle": ("cifar10", _cifar_truncated, "not a readable CIFAR pickle"),
       "cifar10: foreign object": ("cifar10", _cifar_foreign_object, "builtins.print"),
       "cifar10: wrong data shape": ("cifar10", _cifar_wrong_shape, r"uint8 array \[N, 3072\]"),
       "cifar100: labels out of range": ("cifar100", _cifar_bad_labels, r"labels in \[0, 100\)"),
       "imagefolder: missing directory": ("imagefolder", lambda root: root / "nowhere", "DIR/train/<class>"),
       "imagefolder: empty directory": ("imagefolder", _cifar_empty, "no train/ folder"),
       "imagefolder: no val": ("imagefolder", _folder_without_val, "no val/ folder"),
       "imagefolder: no class folders": ("imagefolder", _folder_without_classes, "no class folder"),
       "imagefolder: class without images": ("imagefolder", _class_without_images, "holds no image"),
       "imagefolder: unknown val class": ("imagefolder", _val_class_unknown_to_train, "cow")}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_directory_names_the_path_and_the_expected_layout(tmp_path, case):
    name, make, detail = BAD[case]
    root = tmp_path / "data"
    named = make(root)
    data_dir = named if case.endswith("missing directory") else root
    with pytest.raises(DatasetError) as caught:
        load_dataset(name, data_dir)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and str(named) in message
    assert "expected" in message and ("DIR/" in message) and re.search(detail, message)


# ------------------------------------------------------------------------------------------------------ training

class TinyConvNet(nn.Module):
    """Two conv stages (3 → 4 → 8 channels), pooling and a linear classifier, with its feature points."""

    def __init__(self, num_classes: int, width: int = 4):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)
        self.kd_points = FeaturePoints(stages=["layer1", "layer2"], embedding="fc/input", classifier="fc")

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layer2(self.layer1(x)))))


def recipe_for(method: str, split, seed: int = 1):
    torch.manual_seed(seed)
    setup = Setup(student=TinyConvNet(split.num_classes), teacher=TinyConvNet(split.num_classes, 6),
                  num_classes=split.num_classes, num_train=len(split.train),
                  train_labels=torch.from_numpy(split.train.labels))
    return build_recipe(method, setup)


QUICK = dict(progress=False, num_workers=0, batch_size=8, lr=0.05, eval_batch_size=16)


@pytest.mark.parametrize("method", ["crd", "bake", "cs-kd"])
def test_index_and_class_aware_methods_train_on_cifar_and_image_folders(tmp_path, method):
    write_cifar10(tmp_path / "cifar")
    write_image_folder(tmp_path / "images", train_per_class=6)
    for split in (load_dataset("cifar10", tmp_path / "cifar"), load_dataset("imagefolder", tmp_path / "images",
                                                                             image_size=8)):
        result = Trainer(TrainConfig(epochs=1, **QUICK)).fit(recipe_for(method, split), split.train, split.test)
        assert result.steps >= 1 and math.isfinite(result.history[0]["train_loss"]) and 0 <= result.accuracy <= 100


def test_the_trainer_gives_the_dataset_each_epoch_before_its_batches(tmp_path, monkeypatch):
    """The loop calls the training set's ``set_epoch`` with the epoch (counted across stages) before the stage's
    first batch and before each epoch, so the augmentation differs between epochs and repeats on resume."""
    write_cifar10(tmp_path / "cifar")
    split = load_dataset("cifar10", tmp_path / "cifar", seed=1)
    epochs, set_epoch = [], type(split.train).set_epoch
    monkeypatch.setattr(type(split.train), "set_epoch", lambda self, epoch: (epochs.append(epoch),
                                                                           set_epoch(self, epoch)))
    Trainer(TrainConfig(epochs=2, **QUICK)).fit(recipe_for("kd", split), split.train, split.test)
    assert epochs == [1, 1, 2]


def test_resume_is_exact_with_the_augmented_dataset_and_any_number_of_workers(tmp_path, monkeypatch):
    """Two epochs of CRD in one call without workers equal two one-epoch calls (resumed) with two workers."""
    monkeypatch.setattr(loop_module.metrics, "plot_run", lambda *args: {})     # curves are not under test here
    write_cifar10(tmp_path / "cifar")
    split = load_dataset("cifar10", tmp_path / "cifar", seed=1)
    config = dict(QUICK, epochs=2)
    reference_recipe = recipe_for("crd", split)
    reference = Trainer(TrainConfig(out_dir=tmp_path / "whole", **config)).fit(reference_recipe, split.train,
                                                                               split.test)
    config["num_workers"] = 2
    for piece in range(2):
        resumed_recipe = recipe_for("crd", split, seed=1 if piece == 0 else 50 + piece)
        resumed = Trainer(TrainConfig(out_dir=tmp_path / "pieces", resume=piece > 0, stop_after_epochs=1,
                                      **config)).fit(resumed_recipe, split.train, split.test)
    assert resumed.completed
    assert_same_run(resumed, resumed_recipe, reference, reference_recipe)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Your own data.**"):readme.index("**ImageNet-scale models.**")]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.S)
    write_cifar100(tmp_path / "data")
    write_image_folder(tmp_path / "imagenet")
    (tmp_path / "my_project").mkdir()
    (tmp_path / "my_project" / "__init__.py").write_text("")
    (tmp_path / "my_project" / "data.py").write_text(FACTORY_MODULE + "\nmake_datasets = pairs\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = {"distill": distill}
    exec(example.replace("image_size=224", "image_size=8"), namespace)
    assert namespace["split"].num_classes == 4 and len(namespace["split"].train) == 12


def test_set_dataset_epoch_reaches_a_wrapped_dataset(tmp_path):
    write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path).train
    assert set_dataset_epoch(torch.utils.data.Subset(train, [0, 1]), 3) and train.epoch == 3
    assert not set_dataset_epoch(as_sample_dataset(TensorDataset(torch.zeros(4, 3, 2, 2), torch.arange(4))), 3)
