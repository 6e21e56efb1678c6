"""The model files (pg_edge/model/siglip.py, gemma.py, paligemma.py, and masks.py) have one code
path each: they import nothing from the CPU backend (pg_edge.cpu) and hold no backend switch; the
CPU variants live in pg_edge.cpu and are swapped in as classes. Also: the masks module's worked
example is what its functions compute."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.model import masks

MODEL = Path(__file__).resolve().parents[2] / "pg_edge" / "model"
FILES = ("siglip.py", "gemma.py", "paligemma.py", "masks.py")
# Names of the switches and CPU helpers the model classes used to read (set from outside).
SWITCHES = {"cpu_ops", "sync_each_layer", "activation_dtype", "attention_on_streams", "cpu_streams",
            "stream_count", "on_streams", "tracing", "lean", "_lean", "for_tracing", "policy", "backend"}


def imported_modules(tree: ast.Module, package: str) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module) if p)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("name", FILES)
def test_model_files_import_no_backend_code(name):
    tree = ast.parse((MODEL / name).read_text())
    mods = imported_modules(tree, "pg_edge.model")
    assert mods, "the parse found the file's imports"
    bad = {m for m in mods if re.match(r"pg_edge\.(cpu|backend|cpu_ops)(\.|$)", m)}
    assert not bad, f"{name} imports backend code: {sorted(bad)}"
    assert all(m.startswith(("__future__", "typing", "mlx", "numpy", "pg_edge.model", "pg_edge.errors", "pg_edge._mlx_lm"))
               for m in mods), sorted(mods)


@pytest.mark.parametrize("name", FILES)
def test_model_files_hold_no_backend_switch(name):
    tree = ast.parse((MODEL / name).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert "mx" in names and len(names) > 40  # the walk sees the code
    assert not names & SWITCHES, f"{name} reads {sorted(names & SWITCHES)}"
    evals = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("eval", "async_eval")]
    assert not evals, f"{name} evaluates inside the model (per-layer evaluation is pg_edge.cpu's)"


def test_the_checker_sees_a_switch(tmp_path):
    """The two checks above fail on the code they guard against."""
    code = "from ..cpu import ops\nclass A:\n    def __call__(self, x):\n        if self.cpu_ops:\n            return x\n"
    tree = ast.parse(code)
    assert "pg_edge.cpu" in imported_modules(tree, "pg_edge.model")
    assert "cpu_ops" in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def test_the_worked_example_in_the_masks_docstring():
    doc = masks.__doc__
    lines = doc[doc.index("    token "):].splitlines()
    header = lines[0].split()[1:]
    assert header[:8] == ["img", "img", "bos", "p", "\\n", "s1", "s2", "pad"]
    mask_ar = [int(x) for x in lines[1].split()[1:9]]
    valid = [int(x) for x in lines[3].split()[1:9]]
    rows = [line.split()[-8:] for line in lines[2:10]]
    want = np.array([[int(x) for x in r] for r in rows], dtype=bool)
    got = masks.prefix_lm_mask(mx.array([mask_ar]), mx.array([valid], dtype=mx.bool_))
    np.testing.assert_array_equal(np.array(got)[0, 0], want)
    assert masks.suffix_mask_ar(5, 2, 8).tolist() == mask_ar
