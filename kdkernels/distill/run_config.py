"""Configuration files of the commands: every command-line option of ``kdkernels distill`` / ``sweep`` in a YAML
file (``--config run.yaml``), command-line flags overriding it, and the resolved configuration written beside the
results (``OUT/config.yaml``) so that ``--config OUT/config.yaml`` repeats the run.

A file is a mapping of option names, spelt as the flags without dashes (``batch-size: 128``) or as Python names
(``batch_size: 128``); ``set`` (the repeatable ``--set NAME=VALUE``) may be a mapping (``set: {temperature: 2}``).
Values go through the option's own type and choices, so a file is checked as the command line is: an unknown
option, a wrong type or a value outside the choices is an error naming the file and the option.
"""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path

CONFIG_DEST = "config"
NOT_SAVED = ("command", CONFIG_DEST)


class ConfigError(ValueError):
    """A bad configuration file (reported like a bad command line)."""


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ConfigError("--config needs PyYAML: pip install 'kdkernels[train]' (or pyyaml)") from None
    return yaml


def read_config(path: str | Path) -> dict:
    """The mapping in the YAML file at ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path}: no such file")
    yaml = _yaml()
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: expected a mapping of option names to values, got "
                          f"{type(loaded).__name__}")
    return loaded


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions
            if action.option_strings and action.dest not in (argparse.SUPPRESS, "help", CONFIG_DEST)}


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _convert(path: Path, action: argparse.Action, value):
    """``value`` as the option ``action`` would parse it from the command line."""
    name = _flag(action)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"config {path}: {name} is a switch: give true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):
            value = [f"{key}={item!r}" if isinstance(item, str) else f"{key}={item}" for key, item in value.items()]
        if not isinstance(value, list):
            raise ConfigError(f"config {path}: {name} takes a list (or a mapping for --set), got {value!r}")
        return [_convert_one(path, action, name, item) for item in value]
    return _convert_one(path, action, name, value)


def _convert_one(path: Path, action: argparse.Action, name: str, value):
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(item, (int, float, str)) for item in value):
        value = ",".join(str(item) for item in value)   # a list option spelt as a YAML list (milestones)
    if action.type is not None:
        if isinstance(value, (dict, list)) or (isinstance(value, bool) and action.type is not bool):
            raise ConfigError(f"config {path}: {name} expects one value, got {value!r}")
        try:
            value = action.type(value if action.type in (int, float) else str(value))
        except (TypeError, ValueError):
            raise ConfigError(f"config {path}: {name} expects {getattr(action.type, '__name__', 'a value')}, got "
                              f"{value!r}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"config {path}: {name} must be one of {list(action.choices)}, got {value!r}")
    return value


def config_defaults(parser: argparse.ArgumentParser, path: str | Path) -> dict:
    """The options of the file at ``path`` as ``parser`` defaults (``dest -> value``), checked and converted."""
    path = Path(path)
    options = _options(parser)
    defaults = {}
    by_flag = {_flag(action).lstrip("-").replace("-", "_"): dest for dest, action in options.items()}
    for key, value in read_config(path).items():
        dest = str(key).replace("-", "_")
        dest = dest if dest in options else by_flag.get(dest, dest)
        if dest not in options:
            flags = [_flag(action).lstrip("-") for action in options.values()]
            close = difflib.get_close_matches(str(key).replace("_", "-"), flags, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"config {path}: unknown option {key!r}{hint} (options: {', '.join(sorted(flags))})")
        defaults[dest] = _convert(path, options[dest], value)
    return defaults


def parse_with_config(parser: argparse.ArgumentParser, subparser: argparse.ArgumentParser,
                      argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the options of ``--config FILE`` (if given) as the subcommand's defaults:
    the file fills what the command line does not say."""
    arguments = parser.parse_args(argv)
    path = getattr(arguments, CONFIG_DEST, None)
    if path is None:
        return arguments
    subparser.set_defaults(**config_defaults(subparser, path))
    return parser.parse_args(argv)


def resolved_config(arguments: argparse.Namespace) -> dict:
    """Every option of a parsed command line, as a configuration file holds them (paths as strings)."""
    values = {}
    for dest, value in sorted(vars(arguments).items()):
        if dest in NOT_SAVED:
            continue
        values[dest.replace("_", "-")] = str(value) if isinstance(value, Path) else value
    return values


def write_config(arguments: argparse.Namespace, path: str | Path) -> Path:
    """Writes :func:`resolved_config` as YAML to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# kdkernels: the resolved configuration of this run; repeat it with --config this-file\n"
    path.write_text(header + _yaml().safe_dump(resolved_config(arguments), sort_keys=True))
    return path
