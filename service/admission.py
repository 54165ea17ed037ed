"""How many calls a gateway sends to a model at once, and how many may wait for their turn.

Ray Serve's handle would queue the excess itself, but its router retries a full replica with
exponential backoff (up to 0.5 s) while the replica drains its queue and then idles: measured on
2 cores with 256 clients against one replica that takes 32 calls, the service fell from 195 to
under 10 images/s (ray-project/ray#52609 reports the same drop). So each gateway keeps its calls
within its share of the model's `max_ongoing_requests` and holds the rest here, in arrival
order, where waiting costs nothing; the replicas then always have room and Ray's router never
backs off. `max_queued_requests` bounds the waiting line: beyond it, callers are refused at once
(503), before any image is decoded.
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


def gateway_share(max_ongoing: int, replicas: int, gateways: int) -> int:
    """One gateway's share of a model's calls in flight: every replica's `max_ongoing_requests`,
    split between the gateway replicas (which HAProxy balances evenly), at least one."""
    return max(1, (max_ongoing * replicas) // max(1, gateways))
