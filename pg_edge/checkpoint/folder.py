"""The converted model folder: the one owner of its layout, reading it and writing it.

    FOLDER/
        config.json                     HF PaliGemma config (+ "quantization" when quantized)
        model.safetensors               or model-0000N-of-0000M.safetensors + the index below
        model.safetensors.index.json    {"metadata": {"total_size"}, "weight_map": {key: file}}
        tokenizer.model, ...            SIDE_FILES, copied along by every tool that writes one

This module imports MLX only where it reads or writes tensors, so the NumPy reference can share
`is_quantized`. Every tensor file a pg_edge tool writes carries the metadata `format: mlx` (MLX layouts,
classic key names), which the loader reads instead of guessing from shapes.

Reading: `resolve` (folder or hub id), `read_config`, `weight_files`, `iter_shards`,
`is_quantized` (the one "is this folder quantized?" rule). Writing: `check_output` (from
pg_edge.checkpoint.output_check: the one output rule, no overlap with an input, "exists: pass --force", and
--force replaces only pg-edge's own output), `atomic_folder` / `atomic_file` (from pg_edge.checkpoint.atomic: built
under a temporary name beside the target, renamed into place only when complete and only over
what was there at the start, removed on failure or signal) and
`FolderWriter` (shards, the index, config.json and side files, on top of `atomic_folder`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .. import __version__
from ..errors import CheckpointError, PgEdgeError
from ..model.config import PaliGemmaConfig
from .atomic import atomic_file, atomic_folder
from .hub import download, looks_local
from .output_check import check_output
from .safetensors_check import load_safetensors, read_index, read_json

if TYPE_CHECKING:
    import mlx.core as mx

    from .safetensors_io import ShardWriter

# What a converted or HF folder needs; everything else on the hub is skipped when downloading.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
# Files of a model folder beside config.json and the weights (tokenizer, processor, generation
# settings): copied along by every tool that writes a folder (converters, quantizer, fine-tune).
SIDE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json", "chat_template.json", "chat_template.jinja",
)
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX = "model.safetensors.index.json"
VAE_FILE = "vae.safetensors"  # the segmentation mask decoder, beside the weights (pg_edge.tasks.calls)
MAX_SHARD_BYTES = 4 << 30  # what HF and mlx-lm use: one shard stays loadable on small machines


# -- reading ------------------------------------------------------------------------------
def resolve(path_or_id: str | os.PathLike, allow_patterns=HUB_PATTERNS) -> Path:
    """A local folder, "demo" (the built-in model, unless a folder of that name exists), or a
    hub id downloaded with huggingface_hub (HF_TOKEN, HF_HUB_OFFLINE and the local cache are
    honoured). Only the files listed in `allow_patterns` are fetched."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; expected a model folder")
        return p
    s = str(path_or_id)
    if s == "demo":  # the built-in demo model shipped inside the package (pg_edge/demo)
        from ..demo import MODEL_DIR

        return MODEL_DIR
    if looks_local(s):  # not owner/name, or its first part is a folder here (pg_edge.checkpoint.hub)
        first = s.split("/", 1)[0]
        why = (f" ({first} is a local folder, so this is a path, not a hub id)"
               if "/" in s and Path(first).expanduser().is_dir() else "")
        raise CheckpointError(f"model folder not found: {s}{why}")
    return download(s, allow_patterns)  # each hub failure is one sentence (pg_edge.checkpoint.hub)


def read_config(folder: Path) -> PaliGemmaConfig:
    """config.json of a folder, checked (model type, dimensions) into a PaliGemmaConfig."""
    f = Path(folder) / "config.json"
    if not f.exists():
        raise CheckpointError(f"missing {f}")
    return PaliGemmaConfig.from_dict(read_json(f))  # from_dict checks it (pg_edge.model.config_checks)


def quantization_section(raw: dict) -> dict | None:
    """The config's quantization settings (mlx-lm writes both names), None for a float folder."""
    return raw.get("quantization") or raw.get("quantization_config") or None


def is_quantized(raw: dict) -> bool:
    """The one rule for "is this folder quantized?": its config.json has a quantization section."""
    return quantization_section(raw) is not None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in index order; pickled weights are refused."""
    index = folder / INDEX
    if index.is_file():
        files = [folder / n for n in read_index(index)]  # names confined to the folder
        missing = [f.name for f in files if not f.exists()]  # a FIFO etc. is refused on open
        if missing:
            raise CheckpointError(f"{index.name} lists missing shard(s): {', '.join(missing)}")
        return files
    # The segmentation mask decoder (VAE_FILE) may sit beside the weights; it is no part of the model.
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != VAE_FILE)
    if not files:
        pickled = [f.name for f in folder.iterdir() if f.name.endswith(REFUSED_SUFFIXES)]
        if pickled:
            raise CheckpointError(
                f"{folder} has only pickled weights ({pickled[0]}); pg_edge never unpickles "
                "(it can run code). Use a safetensors checkpoint."
            )
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return files


def iter_shards(folder: Path) -> Iterator[tuple[Path, dict, dict]]:
    """(file, tensors, metadata) per weight file, each header checked in Python first
    (pg_edge.checkpoint.safetensors_check); memory stays near one shard."""
    seen: dict[str, str] = {}
    for f in weight_files(folder):
        tensors, meta = load_safetensors(f)
        for k in tensors:  # a tensor in two shards would silently replace the first copy
            if seen.setdefault(k, f.name) != f.name:
                raise CheckpointError(f"tensor {k} is in both {seen[k]} and {f.name}")
        yield f, tensors, meta


# -- writing ------------------------------------------------------------------------------
# atomic_folder / atomic_file live in pg_edge.checkpoint.atomic (imported above): temporary name beside the
# target, swapped in only when complete and only over what was there at the start (a concurrent
# writer's result is never replaced), removed on any failure or signal.


def split_shards(weights: dict[str, mx.array], max_bytes: int = MAX_SHARD_BYTES) -> list[dict]:
    """Sorted keys cut into shards of at most `max_bytes` (a bigger single tensor gets its own)."""
    shards, cur, size = [], {}, 0
    for k in sorted(weights):
        n = weights[k].nbytes
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = weights[k]
        size += n
    return shards + [cur] if cur else shards


class Progress:
    """A one-line progress report on stderr: `label [3/8] name  1.2 GB  12 s`."""

    def __init__(self, total: int, label: str, quiet: bool = False):
        self.total, self.label, self.quiet, self.t0 = total, label, quiet, time.perf_counter()

    def update(self, i: int, what: str, nbytes: int = 0) -> None:
        if self.quiet:
            return
        el = time.perf_counter() - self.t0
        line = f"{self.label} [{i}/{self.total}] {what:<40.40} {nbytes / 1e9:6.2f} GB {el:6.1f} s"
        if sys.stderr.isatty():  # redraw one line in a terminal; one line per step in logs
            print("\r" + line, end="" if i < self.total else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


class FolderWriter:
    """Writes a converted folder, shard by shard, atomically (the converters, the quantizer and
    the fine-tune export all write through it):

        with FolderWriter(out, force=False, source="google/paligemma2-3b-pt-224") as w:
            for tensors in shards:
                w.add_shard(tensors)          # saved at once; memory stays near one shard
            w.finish(config_dict, source_folder)  # index, config.json, side files; rename

    `add_weights(all_tensors)` cuts an in-memory checkpoint into MAX_SHARD_BYTES shards first;
    `open_shard(specs)` gives a shard whose header is written first and whose tensors arrive
    piece by piece (pg_edge.checkpoint.stream_convert streams converters and the quantizer through it).
    Leaving the block without `finish()` (an error, an interrupt) leaves nothing behind.
    `inputs`: the paths the folder is made from; an output overlapping one is refused
    (pg_edge.checkpoint.output_check.check_output)."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False, source: str = "", converter: str = "hf",
                 inputs=()):
        self.out = check_output(out, force, kind="model", inputs=inputs)
        self.metadata = {"format": "mlx", "pg_edge_version": __version__,
                         "pg_edge_source": str(source), "pg_edge_converter": converter}
        self.shards: list[dict[str, tuple]] = []
        self.nbytes = 0
        self.tmp: Path | None = None
        self._ctx = None

    def __enter__(self) -> "FolderWriter":
        self._ctx = atomic_folder(self.out)
        self.tmp = self._ctx.__enter__()
        self._done = False
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:  # left without finish(): remove the partial folder
            exc_type, exc = RuntimeError, RuntimeError("FolderWriter left without finish()")
        self._ctx.__exit__(exc_type, exc, tb)
        self.tmp = None

    def open_shard(self, specs: dict) -> "ShardWriter":
        """A new shard whose tensors ({name: safetensors_io.Spec}) are written piece by
        piece (pg_edge.checkpoint.stream_convert); named at finish, when the count is known. The caller
        closes it."""
        from .safetensors_io import ShardWriter

        name = f"shard-{len(self.shards):05d}.safetensors"
        shard = ShardWriter(self.tmp / name, specs, self.metadata)  # full disk -> PgEdgeError
        self.shards.append({k: tuple(s.shape) for k, s in specs.items()})
        self.nbytes += shard.nbytes
        return shard

    def add_shard(self, tensors: dict[str, mx.array]) -> None:
        """Save one shard of in-memory (or lazy) tensors now, evaluated one at a time."""
        from .safetensors_io import Spec, fill

        if tensors:
            fill(self.open_shard({k: Spec.of(v) for k, v in tensors.items()}), tensors)

    def add_weights(self, weights: dict[str, mx.array], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        """A whole in-memory checkpoint, cut into shards of at most `max_shard_bytes`."""
        for shard in split_shards(weights, max_shard_bytes):
            self.add_shard(shard)

    def shapes(self) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for s in self.shards:
            out.update(s)
        return out

    def finish(self, config: dict, source_folder: Path | None = None, extra_files: dict | None = None) -> Path:
        """Name the shards, write the index, config.json and the side files found in
        `source_folder` (plus `extra_files`: name -> path); the folder appears on leaving."""
        n = len(self.shards)
        if n == 0:
            raise PgEdgeError("no tensors were written")
        weight_map = {}
        for i, shapes in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / final)
            weight_map.update({k: final for k in shapes})
        if n > 1:
            index = {"metadata": {"total_size": self.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if source_folder is not None:
            for name in SIDE_FILES:
                if (Path(source_folder) / name).is_file():
                    shutil.copy2(Path(source_folder) / name, self.tmp / name)
        for name, path in (extra_files or {}).items():
            shutil.copy2(path, self.tmp / name)
        self._done = True
        return self.out
