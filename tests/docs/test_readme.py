"""The README and docs cannot drift from the CLI: every `pg-edge ...` command they show names a
real subcommand with the flags it uses, and the README's Use and Tasks sections run on a fixture."""
import re
import shlex
import shutil
from pathlib import Path

import pytest

from pg_edge.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
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


def readme_blocks(*sections):
    """(language, code) of every fenced block under the README headings starting with `sections`."""
    blocks, section, lang, lines = [], "", None, []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("```") and lang is None:
            lang, lines = line[3:].strip(), []
        elif line.startswith("```"):
            if section.startswith(sections):
                blocks.append((lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def test_readme_use_and_tasks_sections_run_on_a_fixture(hf_checkpoint, sample_images, tmp_path, monkeypatch,
                                                        capsys):
    """The commands and Python of "Use" and "Tasks" run as written, in a folder where the
    names they use are fixtures: google/paligemma2-3b-mix-224 is a tiny random PaliGemma 2 in
    the HF layout, cat.jpg and friends are sample images, vae-oid.npz a random mask decoder.
    (Quantize, verify and fine-tune have their own tests; their flags are checked above.)"""
    from pg_edge.cli import main
    from fixtures.vae import write_fake_vae

    shutil.copytree(hf_checkpoint(version=2), tmp_path / "google" / "paligemma2-3b-mix-224")
    for name, image in zip(["cat.jpg", "receipt.png", "a.jpg", "b.jpg"], sample_images):
        image.convert("RGB").save(tmp_path / name)
    write_fake_vae(tmp_path / "vae-oid.npz")
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks("Use", "Tasks")
    # Lines on the built-in demo model run for real in tests/apps/test_demo_model.py.
    commands = [shlex.split(line.split("  #")[0]) for lang, code in blocks if lang == "bash"
                for line in code.splitlines() if line.startswith("pg-edge ") and "demo" not in line]
    assert [c[1] for c in commands] == ["convert", "run", "run", "caption", "ocr", "ask", "detect",
                                        "convert-vae", "segment"]
    for argv in commands:
        argv += ["--max-tokens", "4"] if argv[1] not in ("convert", "convert-vae") else []
        assert main(argv[1:]) == 0, argv
    capsys.readouterr()
    assert (tmp_path / "boxes.png").is_file() and (tmp_path / "masks.png").is_file()
    from pg_edge.pipeline import PaliGemma

    for method in (PaliGemma.generate, PaliGemma.stream, PaliGemma.generate_batch):
        monkeypatch.setitem(method.__kwdefaults__, "max_tokens", 4)  # random weights: cap the length
    namespace: dict = {}
    snippets = [code for lang, code in blocks if lang == "python"]
    assert len(snippets) == 2
    for code in snippets:  # the second uses the first's `pg`, as a reader would
        exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["results"]) == 2 and isinstance(namespace["r"].objects, list)
    assert capsys.readouterr().out  # the snippet printed a caption and the streamed text
