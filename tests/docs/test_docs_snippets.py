"""The commands and Python snippets of the explanations run as written: the `pg-edge explain`
commands in README.md and docs/architecture.md, and every Python block of docs/architecture.md
and docs/finetuning.md (the mask rule, the <loc> formula, the parameter counts)."""
import re
import shlex
from pathlib import Path

import pytest

from pg_edge.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "architecture.md", ROOT / "docs" / "finetuning.md"]


def blocks(path: Path):
    """(language, code) of every fenced block of a Markdown file."""
    out, lang, lines = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("```") and lang is None:
            lang, lines = line[3:].strip(), []
        elif line.startswith("```"):
            out.append((lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


EXPLAIN = [(p.name, line) for p in DOCS for lang, code in blocks(p) if lang == "bash"
           for line in code.splitlines() if line.startswith("pg-edge explain ")]
# `print(...)   # what it prints` (a leading "..." stands for the start of the line)
PRINTS = r"^\s*print\(.*\)\s+#\s*(?:\.\.\.\s*)?(.+)$"
SNIPPETS = [(p.name, i, code) for p in DOCS[1:] for i, (lang, code) in enumerate(blocks(p)) if lang == "python"]


def test_the_docs_show_explain_and_snippets():
    assert {d for d, _ in EXPLAIN} == {"README.md", "architecture.md"}
    assert len(SNIPPETS) >= 3
    shown = [m for _, _, code in SNIPPETS for m in re.findall(PRINTS, code, re.M)]
    assert len(shown) >= 2  # snippets that say what they print are checked for it


@pytest.mark.parametrize("doc,line", EXPLAIN)
def test_explain_command_runs(doc, line, tmp_path, monkeypatch, capsys):
    argv = shlex.split(line.split("  #")[0])
    out = argv[argv.index("-o") + 1]
    monkeypatch.chdir(ROOT)
    argv[argv.index("-o") + 1] = str(tmp_path / out)
    assert main(argv[1:]) == 0
    text = capsys.readouterr().out
    assert "7. generation (greedy)" in text and "circle: bins (y1, x1, y2, x2)" in text
    assert {p.name for p in (tmp_path / out).iterdir()} >= {"input.png", "layout.png", "mask.png", "answer.png"}


@pytest.mark.parametrize("doc,index,code", SNIPPETS)
def test_python_snippet_runs(doc, index, code, capsys):
    exec(compile(code, f"{doc} block {index}", "exec"), {})
    printed = capsys.readouterr().out
    for expected in re.findall(PRINTS, code, re.M):
        assert expected.strip() in printed, (doc, expected)
