"""The commands and Python snippets of the explanations run as written: the `pg-edge explain`
commands in README.md and docs/architecture.md, every Python block of docs/architecture.md
and docs/finetuning.md (the mask rule, the <loc> formula, the parameter counts), and the
walkthrough of docs/finetuning.md (label, correct, fine-tune, serve, call with the openai client:
its blocks in order, in one folder, with a free port instead of 8080)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pg_edge.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "architecture.md", ROOT / "docs" / "finetuning.md"]


def blocks(path: Path):
    """(language, code) of every fenced block of a Markdown file."""
    return blocks_of(path.read_text())


def blocks_of(text: str):
    """(language, code) of every fenced block of Markdown text."""
    out, lang, lines = [], None, []
    for line in text.splitlines():
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
WALK_RE = r"<!-- walkthrough -->\n(.*?)<!-- /walkthrough -->"


def walkthrough(path: Path):
    """(language, code) of the blocks between `<!-- walkthrough -->` and its end, in order."""
    return [b for part in re.findall(WALK_RE, path.read_text(), re.S) for b in blocks_of(part)]


WALKED = {code for p in DOCS for _, code in walkthrough(p)}
SNIPPETS = [(p.name, i, code) for p in DOCS[1:] for i, (lang, code) in enumerate(blocks(p))
            if lang == "python" and code not in WALKED]


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


def test_finetuning_walkthrough_runs(tmp_path):
    """docs/finetuning.md's walkthrough, block by block: bash blocks with bash (pg-edge is this
    checkout's), Python blocks with python, each `pg-edge serve` in the background on a free port
    (stopped when the next one starts). Checked: the adapters box what the base did not, the fused
    model's server answers with "red" boxes, the two-adapter server lists both and each adapter
    answers with its own name."""
    from pg_edge.tasks.parse import parse_objects

    steps = walkthrough(ROOT / "docs" / "finetuning.md")
    assert [lang for lang, _ in steps] == ["bash", "python", "bash", "bash", "python",
                                           "python", "bash", "bash", "python"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server, outputs = None, []
    try:
        for lang, code in steps:
            if code.startswith("pg-edge serve "):
                if server is not None:
                    server.kill()
                    server.wait()
                argv = shlex.split(code.split("#")[0])
                assert argv[-2:] == ["--port", "8080"]
                server = subprocess.Popen([sys.executable, "-m", "pg_edge.cli", *argv[1:-1], "0"], cwd=tmp_path,
                                          env=env, stderr=subprocess.PIPE, text=True)
                port = re.search(r"http://127\.0\.0\.1:(\d+)", server.stderr.readline()).group(1)
                continue
            if server is not None:
                code = code.replace("8080", port)
            cmd = ["bash", "-e", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, (code, out.stderr[-2000:])
            if "--adapters run/adapters" in code:  # the fine-tune boxes what the base did not
                assert out.stdout.count("red  [") >= 2, out.stdout
            if lang == "python" and "OpenAI(" in code:
                outputs.append(out.stdout)
        fused, both = outputs
        objects = parse_objects(fused, (224, 224)).objects
        assert len(objects) >= 2 and {o.label for o in objects} == {"red"}, fused
        listed, *answers = both.splitlines()
        assert listed == "['demo', 'red', 'blue']"
        for name, line in zip(("red", "blue"), answers):
            assert line.startswith(name + " ")
            objects = parse_objects(line[len(name) + 1:], (224, 224)).objects
            assert len(objects) >= 2 and {o.label for o in objects} == {name}, line
    finally:
        if server is not None:
            server.kill()
            server.wait()


def test_readme_labels_example_is_the_walkthroughs():
    """The README's "From your labels" commands are lines of the walkthrough the test above runs."""
    readme = (ROOT / "README.md").read_text().split("### From your labels", 1)[1]
    (_, shown), *_ = blocks_of(readme)
    walked = {line.split("  #")[0].strip() for lang, code in walkthrough(ROOT / "docs" / "finetuning.md")
              if lang == "bash" for line in code.splitlines()}
    commands = [line for line in shown.splitlines() if not line.startswith("#")]
    assert len(commands) == 4
    for line in commands:
        assert line.split("  #")[0].strip() in walked, line
