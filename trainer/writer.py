"""Group commit of telemetry batches: one thread writes for every stream of the trainer.

Each open agent stream is a coroutine on the gRPC event loop; none may block it on
SQLite. A stream hands its checked batch to `GroupWriter.ingest` and awaits the result.
The writer thread takes every batch waiting (up to `max_group`) and stores them in one
transaction (`TelemetryStore.ingest_many`), then answers them all: under load the cost of
a commit is shared by many batches, and an ack is only sent after its batch is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from vmad.trainer.store import IngestBatch, IngestResult, TelemetryStore

__all__ = ["GroupWriter", "WriterStats"]

log = logging.getLogger("vmad.trainer.writer")


@dataclass
class WriterStats:
    commits: int = 0
    batches: int = 0
    failed_commits: int = 0
    largest_group: int = 0


_Job = tuple[IngestBatch, asyncio.Future, asyncio.AbstractEventLoop]


class GroupWriter:
    def __init__(self, store: TelemetryStore, max_group: int = 512) -> None:
        self.store = store
        self.max_group = max_group
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vmad-store-writer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then end the thread."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def ingest(self, batch: IngestBatch) -> IngestResult:
        """Store `batch` (committed when this returns). Raises ValueError for a batch the
        store refuses, sqlite3.Error when the commit fails."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((batch, future, loop))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_group:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            self._commit(jobs)

    def _commit(self, jobs: Sequence[_Job]) -> None:
        try:
            outcomes: Sequence[IngestResult | BaseException] = self.store.ingest_many(
                [batch for batch, _, _ in jobs])
            self.stats.commits += 1
        except Exception as error:  # disk full, I/O error: every batch is answered with it
            log.error("storing %d telemetry batches failed: %s", len(jobs), error)
            self.stats.failed_commits += 1
            outcomes = [error] * len(jobs)
        self.stats.batches += len(jobs)
        self.stats.largest_group = max(self.stats.largest_group, len(jobs))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object]]] = {}
        for (_, future, loop), outcome in zip(jobs, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((future, outcome))
        for loop, answers in by_loop.items():
            # A loop that has closed (server stopped) has nobody waiting.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_answer, answers)


def _answer(answers: list[tuple[asyncio.Future, object]]) -> None:
    for future, outcome in answers:
        if future.done():  # the stream was cancelled while its batch was being written
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
