"""Adapters by name on one base, and concurrent generations in one batch (issue 22, items 1-2):
mixed base + two adapters at once each equal their run alone, a row that leaves does not
disturb the others, unknown names and adapters of another base are one-line errors."""
import json
import shutil
import threading
import time

import numpy as np
import pytest

import pg_edge
from pg_edge.batching import Batch
from pg_edge.errors import PgEdgeError
from pg_edge.scheduler import GATHER_S
from tests.helpers.adapter_helpers import DEMO, make_adapter

SHAPES = [f"pg_edge/demo/samples/shapes_{i}.png" for i in (1, 2, 3)]
PROMPTS = ["caption en", "detect circle ; square", "answer en how many shapes?", "detect triangle"]
JOBS = [(SHAPES[i % 3], PROMPTS[i % 4], (None, "a", "b")[i % 3]) for i in range(12)]
LONG = "pg_edge/assets/astronaut.jpg"  # the demo model answers a photo with many tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return make_adapter(d / "a", seed=1, rank=4), make_adapter(d / "b", seed=2, rank=2, freeze_vision=True)


@pytest.fixture(scope="module")
def pg(adapters):
    a, b = adapters
    with pg_edge.load(DEMO, adapters={"a": a, "b": b}) as pg:
        yield pg


def alone(pg, jobs, **gen):
    return [pg.generate(img, prompt, adapter=ad, max_tokens=12, **gen).tokens for img, prompt, ad in jobs]


def at_once(pg, jobs, **gen):
    """Every job from its own thread, started together: they decode in one batch."""
    out = [None] * len(jobs)
    go = threading.Barrier(len(jobs))

    def run(k):
        img, prompt, ad = jobs[k]
        go.wait()
        out[k] = pg.generate(img, prompt, adapter=ad, max_tokens=12, **gen).tokens

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_each_adapter_changes_the_answers(pg):
    """(Else the equality below would not show that each row used its own adapter.)"""
    base = alone(pg, [(img, p, None) for img, p, _ in JOBS[:4]])
    for name in ("a", "b"):
        assert alone(pg, [(img, p, name) for img, p, _ in JOBS[:4]]) != base, name


def test_concurrent_mixed_requests_equal_their_run_alone(pg):
    expected = alone(pg, JOBS)
    pg._scheduler.most_rows = 0
    assert at_once(pg, JOBS) == expected
    assert pg._scheduler.most_rows > 2  # they did share a batch


def test_requests_announced_together_share_one_prefill(pg, monkeypatch):
    """A server announces each request as soon as it has read it (pg.announce()): an idle batch
    waits for the announced ones, so requests arriving one after another within
    GATHER_S are prefilled in one pass, and each still equals its run alone."""
    jobs = JOBS[:4]
    expected = alone(pg, jobs)
    sizes = []
    admit = Batch.admit
    monkeypatch.setattr(Batch, "admit", lambda self, reqs: (sizes.append(len(reqs)), admit(self, reqs))[1])
    arrivals = [pg.announce() for _ in jobs]
    out = [None] * len(jobs)

    def run(k):
        time.sleep(0.002 * k)  # they come in one by one
        img, prompt, ad = jobs[k]
        with arrivals[k]:
            chunks = list(pg.stream(img, prompt, adapter=ad, max_tokens=12, arrival=arrivals[k]))
        out[k] = chunks[-1].result.tokens

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out == expected
    assert sizes == [len(jobs)]
    assert pg._scheduler.preparing == 0


def test_an_announcement_never_used_holds_an_idle_batch_briefly_only(pg):
    """A request announced but never submitted (its image refused, its client gone) delays an
    idle batch's first prefill by GATHER_S at most; withdrawn, it holds nothing."""
    out = {}

    def run():
        t0 = time.monotonic()
        out["tokens"] = pg.generate(SHAPES[0], "caption en", max_tokens=4).tokens
        out["s"] = time.monotonic() - t0

    with pg.announce():
        t = threading.Thread(target=run)
        t.start()
        t.join(timeout=60)
    assert out["tokens"] and out["s"] >= GATHER_S
    assert pg._scheduler.preparing == 0
    pg.announce().withdraw()
    assert pg._scheduler.preparing == 0


def test_an_8_bit_kv_cache_batches_too(adapters):
    """kv_bits=8 (mlx-lm's QuantizedKVCache): rows joining and leaving rebuild the packed keys,
    scales and biases; each request equals its run alone."""
    a, b = adapters
    with pg_edge.load(DEMO, adapters={"a": a, "b": b}, kv_bits=8) as q:
        expected = alone(q, JOBS)
        q._scheduler.most_rows = 0
        assert at_once(q, JOBS) == expected
        assert q._scheduler.most_rows > 2


def test_named_adapter_equals_the_adapter_applied_alone(pg, adapters):
    """A row's LoRA delta, gathered from the shared stacks, is mlx-lm's LoRALinear arithmetic."""
    with pg_edge.load(DEMO, adapters=adapters[0]) as applied:
        np.testing.assert_allclose(pg.logits(SHAPES[0], "caption en", adapter="a"),
                                   applied.logits(SHAPES[0], "caption en"), rtol=0, atol=1e-4)
        assert (pg.generate(SHAPES[1], "detect circle", adapter="a", max_tokens=12).tokens
                == applied.generate(SHAPES[1], "detect circle", max_tokens=12).tokens)


def test_a_row_that_leaves_does_not_disturb_the_others(pg):
    """A long stream is dropped (a client hanging up) or cancelled while six others decode
    beside it: theirs are unchanged; the cancelled one still gets its result."""
    expected = alone(pg, JOBS[:6])
    assert pg.generate(LONG, "caption en", max_tokens=40, adapter="a").finish_reason == "length"
    for leave in ("close", "cancel"):
        stream = pg.stream(LONG, "caption en", max_tokens=400, adapter="a")
        next(stream)
        pg._scheduler.most_rows = 0
        out = [None] * 6

        def run(k):
            img, prompt, ad = JOBS[k]
            out[k] = pg.generate(img, prompt, adapter=ad, max_tokens=12).tokens

        threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        if leave == "close":
            stream.close()
        else:
            stream.cancel()
            result = list(stream)[-1].result
            assert result.finish_reason == "cancelled" and 0 < len(result.tokens) < 400
        for t in threads:
            t.join(timeout=120)
        assert out == expected, leave
        assert pg._scheduler.most_rows >= 2  # the long row shared the batch


def test_a_cancel_event_stops_its_own_row_only(pg):
    stop = threading.Event()
    out = {}

    def long_run():
        out["long"] = pg.generate(LONG, "caption en", max_tokens=400, adapter="a", cancel=stop)

    t = threading.Thread(target=long_run)
    t.start()
    expected = alone(pg, JOBS[:3])
    got = at_once(pg, JOBS[:3])
    stop.set()
    t.join(timeout=60)
    assert got == expected and out["long"].finish_reason == "cancelled"


def test_sampled_and_greedy_rows_together(pg):
    """A sampled row (its own temperature) beside greedy ones leaves theirs unchanged."""
    expected = alone(pg, JOBS[:4])
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("s", pg.generate(LONG, "caption en", max_tokens=30,
                                                                       temperature=1.0, seed=3)))
    t.start()
    assert at_once(pg, JOBS[:4]) == expected
    t.join(timeout=60)
    assert len(out["s"].tokens) > 0


def test_unknown_adapter_names_are_one_line_errors(pg):
    for call in (lambda: pg.generate(SHAPES[0], "caption en", adapter="c"),
                 lambda: pg.detect(SHAPES[0], "circle", adapter="c"),
                 lambda: pg.generate_batch(SHAPES[:2], ["caption en"] * 2, adapter=["a", "c"]),
                 lambda: pg.remove_adapter("c")):
        with pytest.raises(PgEdgeError, match="no adapter named 'c' \\(adapters: a, b\\)") as info:
            call()
        assert "\n" not in str(info.value)
    with pg_edge.load(DEMO) as plain:
        with pytest.raises(PgEdgeError, match="no adapter named 'a' \\(adapters: none loaded\\)"):
            plain.caption(SHAPES[0], adapter="a")


def test_adapters_of_another_base_are_refused_in_one_line(adapters, converted):
    other = converted(version=1)  # the tiny PaliGemma 1 fixture: another architecture
    with pytest.raises(PgEdgeError, match="made for another base model") as info:
        pg_edge.load(other, adapters={"a": adapters[0]})
    assert "\n" not in str(info.value)
    with pg_edge.load(other) as pg:
        with pytest.raises(PgEdgeError, match="made for another base model"):
            pg.add_adapter("a", adapters[0])
        assert pg.adapters == []


def test_only_lora_adapters_share_a_base(adapters, tmp_path):
    """attn/full adapters replace base weights (the demo model is quantized, so one is made by
    relabelling a LoRA folder: the mode is checked first)."""
    attn = tmp_path / "attn"
    shutil.copytree(adapters[0], attn)
    config = json.loads((attn / "adapter_config.json").read_text())
    config.update(mode="attn")
    config.pop("lora")
    (attn / "adapter_config.json").write_text(json.dumps(config))
    with pg_edge.load(DEMO) as pg:
        with pytest.raises(PgEdgeError, match="only LoRA adapters share a base") as info:
            pg.add_adapter("attn", attn)
        assert "\n" not in str(info.value)


def test_add_and_remove_adapters(pg, adapters):
    expected = alone(pg, [(SHAPES[1], "detect circle", "a")])
    pg.add_adapter("a2", adapters[0])
    assert pg.adapters == ["a", "b", "a2"]
    assert alone(pg, [(SHAPES[1], "detect circle", "a2")]) == expected
    with pytest.raises(PgEdgeError, match="is loaded already"):
        pg.add_adapter("a2", adapters[0])
    pg.remove_adapter("a2")
    assert pg.adapters == ["a", "b"]
    with pytest.raises(PgEdgeError, match="no adapter named 'a2'"):
        pg.generate(SHAPES[1], "detect circle", adapter="a2")
    assert alone(pg, [(SHAPES[1], "detect circle", "a")]) == expected


def test_generate_batch_takes_one_adapter_per_row(pg):
    jobs = JOBS[:6]
    rows = pg.generate_batch([j[0] for j in jobs], [j[1] for j in jobs], adapter=[j[2] for j in jobs],
                             max_tokens=12)
    assert [r.tokens for r in rows] == alone(pg, jobs)


def test_max_batch_one_runs_them_in_turn(pg):
    expected = alone(pg, JOBS[:4])
    pg.max_batch = 1
    try:
        pg._scheduler.most_rows = 0
        assert at_once(pg, JOBS[:4]) == expected
        assert pg._scheduler.most_rows == 1
    finally:
        pg.max_batch = 8
    with pytest.raises(PgEdgeError, match="max_batch must be a positive integer"):
        pg.max_batch = 0


def test_label_runs_its_images_in_batches_with_the_same_results(pg, tmp_path):
    """pg-edge label asks for a batch of images at once (issue 22, item 4): the labels equal
    one-at-a-time labelling, image for image, in file order."""
    from pg_edge.tasks.label import label_folder

    out = {}
    for size in (1, 8):
        pg.max_batch = size
        pg._scheduler.most_rows = 0
        label_folder(pg, "pg_edge/demo/samples", "circle ; square ; triangle", tmp_path / f"{size}.json",
                     gen={"max_tokens": 24}, quiet=True)
        out[size] = (json.loads((tmp_path / f"{size}.json").read_text()), pg._scheduler.most_rows)
    pg.max_batch = 8
    (one, rows1), (many, rows8) = out[1], out[8]
    assert rows1 == 1 and rows8 > 1
    assert one["annotations"] and one["annotations"] == many["annotations"]
    assert one["pg_edge"]["done"] == many["pg_edge"]["done"] == sorted(one["pg_edge"]["done"])
