"""Read `.safetensors` files and checkpoint folders with NumPy alone.

The format (https://github.com/huggingface/safetensors) is simple enough to read by hand:

    [8 bytes]  N, the header length, unsigned 64-bit little-endian
    [N bytes]  a JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                               "__metadata__": {str: str}}   (metadata optional)
    [rest]     the raw little-endian tensor bytes; offsets count from the end of the header

Tensors are read lazily from a memory map, so a multi-GB checkpoint costs nothing until a tensor
is used. bfloat16 has no NumPy dtype: its 16 bits are the top half of a float32, so it is read
as uint16 and shifted into place (exact).
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from pg_edge.errors import CheckpointError
from pg_edge.checkpoint.safetensors_check import check_safetensors, read_index

# safetensors dtype name -> NumPy dtype of the stored bytes ("BF16" is converted on read).
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation refuses larger headers too


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16[...] holding bfloat16 bit patterns -> float32[...] with the same values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and the byte offset where the tensor data starts.
    The file is first checked by pg_edge.checkpoint.safetensors_check (the format's rules, regular files
    only), the same check the MLX loader applies."""
    path = Path(path)
    check_safetensors(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: too short to be a .safetensors file ({size} bytes)")
        n = int.from_bytes(prefix, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    return header, 8 + n


class SafetensorsFile(Mapping):
    """One .safetensors file as a read-only mapping name -> np.ndarray (read on access)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, self._data_start = read_header(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        data_bytes = self.path.stat().st_size - self._data_start
        for name, entry in header.items():
            self._check_entry(name, entry, data_bytes)
        self._map = None

    def _check_entry(self, name: str, entry: dict, data_bytes: int) -> None:
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: malformed header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_bytes or end - begin != expected:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} ({dtype} {shape}) has byte range [{begin}, {end}) "
                f"that does not match its size or lies past the end of the file (truncated?)"
            )

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if self._map is None:  # mapped on first use; read_header checked the file is not empty
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        array = np.frombuffer(self._map, dtype, count, self._data_start + begin).reshape(entry["shape"])
        return bf16_to_float32(array) if entry["dtype"] == "BF16" else array

    def dtype_name(self, name: str) -> str:
        """The stored safetensors dtype of a tensor ("BF16", "F32", "U32", ...)."""
        return self._entries[name]["dtype"]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def load_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, as NumPy arrays (memory-mapped where possible)."""
    f = SafetensorsFile(path)
    return {name: f[name] for name in f}


class FolderWeights(Mapping):
    """The tensors of all shards of a checkpoint folder as one mapping name -> np.ndarray."""

    def __init__(self, files: list[SafetensorsFile]):
        self.files = files
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for name in f:
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} is in both {self._where[name].path} and {f.path}")
                self._where[name] = f

    @property
    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first shard (pg_edge writes the same marker in every shard)."""
        return self.files[0].metadata if self.files else {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def shard_paths(folder: Path) -> list[Path]:
    """The .safetensors files of a folder: those named by model.safetensors.index.json, or all."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = read_index(index)  # shard names confined to the folder
        paths = [folder / name for name in names]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return paths
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    return paths


def read_config(folder: str | Path) -> dict:
    """config.json of a checkpoint folder as a dict."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


class HFLayoutWeights(Mapping):
    """An original Hugging Face checkpoint seen with converted-folder names and layouts: any of
    the three HF key layouts renamed to the classic names (pg_edge.checkpoint.weights.canonical_key), the
    patch conv OIHW -> OHWI, buffers and the tied LM head dropped. Lazy like FolderWeights."""

    def __init__(self, weights: FolderWeights):
        from pg_edge.checkpoint.weights import canonical_key, is_dropped

        self.weights = weights
        self._source = {}
        for key in weights:
            k = canonical_key(key)
            if not is_dropped(k) and k != "language_model.lm_head.weight":
                self._source[k] = key

    def __getitem__(self, name: str) -> np.ndarray:
        array = self.weights[self._source[name]]
        return array.transpose(0, 2, 3, 1) if name.endswith("patch_embedding.weight") else array

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def read_folder(folder: str | Path) -> tuple[dict, Mapping]:
    """(config.json as a dict, all tensors as a lazy mapping) of a checkpoint folder: a converted
    one (safetensors metadata `format: mlx`), or an original Hugging Face one, renamed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config = read_config(folder)
    weights = FolderWeights([SafetensorsFile(p) for p in shard_paths(folder)])
    if weights.metadata.get("format") != "mlx":
        return config, HFLayoutWeights(weights)
    return config, weights
