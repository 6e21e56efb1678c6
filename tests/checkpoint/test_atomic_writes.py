"""Writes are atomic: `pg-edge convert` (and `convert -q`) killed with SIGTERM at several points,
killed with SIGKILL, failing to write (a real file size limit), racing another convert to the
same output, or forced onto a regular file: the previous state stays intact, no temporary
folder is left, the message is one line."""
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pg_edge.cli import main
from pg_edge.checkpoint.folder import read_config, weight_files

ROOT = Path(__file__).parents[2]
# The real CLI with every safetensors file completed reported and slowed, so a test can signal
# it at an exact point ("SAVED 3": the third file is on disk, the run not yet finished).
SLOW_CLI = textwrap.dedent("""
    import os, sys, time
    from pg_edge.checkpoint.safetensors_io import ShardWriter
    real, count = ShardWriter.close, [0]
    def save(*a, **k):
        real(*a, **k)
        count[0] += 1
        print("SAVED", count[0], flush=True)
        time.sleep(float(os.environ.get("PG_TEST_SLOW", "0.1")))
    ShardWriter.close = save
    from pg_edge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def start(*args, slow="0.1"):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PG_TEST_SLOW=slow)
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def signal_at(proc, n_saved: int, sig=signal.SIGTERM):
    """Send `sig` once the n-th file is saved; returns (exit code, stderr lines)."""
    for line in proc.stdout:
        if line.strip() == f"SAVED {n_saved}":
            proc.send_signal(sig)
            break
    else:
        pytest.fail(f"the run ended before save {n_saved}: {proc.stderr.read()}")
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.strip().splitlines()


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(f.name.encode() + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()


def n_shards(folder: Path) -> int:
    return len(list(folder.glob("*.safetensors")))


def test_sigterm_at_several_points_leaves_the_previous_state(hf_checkpoint, qsrc, converted, tmp_path):
    src = hf_checkpoint(version=1)
    n = n_shards(src)
    qhf, _ = qsrc(1)
    assert n_shards(qhf) >= 2  # convert -q streams shard by shard: signalled after the first
    cases = {  # name: (argv, save to stop at, an output that exists before)
        "first shard": (["convert", src, "--quiet"], 1, None),
        "last shard, --force over a previous output": (["convert", src, "--force", "--quiet"], n, converted(version=1)),
        "convert -q, between its shards": (["convert", qhf, "-q", "4", "--quiet"], n_shards(qhf) - 1, None),
    }
    runs = {}
    for name, (argv, at, previous) in cases.items():  # all started at once: they overlap in time
        parent = tmp_path / name.replace(" ", "_").replace(",", "")
        parent.mkdir()
        if previous is not None:
            shutil.copytree(previous, parent / "out")
        before = tree_hash(parent / "out") if previous is not None else None
        runs[name] = (start(*argv, "-o", parent / "out"), at, parent, before)
    with ThreadPoolExecutor(len(runs)) as pool:  # watch every run at once: each is signalled on time
        ended = {name: pool.submit(signal_at, proc, at) for name, (proc, at, _, _) in runs.items()}
    for name, (proc, at, parent, before) in runs.items():
        code, err = ended[name].result()
        assert code == 128 + signal.SIGTERM and err == ["pg-edge convert: terminated by signal 15"], (name, err)
        left = sorted(p.name for p in parent.iterdir())
        if before is None:
            assert left == [], (name, left)  # no output, no .out.partial-*, no .out.float-*
        else:
            assert left == ["out"] and tree_hash(parent / "out") == before, (name, left)


def test_sigkill_debris_is_cleaned_by_the_next_run(hf_checkpoint, tmp_path, capsys):
    src = hf_checkpoint(version=1)
    out = tmp_path / "out"
    code, _ = signal_at(start("convert", src, "-o", out, "--quiet"), 2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".out.partial"]  # SIGKILL cannot be caught
    assert main(["convert", str(src), "-o", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the dead run's folder is gone


def test_write_failure_is_one_line_and_leaves_nothing(hf_checkpoint, tmp_path, capsys):
    """A real write failure: a 1 MB file size limit (the fixture's embedding shard is ~50 MB),
    set on this process for the one call (Python ignores SIGXFSZ, so the write fails instead)."""
    src = str(hf_checkpoint(version=1))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    try:
        code = main(["convert", src, "-o", str(tmp_path / "out"), "--quiet"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "cannot write" in err[0] and "disk full or a file size limit" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_concurrent_converts_to_one_output_never_replace_each_other(hf_checkpoint, tmp_path):
    src = hf_checkpoint(version=1)
    out = tmp_path / "out"
    procs = [start("convert", src, "-o", out, "--quiet", slow="0.05") for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read().strip().splitlines()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser) == 1 and ("appeared while this run was writing it" in loser[0]
                                or "exists; pass --force" in loser[0]), loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    read_config(out)
    assert len(weight_files(out)) == n_shards(src)


def test_force_onto_a_regular_file_leaves_it_and_no_debris(hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")  # not pg-edge's: --force refuses to replace it
    assert main(["convert", str(hf_checkpoint(version=1)), "-o", str(out), "--force", "--quiet"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and out.read_text() == "not a folder"


def test_swap_primitives(tmp_path):
    """pg_edge.checkpoint.atomic directly: a changed target is never replaced; debris of dead writers is
    removed, a live writer's is kept, a set-aside previous output is put back."""
    from pg_edge.checkpoint import atomic
    from pg_edge.errors import PgEdgeError

    out = tmp_path / "out"
    with pytest.raises(PgEdgeError, match="appeared while this run was writing it"):
        with atomic.atomic_folder(out) as tmp:
            (tmp / "a").write_text("mine")
            out.mkdir()  # another writer finished first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list(out.iterdir()) == []
    out.rmdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".out.old-{dead}-0123abcd").mkdir()  # killed between the two renames of a swap
    (tmp_path / f".out.partial-{dead}-89abcdef").mkdir()
    live = tmp_path / f".out.partial-{os.getpid()}-00000000"
    live.mkdir()
    atomic.clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
