"""pg_edge.cpu.pages: the weights moved onto 2 MB pages at load, contents and results unchanged."""
from __future__ import annotations

import ctypes
import errno
import sys

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cpu import pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="2 MB pages are asked of Linux only")


class Holder:
    """What settle reads of a model: parameters(), a tree of arrays."""

    def __init__(self, arrays):
        self.arrays = arrays

    def parameters(self):
        return {"layers": [{"weight": a} for a in self.arrays]}


def huge_kb_at(start: int, end: int) -> int:
    """AnonHugePages (kB) of the mappings that overlap [start, end), from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < end and hi > start
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


def test_ranges_round_to_2mb_pages():
    H = pages.HUGE
    assert pages.aligned_range(H + 16, 3 * H) == (2 * H, 4 * H)
    assert pages.covering_range(H + 16, 3 * H) == (H, 5 * H)
    first, end = pages.aligned_range(H + 16, H)  # a buffer under 2 MB past a boundary holds none
    assert first >= end
    assert pages.covering_range(2 * H, H) == (2 * H, 3 * H)


@linux
def test_settle_moves_large_weights_and_keeps_every_value(monkeypatch):
    monkeypatch.setenv("PG_EDGE_HUGEPAGES", "on")
    arrays = [mx.random.randint(0, 2**31, (n, 1024)).astype(mx.uint32) for n in (3000, 700, 5000)]
    arrays.append(mx.random.normal((2000, 1024)).astype(mx.bfloat16))
    mx.eval(arrays)
    before = [np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for a in arrays]
    r = pages.settle(Holder(arrays))
    assert r["how"] in ("collapse", "hugepage"), r  # a Linux kernel with transparent huge pages
    assert r["bytes"] >= sum(a.nbytes for a in arrays if a.nbytes >= 4 * pages.HUGE) * 0.5
    for a, want in zip(arrays, before):
        np.testing.assert_array_equal(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a), want)
    if r["how"] == "collapse":  # what settle says it moved, the kernel says sits on 2 MB pages
        # (the move is best effort: on a host short of free 2 MB blocks the kernel refuses some,
        # and settle does not count those; the mappings holding the buffers are read once)
        lo = min(pages._address(a) for a in arrays)
        hi = max(pages._address(a) + a.nbytes for a in arrays)
        assert huge_kb_at(lo, hi) * 1024 >= r["bytes"] // 2
    again = pages.settle(Holder(arrays))  # nothing left to do: same answer, at once
    assert again["how"] == r["how"] and again["bytes"] == r["bytes"]


@linux
def test_neighbours_of_a_moved_buffer_keep_their_values(monkeypatch):
    """A buffer's first and last 2 MB page hold its neighbours' ends: they must read the same."""
    monkeypatch.setenv("PG_EDGE_HUGEPAGES", "on")
    small = [mx.arange(i * 40_000, (i + 1) * 40_000, dtype=mx.int32) for i in range(40)]
    big = [mx.random.randint(0, 1000, (700_000,), dtype=mx.int32) for _ in range(6)]
    everything = [x for pair in zip(small, big + [None] * 40) for x in pair if x is not None]
    mx.eval(everything)
    snapshot = [np.array(a).copy() for a in everything]
    pages.settle(Holder(big))
    for a, want in zip(everything, snapshot):
        np.testing.assert_array_equal(np.array(a), want)


def test_off_switch_and_gpu_leave_pages_alone(monkeypatch):
    a = mx.zeros((3_000_000,), dtype=mx.float32)
    mx.eval(a)
    monkeypatch.setenv("PG_EDGE_HUGEPAGES", "off")
    assert pages.settle(Holder([a])) == {"bytes": 0, "how": "off", "seconds": 0.0}
    assert "PG_EDGE_HUGEPAGES=off" in pages.describe()
    monkeypatch.delenv("PG_EDGE_HUGEPAGES")
    monkeypatch.setattr(pages.mx, "default_device", lambda: mx.Device(mx.gpu))
    assert pages.settle(Holder([a]))["how"] == "not run"


@linux
def test_load_settles_the_model_and_generates_the_same_tokens(converted, monkeypatch):
    """pg_edge.load moves the weights (every one, with the size floor lowered for the tiny
    fixture) and the greedy tokens are those of a load that leaves them on 4 KB pages."""
    import pg_edge

    folder = converted(version=2)
    monkeypatch.setenv("PG_EDGE_HUGEPAGES", "off")
    with pg_edge.load(folder) as pg:
        assert pages.last["how"] == "off"
        want = pg.generate(np.full((28, 28, 3), 90, np.uint8), "caption en", max_tokens=6).text
    monkeypatch.setenv("PG_EDGE_HUGEPAGES", "on")
    monkeypatch.setattr(pages, "MIN_BYTES", 0)
    with pg_edge.load(folder) as pg:
        assert pages.last["how"] in ("collapse", "hugepage") and pages.last["bytes"] > 0
        assert pg.generate(np.full((28, 28, 3), 90, np.uint8), "caption en", max_tokens=6).text == want


def test_bench_reports_the_pages(converted, capsys):
    from pg_edge.cli import main

    assert main(["bench", str(converted(version=2)), "--tokens", "2", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert f"weights' pages: {pages.describe()}" in out


def test_a_refused_covering_range_falls_back_to_the_pages_inside():
    """A buffer with a mapping of its own, next to a mapping of another kind: the kernel refuses
    the covering range with EINVAL (or ENOMEM where part of it is unmapped); the 2 MB pages inside
    the buffer are still moved. Only when those are refused too is the errno reported."""
    H = pages.HUGE
    start, nbytes = H + 100, 5 * H  # covering [H, 7H), inside [2H, 6H)
    for refused in (errno.EINVAL, errno.ENOMEM):
        calls = []

        def madvise(addr, length, advice, refused=refused, calls=calls):
            calls.append((addr, length))
            if addr == H:  # the covering range
                ctypes.set_errno(refused)
                return -1
            return 0

        assert pages._collapse(madvise, start, nbytes) == (4 * H, 0)
        assert calls == [(H, 6 * H), (2 * H, 4 * H)]

    def old_kernel(addr, length, advice):
        ctypes.set_errno(errno.EINVAL)
        return -1

    assert pages._collapse(old_kernel, start, nbytes) == (0, errno.EINVAL)
    assert pages._collapse(old_kernel, H + 100, H) == (0, errno.EINVAL)  # nothing inside: the first answer
