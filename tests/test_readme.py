"""The README and docs cannot drift from the CLI: every `pg-edge ...` command they show names a
real subcommand, and every --flag it uses exists on that subcommand."""
import re
import shlex
from pathlib import Path

import pytest

from apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands():
    """(doc, subcommand, rest of line) for every `pg-edge X ...` inside a fenced code block."""
    for doc in DOCS:
        fenced = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                fenced = not fenced
                continue
            # a command line, or `mlx.launch ... "$(which pg-edge)" finetune ...`
            m = re.search(r"(?:^\s*|\(which )pg-edge\)?\"?\s+([a-z-]+)(.*)", line)
            if fenced and m:
                yield doc.name, m.group(1), m.group(2).split("  #")[0]


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


COMMANDS = list(shown_commands())


def test_docs_show_commands():
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("doc,command,rest", COMMANDS)
def test_shown_command_exists_with_its_flags(doc, command, rest):
    subs = subparsers()
    assert command in subs, f"{doc}: pg-edge {command} is not a command"
    known = {opt for a in subs[command]._actions for opt in a.option_strings}
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    for w in words:
        if w.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", w):
            assert w.split("=")[0] in known, f"{doc}: pg-edge {command} has no option {w}"
