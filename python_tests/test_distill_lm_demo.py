"""`kdkernels lm-demo` (kdkernels/distill/lm_demo.py) at a tiny setting: a teacher and students train from the
standard library's bytes, every distillation row comes from linear_kd_loss, and bad options are refused."""
import json
import math

import pytest
import torch

from kdkernels import cli
from kdkernels.distill import lm_demo

TINY = ["--seeds", "1", "--steps", "2", "--teacher-steps", "3", "--context", "16", "--batch-size", "2",
        "--teacher-width", "16", "--teacher-layers", "1", "--student-width", "8", "--student-layers", "1"]


def test_lm_demo_writes_a_perplexity_table_for_every_method(tmp_path, capsys):
    assert cli.main(["lm-demo", *TINY, "--methods", "ce,forward-kl,skew-kl,top-16", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "lm_demo.json").read_text())
    assert list(result["methods"]) == ["ce", "forward-kl", "skew-kl", "top-16"]
    for record in result["methods"].values():
        assert 1.0 < record["perplexity_mean"] < 10 * lm_demo.VOCABULARY and math.isfinite(record["step_s"])
    assert result["corpus"]["bytes"] > 10_000 and 1.0 < result["teacher"]["perplexity"]
    assert "| top-16 | divergence=forward, topk=16 |" in (tmp_path / "lm_demo.md").read_text()
    assert "held-out perplexity" in capsys.readouterr().out


def test_the_distillation_loss_is_linear_kd_on_the_models_hidden_states():
    torch.manual_seed(0)
    student, teacher = lm_demo.TinyCausalLM(8, 1, 2, 16), lm_demo.TinyCausalLM(16, 1, 2, 16)
    tokens = torch.randint(0, 256, (2, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ours = lm_demo.distillation_loss(student, teacher, inputs, targets, dict(divergence="reverse"), 0.25)
    log_s, log_t = student(inputs).log_softmax(-1), teacher(inputs).log_softmax(-1).detach()
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    cross_entropy = torch.nn.functional.cross_entropy(student(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(ours, 0.75 * reverse + 0.25 * cross_entropy, rtol=1e-5, atol=1e-6)
    top = lm_demo.distillation_loss(student, teacher, inputs, targets, dict(divergence="forward", topk=256), 0.0)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    torch.testing.assert_close(top, forward, rtol=1e-5, atol=1e-6)   # k = V: the dense forward KL


@pytest.mark.parametrize("arguments, message", [
    (["--methods", "ce,kd"], "unknown method"), (["--steps", "0"], "--steps must be >= 1"),
    (["--hard-weight", "1.5"], "--hard-weight must be in"),
])
def test_bad_options_are_refused_with_a_message(arguments, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        lm_demo.main([*TINY, *arguments, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
