"""``torchvision:NAME`` and ``timm:NAME`` models and the feature taps derived from their structure.

The first part always runs: small fake ``torchvision`` and ``timm`` packages (put in ``sys.modules``) return real
``nn.Module``s shaped like the hubs' families (a ResNet, a ``features`` + ``classifier`` net, a ViT-like token model,
a timm model with ``feature_info`` and ``pretrained_cfg``). The real-package tests at the end run only where
torchvision and timm are installed (``pip install torchvision timm``); CI does not install them, so they skip there.
"""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn

from kdkernels.distill import FeatureTaps, Setup, build_recipe
from kdkernels.distill.hub_models import hub_model
from kdkernels.distill.terms import StepContext


# ------------------------------------------------------------------------------------------------ fake models

def conv(in_channels, out_channels, stride):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.ReLU())


class TinyResNet(nn.Module):
    """torchvision's ResNet layout: stem, ``layer1``..``layer4``, ``avgpool``, ``fc``."""

    def __init__(self, width=4, num_classes=1000):
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(3, width, 3, 2, 1), nn.ReLU()
        self.layer1, self.layer2 = conv(width, width, 1), conv(width, 2 * width, 2)
        self.layer3, self.layer4 = conv(2 * width, 4 * width, 2), conv(4 * width, 8 * width, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8 * width, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.relu(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyFeaturesNet(nn.Module):
    """MobileNetV2's layout: ``features`` (strides 2, 1, 2, 1, 2), then ``classifier`` = dropout + linear."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(conv(3, 4, 2), conv(4, 4, 1), conv(4, 8, 2), conv(8, 8, 1), conv(8, 16, 2))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class TinyViT(nn.Module):
    """torchvision's ViT layout: ``conv_proj`` (patches), ``encoder`` on tokens, ``heads.head``; takes only 224²."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 8, 32, 32)
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(8, num_classes))

    def forward(self, x):
        if x.shape[-2:] != (224, 224):
            raise ValueError(f"Wrong image size {tuple(x.shape[-2:])}: expected 224×224")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        return self.heads(self.encoder(tokens)[:, 0])


class TinyGoogLeNet(nn.Module):
    """GoogLeNet's layout: no trunk child, the model's own children, then a global pool, dropout and ``fc``."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1, self.maxpool1 = conv(3, 4, 2), nn.MaxPool2d(2)
        self.conv2, self.conv3 = conv(4, 8, 1), conv(8, 16, 2)
        self.avgpool, self.dropout = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.conv3(self.conv2(self.maxpool1(self.conv1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class ChannelsLast(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1)

    def forward(self, x):   # N×H×W×C in and out, as Swin's stages
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class TinySwin(nn.Module):
    """Swin's layout: ``features`` whose children give N×H×W×C maps, then ``head``."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(ChannelsLast(3, 8, 4), ChannelsLast(8, 16, 2))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x.permute(0, 2, 3, 1)).mean((1, 2)))


class TinySqueezeNet(nn.Module):
    """SqueezeNet's layout: ``features``, then a 1×1 convolution classifier and a global pool (no nn.Linear)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(conv(3, 8, 2), conv(8, 16, 2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class TimmNet(nn.Module):
    """timm's layout: a stem, ``stages``, ``head.fc``, ``feature_info`` and ``pretrained_cfg``."""

    def __init__(self, num_classes=1000, classifier="head.fc"):
        super().__init__()
        self.conv_stem, self.act1 = nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU()
        self.stages = nn.Sequential(conv(4, 8, 2), conv(8, 16, 1), conv(16, 16, 2))
        self.head = nn.Module()
        self.head.fc = nn.Linear(16, num_classes)
        self.feature_info = [dict(num_chs=4, reduction=2, module="act1"),
                             dict(num_chs=8, reduction=4, module="stages.0"),
                             dict(num_chs=16, reduction=4, module="stages.1"),
                             dict(num_chs=16, reduction=8, module="stages.2")]
        self.pretrained_cfg = dict(classifier=classifier, input_size=(3, 224, 224))

    def get_classifier(self):
        return self.head.fc

    def forward(self, x):
        return self.head.fc(self.stages(self.act1(self.conv_stem(x))).mean((2, 3)))


class TimmTokenNet(nn.Module):
    """A timm ViT: every block at reduction 16, outputs are tokens."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 16, 16)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, num_classes)
        self.feature_info = [dict(num_chs=8, reduction=16, module=f"blocks.{i}") for i in range(2)]
        self.pretrained_cfg = dict(classifier="head", input_size=(3, 224, 224))

    def forward(self, x):
        return self.head(self.blocks(self.patch_embed(x).flatten(2).transpose(1, 2)).mean(1))


TORCHVISION_MODELS = {"resnet18": TinyResNet, "resnet50": lambda num_classes: TinyResNet(8, num_classes),
                      "mobilenet_v2": TinyFeaturesNet, "vit_b_16": TinyViT, "googlenet": TinyGoogLeNet,
                      "swin_t": TinySwin, "squeezenet1_0": TinySqueezeNet}
TIMM_MODELS = {"resnet18": TimmNet, "vit_tiny_patch16_224": TimmTokenNet,
               "resnet26": lambda num_classes: TimmNet(num_classes, classifier="fc")}


def fake_torchvision() -> types.ModuleType:
    def get_model(name, *, weights, num_classes):
        assert weights is None, "hub_model must never ask for weights"
        return TORCHVISION_MODELS[name](num_classes=num_classes)

    package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.get_model = get_model
    models.list_models = lambda module=None: sorted(TORCHVISION_MODELS)
    package.models = models
    return package


def fake_timm() -> types.ModuleType:
    def create_model(name, *, pretrained, num_classes):
        assert pretrained is False, "hub_model must never ask for pretrained weights"
        return TIMM_MODELS[name.partition(".")[0]](num_classes=num_classes)

    package = types.ModuleType("timm")
    package.create_model = create_model
    package.list_models = lambda: sorted(TIMM_MODELS)
    return package


@pytest.fixture
def fake_hubs(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision())
    monkeypatch.setitem(sys.modules, "timm", fake_timm())


def tapped_shapes(model, size=64):
    """(stage shapes, embedding shape, output shape) of an eval forward of 2×3×size×size through the taps."""
    points = model.kd_points
    taps = FeatureTaps(model, [*points.stages, points.embedding])
    model.eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, size, size))
    values = taps.pop()
    taps.remove()
    return [tuple(values[stage].shape) for stage in points.stages], tuple(values[points.embedding].shape), \
        tuple(output.shape)


# ---------------------------------------------------------------------------------------------- derived taps

def test_a_resnet_takes_its_four_layers(fake_hubs):
    model = hub_model("torchvision:resnet18", 7)
    points = model.kd_points
    assert (points.stages, points.embedding, points.classifier) == (["layer1", "layer2", "layer3", "layer4"],
                                                                     "fc/input", "fc")
    assert points.pre_activation == []
    assert tapped_shapes(model) == ([(2, 4, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)], (2, 32), (2, 7))


def test_a_features_net_takes_the_last_child_before_each_downsampling(fake_hubs):
    model = hub_model("torchvision:mobilenet_v2", 5)
    points = model.kd_points
    assert points.stages == ["features.1", "features.3", "features.4"]
    assert (points.embedding, points.classifier) == ("classifier.1/input", "classifier.1")
    assert tapped_shapes(model) == ([(2, 4, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8)], (2, 16), (2, 5))


def test_a_net_without_a_trunk_child_uses_its_own_children_up_to_the_global_pool(fake_hubs):
    model = hub_model("torchvision:googlenet", 5)
    points = model.kd_points
    assert (points.stages, points.classifier) == (["conv1", "conv2", "conv3"], "fc")
    assert tapped_shapes(model) == ([(2, 4, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8)], (2, 16), (2, 5))


def test_channels_last_stages_are_not_maps(fake_hubs):
    points = hub_model("torchvision:swin_t", 5).kd_points
    assert (points.stages, points.embedding, points.classifier) == ([], "head/input", "head")


def test_a_convolution_classifier_without_a_linear_layer(fake_hubs):
    points = hub_model("torchvision:squeezenet1_0", 5).kd_points
    assert (points.stages, points.embedding, points.classifier) == (["features.0", "features.1"],
                                                                     "classifier.1/input", "classifier.1")


def test_the_probe_leaves_the_model_in_train_mode_with_its_weights(fake_hubs):
    torch.manual_seed(0)
    model = hub_model("torchvision:mobilenet_v2", 5)
    assert model.training
    state = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(0)
    plain = TinyFeaturesNet(num_classes=5)
    assert all(torch.equal(state[name], value) for name, value in plain.state_dict().items())
    assert not any(module._forward_hooks for module in model.modules())


def test_a_token_model_has_no_stages_and_feature_methods_ask_for_taps(fake_hubs):
    model = hub_model("torchvision:vit_b_16", 3)   # refuses 64×64: probed at 224×224
    points = model.kd_points
    assert (points.stages, points.embedding, points.classifier) == ([], "heads.head/input", "heads.head")
    setup = Setup(student=model, teacher=hub_model("torchvision:vit_b_16", 3), num_classes=3)
    with pytest.raises(ValueError, match="TinyViT declares no stages feature points: pass the tap paths"):
        build_recipe("at", setup)
    build_recipe("pkt", setup)   # the embedding is there


def test_timm_stages_are_the_last_feature_info_module_of_each_reduction(fake_hubs):
    model = hub_model("timm:resnet18", 6)
    points = model.kd_points
    assert points.stages == ["act1", "stages.1", "stages.2"]
    assert (points.embedding, points.classifier) == ("head.fc/input", "head.fc")
    assert tapped_shapes(model) == ([(2, 4, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8)], (2, 16), (2, 6))


def test_timm_classifier_falls_back_to_get_classifier(fake_hubs):
    assert hub_model("timm:resnet26", 6).kd_points.classifier == "head.fc"   # pretrained_cfg names a missing "fc"
    assert hub_model("timm:resnet18.a1_in1k", 6).kd_points.stages[-1] == "stages.2"   # a pretrained tag is a name


def test_timm_token_stages_are_not_maps(fake_hubs):
    points = hub_model("timm:vit_tiny_patch16_224", 4).kd_points
    assert (points.stages, points.embedding, points.classifier) == ([], "head/input", "head")


# ---------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("package, spec", [("timm", "timm:resnet18"), ("torchvision", "torchvision:resnet18")])
def test_a_missing_package_says_how_to_install_it(monkeypatch, package, spec):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=f"{spec} needs the {package} package, which is not installed: "
                                          f"pip install {package}"):
        hub_model(spec, 10)


def test_a_package_that_cannot_load_is_named(monkeypatch):
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision":
                raise RuntimeError("operator torchvision::nms does not exist")
            return None

    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ImportError, match="torchvision is installed but cannot be imported .RuntimeError: operator"):
        hub_model("torchvision:resnet18", 10)


@pytest.mark.parametrize("spec, message", [
    ("torchvision:resnet81", "torchvision has no classification model 'resnet81'; close matches: resnet18"),
    ("timm:vit_tiny_patch16", "timm has no classification model 'vit_tiny_patch16'; close matches: vit_tiny_patch16_"),
    ("timm:nothing_like_it", "timm has no classification model 'nothing_like_it'$"),
    ("keras:resnet50", "unknown model hub in 'keras:resnet50': expected 'torchvision:NAME' or 'timm:NAME'"),
    ("resnet50", "unknown model hub in 'resnet50'"),
    ("timm:", "unknown model hub in 'timm:'")])
def test_unknown_names_and_hubs(fake_hubs, spec, message):
    with pytest.raises(ValueError, match=message):
        hub_model(spec, 10)


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_num_classes_must_be_a_positive_int(fake_hubs, num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        hub_model("timm:resnet18", num_classes)


# ------------------------------------------------------------------------------------ feature methods train

def one_step(recipe, num_classes):
    """One SGD step of the recipe's last stage on random 8×3×32×32 data: a finite loss, and the student moves."""
    torch.manual_seed(0)
    batch = {"input": torch.randn(8, 3, 32, 32), "target": torch.randint(0, num_classes, (8,)),
             "index": torch.arange(8)}
    distiller = recipe.stages[-1].distiller
    distiller.build(batch).activate().train()
    parameters = distiller.trainable_parameters()
    before = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    output = distiller(batch, StepContext(epoch=1, epochs=1, step=0, batch=batch))
    assert torch.isfinite(output.loss)
    optimizer.zero_grad()
    output.loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, parameters))
    return output


def test_at_between_a_torchvision_student_and_a_timm_teacher(fake_hubs):
    setup = Setup(student=hub_model("torchvision:mobilenet_v2", 10), teacher=hub_model("timm:resnet18", 10),
                  num_classes=10, num_train=8)
    output = one_step(build_recipe("at", setup), 10)
    assert set(output.terms) == {"ce_student", "at"}


def test_fitnet_between_torchvision_resnets(fake_hubs):
    setup = Setup(student=hub_model("torchvision:resnet18", 10), teacher=hub_model("torchvision:resnet50", 10),
                  num_classes=10, num_train=8)
    recipe = build_recipe("fitnet", setup)
    assert [t.reads for t in recipe.stages[-1].distiller.terms if t.name == "hint"] == [("student:layer2",
                                                                                        "teacher:layer2")]
    one_step(recipe, 10)


# ---------------------------------------------------------------------------- real packages (when installed)

def installed(package: str):
    """The package, or a skip: not installed (CI), or installed but unable to load with this torch."""
    try:
        return importlib.import_module(package)
    except ImportError:
        pytest.skip(f"{package} is not installed (pip install {package})")
    except Exception as error:   # e.g. a torchvision binary built for another torch
        pytest.skip(f"{package} is installed but cannot be imported here: {type(error).__name__}: {error}")


def expect_taps(model, stages, reductions, classifier, width):
    points = model.kd_points
    assert (points.stages, points.embedding, points.classifier) == (stages, f"{classifier}/input", classifier)
    stage_shapes, embedding_shape, output_shape = tapped_shapes(model, 64)
    assert [shape[-1] for shape in stage_shapes] == [64 // r for r in reductions]
    assert all(len(shape) == 4 and shape[0] == 2 and shape[-1] == shape[-2] for shape in stage_shapes)
    assert embedding_shape == (2, width) and output_shape == (2, 10)


@pytest.mark.parametrize("name, stages, reductions, classifier, width", [
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"], [4, 8, 16, 32], "fc", 512),
    ("mobilenet_v2", ["features.1", "features.3", "features.6", "features.13", "features.18"], [2, 4, 8, 16, 32],
     "classifier.1", 1280),
    ("efficientnet_b0", ["features.1", "features.2", "features.3", "features.5", "features.8"], [2, 4, 8, 16, 32],
     "classifier.1", 1280)])
def test_real_torchvision_taps(name, stages, reductions, classifier, width):
    installed("torchvision")
    expect_taps(hub_model(f"torchvision:{name}", 10), stages, reductions, classifier, width)


def test_real_torchvision_vit_has_no_stages():
    installed("torchvision")
    model = hub_model("torchvision:vit_b_16", 10)
    assert (model.kd_points.stages, model.kd_points.embedding) == ([], "heads.head/input")
    with pytest.raises(ValueError, match="declares no stages feature points: pass the tap paths explicitly"):
        build_recipe("at", Setup(student=model, teacher=model, num_classes=10))


@pytest.mark.parametrize("name, stages, classifier, width", [
    ("resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"], "fc", 512),
    ("mobilenetv3_small_100", ["bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5"], "classifier", 1024)])
def test_real_timm_taps(name, stages, classifier, width):
    installed("timm")
    expect_taps(hub_model(f"timm:{name}", 10), stages, [2, 4, 8, 16, 32], classifier, width)


def test_real_timm_at_step():
    installed("timm")
    setup = Setup(student=hub_model("timm:mobilenetv3_small_100", 10), teacher=hub_model("timm:resnet18", 10),
                  num_classes=10, num_train=8)
    one_step(build_recipe("at", setup), 10)
