"""One optimiser step (kdkernels.distill.step, kdkernels.distill.precision): AMP runs the models in low precision
and the losses in fp32 (fp16 with a checkpointed GradScaler), gradient accumulation equals one large batch, and
clipping bounds the update, and the channels-last memory format changes the layout, not the run."""
import math

import pytest
import torch

from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.terms import CrossEntropyTerm
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, kd_recipe, parameters_of, recording_recipe, small_split


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_models_in_low_precision_and_losses_in_fp32(amp, dtype):
    if amp == "fp16" and not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    recipe, term = recording_recipe()
    outputs = []
    handle = recipe.student.register_forward_hook(lambda _m, _i, output: outputs.append(output.dtype))
    try:
        result = Trainer(TrainConfig(epochs=1, batch_size=32, amp=amp, **QUIET)).fit(
            recipe, small_split().train, small_split().test)
    finally:
        handle.remove()
    # Distiller.build's sizing pass runs first, without autocast; then every training and eval forward uses it.
    assert outputs[0] == torch.float32 and set(outputs[1:]) == {dtype}
    assert {r["dtypes"] for r in term.records} == {(torch.float32, torch.float32)}
    assert {r["loss_dtype"] for r in term.records} == {torch.float32}
    assert all(math.isfinite(v) for row in result.history for v in row.values() if isinstance(v, float))


def test_fp16_uses_a_grad_scaler_and_checkpoints_it(tmp_path):
    config = TrainConfig(epochs=1, batch_size=32, amp="fp16", out_dir=tmp_path, **QUIET)
    Trainer(config).fit(kd_recipe(), small_split().train)
    scaler = load_checkpoint(tmp_path / "last.pt")["run"]["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 2   # two finite steps


def test_gradient_accumulation_equals_one_large_batch():
    """2 micro-batches of 16 per step = 1 batch of 32 (mean-reduced losses, no BN); 72 samples, so the epoch ends
    on a short batch of 8 in both runs (a group of one micro-batch)."""
    split = small_split(72)
    base = dict(epochs=2, lr=0.1, **QUIET)
    large = kd_recipe()
    Trainer(TrainConfig(batch_size=32, **base)).fit(large, split.train)
    accumulated = kd_recipe()
    result = Trainer(TrainConfig(batch_size=16, grad_accum=2, **base)).fit(accumulated, split.train)
    for name, value in parameters_of(large.student).items():
        torch.testing.assert_close(parameters_of(accumulated.student)[name], value, rtol=1e-5, atol=1e-6)
    assert result.history[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))


def test_clip_grad_norm_bounds_the_update():
    """One plain SGD step (lr 1, no momentum or decay) moves the parameters by lr · ‖clipped gradient‖."""
    split = small_split()
    base = dict(epochs=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", **QUIET)
    moves = {}
    for clip in (None, 1e-3):
        recipe = kd_recipe()
        before = torch.cat([p.detach().flatten().clone() for p in recipe.student.parameters()])
        Trainer(TrainConfig(clip_grad_norm=clip, **base)).fit(recipe, split.train)
        after = torch.cat([p.detach().flatten() for p in recipe.student.parameters()])
        moves[clip] = float((after - before).norm())
    assert moves[1e-3] == pytest.approx(1e-3, rel=1e-4)
    assert moves[None] > 10 * moves[1e-3]


def test_a_diverged_loss_is_an_error_naming_the_step():
    from kdkernels.distill.distiller import Distiller
    from kdkernels.distill.models import digits_model
    from kdkernels.distill.recipe import Recipe, Stage
    from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm

    def blows_up(logits, *, context):
        return logits.sum() * (float("nan") if context.step == 2 else 0.0)

    class StepTerm(FunctionTerm):
        def loss(self, *values, context):
            return self.fn(*values, context=context)

    distiller = Distiller({"student": digits_model("student-mlp")},
                          [CrossEntropyTerm("student"), StepTerm("unstable", blows_up, ("student",))])
    recipe = Recipe("unstable", [Stage("unstable", distiller)])
    with pytest.raises(FloatingPointError, match=r"stage 'unstable', epoch 1, step 2: the loss is nan \(terms: "
                                                 r"ce_student .*, unstable nan\); training has diverged"):
        Trainer(TrainConfig(epochs=1, batch_size=16, **QUIET)).fit(recipe, small_split().train, small_split().test)


def test_channels_last_keeps_the_run_and_converts_the_weights_and_inputs():
    """``channels_last=True`` trains the same model as the default memory format (the same math in another layout);
    the 4-D weights of the stage's models end channels-last; "auto" leaves a CPU run alone; bad values fail."""
    from kdkernels.distill.batches import to_device, uses_channels_last
    from kdkernels.distill.models import digits_model
    from kdkernels.distill.recipe import Recipe, Stage

    def run(channels_last):
        torch.manual_seed(0)
        model = digits_model("student-cnn")
        recipe = Recipe("ce", [Stage("ce", Distiller({"student": model}, [CrossEntropyTerm("student")]))])
        result = Trainer(TrainConfig(epochs=1, batch_size=32, channels_last=channels_last, **QUIET)).fit(
            recipe, small_split().train, small_split().test)
        return model, result

    plain, plain_result = run(False)
    converted, converted_result = run(True)
    conv = next(p for p in converted.parameters() if p.dim() == 4 and p.shape[1] > 1)   # C = 1: both layouts
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for a, b in zip(plain.parameters(), converted.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert converted_result.history[0]["train_loss"] == pytest.approx(plain_result.history[0]["train_loss"], rel=1e-5)
    batch = to_device({"input": torch.randn(2, 3, 4, 4), "target": torch.arange(2)}, torch.device("cpu"), True)
    assert batch["input"].is_contiguous(memory_format=torch.channels_last) and batch["target"].dim() == 1
    assert not uses_channels_last(TrainConfig(amp="bf16"), torch.device("cpu"))
    assert uses_channels_last(TrainConfig(amp="bf16"), torch.device("cuda"))
    assert not uses_channels_last(TrainConfig(), torch.device("cuda"))
    with pytest.raises(ValueError, match="channels_last must be 'auto', True or False"):
        TrainConfig(channels_last="yes")
