"""Issue 23 item 15 (the Python API): an array image's pixel limit is checked before any copy;
`PaliGemma.close()` and `with pg_edge.load(...)` release the worker thread, so loading and
dropping models does not pile up threads, and the process still exits cleanly."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import pg_edge
from pg_edge.errors import ImageError, PgEdgeError
from pg_edge.inputs.images import load_image

IMAGE = "pg_edge/demo/samples/shapes_1.png"
ROOT = Path(__file__).resolve().parents[2]


def _model_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pg_edge-model")]


def test_a_broadcast_array_past_the_limit_costs_no_memory():
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20_000, 20_000, 3))  # 0 bytes, 1.2 GB as a copy
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="20000x20000 = 400,000,000 pixels, past the limit"):
            load_image(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    small = np.broadcast_to(np.full((1, 1, 3), 7, np.uint8), (30, 40, 3))  # within the limit: used
    assert load_image(small).size == (40, 30)


def test_close_and_with_release_the_worker_thread():
    before = len(_model_threads())
    for _ in range(3):
        with pg_edge.load("demo") as pg:
            assert pg.generate(IMAGE, "caption en", max_tokens=2).tokens
    for _ in range(3):  # dropped without close(): released when garbage-collected
        pg = pg_edge.load("demo")
        pg.generate(IMAGE, "caption en", max_tokens=2)
        del pg
        gc.collect()
    assert len(_model_threads()) <= max(before, 1), _model_threads()
    pg = pg_edge.load("demo")
    pg.close()
    pg.close()  # twice is fine
    with pytest.raises(PgEdgeError, match="closed"):
        pg.generate(IMAGE, "caption en", max_tokens=2)


def test_close_stops_a_running_stream_and_ends_queued_calls(converted):
    pg = pg_edge.load(converted(version=1))  # random weights: never says eos
    stream = pg.stream(IMAGE, "caption en", max_tokens=5000)
    next(stream)  # the generation is running on the worker
    queued = []
    t = threading.Thread(target=lambda: queued.append(_try(lambda: pg.generate(IMAGE, "ocr", max_tokens=2))))
    t.start()
    pg.close()
    last = list(stream)[-1].result
    t.join(30)
    assert last.finish_reason == "cancelled" and len(last.tokens) < 1000
    assert queued and isinstance(queued[0], PgEdgeError), queued


def _try(fn):
    try:
        return fn()
    except Exception as err:
        return err


@pytest.mark.parametrize("last", ["closed", "dropped"])
def test_a_process_that_closed_models_exits_cleanly(last):
    """Threads are parked, not ended: an ended thread that ran the model aborts MLX at exit
    ("terminate called without an active exception"). The last model is closed, or dropped
    (garbage-collected) just before the interpreter exits, as `python -m apps.demo` does."""
    code = textwrap.dedent(f"""
        import pg_edge
        for _ in range(2):
            with pg_edge.load("demo") as pg:
                pg.generate({IMAGE!r}, "caption en", max_tokens=2)
        def use():
            pg = pg_edge.load("demo")
            pg.generate({IMAGE!r}, "caption en", max_tokens=2)
        if {last!r} == "dropped":
            use()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
