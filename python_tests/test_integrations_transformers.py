"""kdkernels.integrations.transformers on tiny randomly initialised causal LMs built from configs in code (no
downloads): causal_lm_kd_loss against an eager formula on the models' own logits (values and student gradients, in
float64), what the configs say about the logits (tied embeddings, soft-capping, logit scales), num_items_in_batch,
TRL's generalized_jsd_loss, DistillationTrainer with gradient accumulation, and DDP / DTensor with 2 gloo processes.
"""
import datetime
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from kdkernels.integrations import transformers as hf  # noqa: E402
from kdkernels.integrations.transformers import DistillationTrainer, causal_lm_kd_loss  # noqa: E402
from distributed_testing import WORLD_SIZE, assert_case, run_cases  # noqa: E402

STUDENT_VOCAB, TEACHER_VOCAB = 64, 80  # the teacher's vocabulary padded beyond the student's
ARCHITECTURES = {"llama": "LlamaConfig", "gemma2": "Gemma2Config", "cohere": "CohereConfig",
                 "granite": "GraniteConfig"}


def tiny(architecture="llama", hidden=16, vocab=STUDENT_VOCAB, tie=False, seed=0, attention="sdpa", **config):
    """A 2-layer causal LM in float64 with weights large enough for peaked distributions."""
    config_class = getattr(transformers, ARCHITECTURES[architecture], None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {ARCHITECTURES[architecture]}")
    if architecture == "gemma2":
        config.setdefault("head_dim", hidden // 2)
    config = config_class(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie,
                          initializer_range=0.3, pad_token_id=None, bos_token_id=None,
                          eos_token_id=None, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).double()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    return model


def batch(rows=3, length=7, vocab=STUDENT_VOCAB, seed=1, left_padding=True):
    """Token ids, a left- and right-padded attention mask, and labels with a prompt, the padding and the token after
    the left padding ignored. (Eager attention gives NaN rows at left padding: no left padding for it.)"""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0 if left_padding else 1
    attention_mask[-1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100
    labels[1, 2] = -100
    return input_ids, attention_mask, labels


def eager_loss(student_logits, teacher_logits, labels, *, divergence="forward", beta=0.5, temperature=1.0,
               hard_weight=0.0, soft_weight=1.0, num_items=None):
    """The per-token loss on materialised, shifted logits, summed over counted tokens / their count (or num_items)."""
    vocab = student_logits.shape[-1]
    student, teacher = student_logits[:, :-1], teacher_logits[:, :-1, :vocab]
    targets = labels[:, 1:]
    kept = targets != -100
    log_q, log_p = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    if divergence == "forward":
        soft = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif divergence == "reverse":
        soft = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        soft = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    hard = F.cross_entropy(student.transpose(1, 2), targets.clamp_min(0), reduction="none")
    rows = soft_weight * soft + hard_weight * hard
    return rows[kept].sum() / (kept.sum() if num_items is None else num_items)


def logits(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def student_gradients(student, loss):
    student.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    return grads


def assert_same_loss_and_gradients(student, teacher, input_ids, attention_mask, labels, **options):
    loss = causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels, **options)
    grads = student_gradients(student, loss)
    with torch.no_grad():
        teacher_logits = logits(teacher, input_ids, attention_mask)
    expected = eager_loss(logits(student, input_ids, attention_mask), teacher_logits, labels, **options)
    expected_grads = student_gradients(student, expected)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-13)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-13, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("options", [
    {},
    {"divergence": "reverse", "temperature": 2.0},
    {"divergence": "jsd", "beta": 0.3, "hard_weight": 0.5, "soft_weight": 0.5},
], ids=["forward", "reverse-T2", "jsd-hard"])
def test_llama_matches_the_models_logits(tie, options):
    student, teacher = tiny(tie=tie), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    assert_same_loss_and_gradients(student, teacher, *batch(), **options)


def test_padding_and_the_token_after_it_are_not_scored():
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, attention_mask, _ = batch()
    scored = input_ids.masked_fill(attention_mask == 0, -100)
    scored[1, 2] = -100  # after the left padding
    loss = causal_lm_kd_loss(student, teacher, input_ids, attention_mask)
    torch.testing.assert_close(loss, causal_lm_kd_loss(student, teacher, input_ids, attention_mask, scored),
                               rtol=0, atol=0)
    torch.testing.assert_close(loss, causal_lm_kd_loss(student, teacher, input_ids, attention_mask, input_ids),
                               rtol=0, atol=0)
    rows = causal_lm_kd_loss(student, teacher, input_ids, attention_mask, reduction="none")
    assert rows.shape == (input_ids.shape[0], input_ids.shape[1] - 1)
    assert bool((rows[scored[:, 1:] == -100] == 0).all()) and bool((rows[scored[:, 1:] != -100] > 0).all())


def test_gemma2_soft_capping_is_honoured():
    student = tiny("gemma2", tie=True, attention="eager", final_logit_softcapping=2.0)
    teacher = tiny("gemma2", hidden=32, vocab=TEACHER_VOCAB, seed=5, attention="eager", final_logit_softcapping=2.0)
    assert_same_loss_and_gradients(student, teacher, *batch(left_padding=False), divergence="jsd", beta=0.5,
                                   hard_weight=1.0)
    other = tiny("gemma2", hidden=32, vocab=TEACHER_VOCAB, seed=5, attention="eager", final_logit_softcapping=3.0)
    with pytest.raises(ValueError, match=r"causal_lm_kd_loss: teacher must have the student's "
                                         r"config.final_logit_softcapping.*2\.0.*got 3\.0"):
        causal_lm_kd_loss(student, other, *batch())
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_kd_loss(student, tiny(hidden=32, vocab=TEACHER_VOCAB), *batch())


@pytest.mark.parametrize("architecture, scale", [("cohere", {"logit_scale": 0.25}),
                                                  ("granite", {"logits_scaling": 0.5})])
def test_logit_scales_are_honoured(architecture, scale):
    student = tiny(architecture, tie=True, **scale)
    teacher = tiny(architecture, hidden=32, vocab=TEACHER_VOCAB, seed=5,
                   **{key: 2 * value for key, value in scale.items()})
    assert_same_loss_and_gradients(student, teacher, *batch(), divergence="reverse", hard_weight=0.5)


def test_a_scaled_teacher_for_a_plain_student():
    student, teacher = tiny(tie=True), tiny("cohere", hidden=32, vocab=TEACHER_VOCAB, seed=5, logit_scale=3.0)
    assert_same_loss_and_gradients(student, teacher, *batch())


def test_position_ids_reach_both_decoders():
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, _, labels = batch()
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    loss = causal_lm_kd_loss(student, teacher, input_ids, labels=labels, position_ids=positions)
    torch.testing.assert_close(loss, causal_lm_kd_loss(student, teacher, input_ids, labels=labels), rtol=0, atol=0)
    packed = positions - (positions >= 3) * 3  # two sequences per row, as packing collators give them
    other = causal_lm_kd_loss(student, teacher, input_ids, labels=labels, position_ids=packed)
    with torch.no_grad():  # the decoders run without a cache, as in training
        teacher_logits = teacher(input_ids=input_ids, position_ids=packed, use_cache=False).logits
    expected = eager_loss(student(input_ids=input_ids, position_ids=packed, use_cache=False).logits, teacher_logits,
                          labels)
    torch.testing.assert_close(other, expected, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(other, loss)


def test_low_precision_models():
    """A float32 student and a bfloat16 teacher: each side's logits are formed in float32 from its own dtype."""
    student, teacher = tiny(tie=True).float(), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5).bfloat16()
    input_ids, attention_mask, labels = batch()
    loss = causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels, divergence="jsd", hard_weight=0.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.get_output_embeddings().weight.grad.dtype == torch.float32
    with torch.no_grad():
        teacher_logits = logits(teacher, input_ids, attention_mask).double()
        expected = eager_loss(logits(student, input_ids, attention_mask).double(), teacher_logits, labels,
                              divergence="jsd", hard_weight=0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=1e-3)


def test_the_full_model_fallback_gives_the_decoder_s_hidden_states(monkeypatch):
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    inputs = batch()
    expected = causal_lm_kd_loss(student, teacher, *inputs, divergence="jsd")
    monkeypatch.setattr(hf, "_decoder", lambda model: None)
    torch.testing.assert_close(causal_lm_kd_loss(student, teacher, *inputs, divergence="jsd"), expected,
                               rtol=1e-12, atol=0)


def test_num_items_in_batch_adds_micro_batches_up_to_the_batch():
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, attention_mask, labels = batch(rows=4)
    options = {"divergence": "jsd", "beta": 0.7, "hard_weight": 0.25}
    whole = causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels, **options)
    whole_grads = student_gradients(student, whole)
    num_items = int((labels[:, 1:] != -100).sum())
    parts = [causal_lm_kd_loss(student, teacher, input_ids[rows], attention_mask[rows], labels[rows],
                               num_items_in_batch=torch.tensor(num_items), **options)
             for rows in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=0)
    for name, grad in student_gradients(student, parts[0] + parts[1]).items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-10, atol=1e-15)


def test_the_teacher_is_frozen_for_the_call():
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5, attention_dropout=0.5)
    teacher.train()
    inputs = batch()
    first = causal_lm_kd_loss(student, teacher, *inputs)
    first.backward()
    assert teacher.training, "the teacher's mode is restored"
    assert all(p.grad is None for p in teacher.parameters())
    torch.testing.assert_close(causal_lm_kd_loss(student, teacher, *inputs), first, rtol=0, atol=0)  # no dropout


def test_bad_arguments_name_the_argument():
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, attention_mask, labels = batch()
    with pytest.raises(TypeError, match="causal_lm_kd_loss: student must be a transformers.PreTrainedModel"):
        causal_lm_kd_loss(torch.nn.Linear(2, 2), teacher, input_ids)
    with pytest.raises(ValueError, match="teacher must have at least the student's 80 output embedding rows"):
        causal_lm_kd_loss(tiny(hidden=32, vocab=TEACHER_VOCAB), tiny(vocab=48), input_ids)
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids's shape \(3, 7\)"):
        causal_lm_kd_loss(student, teacher, input_ids, attention_mask[:, 1:])
    with pytest.raises(ValueError, match=r"labels must have input_ids's shape"):
        causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels[:2])
    with pytest.raises(TypeError, match="input_ids"):
        causal_lm_kd_loss(student, teacher, input_ids.double())
    with pytest.raises(ValueError, match="input_ids must have shape"):
        causal_lm_kd_loss(student, teacher, input_ids[:, :1])
    with pytest.raises(TypeError, match=r"logit_softcap must be left out \(it is taken from the models"):
        causal_lm_kd_loss(student, teacher, input_ids, logit_softcap=30.0)
    with pytest.raises(TypeError, match="temprature must be one of the linear_kd_loss options temperature, "):
        causal_lm_kd_loss(student, teacher, input_ids, temprature=2.0)
    with pytest.raises(ValueError, match="linear_kd_loss: beta"):
        causal_lm_kd_loss(student, teacher, input_ids, divergence="jsd", beta=2.0)


# ------------------------------------------------------------------------------------------------- TRL's GKD loss

def generalized_jsd_transcribed(student_logits, teacher_logits, labels, beta, temperature=1.0,
                                num_items_in_batch=None):
    """TRL's GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py at f2cd5771), transcribed from
    its formula: log_softmax of logits / T; β = 0 KL(teacher ‖ student), β = 1 KL(student ‖ teacher), otherwise
    β KL(teacher ‖ m) + (1 − β) KL(student ‖ m), log m = logsumexp(log q + log(1 − β), log p + log β); entries at
    labels == -100 dropped; sum / num_items_in_batch, else batchmean = sum / #unmasked tokens."""
    log_q = F.log_softmax(student_logits / temperature, -1)
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = log_p.exp() * (log_p - log_q)
    elif beta == 1:
        jsd = log_q.exp() * (log_q - log_p)
    else:
        log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        jsd = beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)
    mask = labels != -100
    jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    return jsd.sum() / mask.sum().clamp_min(1)


def trl_generalized_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        pytest.skip("trl (with trl.experimental.gkd) is not installed; the transcription test covers the formula")
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("source", ["transcription", "trl"])
@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 1.0])
def test_gkd_generalized_jsd_is_jsd_with_the_same_beta(source, beta):
    """GKDTrainer's non-Liger loss: generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1],
    labels[:, 1:], beta=self.beta, num_items_in_batch=...) at T = 1 is causal_lm_kd_loss(divergence="jsd",
    beta=self.beta) with the same labels and num_items_in_batch."""
    reference = generalized_jsd_transcribed if source == "transcription" else trl_generalized_jsd()
    student, teacher = tiny(tie=True), tiny(hidden=32, seed=5)  # TRL needs equal vocabularies
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        teacher_logits = logits(teacher, input_ids, attention_mask)
    for num_items in (None, torch.tensor(40)):
        loss = causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels, divergence="jsd", beta=beta,
                                 num_items_in_batch=num_items)
        grads = student_gradients(student, loss)
        expected = reference(logits(student, input_ids, attention_mask)[:, :-1], teacher_logits[:, :-1],
                             labels[:, 1:], beta=beta, num_items_in_batch=num_items)
        expected_grads = student_gradients(student, expected)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-13)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-13)


def test_readme_gkd_drop_in_matches_gkd_trainer_compute_loss():
    """The README's FusedGKDTrainer.compute_loss against GKDTrainer.compute_loss's own (non-Liger) path, values and
    gradients, with and without num_items_in_batch."""
    trl_generalized_jsd()
    from trl.experimental.gkd import GKDTrainer

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "FusedGKDTrainer" in block]
    namespace = {"causal_lm_kd_loss": causal_lm_kd_loss}
    exec(snippet, namespace)
    student, teacher = tiny(tie=True), tiny(hidden=32, seed=5)
    trainer = object.__new__(namespace["FusedGKDTrainer"])
    trainer.teacher_model, trainer.beta, trainer.use_liger_gkd_loss = teacher, 0.3, False
    input_ids, attention_mask, labels = batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for num_items in (None, torch.tensor(17)):
        loss = trainer.compute_loss(student, inputs, num_items_in_batch=num_items)
        grads = student_gradients(student, loss)
        expected = GKDTrainer.compute_loss(trainer, student, inputs, num_items_in_batch=num_items)
        expected_grads = student_gradients(student, expected)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-13)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-13)


# ------------------------------------------------------------------------------------------------- the Trainer

class Rows(torch.utils.data.Dataset):
    def __init__(self, input_ids, attention_mask, labels):
        self.items = [{"input_ids": i, "attention_mask": a, "labels": l}
                      for i, a, l in zip(input_ids, attention_mask, labels)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def trainer_arguments(tmp_path, **overrides):
    arguments = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=0.0, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True, seed=0)
    arguments.update(overrides)
    return transformers.TrainingArguments(**arguments)


def test_trainer_step_is_the_whole_batch_gradient_with_accumulation(tmp_path):
    """One SGD step (lr 1) over 2 accumulated micro-batches of unequal token counts moves the student by exactly
    minus the gradient of the loss on the whole batch: the micro-batches are normalised by num_items_in_batch, which
    counts the scored tokens (the labels give the token after the left padding, which is not scored)."""
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, attention_mask, _ = batch(rows=4)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    options = {"divergence": "jsd", "beta": 0.5, "hard_weight": 0.5}
    expected = student_gradients(student, causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels,
                                                            **options))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd_options=options,
                                  args=trainer_arguments(tmp_path, max_steps=1),
                                  train_dataset=Rows(input_ids, attention_mask, labels))
    trainer.train()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - expected[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
    for name, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[name]) and not p.requires_grad


def test_trainer_trains_the_student(tmp_path):
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, attention_mask, labels = batch(rows=4)
    arguments = trainer_arguments(tmp_path, max_steps=6, learning_rate=0.02, optim="adamw_torch")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd_options={"temperature": 2.0},
                                  args=arguments, train_dataset=Rows(input_ids, attention_mask, labels))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert trainer.evaluate(Rows(input_ids, attention_mask, labels))["eval_loss"] < losses[0]


def test_trainer_mixed_precision_runs_the_decoders_under_autocast(tmp_path):
    student, teacher = tiny(tie=True).float(), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5).float()
    dtypes = []
    for model in (student, teacher):
        model.get_decoder().layers[0].mlp.down_proj.register_forward_hook(
            lambda module, args, output: dtypes.append(output.dtype))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trainer_arguments(
                                      tmp_path, max_steps=1, learning_rate=0.01, bf16=True),
                                  train_dataset=Rows(*batch(rows=4)))
    trainer.train()
    assert dtypes == [torch.bfloat16] * 4, dtypes  # student and teacher, 2 micro-batches
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert student.get_output_embeddings().weight.dtype == torch.float32


def test_trainer_rejects_a_missing_teacher_and_unknown_options(tmp_path):
    with pytest.raises(TypeError, match="DistillationTrainer: teacher_model must be a transformers.PreTrainedModel"):
        DistillationTrainer(model=tiny(), args=trainer_arguments(tmp_path))
    with pytest.raises(TypeError, match="DistillationTrainer: alpha must be one of the linear_kd_loss options"):
        DistillationTrainer(model=tiny(), teacher_model=tiny(), kd_options={"alpha": 0.5},
                            args=trainer_arguments(tmp_path))


# ------------------------------------------------------------------------------------------------- 2 gloo processes

TIMEOUT = datetime.timedelta(seconds=60)


def whole_batch_gradients(options):
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, attention_mask, labels = batch(rows=4)
    loss = causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels, **options)
    return loss, student_gradients(student, loss)


def case_ddp(rank):
    """Each rank's loss over the global token count, times the world size (as DistillationTrainer does), through a
    DDP-wrapped student: DDP's averaged gradients are the whole batch's in one process."""
    options = {"divergence": "jsd", "beta": 0.3, "hard_weight": 0.5}
    _, expected = whole_batch_gradients(options)
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    model = torch.nn.parallel.DistributedDataParallel(student)
    input_ids, attention_mask, labels = (t[2 * rank:2 * rank + 2] for t in batch(rows=4))
    num_items = (labels[:, 1:] != -100).sum()
    dist.all_reduce(num_items)
    loss = causal_lm_kd_loss(model, teacher, input_ids, attention_mask, labels, num_items_in_batch=num_items,
                             **options) * WORLD_SIZE
    loss.backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-13, msg=lambda m: f"{name}: {m}")
    assert "forward" not in student.__dict__


def case_fsdp2(rank):
    """The student under FSDP2 (fully_shard on each layer and the root), each rank its half of the batch: the
    reduce-scattered gradients are the whole batch's in one process (the lm_head is read while the root forward
    holds it unsharded)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    options = {"divergence": "jsd", "beta": 0.3, "hard_weight": 0.5}
    _, expected = whole_batch_gradients(options)
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    input_ids, attention_mask, labels = batch(rows=4)
    num_items = (labels[:, 1:] != -100).sum()
    rows = slice(2 * rank, 2 * rank + 2)
    loss = causal_lm_kd_loss(student, teacher, input_ids[rows], attention_mask[rows], labels[rows],
                             num_items_in_batch=num_items, **options) * WORLD_SIZE
    loss.backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), expected[name], rtol=1e-9, atol=1e-13,
                                   msg=lambda m: f"{name}: {m}")


def case_dtensor(rank):
    """A Shard(0) DTensor lm_head weight is gathered once per call, with the loss and gradients of the plain one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    options = {"divergence": "forward", "hard_weight": 0.5}
    student, teacher = tiny(), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    inputs = batch(rows=4)
    expected = causal_lm_kd_loss(student, teacher, *inputs, **options)
    expected_grads = student_gradients(student, expected)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    head = student.get_output_embeddings()
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
    gathers = []
    full_tensor = DTensor.full_tensor
    DTensor.full_tensor = lambda self, **kw: gathers.append(1) or full_tensor(self, **kw)
    try:
        loss = causal_lm_kd_loss(student, teacher, *inputs, **options)
    finally:
        DTensor.full_tensor = full_tensor
    assert len(gathers) == 1, f"the lm_head weight was gathered {len(gathers)} times"
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert isinstance(head.weight.grad, DTensor)
    torch.testing.assert_close(head.weight.grad.full_tensor(), expected_grads["lm_head.weight"], rtol=1e-10, atol=1e-14)
    for name, p in student.named_parameters():
        if name != "lm_head.weight":
            torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-10, atol=1e-14)


def case_trainer(rank, tmp_path):
    """DistillationTrainer on 2 processes (per-device batch 1, 2 accumulated micro-batches, the 4 rows split by the
    distributed sampler): one SGD step of lr 1 is minus the whole batch's gradient in one process."""
    options = {"divergence": "reverse", "hard_weight": 0.5}
    student, teacher = tiny(tie=True), tiny(hidden=32, vocab=TEACHER_VOCAB, seed=5)
    input_ids, attention_mask, _ = batch(rows=4)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    expected = student_gradients(student, causal_lm_kd_loss(student, teacher, input_ids, attention_mask, labels,
                                                            **options))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE="2")
    arguments = trainer_arguments(tmp_path, max_steps=1, per_device_train_batch_size=1, ddp_backend="gloo",
                                  average_tokens_across_devices=True)  # the default now; False in 4.46
    assert arguments.world_size == WORLD_SIZE
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd_options=options, args=arguments,
                                  train_dataset=Rows(input_ids, attention_mask, labels))
    trainer.train()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - expected[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")


CASES = {"ddp": case_ddp, "fsdp2": case_fsdp2, "dtensor": case_dtensor, "trainer": case_trainer}


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    return run_cases(__name__, tmp_path_factory.mktemp("distributed"), timeout_s=TIMEOUT.total_seconds())


@pytest.mark.parametrize("name", list(CASES))
def test_two_gloo_processes(distributed_results, name):
    assert_case(distributed_results, name)
