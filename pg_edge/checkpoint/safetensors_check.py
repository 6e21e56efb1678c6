"""Check a `.safetensors` file in Python before MLX's native loader sees it.

MLX's loader trusts the header: overlapping data offsets, a dimension past 2^31 (its shapes are
int32 and wrap) or a FIFO in place of a file are read without complaint, change the output or
hang. `check_safetensors` applies the rules of the `safetensors` library, at least as strictly:

    [8 bytes]  N, header length, u64 little-endian; 2 <= N <= 100 MiB and 8 + N <= file size
    [N bytes]  UTF-8 JSON object starting with "{" (trailing spaces allowed), no duplicate keys:
               {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}
    [rest]     tensor bytes: offsets count from the end of the header; sorted by offset the
               tensors tile the data area exactly (first begins at 0, each begins where the last
               ends, the last ends at the end of the file), and end - begin == prod(shape) x
               the dtype's size

Every dimension is a non-negative integer below 2^31, every dtype one MLX loads. Only regular
files are opened (`open_regular`), so a FIFO or a device fails at once instead of hanging.
`load_safetensors` checks and then calls `mx.load`, turning any native error into one sentence.
`read_json` reads a folder's JSON side files (config, index, tokenizer_config...) with the same care.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit
MAX_DIM = 2**31 - 1  # MLX shapes are int32
MAX_JSON_BYTES = 64 * 1024 * 1024
# Bytes per element of the dtypes MLX's safetensors loader accepts.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
}


def open_regular(path: str | os.PathLike):
    """Open a file for binary reading only if it is a regular file (symlinks followed).

    O_NONBLOCK makes opening a FIFO return at once; fstat then refuses it, so nothing can block.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except OSError as err:
        raise CheckpointError(f"cannot open {path}: {err.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder?)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: str | os.PathLike):
    """Parse a JSON file (regular files only, at most 64 MiB); CheckpointError naming it."""
    path = Path(path)
    with open_regular(path) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path.name} is larger than {MAX_JSON_BYTES >> 20} MiB; refused")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path.name} is not valid JSON: {str(err)[:120]}") from None

def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path.name} is not a valid safetensors file: {what}")


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate `path`; returns the header {name: {dtype, shape, data_offsets}} (metadata under
    "__metadata__"). Raises CheckpointError naming the file and the first rule broken."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _bad(path, f"only {size} bytes (truncated?)")
        n = int.from_bytes(prefix, "little")
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _bad(path, f"header length {n} does not fit a {size}-byte file (truncated?)")
        raw = f.read(n)
    if len(raw) != n:
        raise _bad(path, "the file shrank while being read")
    if raw[:1] != b"{":
        raise _bad(path, "the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _bad(path, f"header is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    meta = header.get("__metadata__")
    meta = {} if meta is None else meta  # MLX writes null when there is none
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans.append((*_check_tensor(path, name, info), name))
    data = size - 8 - n
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise _bad(path, f"tensor {name!r} {what} (data offsets must tile the data area)")
        pos = end
    if pos != data:
        raise _bad(path, f"tensors cover {pos} bytes but the data area has {data} (truncated or padded?)")
    return header


def _check_tensor(path: Path, name: str, info) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise _bad(path, f"tensor {name!r} has shape {str(shape)[:80]}: dimensions must be integers in [0, 2^31)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"tensor {name!r} has data_offsets {str(offsets)[:80]}: need [begin, end], 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {nbytes}")
    return offsets[0], offsets[1]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, metadata) of a checked file, via mx.load; any native error -> CheckpointError."""
    import mlx.core as mx

    path = Path(path)
    check_safetensors(path)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as err:  # MLX raises RuntimeError/ValueError; never let one leak out raw
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {path.name} (corrupt safetensors?): {msg[:200]}") from None
    return tensors, meta or {}


def check_shard_name(name, index: Path) -> str:
    """A shard path from an index's weight_map: relative, inside the folder, a .safetensors."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index.name}: weight_map values must be file names, got {str(name)[:60]!r}")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or ":" in parts[0]:
        raise CheckpointError(f"{index.name} names shard {name!r} outside the model folder; refused")
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{index.name} names shard {name!r}, which is not a .safetensors file")
    return name


def read_index(index: Path) -> list[str]:
    """Sorted distinct shard names of a `model.safetensors.index.json`, each checked."""
    with open_regular(index) as f:
        text = f.read(MAX_HEADER_BYTES + 1)
    if len(text) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{index.name} is larger than {MAX_HEADER_BYTES} bytes; refused")
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{index.name} is not valid JSON: {str(err)[:120]}") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index.name} has no weight_map object")
    return sorted({check_shard_name(v, index) for v in wm.values()})
