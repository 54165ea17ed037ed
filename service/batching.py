"""Dynamic batching that forms a batch when the model can take one.

Calls (a request's images, up to a batch of them) wait in one first-come line. When the model
has room (`depth` batches in flight: one on a CPU, where decoding and the forward pass share
the inference thread; two on a GPU, where the next batch decodes while this one runs), the
batch is formed from the head of the line, up to `max_batch_size` images, so everything that
arrived while the model was busy goes into the next batch together.

Ray Serve's `@serve.batch` forms a batch as soon as one item is queued and lets it wait for
the model there; under load the requests that arrive a moment later then wait a whole batch,
and a closed loop of clients settles into lopsided batches (docs/benchmarks/serving-cpu.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Call(Generic[T]):
    """Items that go into one batch together, and when they arrived."""

    items: Sequence[T]
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class Batcher(Generic[T]):
    """`await batcher(items)`: the results of `run_batch` for these items, batched with others.

    `run_batch(calls)` gets the calls of one batch (each call's items stay together) and
    returns one result per item, in order; an exception fails every call of its batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Call[T]]], Awaitable[list[Any]]],
        max_batch_size: int,
        batch_wait_timeout_s: float = 0.0,
        depth: int = 1,
    ):
        if max_batch_size < 1 or depth < 1:
            raise ValueError("max_batch_size and depth must be at least 1")
        self.run_batch, self.max_batch_size = run_batch, max_batch_size
        self.batch_wait_timeout_s, self.depth = batch_wait_timeout_s, depth
        self.in_flight = 0  # batches formed and not yet answered
        self._line: deque[Call[T]] = deque()
        self._queued = 0  # images in the line
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self._queued

    async def __call__(self, items: Sequence[T]) -> list[Any]:
        if not 1 <= len(items) <= self.max_batch_size:
            raise ValueError(f"a call takes 1 to {self.max_batch_size} items, got {len(items)}")
        call = Call(items, asyncio.get_running_loop().create_future())
        self._line.append(call)
        self._queued += len(items)
        self._form_batches()
        return await call.future  # cancelled: the batch skips it, or its answer is dropped

    def _form_batches(self) -> None:
        while self.in_flight < self.depth and self._drop_cancelled():
            if self._queued < self.max_batch_size and self._should_wait():
                return
            # the head is live (`_drop_cancelled`) and fits, so the batch is never empty
            batch, size = [], 0
            while self._line and size + len(self._line[0].items) <= self.max_batch_size:
                call = self._line.popleft()
                self._queued -= len(call.items)
                if not call.future.done():
                    batch.append(call)
                    size += len(call.items)
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)  # a reference, so the task is not collected mid-run
            task.add_done_callback(partial(self._finished, batch))

    def _drop_cancelled(self) -> bool:
        """Whether any live call waits (calls cancelled at the head of the line go)."""
        while self._line and self._line[0].future.done():
            self._queued -= len(self._line.popleft().items)
        return bool(self._line)

    def _should_wait(self) -> bool:
        """Hold a short batch for `batch_wait_timeout_s` after its first call arrived."""
        left = self._line[0].arrived + self.batch_wait_timeout_s - time.perf_counter()
        if left <= 0:
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(left, self._on_timer)
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self._form_batches()

    async def _run(self, batch: list[Call[T]]) -> None:
        try:
            results = await self.run_batch(batch)
            if len(results) != sum(len(call.items) for call in batch):
                raise RuntimeError(f"a batch of {len(batch)} calls got {len(results)} results")
        except BaseException as e:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
        else:
            start = 0
            for call in batch:
                end = start + len(call.items)
                if not call.future.done():
                    call.future.set_result(results[start:end])
                start = end
        finally:
            self.in_flight -= 1
            self._form_batches()

    def _finished(self, batch: list[Call[T]], task: asyncio.Task) -> None:
        """Let the batch's task go; if it was cancelled before it started (`_run` answers every
        call otherwise), cancel its calls rather than leave them waiting, and go on."""
        self._tasks.discard(task)
        if all(call.future.done() for call in batch):
            return
        for call in batch:
            call.future.cancel()
        self.in_flight -= 1
        self._form_batches()
