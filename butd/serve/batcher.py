"""Asyncio micro-batcher: images of concurrent requests share one pass through the detector and decoder.

Every image becomes one queue item with its own future. A single worker task takes the first waiting item, waits at
most ``max_wait_ms`` for more (never more than ``max_batch`` images), and runs the batch in one dedicated thread so the
event loop keeps accepting requests meanwhile. Requests that arrive while a batch runs form the next batch, which is
why throughput grows with concurrency.

A request whose caller stopped waiting (its client hung up, so the app cancelled ``submit``) has its futures cancelled;
the worker skips such images right before each call of the model, so abandoned work never reaches it. How much may
wait is bounded by the app's memory budget (``butd.serve.admission``), in pixels, not here.
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


@dataclass
class BatchStats:
    """Counters for /healthz and the load test: how well requests were batched."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    skipped: int = 0  # images dropped before the model because their caller stopped waiting


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
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"MicroBatcher: need max_batch >= 1 and max_wait_ms >= 0 (got {max_batch}, {max_wait_ms})")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
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

    @property
    def queued(self) -> int:
        """Images waiting for a batch (cancelled ones included until the worker drops them)."""
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, images: Sequence[Any], names: Sequence[str], beam_size: int) -> list[Result]:
        """Queue the images of one request and wait for their results (in order).

        Cancelling the call (the app does when the client hangs up) cancels its images: the worker skips them.
        """
        if self._queue is None or self._worker is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        loop = asyncio.get_running_loop()
        items = [_Item(image, name, beam_size, loop.create_future()) for image, name in zip(images, names)]
        for item in items:
            self._queue.put_nowait(item)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
                item.image = None  # the queue must not keep a cancelled request's decoded pixels alive
            raise

    async def _collect(self) -> list[_Item]:
        """The first waiting item plus whatever else arrives within ``max_wait``, up to ``max_batch`` items.

        Items whose caller stopped waiting are dropped as they are taken, so they do not use up a batch's places.
        """
        assert self._queue is not None
        batch: list[_Item] = []
        while not batch:
            batch = self._still_wanted([await self._queue.get()])
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch += self._still_wanted([self._queue.get_nowait()])
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch += self._still_wanted([await asyncio.wait_for(self._queue.get(), remaining)])
            except TimeoutError:
                break
        return batch

    def _still_wanted(self, items: list[_Item]) -> list[_Item]:
        """The items whose caller still waits; the others are counted as skipped and never reach the model."""
        wanted = [item for item in items if not item.future.done()]
        self.stats.skipped += len(items) - len(wanted)
        return wanted

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            for beam_size in dict.fromkeys(item.beam_size for item in batch):
                # Checked right before the model runs: a group can be cancelled while an earlier group runs.
                group = self._still_wanted([item for item in batch if item.beam_size == beam_size])
                if not group:
                    continue
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
