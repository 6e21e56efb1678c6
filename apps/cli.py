"""The `pg-edge` command line: one entry point, one subcommand per tool.

Each subcommand lives in a module exposing ``add_parser(subparsers)``; the parser it adds sets
``func`` to a function taking the parsed arguments and returning an exit code. Only the chosen
command's module is imported (tests/test_cli.py checks that `pg-edge run` imports no
pg_edge.train, convert or quantize); `pg-edge --help` imports none of them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand -> (the module whose add_parser defines it, the one-line help `pg-edge --help`
# shows), in the order `pg-edge --help` lists them. A new command is one added line.
COMMAND_MODULES = {
    "run": ("apps.commands.run", "generate text for an image and a prompt"),
    "caption": ("apps.commands.tasks", "a short caption of the image"),
    "ocr": ("apps.commands.tasks", "the text in the image"),
    "ask": ("apps.commands.tasks", "answer a question about the image"),
    "detect": ("apps.commands.tasks", "boxes around the named objects"),
    "segment": ("apps.commands.tasks", "boxes and masks of the named objects"),
    "verify": ("apps.commands.verify", "check a model against the NumPy reference, or the checkpoint it came from"),
    "convert": ("apps.commands.convert", "convert an official checkpoint (HF folder, hub id, big_vision .npz) to a pg_edge folder"),
    "convert-vae": ("convert.vae_cli", "convert big_vision's vae-oid.npz (segmentation masks) to MLX safetensors"),
    "quantize": ("quantize.cli", "quantize a converted folder to 4/8 bits, per component, and report the quality"),
    "finetune": ("pg_edge.train.cli", "fine-tune on image/prefix/suffix examples (attention-only, LoRA/QLoRA, full)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully defined (its module imported) and every other command
    listed by name and help only. `command=None`: all of them defined (for tools and tests)."""
    parser = argparse.ArgumentParser(
        prog="pg-edge",
        description="PaliGemma 1 and 2 on your own machine with MLX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = set(m for m, _ in COMMAND_MODULES.values()) if command is None else (
        {COMMAND_MODULES[command][0]} if command in COMMAND_MODULES else set())
    added: set[str] = set()
    for name, (module, help_) in COMMAND_MODULES.items():
        if module not in wanted:  # listed only; when chosen, its own module parses it
            sub.add_parser(name, help=help_, add_help=False)
        elif module not in added:  # defines all of its commands (tasks: caption, ocr, ...)
            importlib.import_module(module).add_parser(sub)
            added.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMAND_MODULES else ""
    args = build_parser(command).parse_args(argv)
    from pg_edge.errors import PgEdgeError

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
