"""The trainer layer's core: hook capture on unseen models, the Distiller's roles and errors, the registry, the
digits data and the samplers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels import distill
from kdkernels.distill.data import ClassAwareBatchSampler, PairBatchSampler, ShuffleBatchSampler
from kdkernels.distill.terms import StepContext

from distill_testing import digits_setup, digits_split, first_step, run_steps


class UnseenNet(nn.Module):
    """A model the library has never seen: nested containers, a tuple output, no kd_points."""

    def __init__(self):
        super().__init__()
        self.body = nn.ModuleDict({"blocks": nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 12))})
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        hidden = self.body["blocks"](x.flatten(1))
        return self.head(hidden), hidden


def test_taps_capture_outputs_and_inputs_of_nested_modules():
    model = UnseenNet()
    taps = distill.FeatureTaps(model, ["body.blocks.1", "head/input", "head"])
    x = torch.randn(5, 1, 8, 8)
    logits, hidden = model(x)
    values = taps.pop()
    expected_tanh = torch.tanh(model.body["blocks"][0](x.flatten(1)))
    torch.testing.assert_close(values["body.blocks.1"], expected_tanh, rtol=0, atol=0)
    torch.testing.assert_close(values["head/input"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(values["head"], logits, rtol=0, atol=0)
    assert taps.pop() == {}  # values are not served twice
    taps.remove()
    model(x)
    assert taps.pop() == {}


def test_missing_hook_path_names_the_model_and_close_matches():
    with pytest.raises(ValueError, match=r"student \(UnseenNet\) has no submodule 'body.block'.*'body.blocks'"):
        distill.FeatureTaps(UnseenNet(), ["body.block"], "student")


def test_distiller_reads_a_tuple_output_and_a_hooked_feature_of_an_unseen_model():
    student, teacher = UnseenNet(), UnseenNet()
    term = distill.FunctionTerm("hint", F.mse_loss, ("student:body.blocks", "teacher:body.blocks"), weight=2.0)
    distiller = distill.Distiller({"student": student, "teacher": teacher},
                                  [distill.CrossEntropyTerm("student"), term])
    batch = {"input": torch.randn(6, 1, 8, 8), "target": torch.randint(0, 10, (6,))}
    distiller.build(batch).activate().train()
    output = distiller(batch)
    s_logits, s_hidden = student(batch["input"])
    with torch.no_grad():
        _, t_hidden = teacher(batch["input"])
    torch.testing.assert_close(output.terms["hint"], 2.0 * F.mse_loss(s_hidden, t_hidden).detach())
    torch.testing.assert_close(output.terms["ce_student"], F.cross_entropy(s_logits, batch["target"]).detach())
    output.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_frozen_models_stay_in_eval_mode_unless_asked():
    setup = digits_setup()
    plain = distill.Distiller({"student": setup.student, "teacher": setup.teacher},
                              [distill.FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"))])
    plain.train()
    assert setup.student.training and not setup.teacher.training
    bn_train = distill.Distiller({"student": setup.student, "teacher": setup.teacher},
                                 [distill.FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"))],
                                 frozen_train_mode=("teacher",))
    bn_train.train()
    assert setup.teacher.training
    bn_train.eval()
    assert not setup.teacher.training and not setup.student.training


def test_build_leaves_batch_norm_statistics_untouched():
    setup = digits_setup()
    recipe = distill.build_recipe("kd", setup)
    before = {k: v.clone() for k, v in setup.student.state_dict().items()}
    batch = next(iter(torch.utils.data.DataLoader(digits_split().train, batch_size=16)))
    recipe.stages[0].distiller.build(batch)
    for key, value in setup.student.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_forward_before_build_is_an_error():
    setup = digits_setup()
    distiller = distill.build_recipe("kd", setup).stages[0].distiller
    batch = next(iter(torch.utils.data.DataLoader(digits_split().train, batch_size=4)))
    with pytest.raises(RuntimeError, match="build"):
        distiller(batch)


@pytest.mark.parametrize("models, terms, kwargs, message", [
    ({}, [], {}, "at least one model"),
    ({"input": nn.Linear(2, 2)}, [], {"trainable": ("input",)}, "not allowed"),
    ({"student": nn.Linear(2, 2)}, [], {"trainable": ("pupil",)}, "unknown models"),
    ({"student": nn.Linear(2, 2)}, "two-terms", {}, "distinct"),
    ({"student": nn.Linear(2, 2)}, "reads-ghost", {}, "no model 'ghost'"),
])
def test_bad_distiller_configuration(models, terms, kwargs, message):
    if terms == "two-terms":
        terms = [distill.CrossEntropyTerm("student"), distill.CrossEntropyTerm("student")]
    elif terms == "reads-ghost":
        terms = [distill.FunctionTerm("x", F.mse_loss, ("student", "ghost:layer1"))]
    with pytest.raises((ValueError, TypeError), match=message):
        distill.Distiller(models, terms, **kwargs)


def test_a_term_reading_a_missing_value_names_it():
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    distiller = distill.Distiller({"student": student}, [distill.CrossEntropyTerm("student", target="soft_target")])
    batch = {"input": torch.randn(3, 1, 8, 8), "target": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ValueError, match="'soft_target'.*available values"):
        distiller.build(batch)


def test_terms_run_in_float32_under_autocast():
    seen = {}

    def record(logits, target):
        seen["dtype"] = logits.dtype
        return F.cross_entropy(logits, target)

    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    distiller = distill.Distiller({"student": student}, [distill.FunctionTerm("ce", record, ("student", "target"))])
    batch = {"input": torch.randn(4, 1, 8, 8), "target": torch.zeros(4, dtype=torch.long)}
    distiller.build(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = distiller.run_models(batch)
        assert values["student"].dtype == torch.bfloat16
        output = distiller.compute_terms(values, StepContext())
    assert seen["dtype"] == torch.float32 and output.loss.dtype == torch.float32


def test_registry_lists_every_method_with_category_and_paper():
    listed = distill.list_methods()
    assert {"ce", "kd"} <= {m.name for m in listed}
    for method in listed:
        assert method.category in distill.registry.CATEGORIES
        assert method.paper and method.summary, method.name
        assert "default" in method.presets


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown method 'kdd'; did you mean kd"):
        distill.get_method("kdd")
    with pytest.raises(ValueError, match=r"no hyperparameter\(s\) \['temp'\]"):
        distill.build_recipe("kd", digits_setup(), temp=2.0)
    with pytest.raises(ValueError, match="no preset 'cifar-9'"):
        distill.build_recipe("kd", digits_setup(), preset="cifar-9")
    with pytest.raises(ValueError, match="distils from a teacher"):
        distill.build_recipe("kd", digits_setup(teacher=None))


def test_presets_override_defaults():
    method = distill.get_method("kd")
    assert method.hyperparameters()["temperature"] == 4.0
    assert method.hyperparameters("imagenet") == {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5}
    recipe = distill.build_recipe("kd", digits_setup(), preset="imagenet", kd_weight=0.7)
    assert recipe.hyperparameters == {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.7}


def test_kd_terms_match_the_mdistiller_formula():
    recipe = distill.build_recipe("kd", digits_setup())
    _, batch, values, output = first_step(recipe)
    s, t, y, T = values["student"], values["teacher"], batch["target"], 4.0
    kd = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(output.terms["kd"], 0.9 * kd.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(output.terms["ce_student"], 0.1 * F.cross_entropy(s, y).detach())
    run_steps(recipe)


def test_ce_baseline_trains_without_a_teacher():
    history = run_steps(distill.build_recipe("ce", digits_setup(teacher=None)), steps=2)
    assert set(history[0]) == {"ce_student"}


def test_digits_split_is_stratified_and_standardised():
    split = distill.load_digits(train_size=100, seed=3)
    assert len(split.train) == 100 and len(split.test) == 539
    assert np.bincount(split.train.labels).min() >= 9
    full = distill.load_digits(seed=3)
    torch.testing.assert_close(full.test.targets, split.test.targets, rtol=0, atol=0)
    assert abs(float(full.train.inputs.mean())) < 1e-5 and abs(float(full.train.inputs.std()) - 1) < 1e-3
    with pytest.raises(ValueError, match="train_size"):
        distill.load_digits(train_size=5)


def test_samplers_are_deterministic_per_epoch_and_shard_by_rank():
    sampler = ShuffleBatchSampler(50, 8, seed=1)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert sorted(i for b in first for i in b) == list(range(50))
    ranks = [list(ShuffleBatchSampler(50, 8, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert ranks[0] == first[0:6:2] and ranks[1] == first[1:6:2]


def test_class_aware_and_pair_samplers_group_same_class_samples():
    labels = digits_split().train.labels
    batch = next(iter(ClassAwareBatchSampler(labels, 12, intra=2, seed=0)))
    assert len(batch) == 12
    for anchor in range(0, 12, 3):
        assert len({labels[i] for i in batch[anchor:anchor + 3]}) == 1
    pairs = next(iter(PairBatchSampler(labels, 8, seed=0)))
    assert len(pairs) == 16
    assert all(labels[a] == labels[b] and a != b for a, b in zip(pairs[:8], pairs[8:]))
    with pytest.raises(ValueError, match="multiple of intra"):
        ClassAwareBatchSampler(labels, 10, intra=2)


def test_feature_points_of_the_zoo_and_of_torchvision_style_models():
    points = distill.feature_points(distill.digits_model("student-cnn"))
    assert points.stages == ["stage1", "stage2", "stage3"] and points.embedding == "fc/input"

    class ResNetLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1, self.layer2, self.fc = nn.Identity(), nn.Identity(), nn.Linear(2, 2)

    assert distill.feature_points(ResNetLike()).stages == ["layer1", "layer2"]
    with pytest.raises(ValueError, match="kd_points"):
        distill.feature_points(nn.Linear(2, 2))


def test_parameter_groups_scale_the_learning_rate_per_model():
    setup = digits_setup(teacher=None)
    peer = distill.digits_model("student-cnn")
    term = distill.FunctionTerm("mutual", kdkernels.kd_loss, ("student", "peer"))
    distiller = distill.Distiller({"student": setup.student, "peer": peer}, [term], trainable=("student", "peer"))
    groups = distiller.parameter_groups(0.01, {"peer": 10.0})
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in groups}
    assert by_lr.keys() == {0.01, 0.1}
    assert by_lr[0.1] == {id(p) for p in peer.parameters()}
    assert by_lr[0.01] == {id(p) for p in setup.student.parameters()}
    stage = distill.Stage("mutual", distiller, model_lr_scales={"peer": 10.0})
    assert stage.model_lr_scales == {"peer": 10.0}
    with pytest.raises(ValueError, match="do not train here"):
        distill.Stage("mutual", distiller, model_lr_scales={"teacher": 2.0})
