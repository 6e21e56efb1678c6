"""The one pool of CPU streams, and the per-thread flag that says a graph is being traced.

MLX runs every kernel queued on a CPU stream on that stream's one thread, so work split over
one stream per core runs side by side (docs/performance.md, "Big products split over the CPU
cores"). The products, the attention split and the streaming converter all take their streams
from `cpu_streams()`.
"""
from __future__ import annotations

import contextlib
import os
import threading

import mlx.core as mx

from ..errors import PgEdgeError


class _ThreadState(threading.local):
    """Per thread: each pg_edge worker thread builds and evaluates its own graphs."""

    streams: list | None = None  # this thread's CPU streams
    tracing: bool = False  # inside tracing_on()


_local = _ThreadState()
_count_cache: dict = {}


def stream_count() -> int:
    """CPU streams a big product is split over: the cores this process may run on (at most
    8), or PG_EDGE_CPU_STREAMS. Cached (per value of the variable): a decode step asks once
    per product, and the affinity query is a system call."""
    forced = os.environ.get("PG_EDGE_CPU_STREAMS")
    n = _count_cache.get(forced)
    if n is None:
        if forced:
            if not forced.isdigit() or int(forced) < 1:
                raise PgEdgeError(f"PG_EDGE_CPU_STREAMS must be a whole number >= 1, got {forced!r}")
            n = int(forced)
        else:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # macOS
                cores = os.cpu_count() or 1
            n = max(1, min(cores, 8))
        _count_cache[forced] = n
    return n


def cpu_streams() -> list:
    """This thread's CPU streams, `stream_count()` of them (created on first use; one thread
    per stream inside MLX); [None] (the default stream) when there is one."""
    n = stream_count()
    streams = _local.streams
    if streams is None or len(streams) != n:
        streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else [None]
        _local.streams = streams
    return streams


def on_streams(make, n: int, eager: bool) -> list:
    """[make(i, stream) for i in range(n)], piece i on CPU stream i % streams (stream None:
    one piece, the default stream). With `eager` and more pieces than streams, each round of
    one piece per stream is evaluated before the next is built, so a round's temporaries are
    freed before the next round's exist (inference only: no eval in training or tracing)."""
    streams = cpu_streams() if n > 1 else [None]
    eager = eager and n > len(streams)
    parts = []
    for i in range(n):
        parts.append(make(i, streams[i % len(streams)]))
        if eager and (i + 1) % len(streams) == 0:
            mx.eval(parts[-len(streams):])
    return parts


def tracing() -> bool:
    """True inside `tracing_on()` on this thread: a function transformation (`mx.exporter`,
    `mx.compile`) is tracing, so no eval and no per-step caches of arrays."""
    return _local.tracing


def lean(module) -> bool:
    """Whether a CPU variant may take its CPU path: inference, and no graph being traced
    (training and tracing need the plain MLX ops: gradients, no eval, no per-step caches)."""
    return not module.training and not _local.tracing


@contextlib.contextmanager
def tracing_on():
    was, _local.tracing = tracing(), True
    try:
        yield
    finally:
        _local.tracing = was
