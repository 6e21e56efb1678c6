"""The fast BLAS under MLX (pg_edge/blas.py): found and loaded before MLX, switchable off, the
import-order limit detected, float32 products right with it, and parity with it off."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pg_edge import blas

ROOT = Path(__file__).resolve().parents[2]


def info_in_child(code_before: str = "", **env) -> dict:
    """backend_info() of a fresh interpreter, after `code_before`, with `env` set."""
    code = f"{code_before}\nimport json, pg_edge\nprint(json.dumps(pg_edge.backend_info()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "LD_PRELOAD": "", **env}, check=True)
    return {**json.loads(out.stdout.splitlines()[-1]), "stderr": out.stderr}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenBLAS search is Linux's")
def test_found_and_loaded_before_mlx_or_named_missing():
    i = info_in_child(PG_EDGE_BLAS="")
    if blas.find() is None:
        assert i["blas"] == "bundled reference BLAS" and "libopenblas0-pthread" in i["blas_note"]
    else:
        assert i["blas"] == "OpenBLAS" and i["blas_path"] == blas.find()
        assert i["blas_note"] == "loaded before MLX"


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false"])
def test_env_turns_it_off(value):
    i = info_in_child(PG_EDGE_BLAS=value)
    assert i["blas_path"] is None and i["blas_note"].startswith("off")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the import-order limit is Linux's")
def test_mlx_imported_first_is_detected():
    i = info_in_child("import mlx.core", PG_EDGE_BLAS="")
    if blas.find() is not None:
        assert i["blas_path"] is None and i["blas_note"].startswith("too late: mlx.core was imported")


def test_a_bad_path_warns_in_one_line_and_keeps_the_bundled_blas():
    i = info_in_child(PG_EDGE_BLAS="/no/such/libblas.so")
    assert i["blas_path"] is None and "did not load" in i["blas_note"]
    assert i["stderr"].count("\n") == 1 and "PG_EDGE_BLAS=/no/such/libblas.so: cannot load it" in i["stderr"]


def test_float32_matmul_is_right_with_the_blas_this_process_has():
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 257), np.float32), rng.standard_normal((257, 190), np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(blas.find() is None, reason="needs an OpenBLAS to compare against its absence")
def test_parity_holds_with_the_fast_blas_off():
    """The transformers parity tests again, in a child pytest with PG_EDGE_BLAS=off (the suite
    itself runs with it on)."""
    env = {**os.environ, "PG_EDGE_BLAS": "off", "LD_PRELOAD": ""}
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/parity/test_parity.py", "-x", "-rA",
                        "-k", "last_logits or greedy_20"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:]
    assert p.stdout.count("PASSED tests/parity/test_parity.py") == 6, p.stdout[-2000:]  # 2 versions x 2 sizes + 2


def test_pg_edge_bench_says_which_blas_and_its_speed(converted, capsys):
    from pg_edge.cli import main

    assert main(["bench", str(converted(version=2)), "--tokens", "2", "--no-warmup", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["blas"] == blas.describe() and r["matmul_gflops"] > 0
    assert main(["bench", str(converted(version=2)), "--tokens", "2", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert f"BLAS: {blas.describe()}" in out and "GFLOP/s" in out


def test_bench_scripts_load_the_blas_before_mlx():
    """A bench script that imports pg_edge at module level does so before MLX: imported after,
    MLX has bound its bundled reference BLAS and every prefill product runs ~20x slower
    (bench/serve_batch.py measured batching on it for a while)."""
    bench = Path(__file__).resolve().parents[2] / "bench"
    late = []
    for script in sorted(bench.glob("*.py")):
        lines = [ln for ln in script.read_text().splitlines() if not ln.startswith((" ", "\t"))]
        first = lambda pred: next((i for i, ln in enumerate(lines) if pred(ln)), None)  # noqa: E731
        pg = first(lambda ln: ln.startswith(("import pg_edge", "from pg_edge")))
        mlx = first(lambda ln: ln.startswith(("import mlx", "from mlx")))
        if pg is not None and mlx is not None and mlx < pg:
            late.append(script.name)
    assert late == []


def threads_in_child(**env) -> int | None:
    """blas.threads() of a fresh interpreter after `import pg_edge`, with `env` set and the
    thread-count variables otherwise unset."""
    base = {k: v for k, v in os.environ.items() if k not in blas.THREAD_VARS}
    code = "import pg_edge, pg_edge.blas as b; print(b.threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**base, "LD_PRELOAD": "", "PG_EDGE_BLAS": "", **env}, check=True)
    last = out.stdout.split()[-1]
    return None if last == "None" else int(last)


@pytest.mark.skipif(blas.find() is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs an OpenBLAS and two cores")
def test_openblas_runs_one_thread_per_call_unless_the_user_chose():
    """pg_edge splits its products over one stream per core; OpenBLAS's own threads on top
    double-booked the cores (docs/performance.md, "One OpenBLAS thread per stream")."""
    assert threads_in_child() == 1
    assert threads_in_child(OPENBLAS_NUM_THREADS="2") == 2
    assert threads_in_child(OMP_NUM_THREADS="2") == 2
    assert threads_in_child(PG_EDGE_BLAS="off") is None


@pytest.mark.skipif(blas.threads() is None, reason="OpenBLAS is not this process's BLAS")
def test_all_cores_gives_training_every_core_and_restores():
    before = blas.threads()
    with blas.all_cores():
        if not any(os.environ.get(v) for v in blas.THREAD_VARS):
            assert blas.threads() == len(os.sched_getaffinity(0))
    assert blas.threads() == before
