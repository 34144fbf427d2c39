"""The trainer's configuration (kdkernels.distill.config): a bad option is a ValueError naming it."""
import pytest

from kdkernels.distill.trainer import TrainConfig


@pytest.mark.parametrize("options, match", [
    ({"optimizer": "rmsprop"}, "optimizer"), ({"schedule": "poly"}, "schedule"), ({"amp": "fp8"}, "amp"),
    ({"grad_accum": 0}, "grad_accum"), ({"batch_size": 0}, "batch_size"), ({"epochs": 1.5}, "epochs"),
    ({"lr": 0.0}, "lr"), ({"clip_grad_norm": 0.0}, "clip_grad_norm"), ({"mixup_alpha": -1.0}, "mixup_alpha"),
    ({"schedule": "multistep"}, "milestones"), ({"device": "gpu"}, "device"), ({"num_workers": -1}, "num_workers"),
])
def test_bad_config_is_rejected_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)
