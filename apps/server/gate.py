"""Admission: one generation at a time, a bounded line of waiting requests, a budget of decoded
pixels shared by all of them, never a hang.

    gate = Gate(queue_size=8, wait_timeout=120, pixel_budget=100_000_000)
    with gate.slot(gone=client_hung_up, pixels=w * h, prepare=decode) as image:
        ...generate...          # the model is this request's; `image` is what decode() returned

`slot` admits the request first (503 + Retry-After at once when the line is full; 413 when its
image alone is past the pixel budget), then, in arrival order, holds its image's pixels from
the budget (waiting while earlier requests hold too much of it), then calls `prepare()` (the
image is decoded only now), then waits for the model. The pixels are given back when the
request ends. So the decoded images held at once never pass the budget, however many
requests arrive; a waiting request leaves the line when its client hangs up (`gone()` polled
every 50 ms) or when wait_timeout passes (503). `close()` (server shutdown) answers every
waiting request and every later one with 503 "server shutting down".
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


def shutting_down(message: str = "the server is shutting down; retry on another server or later") -> ApiError:
    return ApiError(503, message, type="server_error", code="server_shutting_down")


class _Ticket:
    __slots__ = ("pixels", "granted")

    def __init__(self, pixels: int):
        self.pixels, self.granted = pixels, False


class Gate:
    def __init__(self, queue_size: int = 8, wait_timeout: float = 120.0, pixel_budget: int = 100_000_000):
        self.queue_size, self.wait_timeout, self.pixel_budget = queue_size, wait_timeout, pixel_budget
        self._cond = threading.Condition()
        self._line: collections.deque[_Ticket] = collections.deque()
        self.running = False
        self.rejected = 0
        self.pixels_held = 0
        self.closed = False

    @property
    def waiting(self) -> int:
        return len(self._line)

    def close(self) -> None:
        """Shut the gate: waiting requests and new ones get 503 "shutting down"."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def _may_hold(self, ticket: _Ticket) -> bool:
        """In line order: every earlier ticket holds its pixels, and this one's still fit."""
        for t in self._line:
            if t is ticket:
                return self.pixels_held + ticket.pixels <= self.pixel_budget
            if not t.granted:
                return False
        return False

    def _wait(self, ready: Callable[[], bool], deadline: float, gone: Callable[[], bool]) -> None:
        """With the lock held: until ready(), or raise (closed, timed out, client gone)."""
        while True:
            if self.closed:
                raise shutting_down()
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self.rejected += 1
                raise busy(f"waited {self.wait_timeout:g} s for the model; retry later")
            self._cond.wait(min(left, POLL_S))
            self._cond.release()  # gone() may write a probe to the socket: not under the lock
            try:
                left_us = gone()
            finally:
                self._cond.acquire()
            if left_us:
                raise ClientGone()

    @contextmanager
    def slot(self, gone: Callable[[], bool] = lambda: False, pixels: int = 0,
             prepare: Callable[[], object] = lambda: None):
        with self._cond:
            if self.closed:
                raise shutting_down()
            if pixels > self.pixel_budget:
                raise ApiError(413, f"the image has {pixels:,} pixels; this server decodes at most "
                               f"{self.pixel_budget:,} at once (pg-edge serve --pixel-budget)",
                               code="image_too_large")
            if len(self._line) + self.running > self.queue_size:
                self.rejected += 1
                raise busy(f"the server is busy ({len(self._line)} requests waiting for the "
                           f"model, limit {self.queue_size}); retry later")
            ticket = _Ticket(pixels)
            self._line.append(ticket)
        deadline = time.monotonic() + self.wait_timeout
        try:
            with self._cond:
                self._wait(lambda: self._may_hold(ticket), deadline, gone)
                ticket.granted = True
                self.pixels_held += pixels
                self._cond.notify_all()  # the next in line may hold its pixels too
            value = prepare()
            with self._cond:
                self._wait(lambda: not self.running and self._line[0] is ticket, deadline, gone)
                self._line.popleft()
                self.running = True
        except BaseException:
            with self._cond:
                if ticket in self._line:
                    self._line.remove(ticket)
                if ticket.granted:
                    self.pixels_held -= pixels
                self._cond.notify_all()
            raise
        try:
            yield value
        finally:
            with self._cond:
                self.running = False
                self.pixels_held -= pixels
                self._cond.notify_all()
