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

One thread per call: pg_edge splits its big inference products over one CPU stream per core
(pg_edge/cpu/streams.py), so OpenBLAS's own threads would double-book the cores; load() sets
OpenBLAS to one thread unless OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS or OMP_NUM_THREADS says
otherwise, and training, whose products stay whole, takes every core back (`all_cores()`).
Figures: docs/performance.md ("One OpenBLAS thread per stream").

macOS: nothing to do (MLX's CPU products use Accelerate). Other systems: nothing is loaded.
"""
from __future__ import annotations

import contextlib
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
# The user's own thread count for OpenBLAS, which pg_edge then leaves alone.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")

# What load() did: {"blas": the library MLX's float32 products use, "path": a file or None,
# "active": bool, "note": one line for `pg-edge bench` and backend_info()}.
_state: dict | None = None
# The loaded OpenBLAS (ctypes.CDLL) while it is the active BLAS, for its thread count.
_lib = None


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
        _one_thread(_preloaded())
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
                _one_thread(path)
    return _state


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _one_thread(path: str) -> None:
    """OpenBLAS at one thread per call (module docstring), unless the user chose a count."""
    global _lib
    import ctypes

    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)  # the loaded library's handle
        lib.openblas_set_num_threads.argtypes = [ctypes.c_int]
        lib.openblas_get_num_threads.restype = ctypes.c_int
    except (OSError, AttributeError):  # not an OpenBLAS after all: leave it as it is
        return
    _lib = lib
    if not any(os.environ.get(v) for v in THREAD_VARS) and _cores() > 1:
        lib.openblas_set_num_threads(1)


def threads() -> int | None:
    """OpenBLAS's threads per call now, or None when OpenBLAS is not the active BLAS."""
    return None if _lib is None else int(_lib.openblas_get_num_threads())


def set_threads(n: int) -> int | None:
    """Set OpenBLAS's threads per call (no-op without it); returns the count before."""
    before = threads()
    if _lib is not None:
        _lib.openblas_set_num_threads(max(1, int(n)))
    return before


@contextlib.contextmanager
def all_cores():
    """OpenBLAS on every core for the duration (training: its products are not split over
    the CPU streams), unless the user set the thread count; restored after."""
    if _lib is None or any(os.environ.get(v) for v in THREAD_VARS):
        yield
        return
    before = set_threads(_cores())
    try:
        yield
    finally:
        set_threads(before)


def _record(blas: str, path: str | None, active: bool, note: str) -> dict:
    return {"blas": blas, "path": path, "active": active, "note": note}


def info() -> dict:
    """What MLX's CPU float32 products run on in this process (after load())."""
    return dict(load())


def describe() -> str:
    """One line: e.g. "OpenBLAS (/usr/lib/.../libopenblas.so.0, loaded before MLX)"."""
    i = info()
    where = f"{i['path']}, " if i["path"] and i["active"] else ""
    n = threads()
    per_call = "" if n is None else f", {n} thread{'s' if n != 1 else ''} per call"
    return f"{i['blas']} ({where}{i['note']}{per_call})"


def backend_info() -> dict:
    """What pg_edge computes on here: MLX's version and default device, and the BLAS under its CPU
    float32 products (`pg_edge.backend_info()`; `pg-edge bench` prints it)."""
    import mlx.core as mx

    i = info()
    return {"mlx": mx.__version__, "device": str(mx.default_device()), "blas": i["blas"],
            "blas_path": i["path"] if i["active"] else None, "blas_note": i["note"]}
