"""Configuration files of the commands (kdkernels.distill.run_config): a YAML file of options, flags overriding it,
the resolved configuration written beside the results and read back to the same options, and errors naming the file
and the option."""
import json

import pytest

from kdkernels.cli import build_parser, main
from kdkernels.distill.commands import resolve_training
from kdkernels.distill.run_config import ConfigError, parse_with_config, read_config


def parse(argv):
    parser, commands = build_parser()
    return parse_with_config(parser, commands.choices[argv[0]], argv)


def test_a_config_file_fills_the_options_and_flags_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: dkd\nbatch-size: 32\nlr: 0.1\namp: bf16\nno_progress: true\n"
                      "set: {beta: 2, warmup: 5}\nteacher-cache: cache/teachers\n")
    arguments = parse(["distill", "--config", str(config), "--lr", "0.01", "--set", "beta=3"])
    assert arguments.method == "dkd" and arguments.batch_size == 32 and arguments.amp == "bf16"
    assert arguments.lr == 0.01                                          # the flag wins
    assert arguments.no_progress is True and str(arguments.teacher_cache) == "cache/teachers"
    assert arguments.overrides == ["beta=2", "warmup=5", "beta=3"]      # later --set wins when parsed
    assert arguments.epochs is None and arguments.recipe == "digits"     # not in the file: the recipe's, later


def test_the_resolved_configuration_repeats_the_run(tmp_path):
    """A 1-epoch ce run configured by a file: OUT/config.yaml holds every option as resolved, and parsing it gives
    the same options again."""
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(f"method: ce\nepochs: 3\ntrain-size: 50\nbatch-size: 16\nno-progress: true\nout: {out}\n")
    assert main(["distill", "--config", str(config), "--epochs", "1", "--json", str(tmp_path / "r.json")]) == 0
    resolved = read_config(out / "config.yaml")
    assert resolved["epochs"] == 1 and resolved["method"] == "ce" and resolved["train-size"] == 50
    assert len(json.loads((tmp_path / "r.json").read_text())["history"]) == 1
    first = parse(["distill", "--config", str(config), "--epochs", "1", "--json", str(tmp_path / "r.json")])
    again = parse(["distill", "--config", str(out / "config.yaml")])
    resolve_training(first)
    assert {k: v for k, v in vars(again).items() if k != "config"} == \
        {k: v for k, v in vars(first).items() if k != "config"}


@pytest.mark.parametrize("text, message", [
    ("batch-sise: 3\n", "unknown option 'batch-sise'; did you mean batch-size"),
    ("epochs: many\n", "--epochs expects int, got 'many'"),
    ("amp: fp8\n", r"--amp must be one of \['off', 'bf16', 'fp16'\], got 'fp8'"),
    ("resume: 1\n", "--resume is a switch: give true or false"),
    ("set: 3\n", "--set takes a list"),
    ("- method\n", "expected a mapping of option names to values, got list"),
    ("method: [kd\n", "not valid YAML"),
])
def test_bad_config_files_name_the_file_and_the_option(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse(["distill", "--config", str(config)])
    assert main(["distill", "--config", str(config)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_a_missing_config_file_and_a_missing_method_are_usage_errors(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: no such file" in capsys.readouterr().err
    assert main(["distill", "--epochs", "1"]) == 2
    assert "--method is required (on the command line or in --config)" in capsys.readouterr().err


def test_a_training_recipe_fills_the_options_not_given(tmp_path):
    """``--recipe cifar`` is mdistiller's CIFAR-100 protocol; explicit options override it; the resolved file holds
    the values used and reads back to them (milestones as a YAML list)."""
    from kdkernels.distill.commands import train_config

    arguments = parse(["distill", "--method", "kd", "--recipe", "cifar", "--lr", "0.02"])
    resolve_training(arguments)
    config = train_config(arguments)
    assert (config.epochs, config.batch_size, config.lr, config.momentum, config.weight_decay) == \
        (240, 64, 0.02, 0.9, 5e-4)
    assert config.schedule == "multistep" and tuple(config.milestones) == (150, 180, 210) and config.gamma == 0.1
    assert arguments.teacher_epochs == 240
    small = parse(["distill", "--method", "kd", "--recipe", "cifar", "--student", "ShuffleV2"])
    resolve_training(small)
    assert small.lr == 0.01                                 # RepDistiller's rate for MobileNetV2 / ShuffleNet students
    imagenet = parse(["distill", "--method", "kd", "--recipe", "imagenet"])
    resolve_training(imagenet)
    assert (imagenet.epochs, imagenet.batch_size, imagenet.lr, imagenet.weight_decay, tuple(imagenet.milestones)) \
        == (100, 256, 0.1, 1e-4, (30, 60, 90))
    from kdkernels.distill.run_config import write_config
    write_config(arguments, tmp_path / "config.yaml")
    again = parse(["distill", "--config", str(tmp_path / "config.yaml")])
    resolve_training(again)
    assert tuple(again.milestones) == (150, 180, 210) and again.lr == 0.02 and again.epochs == 240
    assert parse(["distill", "--milestones", "5,9"]).milestones == (5, 9)
