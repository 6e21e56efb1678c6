"""The `pg-edge` command line, installed as `pg_edge.cli` (the repository keeps it in apps/cli/).

    main.py     the entry point: parses, dispatches to one command, prints errors as one line
    commands/   one module per verb (run, the tasks, serve, label, verify, export, convert,
                convert-vae, quantize, finetune, bench), each with add_parser(subparsers)
"""
from .main import build_parser, main

__all__ = ["main", "build_parser"]
