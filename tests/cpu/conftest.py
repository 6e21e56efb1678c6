"""The compiled kernels (pg_edge.cpu.qmv) for tests/cpu/test_qmv.py, test_fmv.py and test_dequantize.py."""
from __future__ import annotations

import os

import pytest

from pg_edge.cpu import qmv
from pg_edge.cpu.qmv import build as qbuild


@pytest.fixture(scope="module")
def ext():
    """The built module, loaded (built first when missing: CMake, a C++ compiler, nanobind;
    make setup installs them), with PG_EDGE_QMV unset for the module's tests."""
    path = qbuild.build()
    assert path.is_file()
    old = os.environ.pop("PG_EDGE_QMV", None)
    qmv.reset()
    mod = qmv.module()
    assert mod is not None, qmv.kernel()
    yield mod
    qmv.reset()
    if old is not None:
        os.environ["PG_EDGE_QMV"] = old


@pytest.fixture
def count_calls(ext, monkeypatch):
    """count_calls(name) -> a list that gets one entry per call of the module's `name`: for the
    test, qmv.module() answers with a stand-in that is `ext` but for that counting."""

    def install(name: str) -> list:
        calls = []
        real = getattr(ext, name)

        class Counting:
            def __getattr__(self, attr):
                return getattr(ext, attr)

        stand_in = Counting()
        setattr(stand_in, name, lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(qmv, "module", lambda: stand_in)
        return calls

    return install
