"""Feature-store writes on a background thread, with a bound on what a killed run can lose.

Encoding a record and committing an LMDB transaction (an fsync) take time the detector need not wait for. A
:class:`BackgroundWriter` hands records to one thread that owns the :class:`FeatureWriter`: the thread takes all
records queued so far, writes them and commits them in one transaction (a "group commit": when it keeps up it
commits every batch, when the disk is slow the transactions grow). ``put_batch`` blocks while more than
``max_uncommitted`` records are not yet committed, so a ``kill -9`` loses at most that many images, and a restart
extracts them again.
"""
from __future__ import annotations

import threading
from collections import deque

from butd.data.store import FeatureRecord, FeatureWriter
from butd.errors import ConfigError


class BackgroundWriter:
    """Writes records into ``writer`` on a thread (``threaded=False``: in the caller's thread, same results)."""

    def __init__(self, writer: FeatureWriter, *, max_uncommitted: int, threaded: bool = True) -> None:
        if max_uncommitted < 1:
            raise ConfigError(f"--commit-every must be >= 1, got {max_uncommitted}")
        self.writer = writer
        self.max_uncommitted = max_uncommitted
        self._queue: deque[FeatureRecord] = deque()
        self._submitted = 0
        self._committed = 0
        self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)
            self._thread.start()

    @property
    def committed(self) -> int:
        """Records committed so far."""
        with self._cond:
            return self._committed

    def put_batch(self, records: list[FeatureRecord]) -> None:
        """Queue ``records`` (one image each); blocks while the uncommitted ones would exceed the bound."""
        if self._thread is None:
            for record in records:
                self.writer.put(record)
                self._submitted += 1
                if self._submitted - self._committed >= self.max_uncommitted:
                    self._commit_now()
            return
        for record in records:
            with self._cond:
                self._cond.wait_for(lambda: self._error is not None
                                    or self._submitted - self._committed < self.max_uncommitted)
                self._raise_error()
                self._queue.append(record)
                self._submitted += 1
                self._cond.notify_all()

    def close(self) -> None:
        """Write and commit everything queued, stop the thread; re-raises an error of the thread."""
        if self._thread is None:
            self._commit_now()
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Stop the thread after the transaction in progress; records not yet committed are dropped."""
        with self._cond:
            self._queue.clear()
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _commit_now(self) -> None:
        self.writer.commit()
        self._committed = self._submitted

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                group = list(self._queue)
                self._queue.clear()
            try:
                for record in group:
                    self.writer.put(record)
                self.writer.commit()
            except BaseException as exc:  # handed to the caller's next put_batch or close
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._committed += len(group)
                self._cond.notify_all()
