"""Build the optional compiled decode matvecs (`_pg_edge_qmv`) into a user cache folder.

`python -m pg_edge.cpu.qmv build` (or `make qmv`) runs CMake on this folder's CMakeLists.txt
(SOURCES) against the installed MLX wheel's headers and CMake files, and puts the
module in `build_dir()`: one folder per MLX version, Python and source digest, so a new MLX or a
changed source builds afresh and an old build is never loaded against the wrong MLX. Needs a C++
compiler, CMake >= 3.24 and nanobind of the ABI MLX's own binding was built with (nanobind 3.1
for MLX 0.32; `pip install nanobind==3.1.0`). Nothing here runs at install or import time.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from ...errors import PgEdgeError

SOURCE = Path(__file__).resolve().parent
SOURCES = ("qmv.h", "qmv.cpp", "qmv_int8.h", "qmv_int8.cpp", "qmm_int8.cpp", "qmm_int8_avx2.cpp", "qmm_int16.cpp", "qmm_bf16dot.cpp", "panel.h", "fmv.h", "fmv.cpp", "dq.h", "dq.cpp", "act.h", "act.cpp", "attn.h", "attn.cpp", "norm.h", "norm.cpp", "logits.h", "logits.cpp", "vexp.h", "bf16_gemm.h",
           "bf16_gemm.cpp", "bf16_kernels.h", "amx.cpp", "pool.h", "pool.cpp",
           "common.h", "common.cpp", "affine.h", "bindings.cpp", "CMakeLists.txt")
MODULE = "_pg_edge_qmv"
NANOBIND = "nanobind==3.1.0"


def cache_root() -> Path:
    """PG_EDGE_QMV_DIR, else $XDG_CACHE_HOME/pg_edge/qmv (~/.cache/pg_edge/qmv)."""
    if os.environ.get("PG_EDGE_QMV_DIR"):
        return Path(os.environ["PG_EDGE_QMV_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pg_edge" / "qmv"


def build_dir() -> Path:
    """The folder this MLX, this Python and these sources build into and load from."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE / name).read_bytes())
    mlx_version = importlib.metadata.version("mlx")
    tag = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / f"mlx{mlx_version}-{tag}-{digest.hexdigest()[:12]}"


def module_file(folder: Path) -> Path | None:
    """The built module in `folder`, or None."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = folder / f"{MODULE}{suffix}"
    return path if path.is_file() else None


def _require_tools() -> None:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise PgEdgeError(f"building the compiled matvecs needs {' and '.join(missing)} on PATH "
                          "(Debian: apt-get install cmake g++); pg_edge runs without it")
    try:
        importlib.metadata.version("nanobind")
    except importlib.metadata.PackageNotFoundError:
        raise PgEdgeError(f"building the compiled matvecs needs nanobind: pip install {NANOBIND}") from None


def build(verbose: bool = False) -> Path:
    """Compile the module into build_dir() (a no-op when it is there); returns its path."""
    target = build_dir()
    found = module_file(target)
    if found is not None:
        return found
    _require_tools()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        out = None if verbose else subprocess.PIPE
        for cmd in (["cmake", "-S", str(SOURCE), "-B", tmp, f"-DPython_EXECUTABLE={sys.executable}",
                     "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", tmp, "-j", str(os.cpu_count() or 1)]):
            run = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
            if run.returncode != 0:
                tail = "" if verbose else "\n" + "\n".join((run.stdout or "").splitlines()[-20:])
                raise PgEdgeError(f"building the compiled matvecs failed at: {' '.join(cmd[:2])}{tail}")
        built = module_file(Path(tmp))
        if built is None:
            raise PgEdgeError(f"the build made no {MODULE} module in {tmp}")
        # staged next to the target, then renamed: a reader never sees a half-written folder
        stage = Path(tmp) / "stage"
        stage.mkdir()
        shutil.copy2(built, stage / built.name)
        try:
            os.replace(stage, target)
        except OSError:
            if module_file(target) is None:  # not another process that got there first
                raise
    return module_file(target)
