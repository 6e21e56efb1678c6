"""Tensor-by-tensor conversion (pg_edge.checkpoint.stream_convert, pg_edge.checkpoint.safetensors_io): the streamed
folders hold what the whole-shard path wrote, tensor for tensor and byte for byte; row blocks
give the same bytes as whole tensors; a failure or an interrupt mid-write leaves nothing; a
corrupt or duplicated source tensor gets its one-line error."""
import errno
import json
import shutil
import threading

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cli import main
import pg_edge.convert.hf
from pg_edge.convert.hf import convert_hf
from pg_edge.checkpoint import safetensors_io, stream_convert
from pg_edge.errors import CheckpointError, PgEdgeError
from pg_edge.checkpoint.folder import iter_shards, read_config, weight_files
from pg_edge.reference.safetensors_np import SafetensorsFile
from pg_edge.checkpoint.safetensors_io import SafetensorsReader
from pg_edge.checkpoint.weights import sanitize
from pg_edge.quantize import quantize, quantize_weights
from pg_edge.quantize.recipes import resolve_settings


def raw_bytes(x: mx.array) -> bytes:
    return bytes(memoryview(mx.contiguous(x)))


def whole_shard_convert(src, dtype) -> dict:
    """The whole-shard path `convert_hf` took before streaming: mx.load, sanitize, cast."""
    tie = read_config(src).tie_word_embeddings
    out = {}
    for _, tensors, meta in iter_shards(src):
        for k, v in sanitize(tensors, mlx_layout=meta.get("format") == "mlx", tie_word_embeddings=tie).items():
            out[k] = v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
    return out


def folder_tensors(folder) -> dict:
    out = {}
    for f in weight_files(folder):
        tensors, meta = mx.load(str(f), return_metadata=True)
        assert meta["format"] == "mlx" and meta["pg_edge_converter"] in ("hf", "quantize")
        out.update(tensors)
    return out


def file_bytes(folder) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.suffix == ".safetensors"}


@pytest.mark.parametrize("layout", ["classic", "v452"])
def test_streamed_convert_equals_the_whole_shard_path(hf_checkpoint, tmp_path, layout):
    src = hf_checkpoint(version=2, layout=layout)
    out = convert_hf(src, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    want, got = whole_shard_convert(src, mx.bfloat16), folder_tensors(out)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and raw_bytes(got[k]) == raw_bytes(v), k
    # the NumPy reader (bf16 decoded by hand) reads the same values from every file
    for f in weight_files(out):
        ref = SafetensorsFile(f)
        for k in ref:
            assert np.array_equal(ref[k], np.array(got[k].astype(mx.float32))), k


def test_streamed_files_are_read_alike_by_the_safetensors_library(converted):
    torch_st = pytest.importorskip("safetensors.torch")  # installed with transformers (CI)
    folder = converted(version=1, dtype="float32")
    for f in weight_files(folder):
        theirs = torch_st.load_file(str(f))
        ours = mx.load(str(f))
        assert set(theirs) == set(ours)
        for k, v in theirs.items():
            assert np.array_equal(v.numpy(), np.array(ours[k])), k
        header = f.read_bytes()[:8]
        assert int.from_bytes(header, "little") % 8 == 0  # padded as the safetensors library pads


def test_row_blocks_give_the_bytes_of_whole_tensors(qsrc, tmp_path, monkeypatch):
    hf, _ = qsrc(2)
    convert_hf(hf, tmp_path / "whole", dtype="bfloat16", quiet=True)
    assert main(["convert", str(hf), "-o", str(tmp_path / "qwhole"), "-q", "4", "--recipe", "all4",
                 "--probes", "0", "--quiet"]) == 0
    # jobs_of's blocks tile every tensor's rows, none over the block size unless one row is
    with pg_edge.convert.hf.open_hf(hf) as source:
        for _, items in stream_convert.plan(source):
            for p in items:
                spans = list(stream_convert.jobs_of(p, 1000))
                if spans != [(None, None)]:
                    row = p.tensor.entry.spec.nbytes // p.tensor.entry.spec.shape[0]
                    assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]]
                    assert spans[-1][1] == p.tensor.entry.spec.shape[0]
                    assert all((b - a) * row <= max(1000, row) for a, b in spans)
    blocks = []

    def odd_blocks(p, block_bytes):  # uneven blocks: 3 rows (the embedding: 20000)
        if not p.rows:
            yield None, None
            return
        n = p.tensor.entry.spec.shape[0]
        step = 20000 if n > 10000 else 3
        for r0 in range(0, n, step):
            blocks.append(r0)
            yield r0, min(n, r0 + step)

    monkeypatch.setattr(stream_convert, "jobs_of", odd_blocks)
    convert_hf(hf, tmp_path / "blocks", dtype="bfloat16", quiet=True)
    assert main(["convert", str(hf), "-o", str(tmp_path / "qblocks"), "-q", "4", "--recipe", "all4",
                 "--probes", "0", "--quiet"]) == 0
    assert len(blocks) > 1000  # the embedding and every matrix went in blocks
    assert file_bytes(tmp_path / "blocks") == file_bytes(tmp_path / "whole")
    assert file_bytes(tmp_path / "qblocks") == file_bytes(tmp_path / "qwhole")
    # and they are MLX's whole-tensor quantization of the whole-shard conversion
    raw = json.loads((tmp_path / "whole" / "config.json").read_text())
    want, _ = quantize_weights(raw, whole_shard_convert(hf, mx.bfloat16), resolve_settings(recipe="all4"))
    got = folder_tensors(tmp_path / "qblocks")
    assert set(got) == set(want)
    assert all(raw_bytes(got[k]) == raw_bytes(v) for k, v in want.items())


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def writer_threads():
    return [t for t in threading.enumerate() if t.name == "pg_edge-writer"]


def test_a_write_failure_mid_file_is_one_line_and_leaves_nothing(qsrc, tmp_path, monkeypatch, capsys):
    hf, src = qsrc(1)
    calls = []
    real_write = safetensors_io.ShardWriter.write

    def failing_write(self, name, data, at=0):
        calls.append(name)
        if len(calls) == 5:  # what a full disk does to os.pwrite, in the writer thread
            raise safetensors_io.write_error(self.path, OSError(errno.ENOSPC, "No space left on device"))
        return real_write(self, name, data, at)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", failing_write)
    for argv in (["convert", str(hf)], ["convert", str(hf), "-q", "4", "--probes", "0"], ["quantize", str(src)]):
        calls.clear()
        parent = tmp_path / argv[0] / str(len(argv))
        parent.mkdir(parents=True)
        assert main([*argv, "-o", str(parent / "out"), "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0] and "No space left" in err[0], err
        assert leftovers(parent) == [], argv
    assert writer_threads() == []


def test_an_interrupt_mid_tensor_leaves_nothing(qsrc, tmp_path, monkeypatch):
    hf, _ = qsrc(1)
    jobs = []
    real_job = stream_convert.run_job

    def interrupted(*a):
        jobs.append(1)
        if len(jobs) == 7:
            raise KeyboardInterrupt
        return real_job(*a)

    monkeypatch.setattr(stream_convert, "run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(hf, tmp_path / "out", quiet=True)
    assert leftovers(tmp_path) == [] and writer_threads() == []


def test_shard_writer_refuses_an_incomplete_file(tmp_path):
    spec = safetensors_io.Spec("F32", (4, 2))
    w = safetensors_io.ShardWriter(tmp_path / "a.safetensors", {"x": spec, "y": spec})
    w.write("x", np.zeros(8, np.float32))
    w.write("y", np.ones(4, np.float32), at=16)  # the second half of y only
    with pytest.raises(PgEdgeError, match="tensor y was not written completely"):
        w.close()
    w = safetensors_io.ShardWriter(tmp_path / "b.safetensors", {"x": spec})
    with pytest.raises(ValueError, match="outside"):
        w.write("x", np.zeros(9, np.float32))
    w.abort()


def test_corrupt_or_duplicated_source_tensors_get_one_line_errors(hf_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_checkpoint(version=1), src)
    first, second = weight_files(src)[:2]
    data = bytearray(first.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    # a tensor of the second shard also in the first: one copy would silently win
    other = next(k for k in mx.load(str(second)) if k != name)
    tensors = mx.load(str(first))
    tensors[other] = mx.load(str(second))[other]
    mx.save_safetensors(str(first), tensors)
    with pytest.raises(CheckpointError, match=f"tensor {other} is in both"):
        convert_hf(src, tmp_path / "out", quiet=True)
    # the same classic key under two layouts' names in one file
    tensors = mx.load(str(first))
    del tensors[other]
    tensors["model." + name] = tensors[name]
    mx.save_safetensors(str(first), tensors)
    with pytest.raises(CheckpointError, match="is given twice"):
        convert_hf(src, tmp_path / "out", quiet=True)
    # a truncated file: the header check's one-line error, before anything is written
    first.write_bytes(bytes(data[:-100]))
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "-q", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{first.name} is not a valid safetensors file" in err[0], err
    assert leftovers(tmp_path) == ["src"]
    # a file that shrinks after its header was checked
    first.write_bytes(bytes(data))
    with SafetensorsReader(first) as reader:
        entry = reader.entries[-1]
        with open(first, "r+b") as f:
            f.truncate(entry.start + 1)
        buf = np.empty(entry.spec.nbytes, np.uint8)
        with pytest.raises(CheckpointError, match="shrank while being read"):
            reader.read_into(entry, buf)


def test_convert_q_scores_against_the_checkpoint_cast_as_it_converts(qsrc, tmp_path):
    """One pass (no float folder): the report's float model is the HF checkpoint loaded with the
    same cast, so its scores are those of quantizing the converted bf16 folder."""
    hf, _ = qsrc(1)
    converted = convert_hf(hf, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    two_steps = quantize(converted, tmp_path / "two", resolve_settings(bits=4), probes=1, max_new_tokens=2)
    with pg_edge.convert.hf.open_hf(hf, "bfloat16") as source:
        one_pass = quantize(source, tmp_path / "one", resolve_settings(bits=4), probes=1, max_new_tokens=2)
    assert one_pass.source == str(hf) and one_pass.probes[0]["tokens"] == two_steps.probes[0]["tokens"]
    assert one_pass.quality == two_steps.quality and one_pass.quality["top1_agreement"] > 0
    a, b = folder_tensors(tmp_path / "one"), folder_tensors(tmp_path / "two")  # metadata names the sources
    assert set(a) == set(b) and all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in a)
    assert leftovers(tmp_path) == ["bf16", "one", "two"]
