"""How many calls a server replica puts into a model's batch queue at once, and how many may
wait for their turn.

A model's `max_ongoing_requests` calls (a request's images, up to a batch of them) are in its
batch queue at once; the rest wait here, in arrival order, where waiting costs nothing.
`max_queued_requests` bounds the waiting line: beyond it, requests are refused at once (503),
before their body is read or any image decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ModelBusy(Exception):
    """The model's waiting line is full: answer 503 and let the client retry."""


class ModelQueue:
    """At most `capacity` calls in flight; up to `max_waiting` more wait (-1: no limit)."""

    def __init__(self, capacity: int, max_waiting: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity, self.max_waiting = capacity, max_waiting
        self._slots = asyncio.Semaphore(capacity)
        self.in_flight = 0
        self.waiting = 0

    def full(self) -> bool:
        """True when a new call would be refused: every slot taken and the line at its limit."""
        return self.in_flight >= self.capacity and 0 <= self.max_waiting <= self.waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the model's slots for a call; waits its turn, or raises `ModelBusy`."""
        if self.full():
            raise ModelBusy()
        self.waiting += 1
        try:
            await self._slots.acquire()  # FIFO: asyncio's semaphore wakes waiters in order
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()
