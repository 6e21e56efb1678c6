"""The Scheduler: waiting requests into the running batch of one PaliGemma (pg_edge/batching.py).

    arrival = scheduler.announce()          # a request is on its way (read by a server)
    stream = scheduler.submit(req, arrival) # a RowStream of its Chunks; the arrival is consumed

`submit` queues a prepared `Request` and posts one step on the model's worker if none is
posted; each step admits the waiting requests that fit (up to `max_batch` rows), hands out
tokens, decodes one more, and posts the next step while rows or requests remain.

Requests that arrive together are prefilled together (one pass for the vision features of
those not cached and for the prefix): each is announced (`announce()`, an `Arrival`) before it
is prepared, by `PaliGemma.stream()` or earlier by a server that has just read it. A step that
would start an idle batch while announced requests are still on their way leaves the waiting
ones for the step that the last of them posts on submitting (or withdrawing), or that a timer
posts GATHER_S after the first was submitted; a batch whose rows decode never waits.
"""
from __future__ import annotations

import collections
import threading
import time
import weakref

import mlx.core as mx
import numpy as np

from .batching import Batch, Request, _closed
from .errors import PgEdgeError
from .worker import WorkerStream

# The longest a request waits, when the batch is idle, for announced requests still being
# prepared so that they are prefilled in one pass with it (see the module docstring).
GATHER_S = 0.05


class Arrival:
    """An announced request (`Scheduler.announce()`): consumed when its request is submitted,
    or withdrawn (`withdraw()`, also on leaving a `with` block; once only)."""

    def __init__(self, scheduler: "Scheduler"):
        self._scheduler = scheduler
        self.open = True  # changed under the scheduler's lock

    def withdraw(self) -> None:
        self._scheduler._withdraw(self)

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc) -> None:
        self.withdraw()


class RowStream(WorkerStream):
    """The caller's end of one batched request (a WorkerStream: cancel() keeps it readable,
    close() abandons it)."""

    def __init__(self, req: Request):
        super().__init__(req.channel)
        self.request = req

    def close(self) -> None:
        self.request._abandoned = True
        super().close()


class Scheduler:
    """Waiting requests and the running batch of one PaliGemma (see the module docstring)."""

    def __init__(self, pg, max_batch: int = 8):
        self.pg = weakref.proxy(pg)  # no cycle: a dropped PaliGemma is freed at once
        self.max_batch = max_batch
        self.batch = Batch(pg)
        self.waiting: collections.deque[Request] = collections.deque()
        self.joining: list[Request] = []
        self.lock = threading.Lock()
        self.posted = False  # a step job is queued or running
        self.preparing = 0  # announced requests not submitted yet (announce / submit / withdraw)
        self.timer_due = None  # when the running gather timer fires (time.monotonic())
        self.closed: Exception | None = None
        self.most_rows = 0  # the largest batch run so far (tests and benchmarks read it)

    @property
    def rows(self) -> int:
        return len(self.batch.rows)

    def announce(self) -> "Arrival":
        """A request is on its way (read by a server, or about to be prepared): an idle batch
        waits for it, up to GATHER_S, so that requests arriving together are prefilled
        together. The Arrival is consumed by submit(req, arrival), or withdrawn."""
        with self.lock:
            self.preparing += 1
        return Arrival(self)

    def _withdraw(self, arrival: "Arrival") -> None:
        with self.lock:
            if not arrival.open:
                return
            arrival.open = False
            self.preparing -= 1
            self._wake_locked()

    def _wake_locked(self) -> None:
        """With the lock held: post a step if requests wait and none is posted."""
        if self.waiting and not self.posted and self.closed is None:
            try:
                self._post()
                self.posted = True
            except PgEdgeError as err:
                self._end(err)

    def _timer_fired(self) -> None:
        with self.lock:
            self.timer_due = None
            self._wake_locked()

    def submit(self, req: Request, arrival: "Arrival | None" = None) -> RowStream:
        with self.lock:
            if arrival is not None and arrival.open:
                arrival.open = False
                self.preparing -= 1
            if self.closed is not None:
                raise self.closed
            req.t_submit = time.monotonic()
            self.waiting.append(req)
            if not self.posted:
                self._post()  # raises if the model was closed
                self.posted = True
        return RowStream(req)

    def _post(self) -> None:
        """Queue one step on the worker. The job holds the scheduler weakly: a PaliGemma
        dropped by its app is not kept alive by a queued or finishing step."""
        ref = weakref.ref(self)

        def step():
            scheduler = ref()
            if scheduler is not None:
                scheduler._step()

        self.pg._worker.post(step)

    def _gathering(self) -> float:
        """With the lock held: how much longer an idle batch waits for announced requests
        before its first prefill (0: not at all; never when rows decode, they would stall)."""
        if self.batch.rows or self.preparing <= 0 or not self.waiting:
            return 0.0
        if len(self.waiting) >= max(1, self.max_batch):
            return 0.0
        return max(0.0, GATHER_S - (time.monotonic() - self.waiting[0].t_submit))

    def _step(self) -> None:
        with self.lock:
            left = self._gathering()
            if left > 0:  # the next submit() or withdrawal posts the step, or the timer does
                self.posted = False
                due = self.waiting[0].t_submit + GATHER_S
                if self.timer_due != due:  # one timer per wait, however often the step defers
                    self.timer_due = due
                    ref = weakref.ref(self)
                    timer = threading.Timer(left, lambda: (lambda s: s and s._timer_fired())(ref()))
                    timer.daemon = True
                    timer.start()
                return
            room = max(1, self.max_batch) - len(self.batch.rows)
            while room > 0 and self.waiting:
                req = self.waiting.popleft()
                if _closed(req):
                    continue
                self.joining.append(req)
                room -= 1
            if not self.batch.rows and self.joining:
                mx.reset_peak_memory()
        try:
            self.batch.step(self.joining)
            self.most_rows = max(self.most_rows, len(self.batch.rows))
        except Exception as err:  # the batch cannot go on: every row gets the error
            self.batch.fail_all(err)
        finally:
            with self.lock:
                self.joining = []
                again = self.closed is None and (self.batch.rows or self.waiting)
                self.posted = False
                if again:
                    try:
                        self._post()
                        self.posted = True
                    except PgEdgeError as err:
                        self._end(err)
            self.batch.flush()

    def cancel_all(self) -> bool:
        """Cancel every row decoding now (PaliGemma.cancel()); waiting requests still run."""
        with self.lock:
            for r in self.joining:
                r.channel.cancel.set()
            return self.batch.cancel_all() or bool(self.joining)

    def close(self, err: Exception) -> None:
        with self.lock:
            self.closed = err
            self._end(err)

    def _end(self, err: Exception) -> None:
        """With the lock held: rows stop as cancelled, waiting requests get `err`."""
        for r in list(self.batch.rows) + self.joining:
            if r.detok is not None:
                r.channel.cancel.set()
                self.batch._finish(r, "cancelled")
            else:
                r.fail(err)
        self.batch.rows, self.batch.caches = [], None
        self.batch.valid = np.zeros((0, 0), dtype=bool)
        while self.waiting:
            self.waiting.popleft().fail(err)
        self.batch.flush()


__all__ = ["GATHER_S", "Arrival", "RowStream", "Scheduler"]
