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

Closing: `close()` cancels the running job, ends queued ones unrun and parks the thread; the
next ModelWorker takes a parked thread before starting one, so a program that loads and drops
models keeps as many threads as it has models open at once. (Threads are parked, never ended:
an ended thread that ran the model makes MLX abort at interpreter exit, "terminate called
without an active exception".)

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
        self.closed: Exception | None = None  # set by ModelWorker.close() on a queued job


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


class _Carrier:
    """A daemon thread with its own job queue, running the jobs of whichever ModelWorker holds
    it. A closed worker parks its carrier in `_IDLE` and the next worker takes it, so threads
    never outnumber the models open at once; carriers are never ended (see _settle_at_exit)."""

    _ids = itertools.count(1)

    def __init__(self, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.current: _Job | None = None
        self.parked = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"{name}-{next(self._ids)}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is _PARK:  # the owner closed: every job it submitted has been answered
                with _IDLE_LOCK:
                    _IDLE.append(self)
                self.parked.set()
                continue
            if job.cancel.is_set():  # its caller went away (or the model was closed) while it waited
                err = job.closed or RuntimeError("cancelled")
                job.out.put((_DONE, err) if job.streaming and job.closed else
                            _DONE if job.streaming else ("error", err))
                continue
            self.current = job
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
            except BaseException as err:  # handed to the caller, never kills the thread
                job.out.put((_DONE, err) if job.streaming else ("error", err))
            finally:
                self.current = None
                job = gen = value = None  # drop the job's references (the model) while idle


_PARK = object()  # on a carrier's queue: its owner closed; park it for the next ModelWorker
_IDLE: list[_Carrier] = []
_IDLE_LOCK = threading.Lock()


class ModelWorker:
    """Runs jobs in arrival order on one daemon thread, taken on first use (a parked one if
    there is one) and handed back by `close()`."""

    def __init__(self, name: str = "pg_edge-model"):
        self._name = name
        self._carrier: _Carrier | None = None
        self._start_lock = threading.Lock()
        self._pending: "weakref.WeakSet[_Job]" = weakref.WeakSet()
        self._closed: Exception | None = None
        self._handed_back: _Carrier | None = None  # the carrier close() parked (settle waits for it)
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
        carrier = self._carrier
        job = carrier.current if carrier is not None else None
        if job is None:
            return False
        job.cancel.set()
        return True

    def close(self, timeout: float | None = EXIT_WAIT_S) -> None:
        """Stop for good: the running job is cancelled, queued ones end without running (a call
        raises, a stream ends with the error), later calls raise; the thread is parked for the
        next ModelWorker. Waits up to `timeout` for the running job to stop (not when called
        from a job on this worker). Closing twice is fine."""
        from .errors import PgEdgeError

        with self._start_lock:
            if self._closed is None:
                self._closed = PgEdgeError("this model was closed (PaliGemma.close())")
            carrier, self._carrier = self._carrier, None
            for job in list(self._pending):
                job.closed = self._closed
                job.cancel.set()
            if carrier is None:
                return
            self._handed_back = carrier
            carrier.jobs.put(_PARK)
        if timeout is not None and threading.current_thread() is not carrier.thread:
            carrier.parked.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # -- worker side ---------------------------------------------------------------------
    def on_worker(self) -> bool:
        carrier = self._carrier
        return carrier is not None and threading.current_thread() is carrier.thread

    def cancelled(self) -> bool:
        """On the worker: has the running job been cancelled? (False off the worker.)"""
        carrier = self._carrier
        if carrier is None:  # closed while the job ran: it stops
            return self._closed is not None
        job = carrier.current
        return threading.current_thread() is carrier.thread and job is not None and job.cancel.is_set()

    @property
    def busy(self) -> bool:
        """A job is running (pg-edge serve waits for it at shutdown)."""
        carrier = self._carrier
        return carrier is not None and carrier.current is not None

    def _submit(self, fn: Callable, streaming: bool) -> _Job:
        job = _Job(fn, streaming)
        with self._start_lock:
            if self._closed is not None:
                raise self._closed
            if self._carrier is None:
                with _IDLE_LOCK:
                    carrier = _IDLE.pop() if _IDLE else None
                if carrier is not None:
                    carrier.parked.clear()
                self._carrier = carrier or _Carrier(self._name)
                if not self._exit_hook:
                    atexit.register(_settle_at_exit, weakref.ref(self))
                    self._exit_hook = True
            self._pending.add(job)
            self._carrier.jobs.put(job)
        return job

    def settle(self, timeout: float) -> None:
        """Cancel the running job and wait up to timeout for the worker to be idle (a thread that
        close() handed back: until it is parked, blocked on its queue again)."""
        self.cancel()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        carrier = self._handed_back
        if carrier is not None:
            carrier.parked.wait(max(0.0, deadline - time.monotonic()))


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
