"""One argument policy for every public loss (kdkernels/_validation.py): TypeError for a wrong type or dtype, ValueError
for a wrong value or shape, each message naming the function and the argument; one reduction vocabulary."""
import inspect
from typing import get_args

import pytest
import torch

import kdkernels
from kdkernels._validation import REDUCTIONS, Checks, promote_float64
from loss_cases import INPUTS

CASES = sorted(name for name, build in INPUTS.items() if build is not None)


def call(name, **changes):
    inputs = INPUTS[name]()
    return getattr(kdkernels, name)(**{**inputs, **changes})


@pytest.mark.parametrize("name", CASES)
def test_a_non_tensor_input_is_a_type_error_naming_function_and_argument(name):
    first = next(iter(INPUTS[name]()))
    with pytest.raises(TypeError, match=rf"^{name}: {first}"):
        call(name, **{first: "not a tensor"})


@pytest.mark.parametrize("name", CASES)
def test_an_integer_tensor_is_a_type_error(name):
    first, value = next(iter(INPUTS[name]().items()))

    def as_long(value):   # a tensor, a list of tensors (per stage), or a list of lists (semckd's pairs)
        return [as_long(v) for v in value] if isinstance(value, list) else value.long()

    with pytest.raises(TypeError, match=rf"^{name}: {first}(\[0\])* must be"):
        call(name, **{first: as_long(value)})


TEMPERATURE_CASES = [name for name in CASES if "temperature" in inspect.signature(getattr(kdkernels, name)).parameters]


@pytest.mark.parametrize("name", TEMPERATURE_CASES)
@pytest.mark.parametrize("value,error", [(0.0, ValueError), (float("nan"), ValueError), ("4", TypeError),
                                         (True, TypeError)])
def test_temperature(name, value, error):
    with pytest.raises(error, match=rf"^{name}: temperature must be"):
        call(name, temperature=value)


REDUCTION_CASES = [name for name in CASES if "reduction" in inspect.signature(getattr(kdkernels, name)).parameters]


@pytest.mark.parametrize("name", REDUCTION_CASES)
def test_reductions_share_one_vocabulary_and_relate_as_documented(name):
    allowed = get_args(inspect.signature(getattr(kdkernels, name), eval_str=True).parameters["reduction"].annotation)
    choices = [r for r in REDUCTIONS if r in allowed]
    with pytest.raises(ValueError, match=rf"^{name}: reduction must be one of"):
        call(name, reduction="avg")
    values = {reduction: call(name, reduction=reduction) for reduction in choices}
    rows = values["none"]
    assert rows.dim() >= 1 and rows.shape[0] == 6
    total = values["sum"]
    torch.testing.assert_close(rows.sum(), total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values["batchmean"], total / rows.numel(), rtol=1e-12, atol=1e-12)
    if "mean" in values:  # sum / (samples x summed elements): the ratio is that element count
        elements = (values["batchmean"] / values["mean"]).item()
        assert elements >= 1 and abs(elements - round(elements)) < 1e-9, elements


def test_every_reduction_annotation_is_the_vocabulary_or_its_sample_subset():
    for name in REDUCTION_CASES:
        annotation = inspect.signature(getattr(kdkernels, name)).parameters["reduction"].annotation
        assert annotation in ("Reduction", "SampleReduction"), (name, annotation)


def test_messages_say_what_was_expected_and_what_came():
    check = Checks("some_loss")
    with pytest.raises(TypeError, match=r"^some_loss: x must be a real number, got 'a'$"):
        check.real("x", "a")
    with pytest.raises(ValueError, match=r"^some_loss: x must be in \[0, 1\), got 1.0$"):
        check.real("x", 1.0, minimum=0.0, maximum=1.0, maximum_open=True)
    with pytest.raises(TypeError, match=r"^some_loss: y must be float32, float16, bfloat16 or float64, got torch.int32$"):
        check.floating("y", torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^some_loss: y must have 2 dims, got shape \(3,\)$"):
        check.floating("y", torch.zeros(3), dims=(2,))
    with pytest.raises(ValueError, match=r"^some_loss: z must be one of 'a', 'b', got 'c'$"):
        check.choice("z", "c", ("a", "b"))
    with pytest.raises(TypeError, match=r"^some_loss: n must be an int, got 2.0$"):
        check.integer("n", 2.0)


def test_one_float64_input_promotes_every_float_input():
    a, b, i = torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)
    assert [t.dtype for t in promote_float64(a, b, i)] == [torch.float64, torch.float64, torch.int64]
    assert [t.dtype for t in promote_float64(a, a.half())] == [torch.float32, torch.float16]
