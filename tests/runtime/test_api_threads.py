"""The `PaliGemma` object shared by threads: results equal sequential calls, one vision cache,
every image input form, and cancelling a running generation (pg_edge/worker.py)."""
import io
import re
import threading
import time

import numpy as np
import pytest

import pg_edge
from pg_edge.errors import PgEdgeError

GEN = dict(max_tokens=5)


@pytest.fixture(scope="module")
def pg(converted):
    return pg_edge.load(converted(version=1))


@pytest.fixture(scope="module")
def images(_sample_images_cache):
    names = ["astronaut", "chelsea", "coffee_portrait", "camera_l"]
    return [_sample_images_cache[n].copy() for n in names]


def test_four_threads_equal_sequential(pg, images):
    prompts = ["caption en", "answer en what is it?", "detect cat", "ocr"]
    jobs = [(img, p) for img in images for p in prompts[:2]] + [(images[0], p) for p in prompts[2:]]
    sequential = [pg.generate(img, p, **GEN) for img, p in jobs]
    calls_before = pg.vision_calls
    results: dict = {}
    errors = []

    def worker(k):
        try:
            for i in range(k, len(jobs), 4):
                img, p = jobs[i]
                if i % 2:  # streams and plain calls interleave on the one model
                    pieces = list(pg.stream(img, p, **GEN))
                    results[i] = pieces[-1].result
                    assert "".join(c.text for c in pieces) == results[i].text
                else:
                    results[i] = pg.generate(img, p, **GEN)
        except Exception as err:  # reported below: an assert in a thread would be lost
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert [results[i].tokens for i in range(len(jobs))] == [r.tokens for r in sequential]
    # The cache is shared: the threads' calls found every image's features already there.
    assert pg.vision_calls == calls_before


def test_image_inputs_path_pil_array_bytes(pg, images, tmp_path):
    img = images[1]
    path = tmp_path / "cat.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    forms = [str(path), path, img, np.asarray(img), buf.getvalue(), bytearray(buf.getvalue()),
             memoryview(buf.getvalue())]
    tokens = [pg.generate(f, "caption en", **GEN).tokens for f in forms]
    assert all(t == tokens[0] for t in tokens)


def test_cancel_stops_a_running_generation(pg, images):
    got = []

    def long_run():
        got.append(pg.generate(images[0], "caption en", max_tokens=5000))

    t = threading.Thread(target=long_run)
    t.start()
    deadline = time.monotonic() + 30
    while not pg._worker.busy and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    assert pg.cancel()
    t.join(timeout=10)
    assert not t.is_alive()
    (result,) = got
    assert result.finish_reason == "cancelled" and 0 < len(result.tokens) < 1000
    # The flag belonged to that job: the next generation runs to its end.
    assert pg.generate(images[0], "caption en", **GEN).finish_reason == "length"


def test_leaving_a_stream_frees_the_model(pg, images):
    """A consumer that stops reading (closes the iterator) cancels its generation at once: the
    next call does not wait for the 5000 tokens it asked for."""
    stream = pg.stream(images[0], "caption en", max_tokens=5000)
    next(stream)
    stream.close()
    t0 = time.monotonic()
    pg.generate(images[0], "caption en", max_tokens=2)
    assert time.monotonic() - t0 < 5  # 5000 tokens take ~20 s here (~4 ms each)


def test_errors_reach_the_caller_and_the_worker_survives(pg, images):
    with pytest.raises(PgEdgeError, match="max_tokens"):
        pg.generate(images[0], "caption en", max_tokens=0)
    with pytest.raises(PgEdgeError, match="cannot read image"):
        pg.generate(b"not an image", "caption en", **GEN)
    assert len(pg.generate(images[0], "caption en", **GEN).tokens) == GEN["max_tokens"]


def test_stream_cancel_still_delivers_the_result(pg, images):
    stream = pg.stream(images[0], "caption en", max_tokens=5000)
    first = next(stream)
    stream.cancel()
    rest = list(stream)
    result = rest[-1].result
    assert result.finish_reason == "cancelled" and len(result.tokens) < 1000
    assert first.text + "".join(c.text for c in rest) == result.text


def test_arrays_from_the_worker_work_in_the_calling_thread(pg, images):
    """MLX evaluates a lazy graph only on the thread that built it: what the worker hands back is
    already evaluated, so the caller can compute with it (as verify and the parity tests do)."""
    pixels = pg.prepare([images[2]], ["caption en"]).pixel_values
    feats = pg.image_features(pixels)
    assert np.isfinite(np.array(feats * 2)).all() and feats.shape[0] == 1


def test_readme_threads_snippet_runs(pg, images, tmp_path, monkeypatch, capsys):
    """The README's "In your app" Python runs as written (cat.jpg a sample photo, 4 tokens)."""
    from tests.docs.test_readme import readme_blocks

    from pg_edge.pipeline import PaliGemma

    (code,) = [c for lang, c in readme_blocks("In your app") if lang == "python"]
    images[1].save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    for method in (PaliGemma.generate, PaliGemma.stream):
        monkeypatch.setitem(method.__kwdefaults__, "max_tokens", 4)
    exec(compile(code, "README.md", "exec"), {"pg": pg})
    for t in threading.enumerate():  # the snippet's background thread
        if t is not threading.current_thread() and t.name.startswith("Thread"):
            t.join(timeout=30)
    out = capsys.readouterr().out
    assert re.search(r"(cancelled|stop|length) \[", out), out  # the background detect's line
    assert pg.generate(tmp_path / "cat.jpg", "caption en").text in out  # the streamed caption
