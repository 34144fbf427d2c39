"""Argument checks, dtype rules and the reduction vocabulary of the public losses and modules: one policy.

* ``TypeError`` for a value of the wrong type or dtype, ``ValueError`` for a wrong value, shape or device.
* Every message names the function and the argument, says what was expected and what came:
  ``"kd_loss: temperature must be positive and finite, got -1.0"``.
* Float inputs are float32, float16, bfloat16 or float64; everything accumulates in float32, or in float64 when an
  input is float64 (then every float input is promoted to float64: the kernels pair float64 only with float64).

A public function makes one :class:`Checks` for its name and runs its arguments through it::

    check = Checks("kd_loss")
    temperature = check.temperature(temperature)
    reduction = check.choice("reduction", reduction, REDUCTIONS)
"""
from __future__ import annotations

import math
import numbers
from typing import Literal, NoReturn, Sequence, get_args

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT_DTYPE_NAMES = "float32, float16, bfloat16 or float64"

# How a loss that sums over samples reduces: "none" per sample (the leading shape), "sum", "batchmean" = sum / the
# number of (counted) samples, "mean" = sum / the number of summed elements (as torch's KLDivLoss / MSELoss mean).
# A loss whose per-sample terms are means of different sizes has no "mean" (SampleReduction). Choices are written as
# Literal annotations of the public signatures, so that kdkernels.nn checks them from the signature alone.
Reduction = Literal["batchmean", "sum", "mean", "none"]
SampleReduction = Literal["batchmean", "sum", "none"]
REDUCTIONS = get_args(Reduction)
SAMPLE_REDUCTIONS = get_args(SampleReduction)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def promote_float64(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The pairing rule: when one input is float64, every float input becomes float64 (else they stay as given)."""
    if accumulation_dtype(*tensors) != torch.float64:
        return tensors
    return tuple(t.double() if t.dtype.is_floating_point else t for t in tensors)


def _describe(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{value!r}" if isinstance(value, (numbers.Number, str)) else type(value).__name__


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


class Checks:
    """The argument checks of one public function: each returns the checked (normalised) value or raises."""

    def __init__(self, function: str):
        self.function = function

    # ------------------------------------------------------------------------------------------------- failures

    def type_error(self, name: str, expected: str, value) -> NoReturn:
        raise TypeError(f"{self.function}: {name} must be {expected}, got {_describe(value)}")

    def value_error(self, name: str, requirement: str, got) -> NoReturn:
        """``requirement`` starts with its verb: "must be positive", "must have shape [B, C]"."""
        got = got if isinstance(got, str) else _describe(got)
        raise ValueError(f"{self.function}: {name} {requirement}, got {got}")

    # ---------------------------------------------------------------------------------------------------- scalars

    def real(self, name: str, value, *, positive: bool = False, nonnegative: bool = False,
             minimum: float | None = None, maximum: float | None = None, maximum_open: bool = False) -> float:
        """A finite real number (not a bool), optionally > 0, >= 0 or in [minimum, maximum] (or [minimum, maximum))."""
        if not _is_real(value):
            self.type_error(name, "a real number", value)
        value = float(value)
        low = minimum if minimum is not None else (0.0 if positive or nonnegative else None)
        if not math.isfinite(value) or (positive and value <= 0) or (low is not None and value < low) or (
                maximum is not None and (value >= maximum if maximum_open else value > maximum)):
            self.value_error(name, "must be " + self._range_text(positive, low, maximum, maximum_open), value)
        return value

    @staticmethod
    def _range_text(positive: bool, low, high, high_open: bool) -> str:
        if positive and high is None:
            return "positive and finite"
        if low is None and high is None:
            return "finite"
        if high is None:
            return f">= {low:g} and finite"
        left = "(0" if positive else f"[{low:g}" if low is not None else "(-inf"
        return f"in {left}, {high:g}{')' if high_open else ']'}"

    def temperature(self, value, name: str = "temperature") -> float:
        return self.real(name, value, positive=True)

    def probability(self, name: str, value, *, upper_open: bool = False) -> float:
        """A real in [0, 1] (or [0, 1))."""
        return self.real(name, value, minimum=0.0, maximum=1.0, maximum_open=upper_open)

    def integer(self, name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
        if not _is_integer(value):
            self.type_error(name, "an int", value)
        value = int(value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                      else f">= {minimum}" if minimum is not None else f"<= {maximum}")
            self.value_error(name, f"must be an int {bounds}", value)
        return value

    def name(self, name: str, value, what: str, type_text: str | None = None) -> str:
        """A non-empty str naming something (``what``: "model name", "batch key"); ``type_text`` is what the
        TypeError says it must be (default ``"a <what> (str)"``)."""
        if not isinstance(value, str):
            self.type_error(name, type_text or f"a {what} (str)", value)
        if not value:
            self.value_error(name, f"must be a non-empty {what}", repr(value))
        return value

    def flag(self, name: str, value) -> bool:
        if not isinstance(value, bool):
            self.type_error(name, "a bool", value)
        return value

    def choice(self, name: str, value, choices: Sequence[str]) -> str:
        if not isinstance(value, str):
            self.type_error(name, f"one of {', '.join(map(repr, choices))}", value)
        if value not in choices:
            self.value_error(name, f"must be one of {', '.join(map(repr, choices))}", repr(value))
        return value

    def reduction(self, value, allowed: Sequence[str] = REDUCTIONS) -> str:
        return self.choice("reduction", value, allowed)

    # ---------------------------------------------------------------------------------------------------- tensors

    def tensor(self, name: str, value) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            self.type_error(name, "a torch.Tensor", value)
        return value

    def floating(self, name: str, value, *, dims: Sequence[int] | None = None, min_dim: int = 0,
                 nonempty: bool = True) -> torch.Tensor:
        """A float32/float16/bfloat16/float64 tensor with an allowed number of dims and (by default) elements."""
        value = self.tensor(name, value)
        if value.dtype not in FLOAT_DTYPES:
            self.type_error(name, FLOAT_DTYPE_NAMES, value.dtype)
        self._dims(name, value, dims, min_dim)
        if nonempty and value.numel() == 0:
            self.value_error(name, "must not be empty", f"shape {tuple(value.shape)}")
        return value

    def integers(self, name: str, value, *, dims: Sequence[int] | None = None, int64: bool = False) -> torch.Tensor:
        """An integer tensor (any integer dtype, or int64 only)."""
        value = self.tensor(name, value)
        if int64 and value.dtype != torch.int64:
            self.type_error(name, "int64", value.dtype)
        if not _is_index_dtype(value.dtype):
            self.type_error(name, "an integer tensor", value.dtype)
        self._dims(name, value, dims, 0)
        return value

    def _dims(self, name: str, value: torch.Tensor, dims: Sequence[int] | None, min_dim: int) -> None:
        if dims is not None and value.dim() not in dims:
            expected = " or ".join(str(d) for d in dims)
            self.value_error(name, f"must have {expected} dims", f"shape {tuple(value.shape)}")
        if value.dim() < min_dim:
            self.value_error(name, f"must have at least {min_dim} dimension(s)", f"shape {tuple(value.shape)}")

    def shape(self, name: str, value: torch.Tensor, shape: Sequence[int | None], what: str | None = None) -> None:
        """value.shape equals `shape` (None entries match anything); `what` describes the shape in the message."""
        if value.dim() != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape)):
            expected = what or "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            self.value_error(name, f"must have shape {expected}", f"shape {tuple(value.shape)}")

    def same_device(self, name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
        if value.device != other.device:
            self.value_error(name, f"must be on the same device as {other_name} ({other.device})",
                             f"a tensor on {value.device}")

    def same_shape(self, name: str, value: torch.Tensor, other_name: str, other: torch.Tensor,
                   hint: str = "") -> None:
        if value.shape != other.shape:
            self.value_error(name, f"must have the same shape as {other_name} {tuple(other.shape)}{hint}",
                             f"shape {tuple(value.shape)}")

    def logits(self, name: str, value, *, dims: Sequence[int] | None = None) -> torch.Tensor:
        """Float logits [..., C] with at least one row and one class (classes last)."""
        return self.floating(name, value, dims=dims, min_dim=1)

    def logits_pair(self, student, teacher, student_name: str = "student_logits",
                    teacher_name: str = "teacher_logits", *, dims: Sequence[int] | None = None) -> None:
        """Both valid logits of one shape on one device (their dtypes may differ)."""
        self.logits(student_name, student, dims=dims)
        self.logits(teacher_name, teacher, dims=dims)
        self.same_shape(teacher_name, teacher, student_name, student)
        self.same_device(teacher_name, teacher, student_name, student)

    def features(self, name: str, value, *, dims: Sequence[int] | None = None) -> torch.Tensor:
        """A float tensor [B, ...] with at least one feature per sample."""
        value = self.floating(name, value, dims=dims, min_dim=1, nonempty=False)
        if math.prod(value.shape[1:]) == 0:
            self.value_error(name, "must have shape [B, ...] with at least one feature per sample",
                             f"shape {tuple(value.shape)}")
        return value

    def feature_pair(self, student_name: str, student, teacher_name: str, teacher, *,
                     dims: Sequence[int] | None = None, same_shape: bool = False, hint: str = "") -> None:
        """Two feature tensors with one batch size on one device (and one shape when asked)."""
        self.features(student_name, student, dims=dims)
        self.features(teacher_name, teacher, dims=dims)
        if student.shape[0] != teacher.shape[0]:
            self.value_error(teacher_name, f"must have the same batch size as {student_name} {tuple(student.shape)}",
                             f"shape {tuple(teacher.shape)}")
        self.same_device(teacher_name, teacher, student_name, student)
        if same_shape:
            self.same_shape(student_name, student, teacher_name, teacher, hint)

    def batch_of_at_least(self, name: str, value: torch.Tensor, minimum: int, why: str) -> None:
        if value.shape[0] < minimum:
            self.value_error(name, f"must hold at least {minimum} samples ({why})",
                             f"a batch of {value.shape[0]}")

    def tensor_list(self, name: str, value, *, minimum: int = 1) -> list[torch.Tensor]:
        """A list or tuple of at least `minimum` tensors."""
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            self.type_error(name, "a list or tuple of tensors", value)
        for index, item in enumerate(value):
            self.tensor(f"{name}[{index}]", item)
        if len(value) < minimum:
            self.value_error(name, f"must hold at least {minimum} tensor(s)", f"{len(value)}")
        return list(value)

    # ----------------------------------------------------------------------------------------------------- labels

    def labels(self, labels, leading_shape: torch.Size, device: torch.device, ignore_index=-100) -> torch.Tensor:
        """Integer labels with the logits' leading shape on their device (values are not range-checked: see
        :meth:`class_labels`); `ignore_index` an int."""
        self.integers("labels", labels)
        if labels.shape != leading_shape:
            self.value_error("labels", f"must have the logits' leading shape {tuple(leading_shape)}",
                             f"shape {tuple(labels.shape)}")
        if labels.device != device:
            self.value_error("labels", f"must be on the logits' device {device}", f"a tensor on {labels.device}")
        self.integer("ignore_index", ignore_index)
        return labels

    def class_labels(self, labels, logits: torch.Tensor, *, allow_soft: bool = False) -> torch.Tensor:
        """Class indices int64 [N] for logits [..., C]: hard labels with the logits' leading shape in [0, C), or (with
        `allow_soft`) soft labels shaped like the logits, reduced by argmax. Outside torch.compile the range is
        checked on the host (one synchronisation on a GPU)."""
        self.tensor("labels", labels)
        if labels.device != logits.device:
            self.value_error("labels", f"must be on the logits' device {logits.device}", f"a tensor on {labels.device}")
        classes = logits.shape[-1]
        if allow_soft and labels.dtype.is_floating_point and labels.shape == logits.shape:
            return labels.reshape(-1, classes).argmax(dim=-1)
        if not _is_index_dtype(labels.dtype):
            self.type_error("labels", "an integer tensor" + (" or soft labels shaped like the logits"
                                                           if allow_soft else ""), labels)
        if labels.shape != logits.shape[:-1]:
            self.value_error("labels", f"must have the logits' leading shape {tuple(logits.shape[:-1])}",
                             f"shape {tuple(labels.shape)}")
        labels = labels.reshape(-1).long()
        if not torch.compiler.is_compiling() and labels.numel():
            bad = (labels < 0) | (labels >= classes)
            if bool(bad.any()):
                self.value_error("labels", f"must be class indices in [0, {classes})", f"{labels[bad][0].item()}")
        return labels

    def index_tensor(self, name: str, value, shape: Sequence[int | None], device: torch.device,
                     what: str | None = None) -> torch.Tensor:
        """An int64 tensor of the given shape (None: any size) on `device`."""
        self.integers(name, value, int64=True)
        self.shape(name, value, shape, what)
        if value.device != device:
            self.value_error(name, f"must be on device {device}", f"a tensor on {value.device}")
        return value
