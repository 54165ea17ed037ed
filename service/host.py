"""One model inside a server replica: its waiting line, its dynamic batches and its metrics.

A request's images go straight from the route handler into this model's batch queue in the
same process (no call to another actor, no copy): the batcher (`service.batching`) gathers
images of concurrent requests into batches, which the runtime decodes, preprocesses and runs
on the inference thread while the event loop keeps taking requests.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from typing import Any

from .admission import ModelBusy, ModelQueue
from .batching import Batcher, Call
from .config import ModelConfig
from .errors import ModelUnavailable, Overloaded, Timeout
from .metrics import ModelMetrics, request_metrics
from .runtime import BatchItem, ModelRunner


class ModelHost:
    """A loaded model, warming up in the background, and the batches it runs."""

    def __init__(
        self, config: ModelConfig, max_pixels: int, retry_after_s: int, version: str = "1"
    ):
        self.config, self.name, self.version = config, config.name, version
        self.retry_after_s = retry_after_s
        self.runner = ModelRunner(config, max_pixels)  # a bad checkpoint fails the replica here
        self.meta, self.task = self.runner.meta, self.runner.task
        # Calls (a request's images, up to a batch of them) in flight, and how many may wait.
        self.queue = ModelQueue(config.ongoing, config.max_queued_requests)
        # Batches in flight: one on a CPU (prepare and run are one step on the inference
        # thread), two on a GPU (the next batch decodes while this one runs).
        self.batcher = Batcher(
            self._batch,
            config.max_batch_size,
            config.batch_wait_timeout_s,
            depth=2 if self.runner.pipelined else 1,
        )
        self.metrics = ModelMetrics(config.name, version)
        self._decode = request_metrics().decode
        self._decode_tags = {"endpoint": self.task.name}
        self.info_tags = {
            "model": self.name,
            "version": version,
            "arch": self.meta.arch,
            "task": self.meta.task,
            "device": self.runner.device.type,
            "precision": self.runner.precision,
        }
        self.warm: Future | None = None

    def start_warmup(self) -> None:
        """Warm up in the background (on the inference thread, after every model loaded)."""
        self.warm = self.runner.start_warmup()
        self.warm.add_done_callback(self._warmed)

    def _warmed(self, warm: Future) -> None:
        """The info gauge exists from readiness on."""
        self.report_info()

    def report_info(self) -> None:
        """Set the info gauge while the model is served: Ray's metrics agent drops a gauge
        that is not set again within two export intervals, so it is set again every report."""
        if self.ready:
            self.metrics.info.set(1, tags=self.info_tags)

    @property
    def ready(self) -> bool:
        return self.warm is not None and self.warm.done() and self.warm.exception() is None

    def failure(self) -> BaseException | None:
        """Why the warm-up failed, once it has."""
        return self.warm.exception() if self.warm is not None and self.warm.done() else None

    def full(self) -> bool:
        """Whether a new request would be refused (checked before its body is read)."""
        return self.queue.full()

    def overloaded(self) -> Overloaded:
        return Overloaded(f"{self.label} has a full queue", self.retry_after_s)

    @property
    def label(self) -> str:
        """How messages name it: the model, and its version where it is not the first."""
        return f"model {self.name!r}" + (f" version {self.version}" if self.version != "1" else "")

    async def infer(self, entries: list[BatchItem], timeout_s: float) -> list[Any]:
        """Results (or `ImageError`s) for a request's images, in order.

        The images go in calls of at most a batch each, each holding one of the model's slots
        (`admission.ModelQueue`); every image still batches with other requests' images.
        """
        size = self.config.max_batch_size

        async def call(chunk: list[BatchItem]) -> list[Any]:
            async with self.queue.slot():
                return await self.batcher(chunk)

        async def all_calls() -> list[list[Any]]:
            if not self.warm.done():  # a replica still warming up: wait for it, not 503
                await asyncio.wait([asyncio.wrap_future(self.warm)])
            if (failed := self.failure()) is not None:
                raise ModelUnavailable(
                    f"{self.label} failed to warm up ({failed!r}); its replica restarts",
                    self.retry_after_s,
                )
            if len(entries) <= size:
                return [await call(entries)]
            return await asyncio.gather(
                *(call(entries[i : i + size]) for i in range(0, len(entries), size))
            )

        try:
            answers = await asyncio.wait_for(all_calls(), timeout=timeout_s)
        except ModelBusy:
            raise self.overloaded() from None
        except TimeoutError:
            raise Timeout(f"no answer within {timeout_s:g} s") from None
        return [result for answer in answers for result in answer]

    async def _batch(self, calls: list[Call[BatchItem]]) -> list[Any]:
        started = time.perf_counter()
        entries = [entry for call in calls for entry in call.items]
        runner = self.runner
        if runner.pipelined:  # this batch decodes while the previous one runs
            prepared = await asyncio.wrap_future(runner.submit_prepare(entries))
            results = await asyncio.wrap_future(runner.submit_forward(prepared))
        else:  # one hop to the inference thread, not two
            prepared, results = await asyncio.wrap_future(runner.submit(entries))
        metrics = self.metrics
        for call in calls:
            wait = started - call.arrived
            for _ in call.items:
                metrics.queue_wait.observe(wait)
        for seconds in prepared.decode_seconds:
            self._decode.observe(seconds, tags=self._decode_tags)
        metrics.inference.observe(prepared.forward_seconds)
        metrics.batch_size.observe(len(entries))
        metrics.images.inc(len(entries))
        return results

    def describe(self, weight: float) -> dict[str, Any]:
        """What `/v1/models` shows of this version, with its traffic weight."""
        return {
            **self.runner.describe(),
            "version": self.version,
            "weight": weight,
            "ready": self.ready,
        }
