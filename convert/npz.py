"""Lazy, slice-by-slice reading of big .npz files, including ones split into `.npz.part*` files.

big_vision checkpoints are one NumPy .npz (a zip of .npy members) of 6-60 GB whose decoder
weights are stacked on axis 0 (`llm/layers/mlp/gating_einsum` of the 28B model alone is 31 GB
in bf16). `np.load(mmap_mode=...)` does not map .npz members, and `NpzFile[key]` reads a whole
member, so this module reads the zip itself:

    with NpzArchive(path) as npz:          # a .npz, or the first of its .npz.part* files
        npz.keys()                          # member names without ".npy"
        npz.shape(key), npz.dtype(key)      # from the .npy header; no data read
        npz.read(key)                       # the whole array
        npz.read(key, i)                    # array[i] only: one layer of a stacked weight

Members stored uncompressed (what `np.savez` writes, and every released checkpoint) are read
with a seek to the slice's byte offset, so any layer costs only its own bytes. Compressed
members fall back to zipfile's decompressing stream, which is fast for in-order layer access.

Split checkpoints (the 28B files) are the bytes of one .npz cut into pieces; `ChainedFile`
presents them as one seekable file, so nothing is joined on disk.

bfloat16 has no NumPy dtype: big_vision saves it as raw 2-byte void (`|V2`). `read` returns
those as `mx.bfloat16` (the uint16 bits reinterpreted, exact); float32/float16 stay NumPy.
"""
from __future__ import annotations

import glob
import io
import re
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from pg_edge.errors import CheckpointError

PART_RE = re.compile(r"^(?P<stem>.+\.npz)\.part[-_.]?(?P<n>\d*|[a-z]{2})$")  # part0, part-01, partaa
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes


def _part_order(p: Path) -> tuple:
    """part2 < part10 (numbers compare as numbers); `split`'s aa, ab, ... compare as text."""
    n = PART_RE.match(p.name).group("n")
    return (0, int(n), "") if n.isdigit() else (1, 0, n)


def source_files(path: str | Path) -> list[Path]:
    """The file(s) holding the .npz at `path`, in byte order.

    `model.npz` -> [model.npz] if it exists, else its `model.npz.part*` pieces;
    `model.npz.part0` (any part) -> all pieces of `model.npz`, sorted by their number.
    """
    path = Path(path).expanduser()
    m = PART_RE.match(path.name)
    stem = m.group("stem") if m else path.name
    if not m and path.is_file():
        return [path]
    parts = sorted((p for p in path.parent.glob(f"{glob.escape(stem)}.part*") if PART_RE.match(p.name)),
                   key=_part_order)
    if not parts:
        raise CheckpointError(f"no such file: {path}")
    return parts


class ChainedFile(io.RawIOBase):
    """Read-only, seekable view of several files as their concatenation."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self.files = [open(p, "rb") for p in paths]
        self.sizes = [p.stat().st_size for p in paths]
        self.starts = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.size = sum(self.sizes)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            i = int(np.searchsorted(self.starts, self.pos, side="right")) - 1
            f, local = self.files[i], self.pos - self.starts[i]
            f.seek(local)
            n = f.readinto(view[done:done + min(len(view) - done, self.sizes[i] - local)])
            if not n:
                break
            done += n
            self.pos += n
        return done

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


class _Member:
    """One .npy inside the zip: header fields and where its data starts."""

    def __init__(self, info: zipfile.ZipInfo, shape: tuple, dtype: np.dtype, fortran: bool, data_offset: int):
        self.info, self.shape, self.dtype, self.fortran = info, shape, dtype, fortran
        self.data_offset = data_offset  # offset inside the member's (uncompressed) bytes
        self.stored = info.compress_type == zipfile.ZIP_STORED
        self.stream = None  # open ZipExtFile, for compressed members only
        self.abs_start: int | None = None  # where a stored member's array data starts in the file


class NpzArchive:
    """The arrays of one .npz (or its parts), read lazily; see the module docstring."""

    def __init__(self, path: str | Path):
        self.files = source_files(path)
        self.name = self.files[0].name
        self.raw = ChainedFile(self.files)
        self.fp = io.BufferedReader(self.raw, buffer_size=1 << 20)
        try:
            self.zip = zipfile.ZipFile(self.fp)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            self.close()
            hint = " (are all .part files present?)" if len(self.files) > 1 else ""
            raise CheckpointError(f"cannot read {self.name} as a .npz file{hint}: {err}") from None
        self.members: dict[str, _Member] = {}
        try:
            for info in self.zip.infolist():
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"{self.name}: member {info.filename!r} is not a .npy array")
                self.members[info.filename[:-len(".npy")]] = self._header(info)
        except BaseException:
            self.close()
            raise

    def _header(self, info: zipfile.ZipInfo) -> _Member:
        try:
            with self.zip.open(info) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                offset = f.tell()
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise CheckpointError(f"{self.name}: member {info.filename} is not a valid .npy: {err}") from None
        if dtype.hasobject:
            raise CheckpointError(f"{self.name}: {info.filename} holds Python objects (pickles); refused")
        return _Member(info, tuple(shape), dtype, fortran, offset)

    def keys(self) -> list[str]:
        return list(self.members)

    def shape(self, key: str) -> tuple:
        return self.members[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.members[key].dtype

    def _absolute_data_start(self, m: _Member) -> int:
        """Byte offset of a stored member's array data in the (chained) file: after the zip
        local header (whose extra field may differ from the central directory's) and the
        .npy header."""
        if m.abs_start is None:
            self.fp.seek(m.info.header_offset)
            sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(self.fp.read(_LOCAL_HEADER.size))
            if sig != b"PK\x03\x04":
                raise CheckpointError(f"{self.name}: corrupt zip header for {m.info.filename}")
            m.abs_start = m.info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + m.data_offset
        return m.abs_start

    def _read_bytes(self, m: _Member, start: int, nbytes: int) -> bytes:
        if m.stored:
            self.fp.seek(self._absolute_data_start(m) + start)
            data = self.fp.read(nbytes)
        else:
            if m.stream is None or m.stream.tell() > m.data_offset + start:
                m.stream = self.zip.open(m.info)  # (re)start: zip streams only seek forward cheaply
            m.stream.seek(m.data_offset + start)
            data = m.stream.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{self.name}: {m.info.filename} is truncated "
                                  f"(wanted {nbytes} bytes, got {len(data)})")
        return data

    def read(self, key: str, index: int | None = None):
        """The array `key` (or its slice `[index]` along axis 0) as np.ndarray, or mx.array
        for bfloat16 (stored as `|V2`)."""
        m = self.members[key]
        shape = m.shape if index is None else m.shape[1:]
        if index is not None and not 0 <= index < m.shape[0]:
            raise IndexError(f"{key}: index {index} out of range for shape {m.shape}")
        if m.fortran:  # never written by big_vision; read all, then slice
            whole = np.frombuffer(self._read_bytes(m, 0, int(np.prod(m.shape)) * m.dtype.itemsize), m.dtype)
            arr = np.ascontiguousarray(whole.reshape(m.shape, order="F")[() if index is None else index])
        else:
            count = int(np.prod(shape))
            start = 0 if index is None else index * count * m.dtype.itemsize
            arr = np.frombuffer(self._read_bytes(m, start, count * m.dtype.itemsize), m.dtype).reshape(shape)
        return as_float(arr, key)

    def close(self) -> None:
        if getattr(self, "zip", None) is not None:
            self.zip.close()
        self.fp.close()

    def __enter__(self) -> "NpzArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_bf16_void(dtype: np.dtype) -> bool:
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None


def check_float(dtype: np.dtype, key: str) -> None:
    if not (is_bf16_void(dtype) or dtype in (np.float32, np.float16)):
        raise CheckpointError(f"{key} has dtype {dtype}; expected float32, float16 or bfloat16 (|V2)")


def as_float(arr: np.ndarray, key: str):
    """float32/float16 NumPy as is; `|V2` void (big_vision's bfloat16) -> mx.bfloat16."""
    check_float(arr.dtype, key)
    return mx.array(arr.view(np.uint16)).view(mx.bfloat16) if is_bf16_void(arr.dtype) else arr
