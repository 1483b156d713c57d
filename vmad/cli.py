"""The `vmad` command line.

Each component package owns its sub-commands in a `commands.py` module exposing
`register(commands, bench)`, where `commands` is the top-level sub-parser set and
`bench` the one under `vmad bench`. Those modules import heavy libraries (torch) only
inside the function that runs a command, so `vmad agent` never loads PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vmad import __version__
from vmad.errors import InputError, UsageError

COMMAND_MODULES = (
    "vmad.trainer.commands",
    "vmad.trainer.service_commands",
    "vmad.planner.commands",
    "vmad.edge_agent.commands",
    "vmad.controller.commands",
    "vmad.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmad",
        description="Adaptive anomaly detection and capacity planning for IaaS VMs.",
    )
    parser.add_argument("--version", action="version", version=f"vmad {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench_parser = commands.add_parser("bench", help="reproducible benchmarks that print tables")
    bench = bench_parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands, bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except KeyboardInterrupt:
        return 130
    except (UsageError, InputError) as error:
        print(f"vmad {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
