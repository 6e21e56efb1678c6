"""Refresh the output shown under each command of the README's demo section (after the shipped
model changes; tests/apps/test_demo_model.py checks that it matches).

    python -m apps.demo_model.readme_outputs [--check]

Runs every `pg-edge ...` line of the first bash block under "## The built-in demo model" through
the CLI entry point (from the repository root) and writes its stdout under it as `# ` lines,
replacing the ones there. --check: only say whether the README is up to date (exit 1 if not).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## The built-in demo model\n"


def refreshed(block: str) -> str:
    from pg_edge.cli import main

    out_lines = []
    for line in block.splitlines():
        if line.startswith("# "):
            continue
        out_lines.append(line)
        if line.startswith("pg-edge "):
            argv = shlex.split(line.split("  #")[0])[1:]
            buf = io.StringIO()
            with tempfile.TemporaryDirectory() as tmp:
                os.symlink(ROOT / "pg_edge", Path(tmp) / "pg_edge")
                cwd = os.getcwd()
                os.chdir(tmp)  # -o files land in a scratch folder
                try:
                    with contextlib.redirect_stdout(buf):
                        rc = main(argv)
                finally:
                    os.chdir(cwd)
            if rc != 0:
                raise SystemExit(f"{line}: exit {rc}")
            out_lines += [f"# {x}" for x in buf.getvalue().splitlines()]
    return "\n".join(out_lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(HEADING, 1)
    before, after = rest.split("```bash\n", 1)
    block, tail = after.split("```", 1)
    new = refreshed(block)
    if a.check:
        print("up to date" if new == block else "README demo outputs differ:\n" + new)
        return 0 if new == block else 1
    readme.write_text(head + HEADING + before + "```bash\n" + new + "```" + tail)
    print(new, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
