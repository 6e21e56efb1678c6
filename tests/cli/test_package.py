"""What is installed: one package, `pg_edge`, and the `pg-edge` script.

The repository keeps convert/, quantize/, apps/cli/ and apps/server/ at the top; they install as
pg_edge.convert, pg_edge.quantize, pg_edge.cli and pg_edge.server (pyproject.toml), and nothing in
the tree imports them by their folder names. `make demo` installs the runtime alone.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Installed name -> folder in the repository (pyproject.toml's package-dir, plus pg_edge itself).
INSTALLED = {"pg_edge": "pg_edge", "pg_edge.convert": "convert", "pg_edge.quantize": "quantize",
             "pg_edge.cli": "apps/cli", "pg_edge.server": "apps/server"}
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", "demo_out"}
# Module names that only resolve from a checkout's root; the installed names are pg_edge.*.
BARE = re.compile(r"(convert|quantize|apps\.(cli|commands|server|labeling))(\.|$)")


def tree_files(suffixes: tuple[str, ...]):
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith(suffixes):
                yield Path(dirpath, name)


def bare_imports(path: Path) -> list[str]:
    """`import X` / `from X import` lines of `path` whose module X is a bare name, and module
    names given as strings (`python -m apps.cli`, import_module("convert.hf"))."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "apps" else [])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            names = [node.value] if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", node.value) else []
        else:
            continue
        found += [f"{path.name}:{node.lineno}: {n}" for n in names if BARE.match(n)]
    return found


def test_nothing_imports_the_bare_folder_names(tmp_path):
    this = Path(__file__).resolve()  # names them below, as strings, to test the checker
    found = [hit for f in tree_files((".py",)) if f.resolve() != this for hit in bare_imports(f)]
    assert found == []
    # The checker catches each form.
    probe = tmp_path / "probe.py"
    probe.write_text("import convert.hf\nfrom quantize import quantize\nfrom apps import cli\n"
                     "from apps.server import make_server\nimport apps.labeling\n"
                     "CMD = ['-m', 'apps.cli']\nfrom apps.demo import OBJECTS\nfrom pg_edge.convert import hf\n")
    assert [h.split(": ")[1] for h in bare_imports(probe)] == [
        "convert.hf", "quantize", "apps.cli", "apps.server", "apps.labeling", "apps.cli"]


def test_docs_and_makefile_use_the_installed_names():
    texts = [*tree_files((".md",)), ROOT / "Makefile"]
    pattern = re.compile(r"python[0-9.]* -m (convert|quantize|apps\.(cli|server))\b|"
                         r"\b(from|import) (convert|quantize|apps\.(cli|commands|server|labeling))\b")
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts for m in pattern.finditer(p.read_text())]
    assert hits == []


def test_editable_checkout_resolves_the_installed_names():
    """What `pip install -e .` (make) and pytest (pythonpath ".") see: pg_edge.convert and the
    others come from their folders in this checkout."""
    import pg_edge.cli
    import pg_edge.convert
    import pg_edge.quantize
    import pg_edge.server

    for module in (pg_edge.cli, pg_edge.convert, pg_edge.quantize, pg_edge.server):
        assert Path(module.__file__).parent == ROOT / INSTALLED[module.__name__]


DATA = ("assets", "demo/model", "demo/samples", "cpu/qmv")  # folders with package-data (pyproject)


def expected_files() -> set[str]:
    """Every file the wheel must hold under pg_edge/: the modules of the installed folders and
    the data files, as paths inside the wheel."""
    out = set()
    for name, folder in INSTALLED.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            if "__pycache__" not in rel.parts:
                out.add("/".join([*name.split("."), *rel.parts]))
    for folder in DATA:
        out |= {f"pg_edge/{folder}/{p.name}" for p in (ROOT / "pg_edge" / folder).iterdir() if p.is_file()}
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps .` of a copy of this checkout (the build writes build/ and egg-info
    where it runs; the checkout stays clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP_DIRS, "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-v", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # setuptools names a folder that holds modules or data but is not in pyproject's list
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr
    (whl,) = (tmp / "dist").glob("*.whl")
    return whl


def test_wheel_holds_pg_edge_alone(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pg_edge", wheel.name.split("-py")[0] + ".dist-info"}
    assert {n for n in names if n.startswith("pg_edge/")} == expected_files()
    assert not [n for n in names if re.search(r"demo_model|desktop|cpp/|tests/|bench/", n)]
    assert {"pg_edge/demo/model/model.safetensors", "pg_edge/tasks/label.py", "pg_edge/cli/commands/finetune.py",
            "pg_edge/server/http_server.py", "pg_edge/convert/hf.py", "pg_edge/quantize/plan.py"} <= set(names)
    dist = wheel.name.split("-py")[0] + ".dist-info"
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"{dist}/top_level.txt").decode().split() == ["pg_edge"]
        assert "pg-edge = pg_edge.cli:main" in z.read(f"{dist}/entry_points.txt").decode()


def test_wheel_installed_alone_runs_the_demo_model_and_the_script(wheel, tmp_path):
    """`pip install --no-deps --target DIR` of the wheel, then, from a folder outside the
    checkout with only DIR and the dependencies on the path (no site hooks, so no editable
    install of this checkout): pg_edge.load("demo") generates, and DIR/bin/pg-edge runs."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "pg_edge"]
    # The site-packages of the test environment, without the checkout (its root, tests/ folders).
    deps = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT
            and ROOT / "tests" not in (Path(p).resolve(), *Path(p).resolve().parents)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps])}
    env.pop("PG_EDGE_DEBUG", None)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    code = (
        "import sys, pg_edge\n"
        "from pg_edge.demo import SAMPLES\n"
        "r = pg_edge.load('demo').generate(str(SAMPLES[0]), 'caption en', max_tokens=4)\n"
        "assert r.tokens, r\n"
        f"root = {str(target)!r}\n"
        "stray = [m for m, v in sys.modules.items() if m.startswith('pg_edge')"
        " and getattr(v, '__file__', None) and not v.__file__.startswith(root)]\n"
        "assert stray == [], stray\n"
        "print(r.text)\n")
    ran = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip()
    script = target / "bin" / "pg-edge"
    version = subprocess.run([sys.executable, "-S", str(script), "--version"], cwd=cwd, env=env,
                             capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == "pg-edge 0.1.0", version.stderr
    caption = subprocess.run([sys.executable, "-S", str(script), "caption", "demo", "--image",
                              str(min((target / "pg_edge" / "demo" / "samples").glob("*.png"))), "--max-tokens", "4"],
                             cwd=cwd, env=env, capture_output=True, text=True)
    assert caption.returncode == 0 and caption.stdout.strip(), caption.stderr
    for bare in ("convert", "quantize", "apps"):
        probe = subprocess.run([sys.executable, "-S", "-c", f"import {bare}"], cwd=cwd, env=env,
                               capture_output=True, text=True)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr


def makefile_dry_run(tmp_path: Path, target: str) -> str:
    """`make -n TARGET` in a copy of the Makefile and what it reads, with no .venv yet."""
    work = tmp_path / target
    (work / ".ci").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", ".ci/apt-packages.txt"):
        shutil.copy(ROOT / name, work / name)
    proc = subprocess.run(["make", "-n", target], cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_the_runtime_only(tmp_path):
    demo = makefile_dry_run(tmp_path, "demo")
    assert "pip install -q -e ." in demo and "python -m apps.demo" in demo
    for extra in ("[test]", "torch", "apt-get", "dpkg", "apt-packages"):
        assert extra not in demo, extra
    test = makefile_dry_run(tmp_path, "test")
    assert '-e ".[test]"' in test and "apt-get" in test and "-m pytest" in test
    for package in (ROOT / ".ci" / "apt-packages.txt").read_text().split():
        assert package in test
