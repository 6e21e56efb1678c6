"""The matvecs' thread pool (pg_edge/cpu/qmv/pool.cpp): its workers' polling between jobs is a
setting (PG_EDGE_QMV_SPIN_US, `spin_microseconds`) that changes no result, with one caller or
several at once. `ext`: tests/cpu/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np


def weight(n: int, k: int, seed: int):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    return mx.quantize(w, group_size=64, bits=4)


def test_spin_setting_reads_and_sets(ext):
    before = ext.spin_microseconds()
    try:
        assert before >= 0
        assert ext.spin_microseconds(0) == before
        assert ext.spin_microseconds() == 0
        ext.spin_microseconds(10**9)  # capped
        assert ext.spin_microseconds() == 100000
    finally:
        ext.spin_microseconds(before)


def test_the_same_products_polling_or_sleeping(ext):
    wq = weight(9216, 2304, 1)
    x = mx.random.normal((1, 2304), key=mx.random.key(2))
    before = ext.spin_microseconds()
    try:
        outs = {}
        for us in (0, 50, 200):
            ext.spin_microseconds(us)
            # many calls in a row, as a decode step makes them: the workers poll or sleep between
            outs[us] = [np.array(ext.quantized_matvec(x * (i + 1), *wq, 64, 4)) for i in range(20)]
        for us in (50, 200):
            for a, b in zip(outs[0], outs[us]):
                np.testing.assert_array_equal(a, b)  # the same rows, whoever computed them
    finally:
        ext.spin_microseconds(before)


def test_callers_on_several_threads_at_once(ext):
    """One job at a time: a caller that finds the pool busy runs its job alone; every result is
    its own product however the threads interleave."""
    wq = weight(4096, 2304, 3)
    xs = [mx.random.normal((1, 2304), key=mx.random.key(10 + i)) for i in range(4)]
    want = [np.array(ext.quantized_matvec(x, *wq, 64, 4)) for x in xs]
    mx.eval(wq)
    errors = []

    def run(i):
        try:
            s = mx.new_stream(mx.cpu)
            for _ in range(15):
                got = ext.quantized_matvec(xs[i], *wq, 64, 4, stream=s)
                np.testing.assert_array_equal(np.array(got), want[i])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert errors == []


def test_environment_variable_sets_it_at_start(ext):
    code = "from pg_edge.cpu import qmv; print(qmv.module().spin_microseconds())"
    for value, want in (("0", "0"), ("750", "750")):
        env = dict(os.environ, PG_EDGE_QMV_SPIN_US=value)
        env.pop("PG_EDGE_QMV", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [want]


def test_a_bad_environment_value_is_a_clear_error(ext):
    code = "import pg_edge; from pg_edge.cpu import qmv; qmv.module()"
    for value in ("abc", "-5", "1e3", "200000"):
        env = dict(os.environ, PG_EDGE_QMV_SPIN_US=value)
        env.pop("PG_EDGE_QMV", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode != 0, value
        assert "PG_EDGE_QMV_SPIN_US must be a whole number" in out.stderr, out.stderr
