"""A checkpoint folder streamed tensor by tensor through a transform into a FolderWriter:
what `pg-edge convert` and `pg-edge quantize` (and `convert -q` in one pass) are built on.

    source = open_source(folder, tie=True, dtype=mx.bfloat16)   # headers only, checked
    specs = source.float_specs()            # classic key -> Spec after sanitize and cast
    planned = plan(source, transform)       # every output tensor's dtype and shape, nothing read
    ... check the planned shapes against the config ...
    write(planned, folder_writer, progress) # read, transform, write; memory: a few blocks

Each source tensor is read with positioned reads into a reused buffer (no memory map, no whole
shard in memory), renamed and laid out as `pg_edge.checkpoint.weights.sanitize` does, cast, passed
through `transform` ({key: float[...]} -> {name: array}, e.g. `QuantPlan.apply`) and each
output's bytes written at its offset in an output shard (pg_edge.checkpoint.safetensors_io) whose
header was written first. A tensor over `block_bytes` whose outputs all keep its leading
dimension is done in row blocks (sanitize's transpose, casts, MLX's group-wise quantization
and the SigLIP fc2 padding all act on each row alone, so blocks give the same bytes); the
257216 x 2304 embedding never exists whole in memory.

Time: jobs (a tensor or one of its row blocks) run side by side, one per CPU stream (MLX runs
each CPU stream's kernels on one core), the next batch of jobs is read while one computes
(`mx.async_eval`), and a writer thread writes finished outputs meanwhile. Output shards follow the source files (one or more per file, cut at
MAX_SHARD_BYTES between tensors).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..cpu.streams import cpu_streams
from ..errors import CheckpointError
from .folder import MAX_SHARD_BYTES, weight_files
from .safetensors_io import Entry, SafetensorsReader, ShardWriter, Spec
from .weights import sanitize

BLOCK_BYTES = 32 << 20  # row blocks of big tensors; also the size of each pooled read buffer


@dataclass
class SourceTensor:
    """One tensor of a source file and the sanitize/cast that makes it a converted tensor."""

    key: str  # its classic key
    reader: SafetensorsReader
    entry: Entry
    mlx_layout: bool
    dtype: object = None  # cast floating tensors to this MLX dtype; None: keep

    def prepare(self, x: mx.array) -> mx.array:
        """Raw tensor (or row block) -> the converted-layout tensor (or the same rows of it)."""
        (x,) = sanitize({self.entry.name: x}, mlx_layout=self.mlx_layout, tie_word_embeddings=False).values()
        if self.dtype is not None and mx.issubdtype(x.dtype, mx.floating):
            x = x.astype(self.dtype)
        return x

    def placeholder(self) -> mx.array:
        """A lazy array of the converted tensor's shape and dtype (never computed)."""
        return self.prepare(mx.zeros(self.entry.spec.shape, self.entry.spec.mx_dtype))


@dataclass
class Source:
    """A folder's safetensors files, headers read and checked, tensors not yet read."""

    folder: Path
    files: list[tuple[Path, list[SourceTensor]]]
    readers: list[SafetensorsReader] = field(default_factory=list)
    name: str = ""  # what the user named (folder or hub id), recorded in the output
    raw: dict | None = None  # the config.json dict, set by whoever checked the source
    dtype: object = None  # what floating tensors are cast to (None: kept as stored)

    def float_specs(self) -> dict[str, Spec]:
        """Classic key -> Spec of every tensor the source gives, after sanitize and cast."""
        return {t.key: Spec.of(t.placeholder()) for _, ts in self.files for t in ts}

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(folder: Path, *, tie: bool, dtype=None, mlx_layout: bool | None = None) -> Source:
    """Read every weight file's header. mlx_layout: None to take each file's `format: mlx`
    marker; tie: drop a tied LM head. Refuses a tensor present twice (in two files, or under
    two names of one classic key) with a one-line CheckpointError."""
    source = Source(Path(folder), [], dtype=dtype)
    files: dict[str, str] = {}  # raw name -> file
    keys: dict[str, str] = {}  # classic key -> "file:raw name"
    try:
        for f in weight_files(source.folder):
            reader = SafetensorsReader(f)
            source.readers.append(reader)
            layout = reader.metadata.get("format") == "mlx" if mlx_layout is None else mlx_layout
            tensors = []
            for e in reader.entries:
                if files.setdefault(e.name, f.name) != f.name:  # one would silently replace the other
                    raise CheckpointError(f"tensor {e.name} is in both {files[e.name]} and {f.name}")
                for k in sanitize({e.name: None}, mlx_layout=True, tie_word_embeddings=tie):
                    if k in keys:
                        raise CheckpointError(f"tensor {k} is given twice ({keys[k]} and {f.name}:{e.name})")
                    keys[k] = f"{f.name}:{e.name}"
                    tensors.append(SourceTensor(k, reader, e, layout, dtype))
            source.files.append((f, tensors))
    except BaseException:
        source.close()
        raise
    return source


@dataclass
class Planned:
    """A source tensor and what it becomes: output name -> Spec; `rows`: row-blockable."""

    tensor: SourceTensor
    float_spec: Spec
    outputs: dict[str, Spec]
    rows: bool


def plan(source: Source, transform: Callable[[dict], dict] | None = None) -> list[tuple[Path, list[Planned]]]:
    """Every output tensor's spec, per source file, from lazy placeholders (nothing is read).

    transform: {classic key: float tensor} -> {name: tensor}, acting on each row of its input
    alone (None: the converted tensors themselves)."""
    out = []
    for f, tensors in source.files:
        items = []
        for t in tensors:
            x = t.placeholder()
            outs = transform({t.key: x}) if transform else {t.key: x}
            shape = t.entry.spec.shape
            rows = len(shape) > 0 and shape[0] > 0 and all(v.ndim and v.shape[0] == shape[0] for v in outs.values())
            items.append(Planned(t, Spec.of(x), {k: Spec.of(v) for k, v in outs.items()}, rows))
        out.append((f, items))
    return out


def output_shapes(planned) -> dict[str, tuple]:
    return {k: s.shape for _, items in planned for p in items for k, s in p.outputs.items()}


class Buffers:
    """Read buffers (MLX uint8 arrays with a NumPy view of the same memory), reused so that
    reading costs no allocation; at most `limit` of BLOCK_BYTES exist, which bounds the work
    in flight. A job bigger than a buffer gets a buffer of its own, dropped after use."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit, self.made = size, limit, 0
        self.free: queue.Queue = queue.Queue()

    def get(self, nbytes: int):
        if nbytes > self.size:
            return self._make(nbytes)
        if self.free.empty() and self.made < self.limit:
            self.made += 1
            return self._make(self.size)
        return self.free.get()

    def put(self, buf) -> None:
        if buf[0].size == self.size:
            self.free.put(buf)

    @staticmethod
    def _make(n: int):
        a = mx.zeros((n,), dtype=mx.uint8, stream=mx.cpu)
        mx.eval(a)
        return a, np.array(a, copy=False)


class Writer(threading.Thread):
    """Writes finished outputs (and closes shards) in order, beside the computing thread.
    Items: (ShardWriter, [(name, byte offset, evaluated contiguous array)], read buffer to give
    back), or (ShardWriter, None, None) to close it; None ends the thread."""

    def __init__(self, buffers: Buffers):
        super().__init__(daemon=True, name="pg_edge-writer")
        self.buffers, self.items = buffers, queue.Queue()
        self.error: BaseException | None = None
        self.cancelled = False

    def run(self) -> None:
        while (item := self.items.get()) is not None:
            shard, parts, buf = item
            try:
                if self.error is not None or self.cancelled:
                    continue
                if parts is None:
                    shard.close()
                for name, at, x in parts or ():
                    if x.size:
                        shard.write(name, memoryview(x), at)
            except BaseException as err:  # raised again by the computing thread
                self.error = err
            finally:
                del item, parts
                if buf is not None:
                    self.buffers.put(buf)

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def jobs_of(p: Planned, block_bytes: int):
    """(first row, last row) of each job of a planned tensor; None, None: the whole tensor."""
    spec = p.tensor.entry.spec
    if not p.rows or spec.nbytes <= block_bytes:
        yield None, None
        return
    step = max(1, block_bytes // (spec.nbytes // spec.shape[0]))
    for r0 in range(0, spec.shape[0], step):
        yield r0, min(r0 + step, spec.shape[0])


def cut_shards(items: list[Planned], max_bytes: int = MAX_SHARD_BYTES) -> list[list[Planned]]:
    """A file's planned tensors cut into output shards of at most max_bytes (between tensors)."""
    shards, cur, size = [], [], 0
    for p in items:
        n = sum(s.nbytes for s in p.outputs.values())
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    return shards + [cur] if cur else shards


def write(planned, folder_writer, progress=None, transform: Callable[[dict], dict] | None = None,
          block_bytes: int | None = None) -> None:
    """Compute and write every planned tensor into `folder_writer` (a pg_edge.checkpoint.folder.FolderWriter,
    inside its `with`); `transform` as given to `plan`. progress: a pg_edge.checkpoint.folder.Progress
    with one step per source file."""
    block_bytes = block_bytes or BLOCK_BYTES
    # One CPU stream per core (pg_edge.cpu's pool), the CPU whatever the default device: the
    # bytes come from files and go to files through host buffers.
    streams = [s if s is not None else mx.default_stream(mx.cpu) for s in cpu_streams()]
    # in flight: the batch computing, the batch being read, and the writer's backlog
    buffers = Buffers(block_bytes, 3 * len(streams) + 2)
    writer = Writer(buffers)
    writer.start()
    batch: list = []  # jobs read and built, one per stream
    computing: list = []  # the previous batch, evaluating while `batch` is read
    opened: list[ShardWriter] = []

    def arrays(jobs):
        return [x for _, parts, _ in jobs for _, _, x in parts]

    def drain():  # wait for the computing batch and hand it to the writer
        mx.eval(arrays(computing))
        for item in computing:
            writer.items.put(item)
        computing.clear()

    def submit():  # start the batch computing; the one before it goes to the writer
        mx.async_eval(arrays(batch))
        drain()
        computing.extend(batch)
        batch.clear()

    ok = False
    try:
        for i, (f, items) in enumerate(planned, 1):
            for shard_items in cut_shards(items):
                shard = folder_writer.open_shard({k: s for p in shard_items for k, s in p.outputs.items()})
                opened.append(shard)
                for p in shard_items:
                    for r0, r1 in jobs_of(p, block_bytes):
                        writer.check()
                        parts, buf = run_job(p, r0, r1, buffers, streams[len(batch)], transform)
                        batch.append((shard, parts, buf))
                        if len(batch) == len(streams):
                            submit()
                submit()
                drain()
                writer.items.put((shard, None, None))  # close it once its tensors are written
            if progress is not None:
                progress.update(i, f.name, folder_writer.nbytes)
        ok = True
    finally:
        if not ok:
            mx.eval(arrays(batch + computing))  # nothing may still compute into a buffer
        batch.clear()
        computing.clear()
        writer.cancelled = not ok  # an error or a signal here: stop writing at once
        writer.items.put(None)
        writer.join()
        for shard in opened:
            shard.abort()  # closed already unless the run stopped early
    writer.check()


def run_job(p: Planned, r0, r1, buffers: Buffers, stream, transform):
    """Read a tensor (or rows r0:r1 of it) and build its outputs, lazily, on `stream`:
    ([(output name, byte offset inside it, array)], the read buffer)."""
    t, spec = p.tensor, p.tensor.entry.spec
    shape, first = spec.shape, 0
    if r0 is not None:
        row = spec.nbytes // shape[0]
        shape, first = (r1 - r0, *shape[1:]), r0 * row
    nbytes = Spec(spec.dtype, shape).nbytes
    buf = buffers.get(nbytes)
    t.reader.read_into(t.entry, buf[1][:nbytes], first)
    with mx.stream(stream):
        x = buf[0][:nbytes].view(spec.mx_dtype).reshape(shape) if nbytes else mx.zeros(shape, spec.mx_dtype)
        x = t.prepare(x)
        outs = transform({t.key: x}) if transform else {t.key: x}
        outs = {k: mx.contiguous(v) for k, v in outs.items()}
    if set(outs) != set(p.outputs):
        raise CheckpointError(f"{t.key}: the transform gave {sorted(outs)}, planned {sorted(p.outputs)}")
    parts = []
    for k, v in outs.items():
        want = p.outputs[k]
        at = 0 if r0 is None else r0 * (want.nbytes // want.shape[0])
        if Spec.of(v) != (want if r0 is None else Spec(want.dtype, (r1 - r0, *want.shape[1:]))):
            raise CheckpointError(f"{k}: computed {Spec.of(v)}, planned {want}")
        parts.append((k, at, v))
    return parts, buf
