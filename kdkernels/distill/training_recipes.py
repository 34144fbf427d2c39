"""Training recipes: the optimiser and schedule settings of the protocols results are compared under, selected by
``kdkernels distill --recipe NAME`` (any option given explicitly overrides the recipe's value).

* ``digits``: the bundled demo's settings (30 epochs, batch 64, SGD lr 0.05, momentum 0.9, weight decay 5e-4, a
  cosine schedule; teachers trained 30 epochs).
* ``cifar``: mdistiller's and RepDistiller's CIFAR-100 protocol (mdistiller ``configs/cifar100/*.yaml`` SOLVER:
  240 epochs, batch 64, SGD lr 0.05, momentum 0.9, weight decay 5e-4, ×0.1 at epochs 150, 180 and 210; RepDistiller
  ``train_student.py`` forces lr 0.01 for MobileNetV2, ShuffleV1 and ShuffleV2 students, as mdistiller's configs for
  those students do).
* ``imagenet``: mdistiller's ImageNet protocol (``configs/imagenet/r34_r18/*.yaml`` SOLVER: 100 epochs, batch 256,
  SGD lr 0.1, momentum 0.9, weight decay 1e-4, ×0.1 at epochs 30, 60 and 90).
"""
from __future__ import annotations

import difflib

TRAINING_OPTIONS = ("epochs", "teacher_epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                    "schedule", "milestones", "gamma")

TRAINING_RECIPES: dict[str, dict] = {
    "digits": {"epochs": 30, "teacher_epochs": 30, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
               "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "milestones": (), "gamma": 0.1},
    "cifar": {"epochs": 240, "teacher_epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
              "momentum": 0.9, "weight_decay": 5e-4, "schedule": "multistep", "milestones": (150, 180, 210),
              "gamma": 0.1},
    "imagenet": {"epochs": 100, "teacher_epochs": 100, "batch_size": 256, "optimizer": "sgd", "lr": 0.1,
                 "momentum": 0.9, "weight_decay": 1e-4, "schedule": "multistep", "milestones": (30, 60, 90),
                 "gamma": 0.1},
}

# Students the official CIFAR protocol trains at a smaller learning rate (RepDistiller train_student.py).
SMALL_LR_STUDENTS = {"cifar": (("MobileNetV2", "ShuffleV1", "ShuffleV2"), 0.01)}


def training_recipe(name: str, student: str | None = None) -> dict:
    """The options of recipe ``name`` for ``student`` (a model name: the CIFAR recipe lowers the learning rate of
    the students its official code does). A ValueError lists the recipes for an unknown name."""
    if name not in TRAINING_RECIPES:
        close = difflib.get_close_matches(str(name), list(TRAINING_RECIPES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown training recipe {name!r}{hint} (recipes: {', '.join(TRAINING_RECIPES)})")
    options = dict(TRAINING_RECIPES[name])
    students, lr = SMALL_LR_STUDENTS.get(name, ((), None))
    if student in students:
        options["lr"] = lr
    return options
