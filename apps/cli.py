"""The `pg-edge` command line: one entry point, one subcommand per tool.

Each subcommand lives in its own module that exposes ``add_parser(subparsers)``; the module's
parser sets ``func`` to a function taking the parsed arguments and returning an exit code.
Modules are imported lazily so `pg-edge run` never pays for (or needs) the converter's imports.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pg_edge.errors import PgEdgeError

# (subcommand module, one-line help) in the order `pg-edge --help` lists them.
COMMAND_MODULES = [
    "apps.commands.run",
    "apps.commands.tasks",
    "apps.commands.verify",
    "convert.cli",
    "convert.vae_cli",
    "quantize.cli",
    "pg_edge.train.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-edge",
        description="PaliGemma 1 and 2 on your own machine with MLX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PgEdgeError, OSError) as err:
        # Errors we raise on bad input carry a one-line message naming the problem.
        print(f"pg-edge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
