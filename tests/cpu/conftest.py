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
