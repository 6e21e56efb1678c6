"""One worker thread that owns the model: every call on a `PaliGemma` runs there, one at a time.

An app's UI thread, its background threads and a server's request threads can share one loaded
model: `PaliGemma`'s public methods hand their work to this thread and wait (plain calls) or
read pieces from a queue (streams). So the vision-feature cache, the peak-memory counter, the
random state and MLX itself are only ever touched by one thread, and callers queue in arrival
order. (A lock would serialise too; a single owner thread also keeps every MLX call on one
thread, which MLX's Metal backend prefers, and lets a stream be abandoned from any thread.)

Cancelling: `cancel()` asks the job that is running now to stop; the generation loops check
`cancelled()` once per token and end with finish_reason "cancelled". Closing a stream's
iterator (a `break` in a for loop, a dropped generator, a client that hung up) cancels its job.

    worker = ModelWorker()
    value = worker.call(fn, *args)             # fn runs on the worker; its exception re-raised here
    stream = worker.stream(make_gen)           # make_gen() runs on the worker, items come here
    for item in stream:
        ...                                    # stream.cancel(): stop it, still read the rest
"""
from __future__ import annotations

import atexit
import itertools
import queue
import threading
import time
import weakref
from typing import Callable, Iterator

import mlx.core as mx

_DONE = object()  # end-of-stream marker on a job's queue
EXIT_WAIT_S = 5.0  # at interpreter exit, how long to wait for a running job to stop


def _settle_at_exit(ref) -> None:
    """Before the interpreter goes away: cancel the running job and wait until the worker idles.
    A daemon thread stopped inside MLX's C++ code aborts the process. (The thread is left
    blocked on its queue, not ended: a finished thread that ran an mx.compile'd function, such
    as mlx.nn's gelu, makes MLX abort at exit.)"""
    worker = ref()
    if worker is not None:
        worker.settle(EXIT_WAIT_S)


class _Job:
    """One unit of work: a callable (plain call) or a generator factory (stream)."""

    _ids = itertools.count(1)

    def __init__(self, fn: Callable, streaming: bool):
        self.id = next(self._ids)
        self.fn = fn
        self.streaming = streaming
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # items, then _DONE or ("error", exc)
        self.cancel = threading.Event()


class WorkerStream:
    """The caller's end of a streaming job: an iterator over the items the worker produces.

    `cancel()` asks the generation to stop and keeps the stream readable, so its last item (the
    result, finish_reason "cancelled") still arrives; `close()` (also on garbage collection)
    cancels and stops reading.
    """

    def __init__(self, job: _Job):
        self._job = job
        self._ended = False

    def __iter__(self) -> "WorkerStream":
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        item = self._job.out.get()
        if item is _DONE:
            self._ended = True
            raise StopIteration
        if isinstance(item, tuple) and len(item) == 2 and item[0] is _DONE:
            self._ended = True
            raise item[1]
        return item

    def cancel(self) -> None:
        self._job.cancel.set()

    def close(self) -> None:
        self._job.cancel.set()  # no-op when it already finished
        self._ended = True

    def __del__(self):
        self._job.cancel.set()


class ModelWorker:
    """A daemon thread running jobs in arrival order; started on first use."""

    def __init__(self, name: str = "pg_edge-model"):
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._current: _Job | None = None
        self._local = threading.local()  # .job on the worker thread while a job runs
        self._exit_hook = False

    # -- caller side ---------------------------------------------------------------------
    def call(self, fn: Callable, *args, **kwargs):
        """Run fn(*args, **kwargs) on the worker and return its result (or raise its error).
        Called from the worker itself (a job calling another public method) it runs inline."""
        if self.on_worker():
            return fn(*args, **kwargs)
        job = self._submit(lambda: fn(*args, **kwargs), streaming=False)
        try:
            kind, value = job.out.get()
        except BaseException:  # interrupted while waiting: the job is not wanted any more
            job.cancel.set()
            raise
        if kind == "error":
            raise value
        return value

    def stream(self, make_gen: Callable[[], Iterator]) -> "WorkerStream | Iterator":
        """Iterate make_gen() on the worker, yielding its items here as they come (see
        WorkerStream). Called from the worker itself it iterates inline."""
        if self.on_worker():
            return make_gen()
        return WorkerStream(self._submit(make_gen, streaming=True))

    def cancel(self) -> bool:
        """Ask the running job to stop; True if there was one. Queued jobs still run."""
        job = self._current
        if job is None:
            return False
        job.cancel.set()
        return True

    # -- worker side ---------------------------------------------------------------------
    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def cancelled(self) -> bool:
        """On the worker: has the running job been cancelled? (False off the worker.)"""
        job = getattr(self._local, "job", None)
        return job is not None and job.cancel.is_set()

    @property
    def busy(self) -> bool:
        """A job is running (pg-edge serve waits for it at shutdown)."""
        return self._current is not None

    def _submit(self, fn: Callable, streaming: bool) -> _Job:
        job = _Job(fn, streaming)
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
                if not self._exit_hook:
                    atexit.register(_settle_at_exit, weakref.ref(self))
                    self._exit_hook = True
        self._jobs.put(job)
        return job

    def settle(self, timeout: float) -> None:
        """Cancel the running job and wait up to timeout for the worker to be idle."""
        self.cancel()
        deadline = time.monotonic() + timeout
        while self._current is not None and time.monotonic() < deadline:
            time.sleep(0.01)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job.cancel.is_set():  # its caller went away while it waited
                job.out.put(_DONE if job.streaming else ("error", RuntimeError("cancelled")))
                continue
            self._current, self._local.job = job, job
            try:
                if job.streaming:
                    gen = job.fn()
                    try:
                        for item in gen:
                            job.out.put(item)
                    finally:
                        close = getattr(gen, "close", None)
                        if close is not None:
                            close()
                    job.out.put(_DONE)
                else:
                    value = job.fn()
                    if isinstance(value, mx.array):  # lazy graphs only evaluate on this thread
                        mx.eval(value)
                    job.out.put(("ok", value))
            except BaseException as err:  # handed to the caller, never kills the worker
                job.out.put((_DONE, err) if job.streaming else ("error", err))
            finally:
                self._current, self._local.job = None, None
                job = gen = value = None  # drop the job's references (the model) while idle


def serialized(method: Callable) -> Callable:
    """Decorator for a `PaliGemma` method: the call runs on the object's `_worker`."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self._worker.call(method, self, *args, **kwargs)

    wrapper.__kwdefaults__ = method.__kwdefaults__  # the same dict: defaults stay one place
    return wrapper


def serialized_stream(method: Callable) -> Callable:
    """Decorator for a `PaliGemma` generator method: it iterates on the object's `_worker`."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self._worker.stream(lambda: method(self, *args, **kwargs))

    wrapper.__kwdefaults__ = method.__kwdefaults__
    return wrapper
