"""The `pg-edge` command line: one entry point, one subcommand per tool.

Each subcommand lives in a module exposing ``add_parser(subparsers)``; the parser it adds sets
``func`` to a function taking the parsed arguments and returning an exit code. Only the chosen
command's module is imported (tests/test_cli.py checks that `pg-edge run` imports no
pg_edge.train, convert or quantize); `pg-edge --help` imports none of them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# Subcommand -> (the module whose add_parser defines it, the one-line help `pg-edge --help`
# shows), in the order `pg-edge --help` lists them. A new command is one added line.
COMMAND_MODULES = {
    "run": ("apps.commands.run", "generate text for an image and a prompt"),
    "caption": ("apps.commands.tasks", "a short caption of the image"),
    "ocr": ("apps.commands.tasks", "the text in the image"),
    "ask": ("apps.commands.tasks", "answer a question about the image"),
    "detect": ("apps.commands.tasks", "boxes around the named objects"),
    "segment": ("apps.commands.tasks", "boxes and masks of the named objects"),
    "explain": ("apps.commands.explain", "one generation stage by stage: shapes, tokens, attention mask, top candidates"),
    "serve": ("apps.server.cli", "serve a model over HTTP (OpenAI chat format)"),
    "label": ("apps.commands.label", "auto-label a folder of images into COCO JSON"),
    "verify": ("apps.commands.verify", "check a model against the NumPy reference, or the checkpoint it came from"),
    "export": ("apps.commands.export", "export encode/prefill/decode graphs for C++ or Swift (MLX, no Python)"),
    "convert": ("apps.commands.convert", "convert an official checkpoint (HF folder, hub id, big_vision .npz) to a pg_edge folder"),
    "convert-vae": ("convert.vae_cli", "convert big_vision's vae-oid.npz (segmentation masks) to MLX safetensors"),
    "quantize": ("quantize.cli", "quantize a converted folder to 4/8 bits, per component, and report the quality"),
    "finetune": ("pg_edge.train.cli", "fine-tune on image/prefix/suffix examples (attention-only, LoRA/QLoRA, full)"),
    "bench": ("apps.commands.bench", "time load, vision encode, first token and decode on this machine"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully defined (its module imported) and every other command
    listed by name and help only. `command=None`: all of them defined (for tools and tests)."""
    parser = argparse.ArgumentParser(
        prog="pg-edge",
        description="PaliGemma 1 and 2 on your own machine with MLX.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of any error (also PG_EDGE_DEBUG=1)")
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
    # The subcommand is the first word that is not an option (`pg-edge --debug run ...`).
    command = next((a for a in argv if not a.startswith("-")), "")
    command = command if command in COMMAND_MODULES else ""
    args = build_parser(command).parse_args(argv)
    from pg_edge.atomic import Terminated, signals_raise
    from pg_edge.errors import PgEdgeError

    debug = args.debug or os.environ.get("PG_EDGE_DEBUG") not in (None, "", "0")
    # pg_edge refuses over-large images itself (pg_edge.image_limits), with the numbers.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")

    try:
        with signals_raise():  # SIGTERM/SIGHUP unwind like Ctrl-C: writers remove their temporaries
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"pg-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print(f"pg-edge {args.command}: terminated by signal {t.signum}",
              file=sys.stderr)
        return 128 + t.signum
    except (PgEdgeError, OSError) as err:
        if debug:
            raise
        # Errors we raise on bad input carry a one-line message naming the problem.
        print(f"pg-edge {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not bad input: still one line, the traceback on --debug
        if debug:
            raise
        print(f"pg-edge {args.command}: error: internal error {type(err).__name__}: {one_line(err)} "
              "(a bug in pg_edge; rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """The first line of an error message, printable whatever bytes the input held."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    sys.exit(main())
