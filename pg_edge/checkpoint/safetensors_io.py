"""Read and write `.safetensors` files one tensor (or one row block of a tensor) at a time.

`SafetensorsReader(path)`: the header checked by pg_edge.checkpoint.safetensors_check (the format's rules,
regular files only, one-line CheckpointError), then tensor bytes read with plain reads at
their offset into a caller's buffer. No memory map: pages of a mapped file that are
touched count in the process's resident memory, a read into a reused buffer does not.

`ShardWriter(path, specs, metadata)`: the names, dtypes and shapes of every tensor are given up
front, so the header is written first and each tensor's bytes go to their offset as soon as
they exist (`write(name, data, at=byte offset inside the tensor)`), whole or a row block at a
time, in any order. `close()` refuses a file with a tensor not fully written. The file is
what `mx.save_safetensors` writes (dtypes, shapes, bytes, `__metadata__`); the header is JSON
with sorted keys padded with spaces to a multiple of 8 bytes, as the safetensors library pads
it; data lies in the order of `specs`. A write failure (full disk, file size limit) is a
PgEdgeError naming the file. `fill(writer, tensors)` writes a dict of MLX arrays through it,
evaluating one tensor at a time.
"""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError, PgEdgeError
from .safetensors_check import DTYPE_SIZES, check_safetensors, open_regular

# safetensors dtype name <-> MLX dtype (every name MLX's own loader accepts)
MX_DTYPES = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16,
    "U32": mx.uint32, "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64, "F16": mx.float16,
    "BF16": mx.bfloat16, "F32": mx.float32, "F64": mx.float64,
}
ST_NAMES = {v: k for k, v in MX_DTYPES.items()}


class Spec(NamedTuple):
    """One tensor of a file: safetensors dtype name and shape (what a header says about it)."""

    dtype: str
    shape: tuple

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE_SIZES[self.dtype]

    @property
    def mx_dtype(self):
        return MX_DTYPES[self.dtype]

    @classmethod
    def of(cls, x: mx.array) -> "Spec":
        """The spec of an MLX array (lazy or not: shapes and dtypes are known before eval)."""
        if x.dtype not in ST_NAMES:
            raise PgEdgeError(f"cannot store a {x.dtype} tensor in safetensors")
        return cls(ST_NAMES[x.dtype], tuple(x.shape))


class Entry(NamedTuple):
    """A tensor inside a source file: its spec and its first byte's absolute file offset."""

    name: str
    spec: Spec
    start: int


class SafetensorsReader:
    """One checked .safetensors file, read tensor by tensor; use as a context manager.

    entries: the tensors in file-offset order; metadata: `__metadata__` ({} when absent)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = check_safetensors(self.path)  # every rule of the format, one-line errors
        self.metadata = header.pop("__metadata__", None) or {}
        self._file = open_regular(self.path)
        n = int.from_bytes(self._file.read(8), "little")
        base = 8 + n
        self.entries = sorted(
            (Entry(name, Spec(e["dtype"], tuple(e["shape"])), base + e["data_offsets"][0])
             for name, e in header.items()), key=lambda e: e.start)

    def read_into(self, entry: Entry, out: np.ndarray, begin: int = 0) -> None:
        """Fill the uint8 buffer `out` with the tensor's bytes from byte `begin` on (one
        thread at a time: the file position is shared)."""
        view = memoryview(out).cast("B")
        self._file.seek(entry.start + begin)
        got = 0
        while got < len(view):  # a read may return less than asked (signals, big reads)
            n = self._file.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.path.name} shrank while being read (truncated?)")
            got += n

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def header_bytes(specs: dict[str, Spec], metadata: dict | None) -> tuple[bytes, dict[str, int]]:
    """(the 8-byte length + padded JSON header, each tensor's offset in the data area), the
    data laid out in the order of `specs`."""
    header: dict = {"__metadata__": dict(metadata) if metadata else None}
    offsets, pos = {}, 0
    for name, s in specs.items():
        offsets[name] = pos
        header[name] = {"data_offsets": [pos, pos + s.nbytes], "dtype": s.dtype, "shape": list(s.shape)}
        pos += s.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


def write_error(path: Path, err: OSError) -> PgEdgeError:
    return PgEdgeError(f"cannot write {path.name} in {path.parent.parent}: {err.strerror or err} "
                       "(disk full or a file size limit?)")


class ShardWriter:
    """A safetensors file whose header is written first and whose tensors arrive piece by
    piece: `write(name, data, at)` puts `data` (bytes-like, C-contiguous) at byte `at` of the
    tensor; `close()` checks every tensor got all its bytes."""

    def __init__(self, path: str | os.PathLike, specs: dict[str, Spec], metadata: dict | None = None):
        self.path = Path(path)
        self.specs = dict(specs)
        head, offsets = header_bytes(self.specs, metadata)
        self._start = {k: len(head) + off for k, off in offsets.items()}
        self._left = {k: s.nbytes for k, s in self.specs.items()}
        self.nbytes = sum(s.nbytes for s in self.specs.values())
        self._fd = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            try:  # reserve the space now: a full disk fails before gigabytes are computed
                os.posix_fallocate(self._fd, 0, len(head) + self.nbytes)
            except (AttributeError, OSError) as err:
                if isinstance(err, OSError) and err.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise
            self._write_at(head, 0)
        except OSError as err:
            self.abort()
            raise write_error(self.path, err) from None

    def _write_at(self, data, pos: int) -> None:
        view = memoryview(data).cast("B")
        os.lseek(self._fd, pos, os.SEEK_SET)  # one thread writes a file at a time
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])

    def write(self, name: str, data, at: int = 0) -> None:
        """Write `data` at byte `at` of tensor `name` (in its row-major layout)."""
        n = memoryview(data).nbytes
        if at < 0 or at + n > self.specs[name].nbytes:
            raise ValueError(f"{name}: bytes [{at}, {at + n}) outside its {self.specs[name].nbytes}")
        try:
            self._write_at(data, self._start[name] + at)
        except OSError as err:
            raise write_error(self.path, err) from None
        self._left[name] -= n

    def close(self) -> None:
        """Close the file; raise if a tensor did not get exactly its bytes."""
        self.abort()
        wrong = [k for k, v in self._left.items() if v != 0]
        if wrong:
            raise PgEdgeError(f"{self.path.name}: tensor {wrong[0]} was not written completely")

    def abort(self) -> None:
        """Close the file as it is (the caller's temporary folder is then removed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def array_bytes(x: mx.array) -> memoryview:
    """The row-major bytes of an evaluated (or evaluable) MLX array, without a copy when it is
    already contiguous."""
    if x.size == 0:
        return memoryview(b"")
    x = mx.contiguous(x)
    mx.eval(x)
    return memoryview(x)


def fill(writer: ShardWriter, tensors: dict[str, mx.array]) -> None:
    """Write a dict of MLX arrays (the writer's specs) and close the file; each tensor is
    evaluated and written in turn."""
    try:
        for k, v in tensors.items():
            writer.write(k, array_bytes(v))
    except BaseException:
        writer.abort()
        raise
    writer.close()
