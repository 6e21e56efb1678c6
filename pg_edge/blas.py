"""A fast BLAS under MLX's CPU float32 products: the system OpenBLAS, loaded before MLX.

MLX's Linux CPU wheel links the netlib reference BLAS (its `mlx_cpu.libs/libblas-*.so`), whose
`cblas_sgemm` is a plain triple loop. The system OpenBLAS exports the same `cblas_*` symbols; loaded
into the process's global symbol scope (`ctypes.CDLL(path, RTLD_GLOBAL)`) before `mlx.core` is
first imported, it is the one MLX's float32 matmul binds to (the bundled library sits in the
extension's local scope, searched after the global one). Figures: docs/performance.md.

`pg_edge/__init__.py` calls `load()` on the first `import pg_edge...`, before any pg_edge module
imports MLX. The limit: a program that imported `mlx.core` before pg_edge keeps the bundled BLAS
(MLX binds its BLAS symbols at import); `info()` says so. Such a program can import pg_edge first,
or start with `LD_PRELOAD=<libopenblas.so.0>`.

PG_EDGE_BLAS chooses:
    unset, "", "auto", "1", "on"   the first OpenBLAS found (SEARCH, then ctypes' find_library)
    "0", "off", "no", "false"      none: MLX's bundled BLAS
    a path                         that library (if it cannot be loaded: one warning line on
                                   stderr, and MLX keeps its bundled BLAS)

macOS: nothing to do (MLX's CPU products use Accelerate). Other systems: nothing is loaded.
"""
from __future__ import annotations

import glob
import os
import sys

ENV = "PG_EDGE_BLAS"
OFF = {"0", "off", "no", "false", "none"}
AUTO = {"", "auto", "1", "on", "yes", "true"}
# Debian/Ubuntu's libopenblas0-pthread first (what `make setup` installs), then other layouts.
SEARCH = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)
INSTALL_HINT = "apt-get install libopenblas0-pthread"

# What load() did: {"blas": the library MLX's float32 products use, "path": a file or None,
# "active": bool, "note": one line for `pg-edge bench` and backend_info()}.
_state: dict | None = None


def find() -> str | None:
    """The first OpenBLAS shared library on this system, or None."""
    for pattern in SEARCH:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    import ctypes.util

    name = ctypes.util.find_library("openblas")
    return name or None


def _preloaded() -> str | None:
    """An OpenBLAS named in LD_PRELOAD (then it precedes MLX whatever the import order)."""
    for part in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if "openblas" in os.path.basename(part):
            return part
    return None


def load() -> dict:
    """Load the fast BLAS once per process (see the module docstring); returns info()."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "").strip()
    if sys.platform == "darwin":
        _state = _record("Accelerate", None, True, "macOS: MLX uses Accelerate")
    elif not sys.platform.startswith("linux"):
        _state = _record("MLX's own", None, False, f"{sys.platform}: nothing loaded")
    elif choice.lower() in OFF:
        _state = _record("bundled reference BLAS", None, False, f"off ({ENV}={choice})")
    elif _preloaded():
        _state = _record("OpenBLAS", _preloaded(), True, "LD_PRELOAD")
    else:
        path = find() if choice.lower() in AUTO else choice
        if path is None:
            _state = _record("bundled reference BLAS", None, False,
                             f"no OpenBLAS found ({INSTALL_HINT} for fast float32 products)")
        elif "mlx.core" in sys.modules:
            _state = _record("bundled reference BLAS", path, False,
                             "too late: mlx.core was imported before pg_edge; import pg_edge first "
                             f"or run with LD_PRELOAD={path}")
        else:
            import ctypes

            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError as e:
                # at import time: a warning, not an exception (the rest of pg_edge still works)
                _state = _record("bundled reference BLAS", None, False, f"{path} did not load: {e}")
                if choice.lower() not in AUTO:
                    print(f"pg_edge: {ENV}={choice}: cannot load it ({e}); MLX keeps its bundled BLAS",
                          file=sys.stderr)
            else:
                _state = _record("OpenBLAS", path, True, "loaded before MLX")
    return _state


def _record(blas: str, path: str | None, active: bool, note: str) -> dict:
    return {"blas": blas, "path": path, "active": active, "note": note}


def info() -> dict:
    """What MLX's CPU float32 products run on in this process (after load())."""
    return dict(load())


def describe() -> str:
    """One line: e.g. "OpenBLAS (/usr/lib/.../libopenblas.so.0, loaded before MLX)"."""
    i = info()
    where = f"{i['path']}, " if i["path"] and i["active"] else ""
    return f"{i['blas']} ({where}{i['note']})"


def backend_info() -> dict:
    """What pg_edge computes on here: MLX's version and default device, and the BLAS under its CPU
    float32 products (`pg_edge.backend_info()`; `pg-edge bench` prints it)."""
    import mlx.core as mx

    i = info()
    return {"mlx": mx.__version__, "device": str(mx.default_device()), "blas": i["blas"],
            "blas_path": i["path"] if i["active"] else None, "blas_note": i["note"]}
