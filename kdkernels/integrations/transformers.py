"""Distilling Hugging Face causal language models with :func:`kdkernels.linear_kd_loss` (``pip install kdkernels[hf]``).

``causal_lm_kd_loss(student, teacher, input_ids)`` runs each model's decoder to its last hidden states ``h`` and
takes its output embeddings ``W`` (and bias ``b``), so the logits the models would produce,

    z = cap(s · (h W^T + b)),   cap(z) = c · tanh(z / c),

are never materialised: ``linear_kd_loss`` forms them tile by tile. What each model's config says about its logits
is honoured: ``final_logit_softcapping`` (Gemma 2/3: ``c``, passed as ``logit_softcap``; the op has one cap, so both
models must agree), ``logit_scale`` (Cohere: ``s``) and ``logits_scaling`` (Granite: ``s = 1 / logits_scaling``),
applied by scaling ``h`` and ``b``; tied embeddings need nothing (the lm_head weight is the embedding parameter, and
its gradient accumulates from both uses). Causal shift: the hidden state at position ``t`` is scored against the
token at ``t + 1``; labels default to ``input_ids``, and padding (``attention_mask == 0``) and the tokens right after
it are never scored. The teacher runs in eval mode under ``torch.no_grad()``; nothing reaches its parameters.

``DistillationTrainer`` is a ``transformers.Trainer`` whose loss is this one, normalised by ``num_items_in_batch``
under gradient accumulation and data parallelism.

The student's decoder and the op run inside the forward of the student (or of the ``DistributedDataParallel`` /
FSDP wrapper around it, anything exposing ``.module``), so that its hooks fire: DDP synchronises the gradients,
FSDP2 (``fully_shard``) unshards the root's parameters. The output embeddings are read there; a ``DTensor`` weight
still sharded then (tensor parallel, a sharded lm_head outside FSDP's forward) is gathered once per call with
``full_tensor()``, before the op's tiles.
"""
from __future__ import annotations

import collections.abc
import contextlib
import inspect

import torch
import transformers

from kdkernels._validation import Checks
from kdkernels.losses.linear_kd import linear_kd_loss

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = None

__all__ = ["causal_lm_kd_loss", "DistillationTrainer", "KD_OPTIONS"]

# linear_kd_loss's options a caller chooses; the rest (logits' inputs, labels, cap, divisor) come from the models.
KD_OPTIONS = ("temperature", "divergence", "beta", "skew_alpha", "hard_weight", "soft_weight", "reduction",
              "scale_by_t2", "backend")


def causal_lm_kd_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                      num_items_in_batch: int | torch.Tensor | None = None, ignore_index: int = -100,
                      **kd_options) -> torch.Tensor:
    """``linear_kd_loss`` of a student causal LM against a teacher causal LM on the same tokens.

    Per predicted token ``t`` (positions ``0 .. T-2`` of each row, scored against the token at ``t + 1``):
    ``soft_weight · D(p_t, p_s) + hard_weight · CE(z_s, labels[t + 1])`` with ``p = softmax(z / T)`` and ``z`` the
    logits each model would output (see the module docstring for what is honoured), reduced as ``reduction`` says:
    ``"batchmean"`` divides by the counted tokens, or by ``num_items_in_batch`` (the counted shifted tokens of the
    whole gradient-accumulation step, so that the micro-batches' losses add up to the full batch's).

    Args:
        student, teacher: ``transformers.PreTrainedModel`` causal LMs (the student possibly wrapped in
            ``DistributedDataParallel``), with the same tokenizer; the teacher's vocabulary may be padded beyond the
            student's (its extra rows are dropped), not shorter. Both on ``input_ids``'s device.
        input_ids: ``[B, T]`` token ids, ``T >= 2``; ``attention_mask``, ``position_ids``: ``[B, T]``, passed to
            both decoders (run with ``use_cache=False``, as in training).
        labels: ``[B, T]``, aligned with ``input_ids`` as Hugging Face causal LMs take them (shifted here);
            ``ignore_index`` marks tokens to skip. Default: ``input_ids``. Either way a token that is padding
            (``attention_mask == 0``) or follows padding (nothing attended predicts it) is not scored.
        num_items_in_batch: the ``batchmean`` divisor (``linear_kd_loss``'s ``num_items``).
        **kd_options: ``linear_kd_loss``'s ``temperature``, ``divergence``, ``beta``, ``skew_alpha``,
            ``hard_weight``, ``soft_weight``, ``reduction`` (``"none"`` gives ``[B, T - 1]``), ``scale_by_t2``,
            ``backend``.
    """
    loss, _ = _distill("causal_lm_kd_loss", student, teacher, input_ids, attention_mask, labels, position_ids,
                       num_items_in_batch, ignore_index, kd_options)
    return loss


def _distill(function: str, student, teacher, input_ids, attention_mask, labels, position_ids, num_items_in_batch,
             ignore_index, kd_options: dict):
    """The loss and the student decoder's outputs."""
    check = Checks(function)
    student_model, teacher_model = _pretrained(check, "student", student), _pretrained(check, "teacher", teacher)
    options = _kd_options(check, kd_options)
    if not isinstance(input_ids, torch.Tensor):
        check.type_error("input_ids", "a torch.Tensor of token ids [B, T]", input_ids)
    check.integers("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        check.value_error("input_ids", "must have shape [B, T] with T >= 2 (a causal LM predicts tokens 1 .. T-1)",
                          f"shape {tuple(input_ids.shape)}")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            check.type_error(name, "a torch.Tensor", tensor)
        if tensor.shape != input_ids.shape:
            check.value_error(name, f"must have input_ids's shape {tuple(input_ids.shape)}",
                              f"shape {tuple(tensor.shape)}")
        if tensor.device != input_ids.device:
            check.value_error(name, f"must be on input_ids's device {input_ids.device}", f"a tensor on {tensor.device}")
    if labels is not None:
        check.integers("labels", labels)
    ignore_index = check.integer("ignore_index", ignore_index)

    for side, model in (("student", student_model), ("teacher", teacher_model)):
        weight = _head(check, side, model)[0]
        if weight.device != input_ids.device:
            check.value_error(side, f"must be on input_ids's device {input_ids.device}",
                              f"an output embedding on {weight.device}")
    student_rows, teacher_rows = (_head(check, side, model)[0].shape[0]
                                  for side, model in (("student", student_model), ("teacher", teacher_model)))
    if teacher_rows < student_rows:
        check.value_error("teacher", f"must have at least the student's {student_rows} output embedding rows (a "
                          "vocabulary padded beyond the student's, not shorter)", f"{teacher_rows} rows")
    student_cap, teacher_cap = _softcap(student_model), _softcap(teacher_model)
    if student_cap != teacher_cap:
        check.value_error("teacher", "must have the student's config.final_logit_softcapping (linear_kd_loss "
                          f"applies one cap to both sides; the student's is {student_cap})", teacher_cap)

    labels = _labels_after_tokens(input_ids if labels is None else labels, attention_mask, ignore_index)
    decoder_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def student_forward():
        student_hidden, student_outputs = _last_hidden_state(student_model, decoder_inputs)
        with torch.no_grad(), _eval_mode(teacher_model):
            teacher_hidden, _ = _last_hidden_state(teacher_model, decoder_inputs)
        # Read here, inside the wrapper's forward: FSDP unshards its parameters for the forward.
        student_weight, student_bias = _unsharded_head(check, "student", student_model)
        teacher_weight, teacher_bias = _unsharded_head(check, "teacher", teacher_model)
        student_scale, teacher_scale = _logit_scale(student_model), _logit_scale(teacher_model)
        with _no_autocast(input_ids.device):
            loss = linear_kd_loss(
                _scaled(student_hidden[:, :-1].to(student_weight.dtype), student_scale), student_weight,
                _scaled(teacher_hidden[:, :-1].to(teacher_weight.dtype), teacher_scale), teacher_weight.detach(),
                student_bias=_scaled(student_bias, student_scale),
                teacher_bias=None if teacher_bias is None else _scaled(teacher_bias.detach(), teacher_scale),
                labels=labels[:, 1:], ignore_index=ignore_index, logit_softcap=student_cap,
                num_items=num_items_in_batch, **options)
        return loss, student_outputs

    return _through_wrapper(student, student_model, student_forward)


def _labels_after_tokens(labels: torch.Tensor, attention_mask: torch.Tensor | None, ignore_index: int):
    """``labels`` with every token ignored that is padding or follows padding (nothing attended predicts it)."""
    if attention_mask is None:
        return labels
    padding = attention_mask == 0
    padding[:, 1:] |= padding[:, :-1].clone()
    return labels.masked_fill(padding, ignore_index)


def _pretrained(check: Checks, name: str, model) -> transformers.PreTrainedModel:
    """The PreTrainedModel inside DistributedDataParallel / torch.compile / accelerate wrappers."""
    inner = model
    while not isinstance(inner, transformers.PreTrainedModel):
        nested = getattr(inner, "module", None)
        nested = getattr(inner, "_orig_mod", None) if nested is None else nested
        if not isinstance(nested, torch.nn.Module):
            check.type_error(name, "a transformers.PreTrainedModel causal LM (or a wrapper of one with .module)",
                             model)
        inner = nested
    return inner


def _kd_options(check: Checks, options: dict) -> dict:
    for key in options:
        if key not in KD_OPTIONS:
            managed = key in ("labels", "num_items", "logit_softcap", "student_bias", "teacher_bias")
            check.type_error(key, "left out (it is taken from the models and the inputs)" if managed else
                             f"one of the linear_kd_loss options {', '.join(KD_OPTIONS)} (an unknown option)",
                             options[key])
    return dict(options)


def _head(check: Checks, side: str, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight [V, H] and bias, as the model holds them."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        check.value_error(side, "must have an output embedding with a [V, H] weight (get_output_embeddings())",
                          type(head).__name__)
    return weight, getattr(head, "bias", None)


def _unsharded_head(check: Checks, side: str, model):
    """The output embedding's weight and bias as plain tensors: a DTensor is gathered, once."""
    return tuple(tensor.full_tensor() if DTensor is not None and isinstance(tensor, DTensor) else tensor
                 for tensor in _head(check, side, model))


def _softcap(model) -> float | None:
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def _logit_scale(model) -> float:
    """Cohere's ``logits · logit_scale`` and Granite's ``logits / logits_scaling``; 1 for the others."""
    config = _text_config(model)
    scale = getattr(config, "logit_scale", None)
    scale = 1.0 if scale is None else float(scale)
    divisor = getattr(config, "logits_scaling", None)
    return scale if divisor is None else scale / float(divisor)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _scaled(tensor, scale: float):
    """Hidden states or bias times a logit scale: ``s · (h W^T + b) = (s h) W^T + s b``."""
    return tensor if tensor is None or scale == 1.0 else tensor * scale


def _decoder(model):
    """The module that returns the hidden states the lm_head reads: ``get_decoder()``, else ``base_model``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        decoder = getattr(model, "base_model", None)
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def _last_hidden_state(model, inputs: dict):
    """``[B, T, H]`` final hidden states (after the final norm) and the outputs they came from. Without a separate
    decoder module, the full model's ``hidden_states[-1]`` (which also computes its logits)."""
    inputs = {key: value for key, value in inputs.items() if value is not None}
    decoder = _decoder(model)
    if decoder is not None:
        outputs = decoder(**inputs, use_cache=False, return_dict=True)
        return outputs.last_hidden_state, outputs
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    outputs = model(**inputs, use_cache=False, output_hidden_states=True, return_dict=True)
    return outputs.hidden_states[-1], outputs


@contextlib.contextmanager
def _eval_mode(model):
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _no_autocast(device: torch.device):
    """The op forms float32 logits itself; an enclosing autocast would round its GEMMs to 16 bits."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _through_wrapper(wrapper, model, compute):
    """Run ``compute()`` as the forward of ``wrapper`` (``model`` itself, or DistributedDataParallel / FSDP around
    it), so that its forward hooks fire: DDP arms its gradient reduction in its forward, FSDP2 unshards the root's
    parameters (embeddings, final norm, lm_head) in its pre-forward hook. Directly for other wrappers."""
    if wrapper is not model and getattr(wrapper, "module", None) is None:
        return compute()
    result, own = [], model.__dict__.get("forward")  # an instance forward (accelerate's wrappers) is kept

    def restore():
        if own is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = own

    def redirected(*args, **kwargs):
        restore()  # before anything inside compute() calls the model
        result.append(compute())
        return result[-1][0]

    model.forward = redirected
    try:
        wrapper()
    finally:
        restore()
    return result[-1]


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` training ``model`` (the student) by ``causal_lm_kd_loss`` against ``teacher_model``.

    ``kd_options``: ``linear_kd_loss`` options (``divergence``, ``temperature``, ``beta``, ``hard_weight``,
    ``soft_weight``, ...). The batches hold ``input_ids`` and optionally ``attention_mask``, ``labels`` (``-100``
    ignored, aligned with ``input_ids``) and ``position_ids``. The teacher is frozen (``requires_grad_(False)``,
    eval mode) and moved to the student's device at the first step.

    Gradient accumulation: the Trainer counts the step's labels into ``num_items_in_batch`` (its collator is
    wrapped so that the labels the loss does not score are ``-100``: each row's first, padding and the token after
    it), which this loss divides by, so the micro-batches' losses add up to the whole step's ``batchmean`` (without labels in the
    batch, each micro-batch is a mean and the Trainer averages them). Under data parallelism with
    ``average_tokens_across_devices`` the count is global and the loss is multiplied by the number of processes,
    which DDP's gradient averaging divides again, as the Trainer does for its own losses.
    """

    def __init__(self, *args, teacher_model=None, kd_options: dict | None = None, **kwargs):
        check = Checks("DistillationTrainer")
        teacher = _pretrained(check, "teacher_model", teacher_model)
        self.kd_options = _kd_options(check, dict(kd_options or {}))
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher.requires_grad_(False).eval()
        # This loss takes num_items_in_batch: have the Trainer count the step's labels and not divide the loss by
        # the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.data_collator = _UnscoredLabelsIgnored(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = _pretrained(Checks("DistillationTrainer"), "model", model)
        device = student.get_output_embeddings().weight.device
        if self.teacher_model.get_output_embeddings().weight.device != device:
            self.teacher_model.to(device)
        # The decoders are called directly, not through the forward accelerate wraps in its mixed-precision autocast.
        with self.accelerator.autocast():
            loss, outputs = _distill("DistillationTrainer.compute_loss", model, self.teacher_model,
                                     inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"),
                                     inputs.get("position_ids"), num_items_in_batch, -100, self.kd_options)
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


class _UnscoredLabelsIgnored:
    """A data collator whose batches' labels ignore what the loss does not score: the first token (nothing predicts
    it), padding and the tokens after it. The Trainer's ``num_items_in_batch`` then counts the scored tokens,
    whether it counts ``labels`` or ``labels[:, 1:]`` (transformers versions differ)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch.get("labels") if isinstance(batch, collections.abc.MutableMapping) else None  # BatchEncoding too
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            labels = _labels_after_tokens(labels, batch.get("attention_mask"), -100).clone()
            labels[:, 0] = -100
            batch["labels"] = labels
        return batch
