"""Admission: one generation at a time, a bounded line of waiting requests, never a hang.

    gate = Gate(queue_size=8, wait_timeout=120)
    with gate.slot(gone=client_hung_up):    # ApiError 503 + Retry-After when the line is full
        ...generate...                      # or the wait passed wait_timeout

Requests enter in arrival order. A waiting request whose client hangs up (`gone()` polled every
50 ms) leaves the line without running.
"""
from __future__ import annotations

import collections
import threading
import time
from contextlib import contextmanager
from typing import Callable

from .openai_format import ApiError

POLL_S = 0.05


class ClientGone(Exception):
    """The client closed its connection; nothing more is sent."""


def busy(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, message, type="server_error", code="server_busy",
                    headers={"Retry-After": str(retry_after)})


class Gate:
    def __init__(self, queue_size: int = 8, wait_timeout: float = 120.0):
        self.queue_size, self.wait_timeout = queue_size, wait_timeout
        self._cond = threading.Condition()
        self._line: collections.deque = collections.deque()
        self.running = False
        self.rejected = 0

    @property
    def waiting(self) -> int:
        return len(self._line)

    @contextmanager
    def slot(self, gone: Callable[[], bool] = lambda: False):
        with self._cond:
            if len(self._line) + self.running > self.queue_size:
                self.rejected += 1
                raise busy(f"the server is busy ({len(self._line)} requests waiting for the "
                           f"model, limit {self.queue_size}); retry later")
            ticket = object()
            self._line.append(ticket)
            deadline = time.monotonic() + self.wait_timeout
            try:
                while self.running or self._line[0] is not ticket:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.rejected += 1
                        raise busy(f"waited {self.wait_timeout:g} s for the model; retry later")
                    self._cond.wait(min(left, POLL_S))
                    if gone():
                        raise ClientGone()
            except BaseException:
                self._line.remove(ticket)
                self._cond.notify_all()
                raise
            self._line.popleft()
            self.running = True
        try:
            yield
        finally:
            with self._cond:
                self.running = False
                self._cond.notify_all()
