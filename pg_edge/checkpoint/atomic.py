"""Atomic replacement of an output folder (or file): signals, write failures, concurrent writers.

Every tool that writes (converters, quantizer, fine-tune checkpoints and export, VAE converter)
builds its output inside `atomic_folder(target)` / `atomic_file(target)`: a hidden temporary
name beside the target, swapped in by `swap_in` when the block succeeds, removed otherwise.
What that guarantees:

- **Signals**: `signals_raise()` (installed by the CLI for the whole command) turns SIGTERM and
  SIGHUP into a `Terminated` exception, like SIGINT's KeyboardInterrupt, so every writer's
  cleanup runs; a second signal during that cleanup is ignored rather than cutting it short.
- **SIGKILL / power loss**: temporary names carry the writer's pid (`.NAME.partial-PID-xxxx`);
  `clean_stale(out)` removes those of dead processes before the next write to the same output,
  and puts back a previous output that was set aside (`.NAME.old-PID-xxxx`) but not replaced.
- **Concurrent writers**: the swap happens under an exclusive lock on the parent folder, with
  SIGINT/SIGTERM blocked; it goes ahead only if the target is still what the writer saw when it
  started (`identity`). A result another process put there meanwhile is never replaced: the
  second writer fails with a sentence saying so. `--force` replaces what existed at the start.
- **Write failures** (full disk, file size limit): `save_safetensors` turns MLX's RuntimeError
  into a PgEdgeError naming the file; the writer's cleanup removes the temporary folder.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from ..errors import PgEdgeError

KINDS = ("partial", "float", "old")


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; raised in the main thread so cleanup code runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM/SIGHUP raise Terminated and a second SIGINT,
    SIGTERM or SIGHUP after the first is ignored, so cleanup is not interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [s for s in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, s)]
    previous = {getattr(signal, s): signal.getsignal(getattr(signal, s)) for s in names}

    def handler(signum, frame):
        for s in previous:  # one-shot: let the cleanup below run to the end
            signal.signal(s, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def temp_path(out: Path, kind: str, suffix: str = "") -> Path:
    """`.NAME.KIND-PID-RANDOM[SUFFIX]` beside `out` (not created)."""
    out = Path(out)
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Delete a file, link or folder tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(out: Path) -> None:
    """Remove temporary siblings of `out` left by dead processes; restore a set-aside output."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(KINDS)})-(\d+)-[0-9a-f]{{8}}(\.\w+)?$")
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            p.rename(out)  # killed between the two renames of a swap: the previous output is back
        else:
            remove(p)


def identity(path: Path):
    """What is at `path` now: None, or (device, inode, mtime) of the folder/file itself."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive flock on `folder` itself, with SIGINT/SIGTERM/SIGHUP held off meanwhile."""
    blocked = {getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here (or on this filesystem): rename still atomic
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def swap_in(tmp: Path, out: Path, started_with) -> None:
    """Rename the complete `tmp` to `out`, replacing what was there only if it is still
    `started_with` (the `identity(out)` taken before writing began)."""
    tmp, out = Path(tmp), Path(out)
    with _locked(out.parent):
        now = identity(out)
        if now != started_with:
            what = "appeared" if started_with is None else "changed"
            raise PgEdgeError(f"{out} {what} while this run was writing it (another pg-edge writing the same "
                              "output?); it was left as it is and this run's result discarded")
        if now is None:
            os.rename(tmp, out)
            return
        old = temp_path(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)  # put the previous output back before reporting the failure
            raise
    remove(old)


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """mx.save_safetensors with a write failure (full disk, file size limit) as a PgEdgeError."""
    import mlx.core as mx

    try:
        mx.save_safetensors(str(path), tensors, metadata=metadata)
    except (RuntimeError, OSError) as err:
        raise PgEdgeError(f"cannot write {Path(path).name} in {Path(path).parent.parent}: "
                          f"{str(err).splitlines()[0]} (disk full or a file size limit?)") from None


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside `target`; when the block succeeds it becomes `target`
    (see `swap_in`: an existing one is replaced only if unchanged since the start), whatever
    else happens it is removed. Callers apply their own "exists: pass --force" rule first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    started = identity(target)
    tmp = temp_path(target, "partial")
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        tmp.chmod(0o755)  # a model folder is meant to be shared
        swap_in(tmp, target, started)
    finally:
        if os.path.lexists(tmp):
            remove(tmp)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """As atomic_folder for one file: yields a temporary path with the same suffix (MLX
    appends ".safetensors" to names without it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    started = identity(target)
    tmp = temp_path(target, "partial", target.suffix)
    try:
        yield tmp
        swap_in(tmp, target, started)
    finally:
        if os.path.lexists(tmp):
            remove(tmp)
