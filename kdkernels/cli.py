"""The ``kdkernels`` command.

    kdkernels demo     the main job: a teacher, a baseline and distilled students on digits, over seeds
    kdkernels list     every distillation method with its category and paper
    kdkernels distill  distil a student with any method, on digits or your own data and models
    kdkernels sweep    several methods over several seeds, and their comparison table
    kdkernels info     how kdkernels was built, which CPU kernels are loaded, which backends can run here (and why not)
    kdkernels bench    forward+backward benchmarks of the losses vs eager and torch.compile (see kdkernels.bench)
    kdkernels lm-demo  language-model distillation from hidden states (linear_kd_loss) on a tiny byte-level LM
"""
from __future__ import annotations

import argparse
import json
import sys

from kdkernels.distill import commands as distill_commands
from kdkernels.distill.run_config import ConfigError, parse_with_config


def _info(_arguments) -> int:
    import kdkernels

    info = kdkernels.build_info()
    print(f"kdkernels {kdkernels.__version__}")
    print(json.dumps(info, indent=2, default=str))
    print(f"CPU kernels loaded: {info.get('cpu_capability') or 'none'} (built: "
          f"{', '.join(info.get('cpu_capabilities') or []) or 'none'}; choose with KDKERNELS_CPU_CAPABILITY)")
    for name, status in kdkernels.available_backends().items():
        print(f"  {name:<10} {'available' if status.available else 'unavailable'}"
              + ("" if status.available else f": {status.reason}"))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``kdkernels`` parser and its subcommands' parsers (``commands.choices[name]``)."""
    parser = argparse.ArgumentParser(prog="kdkernels", description="Fused knowledge-distillation kernels and a distillation toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="build information and available backends")
    distill_commands.add_parsers(commands)
    commands.add_parser("bench", help="benchmark the losses (run `kdkernels bench --help` for options)",
                        add_help=False)
    commands.add_parser("lm-demo", help="LM distillation from hidden states on a tiny byte-level model (run "
                        "`kdkernels lm-demo --help` for options)", add_help=False)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, commands = build_parser()
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from kdkernels import bench

        return bench.main(argv[1:])
    if argv[:1] == ["lm-demo"]:
        from kdkernels.distill import lm_demo

        return lm_demo.main(argv[1:])
    try:
        arguments = parse_with_config(parser, commands.choices.get(argv[0]) if argv else None, argv)
        return {"info": _info, **distill_commands.COMMANDS}[arguments.command](arguments)
    except (distill_commands.UsageError, ConfigError) as error:
        print(f"kdkernels {argv[0]}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
