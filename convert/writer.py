"""Writing a converted folder: atomically, shard by shard, with the format marker.

Every converter (HF safetensors, big_vision .npz) produces the same folder through `FolderWriter`:
    with FolderWriter(out, force=False, source="google/paligemma2-3b-pt-224") as w:
        for tensors in shards:
            w.add_shard(tensors)          # saved at once; memory stays near one shard
        w.finish(config_dict, side_files) # index, config.json, tokenizer & processor files
The folder is built under a temporary name beside the target and renamed into place only
when complete, so an interrupted or failed run leaves nothing behind.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from pg_edge import __version__
from pg_edge.errors import PgEdgeError
from pg_edge.loader import SIDE_FILES

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def parse_dtype(name: str) -> mx.Dtype:
    if name not in DTYPES:
        raise PgEdgeError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


class Progress:
    """A one-line progress report on stderr: `[3/8] name  1.2 GB  12 s`."""

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
    def __init__(self, out: str | Path, *, force: bool = False, source: str = "", converter: str = "hf"):
        self.out = Path(out).expanduser().resolve()
        if self.out.exists() and not force:
            raise PgEdgeError(f"output {self.out} exists; pass --force to overwrite it")
        self.force = force
        self.metadata = {"format": "mlx", "pg_edge_version": __version__,
                         "pg_edge_source": str(source), "pg_edge_converter": converter}
        self.shards: list[dict[str, tuple]] = []
        self.nbytes = 0
        self.tmp: Path | None = None

    def __enter__(self) -> "FolderWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None:  # failed, or left without finish(): leave nothing behind
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add_shard(self, tensors: dict[str, mx.array]) -> None:
        """Save one shard now (named at finish, when the count is known)."""
        if not tensors:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        mx.save_safetensors(str(self.tmp / name), tensors, metadata=self.metadata)
        self.shards.append({k: tuple(v.shape) for k, v in tensors.items()})
        self.nbytes += sum(v.nbytes for v in tensors.values())

    def shapes(self) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for s in self.shards:
            out.update(s)
        return out

    def finish(self, config: dict, source_folder: Path | None = None, extra_files: dict | None = None) -> Path:
        """Name the shards, write the index, config.json and side files; rename into place."""
        n = len(self.shards)
        if n == 0:
            raise PgEdgeError("no tensors were converted")
        weight_map = {}
        for i, shapes in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / final)
            weight_map.update({k: final for k in shapes})
        if n > 1:
            index = {"metadata": {"total_size": self.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if source_folder is not None:
            for name in SIDE_FILES:
                if (source_folder / name).is_file() and name != "config.json":
                    shutil.copy2(source_folder / name, self.tmp / name)
        for name, path in (extra_files or {}).items():
            shutil.copy2(path, self.tmp / name)
        self._swap_in()
        return self.out

    def _swap_in(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{int(time.time())}")
            self.out.rename(old)
        self.tmp.chmod(0o755)  # mkdtemp makes it 0700: a model folder is meant to be shared
        self.tmp.rename(self.out)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
