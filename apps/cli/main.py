"""The `pg-edge` command line: one entry point, one subcommand per tool.

Each subcommand lives in a module of commands/ exposing ``add_parser(subparsers)``; the parser
it adds sets ``func`` to a function taking the parsed arguments and returning an exit code. Only
the chosen command's module is imported (tests/cli/test_cli.py checks that `pg-edge run` imports no
pg_edge.train, pg_edge.convert or pg_edge.quantize); `pg-edge --help` imports none of them.
Every subcommand's parser is a CommandParser: --help shows the defaults, --debug is accepted
after the command too; an unknown option is reported with that command's usage.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from pg_edge import __version__

# Subcommand -> (the module in commands/ whose add_parser defines it, the one-line help
# `pg-edge --help` shows), in the order `pg-edge --help` lists them. A new command is one line.
COMMAND_MODULES = {
    "run": ("run", "generate text for an image and a prompt"),
    "caption": ("tasks", "a short caption of the image"),
    "ocr": ("tasks", "the text in the image"),
    "ask": ("tasks", "answer a question about the image"),
    "detect": ("tasks", "boxes around the named objects"),
    "segment": ("tasks", "boxes and masks of the named objects"),
    "explain": ("explain", "one generation stage by stage: shapes, tokens, attention mask, top candidates"),
    "serve": ("serve", "serve a model over HTTP (OpenAI chat format)"),
    "label": ("label", "auto-label a folder of images into COCO JSON"),
    "verify": ("verify", "check a model against the NumPy reference, or the checkpoint it came from"),
    "export": ("export", "export encode/prefill/decode graphs for C++ or Swift (MLX, no Python)"),
    "convert": ("convert", "convert an official checkpoint (HF folder, hub id, big_vision .npz) to a pg_edge folder"),
    "convert-vae": ("convert_vae", "convert big_vision's vae-oid.npz (segmentation masks) to MLX safetensors"),
    "quantize": ("quantize", "quantize a converted folder to 4/8 bits, per component, and report the quality"),
    "finetune": ("finetune", "fine-tune on image/prefix/suffix examples (attention-only, LoRA/QLoRA, full)"),
    "bench": ("bench", "time load, vision encode, first token and decode on this machine"),
}


DEBUG_HELP = "print the full traceback of any error (also PG_EDGE_DEBUG=1)"


class HelpFormatter(argparse.HelpFormatter):
    """`--help` shows every option's default: a help text that does not state it gets
    "(default: X)" appended; None, False and [] defaults (option absent, flag off, none
    repeated) show nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if ("default" in text or not action.option_strings or default is None or default is False
                or default == [] or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: defaults shown in its --help, and --debug accepted after the
    command as before it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: absent here leaves the value the top-level --debug set.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully defined (its module imported) and every other command
    listed by name and help only. `command=None`: all of them defined (for tools and tests)."""
    parser = argparse.ArgumentParser(
        prog="pg-edge",
        description="PaliGemma 1 and 2 on your own machine with MLX. `pg-edge COMMAND --help` "
        "gives a command's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"pg-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    wanted = set(m for m, _ in COMMAND_MODULES.values()) if command is None else (
        {COMMAND_MODULES[command][0]} if command in COMMAND_MODULES else set())
    added: set[str] = set()
    for name, (module, help_) in COMMAND_MODULES.items():
        if module not in wanted:  # listed only; when chosen, its own module parses it
            sub.add_parser(name, help=help_, add_help=False)
        elif module not in added:  # defines all of its commands (tasks: caption, ocr, ...)
            importlib.import_module(f"{__package__}.commands.{module}").add_parser(sub)
            added.add(module)
    return parser


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name` inside `build_parser()`'s parser."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand is the first word that is not an option (`pg-edge --debug run ...`).
    command = next((a for a in argv if not a.startswith("-")), "")
    command = command if command in COMMAND_MODULES else ""
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:  # a bare `pg-edge` (or only --debug): the help, not an error
        parser.print_help()
        return 0
    if unknown:  # with the usage of the command they were given to, not the top level's
        command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    from pg_edge.checkpoint.atomic import Terminated, signals_raise
    from pg_edge.errors import PgEdgeError

    debug = args.debug or os.environ.get("PG_EDGE_DEBUG") not in (None, "", "0")
    # pg_edge refuses over-large images itself (pg_edge.inputs.images), with the numbers.
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
