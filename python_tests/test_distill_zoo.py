"""The CIFAR model zoo (kdkernels.distill.zoo) against facts of the official definitions.

The facts in data/cifar_zoo.json were recorded by running RepDistiller's own model code
(https://github.com/HobbitLong/RepDistiller, commit b84f547c5db6a35318d4671d7d5c4de74c822403: models/__init__.py's
``model_dict`` and models/resnet.py, resnetv2.py, wrn.py, vgg.py, mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py)
with num_classes=100: each model's state-dict keys and shapes in order, its parameter count, the features of
``model(x, is_feat=True[, preact=True])`` (shape, mean, mean |value|), the module paths of ``get_feat_modules()`` and
``get_bn_before_relu()``, and its logits on a seeded input, with every state-dict entry set by the rule in the
file's provenance (reproduced by :func:`official_rule_state`); then a training-mode forward's outputs and running
statistics.
mdistiller's ``mdistiller/models/cifar/`` has the same state dicts for the names both zoos share.
"""
from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from kdkernels.distill import build_recipe, zoo
from kdkernels.distill.hooks import FeatureTaps
from kdkernels.distill.models import create, digits_model, names
from kdkernels.distill.recipe import Setup, feature_points
from kdkernels.distill.terms import StepContext

FACTS = json.loads((Path(__file__).parent / "data" / "cifar_zoo.json").read_text())
MODELS = FACTS["models"]
NAMES = list(MODELS)
NUM_CLASSES = FACTS["provenance"]["num_classes"]
VIT_NAMES = ("student-vit", "student-vit-distilled", "teacher-vit", "student-vit-cifar", "student-vit-distilled-cifar",
             "teacher-vit-cifar")


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Batches of 2 to 4 small images: a second intra-op thread saves nothing and, on a busy 2-core machine, costs
    several times the work in thread-pool waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recorded_state(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """The official state dict's (key, shape) pairs, in order."""
    entries = []
    for entry in MODELS[name]["state_dict"].split():
        key, shape = entry.split(":")
        entries.append((key, tuple(int(size) for size in shape.split("x")) if shape else ()))
    return entries


def official_rule_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every entry set by the recorded parameters rule (see the data file's provenance)."""
    generator = torch.Generator().manual_seed(0)
    filled = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            filled[key] = torch.zeros_like(tensor)
            continue
        u = torch.rand(tensor.shape, generator=generator, dtype=torch.float32)
        if key.endswith("running_var"):
            filled[key] = 0.5 + u
        elif tensor.dim() > 1:
            filled[key] = (2 * u - 1) * math.sqrt(3.0 / tensor[0].numel())
        elif key.endswith("weight"):
            filled[key] = 0.5 + 0.5 * u
        else:
            filled[key] = 0.2 * (2 * u - 1)
    return filled


def recorded_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def evaluated(name: str):
    """(model with the rule's parameters in eval mode, logits, is_feat result, is_feat+preact result); read only."""
    model = create(name, NUM_CLASSES)
    model.load_state_dict(official_rule_state(model.state_dict()), strict=True)
    model.eval()
    x = recorded_input()
    with torch.no_grad():
        return model, model(x), model(x, is_feat=True), model(x, is_feat=True, preact=True)


def assert_recorded_features(features: list[torch.Tensor], recorded: list[dict], what: str) -> None:
    assert [list(f.shape) for f in features] == [r["shape"] for r in recorded], what
    for index, (feature, fact) in enumerate(zip(features, recorded)):
        assert feature.mean().item() == pytest.approx(fact["mean"], rel=1e-4, abs=1e-5), f"{what} {index}"
        assert feature.abs().mean().item() == pytest.approx(fact["abs_mean"], rel=1e-4), f"{what} {index}"


# ------------------------------------------------------------------------------------------------- names

def test_the_zoo_has_every_name_of_model_dict_in_its_order():
    assert zoo.names() == NAMES
    assert len(NAMES) == 22
    assert names()[:len(NAMES)] == NAMES and set(names()[len(NAMES):]) == {
        "teacher-cnn", "assistant-cnn", "student-cnn", "student-cnn-deep", "student-mlp", "modal-mlp", *VIT_NAMES}


def test_an_unknown_name_lists_the_close_matches_and_every_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet32x2'.*did you mean 'resnet32x4'.*resnet8x4, "
                                         r"resnet32x4, ResNet50, wrn_16_1"):
        create("resnet32x2")
    with pytest.raises(ValueError, match="student-mlp"):
        create("wrn_28_10")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        create("resnet8", 0)


def test_create_gives_the_asked_classes_and_keeps_the_digits_zoo():
    assert create("resnet8").fc.out_features == 100
    assert create("MobileNetV2", 10).classifier[0].out_features == 10
    assert create("student-cnn").fc.out_features == 10 and create("student-cnn", 5).fc.out_features == 5
    assert [p.shape for p in digits_model("teacher-cnn").parameters()] == \
        [p.shape for p in create("teacher-cnn").parameters()]


def test_readme_zoo_example_loads_a_checkpoint_of_the_official_keys_strictly(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**The CIFAR model zoo.**"):readme.index("**Your own data.**")]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.S)
    checkpoint = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": official_rule_state(create("resnet32x4").state_dict())}, checkpoint)
    path = "resnet32x4_vanilla/ckpt_epoch_240.pth"
    assert path in example
    namespace = {}
    exec(example.replace(path, str(checkpoint)), namespace)
    assert [f.shape[1] for f in namespace["features"]] == [32, 64, 128, 256, 256]
    assert namespace["logits"].shape == (8, 100)


# ------------------------------------------------------------------------------------- state dicts (facts)

@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_are_the_official_ones_in_order(name):
    model = evaluated(name)[0]
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == recorded_state(name)
    assert sum(p.numel() for p in model.parameters()) == MODELS[name]["parameters"]


@pytest.mark.parametrize("name", NAMES)
def test_a_state_dict_of_exactly_the_official_keys_loads_strictly(name):
    official = {key: torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32)
                for key, shape in recorded_state(name)}
    model = create(name, NUM_CLASSES)
    assert not model.load_state_dict(official, strict=True).missing_keys
    key, shape = recorded_state(name)[0]
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\).*\"{key}\""):
        model.load_state_dict({k: v for k, v in official.items() if k != key}, strict=True)
    with pytest.raises(RuntimeError, match=rf"size mismatch for {key}"):
        model.load_state_dict({**official, key: torch.zeros(shape[0] + 1, *shape[1:])}, strict=True)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*\"module.extra\""):
        model.load_state_dict({**official, "module.extra": torch.zeros(1)}, strict=True)


# --------------------------------------------------------------------------------------- forward (facts)

@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_the_official_model_s_under_the_same_parameters(name):
    logits = evaluated(name)[1]
    expected = torch.tensor(MODELS[name]["logits"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_is_feat_and_preact_return_the_official_features(name):
    _, logits, plain, preact = evaluated(name)
    fact = MODELS[name]
    assert isinstance(plain, tuple) and type(preact).__name__ == fact["preact_return_type"]
    for result, key in ((plain, "features"), (preact, "preact_features")):
        features, result_logits = result
        assert torch.equal(result_logits, logits)
        assert_recorded_features(features, fact[key], f"{name} {key}")


@pytest.mark.parametrize("name", NAMES)
def test_a_training_mode_forward_matches_the_official_one_running_statistics_included(name):
    """Batch statistics, and the BN updates of the forward (the WRNs run three BNs twice with preact=True)."""
    model = create(name, NUM_CLASSES)
    model.load_state_dict(official_rule_state(model.state_dict()), strict=True)
    model.train()
    with torch.no_grad():
        features, logits = model(recorded_input(), is_feat=True, preact=True)
    fact = MODELS[name]["train_mode"]
    assert logits.mean().item() == pytest.approx(fact["logits_mean"], rel=1e-4, abs=1e-6)
    assert logits.abs().mean().item() == pytest.approx(fact["logits_abs_mean"], rel=1e-4)
    assert [f.abs().mean().item() for f in features] == pytest.approx(fact["preact_features_abs_mean"], rel=1e-4)
    running = sum(value.double().sum().item() for key, value in model.state_dict().items()
                  if key.endswith(("running_mean", "running_var")))
    assert running == pytest.approx(fact["running_stats_sum"], rel=1e-7)


def test_where_the_official_models_pool_and_return_pre_activations():
    """The structure the facts show: stage counts and pooling, and which models' preact features differ."""
    stage_count = {name: len(MODELS[name]["features"]) - 2 for name in NAMES}
    assert {name for name, count in stage_count.items() if count == 4} == {"ResNet50", "vgg8", "vgg11", "vgg13",
                                                                           "vgg16", "vgg19", "MobileNetV2"}
    assert {name for name in NAMES if MODELS[name]["features"] == MODELS[name]["preact_features"]} == \
        {"MobileNetV2"}
    # VGG skips pool3 on 32×32 inputs: its last two stages are both 4×4
    assert MODELS["vgg8"]["features"][3]["shape"][2:] == MODELS["vgg8"]["features"][4]["shape"][2:] == [4, 4]
    assert MODELS["ResNet50"]["preact_return_type"] == "list"


@pytest.mark.parametrize("name", NAMES)
def test_get_feat_modules_and_get_bn_before_relu_are_the_official_modules(name):
    model = evaluated(name)[0]
    paths = {id(module): path for path, module in model.named_modules()}
    assert [paths[id(module)] for module in model.get_feat_modules()] == MODELS[name]["get_feat_modules"]
    if MODELS[name]["get_bn_before_relu"] is None:
        with pytest.raises(NotImplementedError, match="OFD teacher"):
            model.get_bn_before_relu()
    else:
        assert [paths[id(module)] for module in model.get_bn_before_relu()] == MODELS[name]["get_bn_before_relu"]


# ------------------------------------------------------------------------------------------------- taps

@pytest.mark.parametrize("name", NAMES)
def test_kd_points_tap_the_official_features(name):
    model, _, (features, _), (preact_features, _) = evaluated(name)
    points = feature_points(model)
    taps = FeatureTaps(model, [*points.stages, *points.pre_activation, points.embedding])
    try:
        with torch.no_grad():
            model(recorded_input())
        values = taps.pop()
    finally:
        taps.remove()
    assert [values[tap].shape for tap in points.stages] == [f.shape for f in features[1:-1]]
    for tap, feature in zip(points.stages, features[1:-1]):
        torch.testing.assert_close(values[tap], feature)
    for tap, feature in zip(points.pre_activation, preact_features[1:-1], strict=True):
        torch.testing.assert_close(values[tap], feature)
    torch.testing.assert_close(values[points.embedding], features[-1])
    classifier = dict(model.named_modules())[points.classifier]
    assert isinstance(classifier, nn.Linear) and classifier.out_features == NUM_CLASSES


# ----------------------------------------------------------------------------------- feature methods

def one_training_step(method: str, student: str, teacher: str, **options) -> dict[str, float]:
    """One SGD step of every stage of the method's recipe on a random CIFAR-shaped batch; the terms' values."""
    torch.manual_seed(0)
    num_train, batch_size = 16, 4
    setup = Setup(student=create(student, NUM_CLASSES), teacher=create(teacher, NUM_CLASSES).eval(),
                  num_classes=NUM_CLASSES, num_train=num_train,
                  train_labels=torch.arange(num_train) % NUM_CLASSES, new_student=lambda: create(student, NUM_CLASSES))
    recipe = build_recipe(method, setup, **options)
    batch = {"input": torch.randn(batch_size, 3, 32, 32), "target": torch.arange(batch_size) % NUM_CLASSES,
             "index": torch.arange(batch_size)}
    terms = {}
    for stage in recipe.stages:
        distiller = stage.distiller
        distiller.build(batch).activate().train()
        parameters = distiller.trainable_parameters()
        before = [p.detach().clone() for p in parameters]
        output = distiller(batch, StepContext(epoch=1, epochs=1, step=0, batch=batch))
        assert torch.isfinite(output.loss), f"{method}/{stage.name}: loss {output.loss}"
        optimizer = torch.optim.SGD(parameters, lr=0.01)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        assert any(not torch.equal(b, p.detach()) for b, p in zip(before, parameters))
        terms.update({name: float(value) for name, value in output.terms.items()})
    return terms


@pytest.mark.parametrize("method, term", [("fitnet", "hint"), ("at", "at"), ("nst", "nst"), ("pkt", "pkt"),
                                          ("vid", "vid"), ("ab", "ab"), ("fsp", "fsp"), ("crd", "crd"), ("ft", "ft")])
def test_feature_methods_train_a_zoo_pair_through_its_taps(method, term):
    assert term in one_training_step(method, "resnet8x4", "resnet32x4")


@pytest.mark.parametrize("student, teacher", [("wrn_16_2", "wrn_40_2"), ("vgg8", "vgg13"), ("resnet8x4", "wrn_40_2"),
                                              ("resnet8x4", "resnet32x4"), ("wrn_16_2", "resnet32x4")])
def test_ofd_trains_with_every_teacher_that_has_batch_norms_before_its_relus(student, teacher):
    """OFD's margins come from the teacher's BN before ReLU: the pre-activation taps themselves (WRN, VGG) or, where
    the pre-activation value is the residual sum after that BN (the ResNets), its ``margin_norms`` (mdistiller's
    ``get_bn_before_relu``)."""
    assert "ofd" in one_training_step("ofd", student, teacher)


def test_ofd_margins_of_a_resnet_teacher_are_those_of_its_bn_before_relu():
    import kdkernels
    from kdkernels.distill import Setup, build_recipe

    teacher = create("resnet32x4")
    recipe = build_recipe("ofd", Setup(student=create("resnet8x4"), teacher=teacher, num_classes=100))
    (term,) = [term for term in recipe.stages[0].distiller.terms if term.name == "ofd"]
    for index, bn in enumerate(teacher.get_bn_before_relu()):
        torch.testing.assert_close(getattr(term, f"margin{index}"), kdkernels.ofd_margins(bn.weight, bn.bias))


@pytest.mark.parametrize("teacher", ["ShuffleV1", "ShuffleV2"])
def test_ofd_refuses_teachers_without_batch_norms_before_their_relus(teacher):
    """As the official models (get_bn_before_relu raises NotImplementedError), the ShuffleNets give no margins."""
    with pytest.raises(ValueError, match=r"ofd takes its margins from the teacher's BN before ReLU, but teacher tap "):
        one_training_step("ofd", "resnet8x4", teacher)


@pytest.mark.parametrize("student, teacher", [("ShuffleV1", "resnet32x4"), ("vgg8", "vgg13"),
                                              ("wrn_16_2", "wrn_40_2"), ("ShuffleV2", "wrn_40_2")])
def test_feature_methods_train_the_official_cross_architecture_pairs(student, teacher):
    for method, term in (("fitnet", "hint"), ("at", "at"), ("crd", "crd")):
        assert term in one_training_step(method, student, teacher)


def test_stage_wise_methods_refuse_pairs_of_different_stage_counts_with_a_clear_error():
    with pytest.raises(ValueError, match=r"term 'at' pairs student and teacher taps, got 4 student and 3 teacher"):
        one_training_step("at", "vgg8", "resnet32x4")


@pytest.mark.slow
@pytest.mark.parametrize("student, teacher", [("MobileNetV2", "ResNet50"), ("vgg8", "ResNet50"),
                                              ("MobileNetV2", "vgg13")])
def test_feature_methods_train_the_four_stage_pairs(student, teacher):
    for method, term in (("fitnet", "hint"), ("at", "at"), ("crd", "crd")):
        assert term in one_training_step(method, student, teacher)


# ------------------------------------------------------------------------------------------------ the tiny ViTs

# name: (input shape, dim, blocks, heads, prefix tokens, patches)
VIT_SHAPES = {"student-vit": ((1, 8, 8), 32, 2, 2, 1, 16), "student-vit-distilled": ((1, 8, 8), 32, 2, 2, 2, 16),
              "teacher-vit": ((1, 8, 8), 64, 4, 4, 1, 16), "student-vit-cifar": ((3, 32, 32), 32, 2, 2, 1, 64),
              "student-vit-distilled-cifar": ((3, 32, 32), 32, 2, 2, 2, 64),
              "teacher-vit-cifar": ((3, 32, 32), 64, 4, 4, 1, 64)}


def vit_taps(model, x):
    points = feature_points(model)
    taps = FeatureTaps(model, [*points.stages, *points.attention, points.embedding, points.classifier,
                               *(["head_dist"] if model.distilled else [])])
    try:
        logits = model(x)
        values = taps.pop()
    finally:
        taps.remove()
    return points, logits, values


@pytest.mark.parametrize("name", VIT_SHAPES)
def test_vit_taps_give_every_block_s_tokens_and_attention_probabilities(name):
    torch.manual_seed(0)
    shape, dim, blocks, heads, prefix, patches = VIT_SHAPES[name]
    model = create(name, 7)
    x = torch.randn(3, *shape)
    points, logits, values = vit_taps(model, x)
    tokens = prefix + patches
    assert logits.shape == (3, 7) and model.num_prefix_tokens == prefix and model.num_patches == patches
    assert points.stages == [f"blocks.{i}" for i in range(blocks)]
    assert points.attention == [f"blocks.{i}.attn.softmax" for i in range(blocks)]
    for tap in points.stages:
        assert values[tap].shape == (3, tokens, dim)
    for tap in points.attention:
        attention = values[tap]
        assert attention.shape == (3, heads, tokens, tokens) and (attention >= 0).all()
        torch.testing.assert_close(attention.sum(-1), torch.ones(3, heads, tokens))
    # the embedding is the normalised class token of the last block, the classifier reads it
    torch.testing.assert_close(values[points.embedding], model.norm(values[points.stages[-1]])[:, 0])
    torch.testing.assert_close(values[points.classifier], model.head(values[points.embedding]))
    if model.distilled:   # DeiT's inference output: the mean of the class and distillation heads
        torch.testing.assert_close(values["head_dist"], model.head_dist(model.norm(values[points.stages[-1]])[:, 1]))
        torch.testing.assert_close(logits, (values["head"] + values["head_dist"]) / 2)
    else:
        torch.testing.assert_close(logits, values["head"])


def test_vit_attention_is_the_scaled_dot_product_softmax_of_its_block_input():
    """The tap is softmax(q·kᵀ/√d_head) per head, recomputed here from the block's qkv projection."""
    torch.manual_seed(0)
    model = create("student-vit")
    x = torch.randn(2, 1, 8, 8)
    block = model.blocks[1]
    taps = FeatureTaps(model, ["blocks.0", "blocks.1.attn.softmax"])
    try:
        model(x)
        values = taps.pop()
    finally:
        taps.remove()
    qkv = block.attn.qkv(block.norm1(values["blocks.0"])).reshape(2, 17, 3, 2, 16)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    torch.testing.assert_close(values["blocks.1.attn.softmax"], torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1))


def test_vit_rejects_images_of_another_size_and_bad_shapes():
    with pytest.raises(ValueError, match=r"expected input \[B, 1, 8, 8\], got \[2, 3, 32, 32\]"):
        create("student-vit")(torch.randn(2, 3, 32, 32))
    from kdkernels.distill.zoo.vit import VisionTransformer
    with pytest.raises(ValueError, match="image_size"):
        VisionTransformer(image_size=9, patch_size=2)
    with pytest.raises(ValueError, match="heads"):
        VisionTransformer(dim=30, heads=4)


def test_a_vit_learns_digits_with_cross_entropy():
    from kdkernels.distill.config import TrainConfig
    from kdkernels.distill.data import load_digits
    from kdkernels.distill.trainer import Trainer

    torch.manual_seed(0)
    split = load_digits(train_size=600, seed=0)
    recipe = build_recipe("ce", Setup(student=create("student-vit"), num_classes=10))
    result = Trainer(TrainConfig(epochs=15, batch_size=32, optimizer="adamw", lr=5e-3, weight_decay=0.05,
                                 progress=False)).fit(recipe, split.train, split.test)
    assert result.accuracy > 40.0, result.accuracy   # chance: 10 %


@pytest.mark.parametrize("method, term", [("kd", "kd"), ("rkd", "rkd")])
def test_vit_students_train_through_the_distillation_methods(method, term):
    """A ViT pair through a response method and a relation method on the embedding tap (the class token)."""
    torch.manual_seed(0)
    setup = Setup(student=create("student-vit"), teacher=create("teacher-vit").eval(), num_classes=10)
    recipe = build_recipe(method, setup)
    batch = {"input": torch.randn(4, 1, 8, 8), "target": torch.arange(4), "index": torch.arange(4)}
    for stage in recipe.stages:
        distiller = stage.distiller
        distiller.build(batch).activate().train()
        output = distiller(batch, StepContext(epoch=1, epochs=1, step=0, batch=batch))
        assert torch.isfinite(output.loss)
        output.loss.backward()
    assert term in output.terms and model_moves(distiller.models["student"])


def model_moves(model) -> bool:
    return all(p.grad is not None for p in model.parameters())
