"""The trainer layer: distillation strategies on one :class:`Distiller` abstraction.

    from kdkernels import distill
    split = distill.load_digits(train_size=300)
    setup = distill.Setup(student=distill.digits_model("student-cnn"), teacher=trained_teacher, num_classes=10)
    recipe = distill.build_recipe("dkd", setup)            # official hyperparameters; override with keywords
    result = distill.Trainer(distill.TrainConfig(epochs=30)).fit(recipe, split.train, split.test)

Strategies call only kdkernels' public losses. See ``kdkernels list`` for every method.
"""
from kdkernels.distill.data import (ClassAwareBatchSampler, IndexedDataset, PairBatchSampler, ShuffleBatchSampler,
                                    TensorDictDataset, load_digits)
from kdkernels.distill.distiller import BATCH, Distiller, DistillOutput
from kdkernels.distill.hooks import FeatureTaps
from kdkernels.distill.models import DigitsCNN, DigitsMLP, digits_model
from kdkernels.distill.recipe import FeaturePoints, Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import Method, build_recipe, get_method, list_methods, register
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, StepContext, Term
from kdkernels.distill.config import RunResult, TrainConfig
from kdkernels.distill.trainer import Trainer
from kdkernels.distill.cache import CachedTeacher, cache_teacher
from kdkernels.distill.updates import EMA, Snapshot
from kdkernels.distill.optimisers import GradientReversal, Optimiser, grad_reverse
from kdkernels.distill.meta_steps import MetaStep
from kdkernels.distill.sources import GeneratorSource, Source, SyntheticData, TensorSource
from kdkernels.distill.views import (CutMix, Downsample, GaussianNoise, HorizontalFlip, MixUp, RandomCrop, Rotate90,
                                     Transform, View)
from kdkernels.distill.modalities import Degrade, Profiles, RandomProjection, modality_views

__all__ = ["Distiller", "DistillOutput", "Term", "FunctionTerm", "CrossEntropyTerm", "StepContext", "FeatureTaps",
           "FeaturePoints", "feature_points", "Setup", "Stage", "Recipe", "Method", "register", "list_methods",
           "get_method", "build_recipe", "load_digits", "TensorDictDataset", "IndexedDataset",
           "ShuffleBatchSampler", "ClassAwareBatchSampler", "PairBatchSampler", "DigitsCNN", "DigitsMLP",
           "digits_model", "Trainer", "TrainConfig", "RunResult", "cache_teacher", "CachedTeacher", "EMA", "Snapshot",
           "BATCH", "View", "Transform", "Rotate90", "RandomCrop", "HorizontalFlip", "GaussianNoise", "Downsample",
           "MixUp", "CutMix", "Optimiser", "GradientReversal", "grad_reverse", "GeneratorSource", "Source",
           "TensorSource", "SyntheticData", "MetaStep", "Degrade", "Profiles", "RandomProjection", "modality_views"]

from kdkernels.distill import meta, term_gradients      # noqa: E402  meta-steps and per-term gradients (modules)

__all__ += ["meta", "term_gradients"]

from kdkernels.distill.datasets import (DatasetError, DatasetSplit, load_dataset,  # noqa: E402
                                        set_dataset_epoch)

__all__ += ["load_dataset", "DatasetSplit", "DatasetError", "set_dataset_epoch"]
