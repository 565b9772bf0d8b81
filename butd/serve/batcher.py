"""Asyncio micro-batcher: images of concurrent requests share one pass through the detector and decoder.

Every image becomes one queue item with its own future. A single worker task takes the first waiting item, waits at
most ``max_wait_ms`` for more (never more than ``max_batch`` images), and runs the batch in one dedicated thread so the
event loop keeps accepting requests meanwhile. Requests that arrive while a batch runs form the next batch, which is
why throughput grows with concurrency.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Result = TypeVar("Result")


@dataclass
class _Item:
    image: Any
    name: str
    beam_size: int
    future: asyncio.Future = field(repr=False)


class QueueFull(Exception):
    """More images are waiting than the batcher accepts; the caller should retry later (HTTP 503)."""


@dataclass
class BatchStats:
    """Counters for /healthz and the load test: how well requests were batched."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0


class MicroBatcher(Generic[Result]):
    """Collects images from concurrent callers into batches for ``run_batch(images, names, beam_size)``.

    ``run_batch`` runs in one worker thread (the model is used by that thread only) and returns one result per
    image. Images with different beam sizes are decoded in separate calls, in arrival order.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any], list[str], int], Sequence[Result]],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(
                f"MicroBatcher: need max_batch >= 1, max_wait_ms >= 0, max_queue >= 1 "
                f"(got {max_batch}, {max_wait_ms}, {max_queue})"
            )
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker task on the running event loop (idempotent)."""
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="butd-inference")
            self._worker = asyncio.create_task(self._work(), name="butd-batcher")

    async def stop(self) -> None:
        """Cancel the worker, fail the waiting requests, and wait for the running batch's thread to finish."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass  # the cancellation we asked for
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, images: Sequence[Any], names: Sequence[str], beam_size: int) -> list[Result]:
        """Queue the images of one request and wait for their results (in order)."""
        if self._queue is None or self._worker is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        if self._queue.qsize() + len(images) > self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} images are already waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        items = [_Item(image, name, beam_size, loop.create_future()) for image, name in zip(images, names)]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _collect(self) -> list[_Item]:
        """The first waiting item plus whatever else arrives within ``max_wait``, up to ``max_batch`` items."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [item for item in batch if not item.future.done()]  # drop requests whose client went away

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            for beam_size in dict.fromkeys(item.beam_size for item in batch):
                group = [item for item in batch if item.beam_size == beam_size]
                images, names = [i.image for i in group], [i.name for i in group]
                try:
                    results = await loop.run_in_executor(self._executor, self._run_batch, images, names, beam_size)
                except Exception as err:  # noqa: BLE001 - handed to every waiting request, not swallowed
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                self.stats.batches += 1
                self.stats.images += len(group)
                self.stats.largest_batch = max(self.stats.largest_batch, len(group))
                for item, result in zip(group, results):
                    if not item.future.done():
                        item.future.set_result(result)
