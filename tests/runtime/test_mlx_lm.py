"""pg_edge uses mlx-lm's caches, sampler and LoRA layer without mlx-lm's package init (which
imports transformers, and with it torch): an app that embeds pg_edge does not load either, and
code that uses mlx-lm afterwards still gets the whole package."""
import subprocess
import sys
import textwrap
import threading

import pytest

from pg_edge._mlx_lm import defer_package_init

HEAVY = ("transformers", "torch", "mlx_lm.utils", "mlx_lm.tuner.trainer")


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_runtime_never_loads_transformers_or_torch():
    out = run_python(f"""
        import sys
        from PIL import Image, ImageDraw
        import pg_edge, pg_edge.train, pg_edge.server
        pg = pg_edge.load("demo")
        image = Image.new("RGB", (224, 224), "white")
        ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill="red")
        assert pg.generate(image, "caption en", max_tokens=3).tokens
        from pg_edge.demo import SAMPLES
        assert pg.segment(str(SAMPLES[-1]), "circle ; square ; triangle").objects  # the mask decoder too
        print("LOADED", [m for m in {HEAVY!r} if m in sys.modules])

        # Code that uses mlx-lm next sees the whole package, with the very classes pg_edge uses.
        import mlx_lm, mlx_lm.tuner
        from mlx_lm import load, stream_generate
        from mlx_lm.models.cache import KVCache
        from mlx_lm.tuner.lora import LoRALinear
        import pg_edge.model.masks, pg_edge.adapters
        assert callable(load) and callable(stream_generate) and callable(mlx_lm.tuner.train)
        assert mlx_lm.__version__
        assert KVCache is pg_edge.model.masks.KVCache and LoRALinear is pg_edge.adapters.LoRALinear
        assert "__getattr__" not in vars(mlx_lm) and "__getattr__" not in vars(mlx_lm.tuner)
        print("AFTER", "transformers" in sys.modules)
    """)
    assert "LOADED []" in out, out
    assert "AFTER True" in out, out  # the deferred init did run, in full


def test_a_package_imported_first_is_left_alone():
    out = run_python("""
        import mlx_lm
        before = mlx_lm
        import pg_edge.model.masks, sys
        assert sys.modules["mlx_lm"] is before and "__getattr__" not in vars(before)
        assert pg_edge.model.masks.KVCache is sys.modules["mlx_lm.models.cache"].KVCache
        print("OK")
    """)
    assert "OK" in out


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package whose __init__ counts its runs (slowly) and imports a submodule of its own."""
    root = tmp_path / "pkg_deferred_demo"
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent("""
        import time
        import builtins
        builtins.pkg_deferred_runs = getattr(builtins, "pkg_deferred_runs", 0) + 1
        time.sleep(0.2)  # a slow init: other threads asking meanwhile must wait for it
        from . import extra
        answer = extra.VALUE + 1
    """))
    (root / "light.py").write_text("VALUE = 1\n")
    (root / "sub").mkdir()
    (root / "sub" / "__init__.py").write_text("import builtins\nbuiltins.pkg_deferred_sub = True\n"
                                               "flag = 'sub init ran'\n")
    (root / "sub" / "leaf.py").write_text("VALUE = 2\n")
    (root / "extra.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pkg_deferred_demo"
    for name in [m for m in sys.modules if m.startswith("pkg_deferred_demo")]:
        del sys.modules[name]
    import builtins

    for name in ("pkg_deferred_runs", "pkg_deferred_sub"):
        if hasattr(builtins, name):
            delattr(builtins, name)


def test_the_deferred_init_runs_once_at_the_first_missing_attribute(fake_package):
    import builtins
    import importlib

    defer_package_init(fake_package)
    light = importlib.import_module(fake_package + ".light")
    assert light.VALUE == 1 and not hasattr(builtins, "pkg_deferred_runs")  # a submodule: no init
    pkg = sys.modules[fake_package]

    got = []
    threads = [threading.Thread(target=lambda: got.append(pkg.answer)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [42] * 4 and builtins.pkg_deferred_runs == 1
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        pkg.nothing
    defer_package_init(fake_package)  # already imported: left alone
    assert sys.modules[fake_package] is pkg and builtins.pkg_deferred_runs == 1


def test_a_deferred_subpackage_is_reachable_from_its_parent(fake_package):
    import builtins
    import importlib

    defer_package_init(fake_package)
    defer_package_init(fake_package + ".sub")
    leaf = importlib.import_module(fake_package + ".sub.leaf")
    pkg = sys.modules[fake_package]
    assert leaf.VALUE == 2 and pkg.sub is sys.modules[fake_package + ".sub"]  # `import a.b; a.b`
    assert not hasattr(builtins, "pkg_deferred_runs") and not hasattr(builtins, "pkg_deferred_sub")
    assert pkg.sub.flag == "sub init ran" and not hasattr(builtins, "pkg_deferred_runs")
