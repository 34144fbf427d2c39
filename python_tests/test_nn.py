"""kdkernels.nn: a module for every public loss, generated from its function so that the two cannot drift apart."""
import inspect

import pytest
import torch

import kdkernels
from kdkernels.nn import LOSS_MODULES
from loss_cases import HELPERS, INPUTS

GENERATED = sorted(name for name in LOSS_MODULES if name != "crd_loss")


def test_every_public_loss_has_a_module_and_a_test_case():
    losses = set(kdkernels.losses.__all__) - set(HELPERS)
    assert losses == set(LOSS_MODULES), losses.symmetric_difference(LOSS_MODULES)
    assert losses == set(INPUTS)
    assert set(kdkernels.nn.__all__) == {module.__name__ for module in LOSS_MODULES.values()}
    for name, module in LOSS_MODULES.items():
        assert getattr(kdkernels.nn, module.__name__) is module


@pytest.mark.parametrize("name", GENERATED)
def test_module_signature_is_the_functions(name):
    module, function = LOSS_MODULES[name], getattr(kdkernels, name)
    parameters = inspect.signature(function).parameters
    init = list(inspect.signature(module.__init__).parameters.values())[1:]
    forward = list(inspect.signature(module.forward).parameters.values())[1:]
    assert [p.name for p in forward] == list(module.inputs)
    assert [p.name for p in init] + [p.name for p in forward] == sorted(
        parameters, key=lambda n: (n in module.inputs, list(parameters).index(n)))
    for p in init:
        assert p.kind == parameters[p.name].kind and p.default == parameters[p.name].default, p.name
    for p in forward:
        assert p.default == parameters[p.name].default, p.name
    assert module.__doc__.startswith(f"Module of :func:`kdkernels.{name}`")


@pytest.mark.parametrize("name", GENERATED)
def test_module_equals_the_function(name):
    module_class, function = LOSS_MODULES[name], getattr(kdkernels, name)
    inputs = INPUTS[name]()
    module = module_class()
    torch.testing.assert_close(module(**inputs), function(**inputs), rtol=0, atol=0)
    positional = module(*inputs.values())
    torch.testing.assert_close(positional, function(**inputs), rtol=0, atol=0)
    assert all(f"{h}=" in repr(module) for h in module_class.hyperparameters)


def test_hyperparameters_are_stored_and_used():
    inputs = INPUTS["kd_loss"]()
    module = kdkernels.nn.KDLoss(2.0, reduction="sum", divergence="symmetric")
    assert module.temperature == 2.0 and module.reduction == "sum"
    expected = kdkernels.kd_loss(**inputs, temperature=2.0, reduction="sum", divergence="symmetric")
    torch.testing.assert_close(module(**inputs), expected, rtol=0, atol=0)
    module.temperature = 3.0  # attributes are read on each call (DKD-style warm-ups, schedules)
    torch.testing.assert_close(module(**inputs), kdkernels.kd_loss(**inputs, temperature=3.0, reduction="sum",
                                                                   divergence="symmetric"), rtol=0, atol=0)


@pytest.mark.parametrize("call,error,message", [
    (lambda: kdkernels.nn.KDLoss(temperature=0.0), ValueError, "KDLoss: temperature must be positive"),
    (lambda: kdkernels.nn.KDLoss(temperature="4"), TypeError, "KDLoss: temperature must be a real number"),
    (lambda: kdkernels.nn.KDLoss(reduction="avg"), ValueError, "KDLoss: reduction must be one of"),
    (lambda: kdkernels.nn.KDLoss(divergence="js"), ValueError, "KDLoss: divergence must be one of"),
    (lambda: kdkernels.nn.KDLoss(scale_by_t2=1), TypeError, "KDLoss: scale_by_t2 must be a bool"),
    (lambda: kdkernels.nn.NSTLoss(reduction="mean"), ValueError, "NSTLoss: reduction must be one of"),
    (lambda: kdkernels.nn.CCLoss(kernel="rbf"), ValueError, "CCLoss: kernel must be one of"),
    (lambda: kdkernels.nn.CCLoss(order=2.5), TypeError, "CCLoss: order must be an int"),
    (lambda: kdkernels.nn.LabelSmoothingLoss(convention="both"), ValueError, "convention must be one of"),
    (lambda: kdkernels.nn.DKDLoss(1.0, 2.0, 3.0, "sum", False, "x"), TypeError, "takes from 1 to 6 positional"),
    (lambda: kdkernels.nn.KDLoss(temp=4.0), TypeError, "unexpected keyword argument 'temp'"),
    (lambda: kdkernels.nn.CRDLoss(num_data=0), ValueError, "CRDLoss: num_data must be an int >= 1"),
])
def test_bad_configuration_raises_at_construction(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_values_the_signature_cannot_state_are_checked_on_the_call_naming_the_function():
    module = kdkernels.nn.KDLoss(beta=1.5, divergence="jsd")
    with pytest.raises(ValueError, match=r"kd_loss: beta must be in \[0, 1\], got 1.5"):
        module(**INPUTS["kd_loss"]())
