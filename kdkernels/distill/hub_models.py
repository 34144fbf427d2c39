"""ImageNet-scale students and teachers from torchvision and timm, each with its distillation taps.

``hub_model("torchvision:resnet18", num_classes)`` calls ``torchvision.models.get_model(NAME, weights=None,
num_classes=...)``; ``hub_model("timm:resnet18", num_classes)`` calls ``timm.create_model(NAME, pretrained=False,
num_classes=...)``. Weights are never downloaded. The package is imported only when such a model is asked for.

Every model gets a ``kd_points`` attribute (:class:`~kdkernels.distill.recipe.FeaturePoints`) derived from its
structure; ``pre_activation`` stays empty (neither hub exposes the BN before a stage's last ReLU), so OFD and AB need
explicit taps.

**torchvision.** A ResNet-style model (``layer1``..``layer4`` and ``fc``: ResNet, ResNeXt, Wide ResNet) takes those
four stages, embedding ``fc/input``, classifier ``fc``, as :func:`~kdkernels.distill.recipe.feature_points` infers.
Any other model is probed: one forward of a zero image in eval mode under ``no_grad`` (64×64, or 224×224 / 299×299
when the model refuses the smaller size), with forward hooks recording, in call order, the output shape of

- the children of its feature trunk, the first child named ``features`` (AlexNet, VGG, SqueezeNet, DenseNet,
  MobileNetV2/V3, EfficientNet, ConvNeXt, Swin), ``trunk_output`` (RegNet), ``layers`` (MNASNet) or ``blocks``
  (MaxViT); without one, the model's own children (ShuffleNetV2, GoogLeNet, Inception v3, ViT);
- every ``nn.Linear`` (and ``nn.Conv2d``).

The trunk's spatial part is its children's outputs up to the first that is not an N×C×H×W map (a 4-D tensor with
H = W: the probe is square, so a channels-last output such as Swin's N×H×W×C is not one) or that is an adaptive
pooling layer (the global pool). The stages are the last child before each downsampling (the spatial size falls to
at most 2/3: a stride of 2 or more, not an unpadded convolution's trim) and the last child of that part, as the
trunk outputs them (MobileNetV2: ``features.1``, ``.3``, ``.6``, ``.13``, ``.18``; VGG: the ReLU before each
max-pool, then the last max-pool; DenseNet's last is ``norm5``, before the model's final ReLU). A child called more
than once is never a stage. When no child gives a map, or a child with parameters that is not on the classifier's
path runs after the spatial part (ViT's encoder works on tokens), the model has no spatial stages: ``stages = []``,
and a method that needs stages asks for explicit taps. The classifier is the last ``nn.Linear`` the forward called
(else the last called ``nn.Conv2d`` with ``num_classes`` outputs: SqueezeNet's, whose input is a map, not a pooled
vector), the embedding its input.

**timm.** The stages are the modules of ``model.feature_info`` (timm's own feature pyramid: module paths, channels
and reductions), the last one of each reduction, so a ViT's twelve blocks at reduction 16 give one candidate. A probe
(64×64, or the model's ``pretrained_cfg["input_size"]``) checks that each is an N×C×H×W map with the channels that
``feature_info`` declares; otherwise (ViT tokens, Swin's channels-last maps) ``stages = []``. The classifier is
``pretrained_cfg["classifier"]`` (``default_cfg`` in older timm; the first of a tuple such as LeViT's two heads), or
where that path is missing the module ``get_classifier()`` returns; the embedding is its input.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import importlib
from typing import Sequence

import torch
from torch import nn

from kdkernels.distill.hooks import find_module
from kdkernels.distill.recipe import FeaturePoints, feature_points

HUBS = {"torchvision": "pip install torchvision", "timm": "pip install timm"}
TRUNK_NAMES = ("features", "trunk_output", "layers", "blocks")
TORCHVISION_PROBE_SIZES = (64, 224, 299)
PROBE_SIZE = 64


def hub_model(spec: str, num_classes: int) -> nn.Module:
    """An untrained ``"torchvision:NAME"`` or ``"timm:NAME"`` classifier with ``num_classes`` outputs and its
    ``kd_points``. Raises ImportError when the package is missing or broken, ValueError for an unknown prefix or
    name (listing close matches)."""
    prefix, _, name = spec.partition(":")
    if prefix not in HUBS or not name:
        raise ValueError(f"unknown model hub in {spec!r}: expected 'torchvision:NAME' or 'timm:NAME'")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{spec}: num_classes must be a positive int, got {num_classes!r}")
    package = import_hub(prefix, spec)
    if prefix == "torchvision":
        check_name(spec, name, package.models.list_models(module=package.models))
        model = package.models.get_model(name, weights=None, num_classes=num_classes)
        model.kd_points = torchvision_points(model, num_classes)
    else:
        check_name(spec, name.partition(".")[0], package.list_models())
        model = package.create_model(name, pretrained=False, num_classes=num_classes)
        model.kd_points = timm_points(model)
    return model


def import_hub(package: str, spec: str):
    """The hub's package, or an ImportError telling how to install it (or that the installed one cannot load)."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"{spec} needs the {package} package, which is not installed: {HUBS[package]}") from error
    except Exception as error:   # a binary built for another torch fails with RuntimeError/OSError
        raise ImportError(f"{spec}: {package} is installed but cannot be imported ({type(error).__name__}: {error}); "
                          f"install a build that matches torch {torch.__version__}: {HUBS[package]}") from error


def check_name(spec: str, name: str, known: Sequence[str]) -> None:
    """A ValueError listing the closest known names when ``name`` is not one of ``known``."""
    known = list(known)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    hub = spec.partition(":")[0]
    raise ValueError(f"{spec}: {hub} has no classification model {name!r}{hint}")


# ------------------------------------------------------------------------------------------------------- probe

@dataclasses.dataclass
class Call:
    """One module call of the probe: its path, module and output shape (``None`` when not a tensor)."""

    path: str
    module: nn.Module
    shape: tuple[int, ...] | None


def probe(model: nn.Module, paths: Sequence[str], sizes: Sequence[int]) -> list[Call]:
    """The calls of the modules at ``paths`` in one eval-mode forward of a zero image (the first size of ``sizes``
    the model accepts), in call order. The model's mode and state are left as they were."""
    modules = {path: find_module(model, path) for path in paths}
    calls: list[Call] = []

    def recorder(path, module):
        def hook(_module, _inputs, output):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            calls.append(Call(path, module, shape))
        return hook

    handles = [module.register_forward_hook(recorder(path, module)) for path, module in modules.items()]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    was_training = model.training
    errors = []
    try:
        model.eval()
        for size in sizes:
            calls.clear()
            try:
                with torch.no_grad():
                    model(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
                return calls
            except Exception as error:   # e.g. a ViT that only takes its own image size
                errors.append(f"{size}×{size}: {type(error).__name__}: {error}")
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    raise ValueError(f"cannot derive the feature taps of {type(model).__name__}: no probe input ran "
                     f"({'; '.join(errors)})")


def is_map(shape: tuple[int, ...] | None) -> bool:
    """An N×C×H×W map of the square probe (H = W)."""
    return shape is not None and len(shape) == 4 and shape[-1] == shape[-2]


def is_downsampling(before: int, after: int) -> bool:
    """A drop of the spatial size to at most 2/3 (a stride ≥ 2, any rounding), not an unpadded convolution's
    trim (Inception's 111 → 109)."""
    return 3 * after <= 2 * before


def last_per_resolution(calls: Sequence[Call]) -> list[str]:
    """The path of the last call before each downsampling, and of the last call."""
    stages = []
    for index, call in enumerate(calls):
        if index + 1 == len(calls) or is_downsampling(call.shape[-1], calls[index + 1].shape[-1]):
            stages.append(call.path)
    return stages


def on_path(path: str, target: str) -> bool:
    """Whether ``path`` is ``target`` or one of its ancestors (``""`` is the root)."""
    return path == target or path == "" or target.startswith(path + ".")


# ------------------------------------------------------------------------------------------------- torchvision

def trunk_of(model: nn.Module) -> str:
    """The path of the model's feature trunk (see the module docstring), ``""`` for the model itself."""
    children = dict(model.named_children())
    return next((name for name in TRUNK_NAMES if name in children), "")


def torchvision_points(model: nn.Module, num_classes: int) -> FeaturePoints:
    """The feature points of a torchvision classifier (see the module docstring)."""
    try:
        return feature_points(model)   # ResNet-style: layer1..layer4, fc
    except ValueError:
        pass
    trunk = trunk_of(model)
    prefix = f"{trunk}." if trunk else ""
    children = [prefix + name for name, _ in find_module(model, trunk).named_children()]
    heads = [path for path, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    calls = probe(model, sorted(set(children) | set(heads)), TORCHVISION_PROBE_SIZES)
    classifier = classifier_of(model, calls, num_classes)
    trunk_calls = [call for call in calls if call.path in set(children)]
    return FeaturePoints(stages=stages_of(trunk_calls, classifier), embedding=f"{classifier}/input",
                         classifier=classifier)


def stages_of(trunk_calls: Sequence[Call], classifier: str) -> list[str]:
    """The stage paths of the trunk's calls, or ``[]`` when its spatial part does not feed the classifier."""
    spatial = []
    for call in trunk_calls:
        if not is_map(call.shape) or isinstance(call.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            break
        spatial.append(call)
    after = trunk_calls[len(spatial):]
    if not spatial or any(has_parameters(call.module) and not on_path(call.path, classifier) for call in after):
        return []
    calls_per_path = collections.Counter(call.path for call in trunk_calls)
    return [path for path in last_per_resolution(spatial) if calls_per_path[path] == 1]   # a reused child is no tap


def has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def classifier_of(model: nn.Module, calls: Sequence[Call], num_classes: int) -> str:
    """The last ``nn.Linear`` called, else the last called ``nn.Conv2d`` with ``num_classes`` outputs."""
    linear = [call.path for call in calls if isinstance(call.module, nn.Linear)]
    if linear:
        return linear[-1]
    conv = [call.path for call in calls
            if isinstance(call.module, nn.Conv2d) and call.module.out_channels == num_classes]
    if conv:
        return conv[-1]
    raise ValueError(f"cannot find the classifier of {type(model).__name__}: its forward calls no nn.Linear and no "
                     f"nn.Conv2d with {num_classes} outputs")


# -------------------------------------------------------------------------------------------------------- timm

def timm_points(model: nn.Module) -> FeaturePoints:
    """The feature points of a timm classifier (see the module docstring)."""
    classifier = timm_classifier(model)
    candidates: dict[int, dict] = {}
    for info in getattr(model, "feature_info", None) or []:
        candidates.pop(info["reduction"], None)   # re-inserted: insertion order stays shallow to deep
        candidates[info["reduction"]] = info
    entries = list(candidates.values())
    modules = dict(model.named_modules())
    stages = []
    if entries and all(info["module"] in modules for info in entries):
        config = timm_config(model)
        size = config.get("input_size", (3, 224, 224))[-1]
        calls = {call.path: call for call in probe(model, [info["module"] for info in entries], (PROBE_SIZE, size))}
        if all(info["module"] in calls and is_map(calls[info["module"]].shape)
               and calls[info["module"]].shape[1] == info["num_chs"] for info in entries):
            stages = [info["module"] for info in entries]
    return FeaturePoints(stages=stages, embedding=f"{classifier}/input", classifier=classifier)


def timm_config(model: nn.Module) -> dict:
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return dict(config)


def timm_classifier(model: nn.Module) -> str:
    """``pretrained_cfg["classifier"]`` (the first of several heads) when the model has it, else the path of
    ``get_classifier()``."""
    path = timm_config(model).get("classifier")
    if isinstance(path, (tuple, list)):
        path = path[0] if path else None
    modules = dict(model.named_modules())
    if isinstance(path, str) and path in modules and not isinstance(modules[path], nn.Identity):
        return path
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, (tuple, list)):
        head = head[0] if head else None
    found = next((name for name, module in modules.items() if head is not None and module is head and name), None)
    if found is None:
        raise ValueError(f"cannot find the classifier of {type(model).__name__}: its pretrained_cfg names "
                         f"{path!r} and get_classifier() gives no submodule")
    return found
