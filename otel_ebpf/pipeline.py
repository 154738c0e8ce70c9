"""Batching between the tracer and the network: the ring-buffer drain loop queues chunks of spans, and one export
thread hands them to the sinks in batches, so the drain loop never waits on a collector.

A chunk is what the drain loop made of one read, anything with len() and slicing (a list, a numpy array). It is
queued as it is, so a hot path that keeps spans in numpy arrays needs no Python object per span. Bounds and counts
are in items, not chunks.
"""

from __future__ import annotations

import collections
import functools
import logging
import sys
import threading
import time
from typing import Callable, Protocol, Sequence, TextIO, runtime_checkable

from otel_ebpf.otlp.transport import ExportError

logger = logging.getLogger(__name__)


class Batch:
    """Chunks exported together; encoded at most once, however many sinks need the bytes."""

    def __init__(self, chunks: list, encode: Callable[[list], bytes] | None):
        self.chunks = chunks
        self._encode = encode
        self._items = sum(len(chunk) for chunk in chunks)

    def __len__(self) -> int:
        """Items, over all the chunks: what sinks count."""
        return self._items

    @functools.cached_property
    def payload(self) -> bytes:
        if self._encode is None:
            raise ExportError("no OTLP encoder configured")
        return self._encode(self.chunks)


class Sink(Protocol):
    def export(self, batch: Batch, deadline: float) -> int | None:
        """Deliver the batch or raise; may return how many items the destination rejected."""

    def close(self) -> None: ...


@runtime_checkable
class CountingSink(Sink, Protocol):
    """A sink that counts what it delivers and loses itself (RetryingExporter, which keeps batches after export()
    returns): BatchProcessor reports its counts, and gives it what is left of the shutdown time."""

    @property
    def counts(self) -> dict[str, int]: ...

    def close(self, deadline: float | None = None) -> None: ...


class ConsoleSink:
    """Writes the text ``format`` makes of each chunk (its lines, each ending in a newline), for --console and
    debugging without a collector. line_per_item() makes such a ``format`` from one for single items."""

    def __init__(self, format: Callable[[Sequence], str], stream: TextIO | None = None):
        self._format = format
        self._stream = stream if stream is not None else sys.stdout

    def export(self, batch: Batch, deadline: float) -> int:
        for chunk in batch.chunks:
            self._stream.write(self._format(chunk))
        self._stream.flush()
        return 0

    def close(self) -> None:
        self._stream.flush()


def line_per_item(format: Callable[[object], str]) -> Callable[[Sequence], str]:
    """A ConsoleSink format from a formatter of single items (SpanEncoder.format, str): one line per item."""
    return lambda chunk: "".join(f"{format(item)}\n" for item in chunk)


def deliver(sinks: list[Sink], batch: Batch, deadline: float) -> tuple[int, str | None]:
    """Export ``batch`` to every sink: (items rejected in total, the last failure's reason or None).

    A sink failing does not keep the others from getting the batch.
    """
    failure = None
    rejected = 0
    for sink in sinks:
        try:
            rejected += sink.export(batch, deadline) or 0
        except ExportError as exc:
            failure = str(exc)
        except Exception as exc:  # a bug in a sink or the encoder must not end the export thread
            logger.debug("export to %r raised", sink, exc_info=True)
            failure = f"{type(exc).__name__}: {exc}"
    return rejected, failure


def close_all(sinks: list[Sink]) -> None:
    """Close every sink; one failing to close does not keep the others open."""
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:
            logger.debug("closing %r failed: %s", sink, exc)


class FailureReport:
    """Turns a stream of export failures into a first warning, periodic summaries and a recovery note.

    ``signal`` names what is exported and ``noun`` what is counted: "span" and "spans", "metric" and "data points".
    """

    def __init__(self, interval_s: float, signal: str = "span", noun: str = "spans"):
        self._interval_s = interval_s
        self._signal = signal
        self._noun = noun
        self._failing = False
        self._window_start = 0.0
        self._batches = 0
        self._failed_items = 0
        self._total_batches = 0

    def failed(self, items: int, reason: str) -> None:
        now = time.monotonic()
        self._total_batches += 1
        if not self._failing:
            self._failing = True
            self._window_start = now
            logger.warning(
                "%s export failed, %d %s dropped: %s (repeats are summarised every %gs)",
                self._signal, items, self._noun, reason, self._interval_s,
            )
            return
        self._batches += 1
        self._failed_items += items
        if now - self._window_start >= self._interval_s:
            logger.warning(
                "%d batches / %d %s failed in the last %gs: %s",
                self._batches, self._failed_items, self._noun, self._interval_s, reason,
            )
            self._window_start = now
            self._batches = self._failed_items = 0

    def succeeded(self) -> None:
        if self._failing:
            logger.warning("%s export recovered after %d failed batches", self._signal, self._total_batches)
            self._failing = False
            self._batches = self._failed_items = self._total_batches = 0


class BatchProcessor:
    """Bounded queue between the ring-buffer drain loop (producer, must never block) and the export threads.

    Several export threads keep several requests in flight: on a busy machine a backend's round trip is mostly
    waiting (for the receiver to be scheduled, to parse, to answer), and one request at a time would make that
    wait the ceiling of the throughput.

    The drain loop asks for room() before reading the ring buffer, so a slow exporter leaves events in
    the kernel's ring buffer (compact, bounded, counted when full) instead of piling up Python objects.
    The queue holds chunks as they were added; a batch takes at most max_batch_size items from its front,
    cutting the last chunk it takes when that holds more.

    Spans are counted where they can be lost: by the CountingSink (RetryingExporter) among the sinks if there is
    one (the console cannot lose them), else here."""

    def __init__(
        self,
        encode: Callable[[list], bytes] | None,
        sinks: list[Sink],
        max_queue_size: int,
        max_batch_size: int,
        schedule_delay_s: float,
        export_timeout_s: float,
        report_interval_s: float = 30.0,
        exporters: int = 1,
    ):
        self._encode = encode
        self._sinks = sinks
        self._exporter = next((sink for sink in sinks if isinstance(sink, CountingSink)), None)
        self._max_queue_size = max_queue_size
        self._max_batch_size = max_batch_size
        self._schedule_delay_s = schedule_delay_s
        self._export_timeout_s = export_timeout_s
        self._report = FailureReport(report_interval_s)
        self._queue: collections.deque = collections.deque()  # chunks, none of them empty
        self._queued = 0  # items in self._queue
        self._cond = threading.Condition()  # items queued, or shutdown
        self._has_room = threading.Condition(self._cond)  # the export thread took items
        self._stop_deadline: float | None = None
        self._exported = self._dropped_full = self._dropped_shutdown = self._failed = self._rejected = 0
        self._threads = [threading.Thread(target=self._run, name=f"otel-ebpf-export-{i}", daemon=True)
                         for i in range(exporters)]
        for thread in self._threads:
            thread.start()

    def add(self, chunk: Sequence) -> None:
        """Queue a chunk without blocking; its items beyond the room left are dropped and counted."""
        items = len(chunk)
        with self._cond:
            if self._stop_deadline is not None:
                self._dropped_shutdown += items
                return
            room = self._max_queue_size - self._queued
            if items > room:
                self._dropped_full += items - room
                chunk, items = chunk[:room], room
            if items:
                self._queue.append(chunk)
                self._queued += items
            if self._queued >= self._max_batch_size:
                self._cond.notify()

    def room(self) -> int:
        """Items that add() would queue now."""
        with self._cond:
            return self._max_queue_size - self._queued

    def wait_for_room(self, timeout_s: float) -> None:
        with self._cond:
            if self._queued >= self._max_queue_size:
                self._has_room.wait(timeout_s)

    def shutdown(self, timeout_s: float) -> None:
        """Export everything queued within ``timeout_s``, then close the sinks; later calls do nothing."""
        with self._cond:
            if self._stop_deadline is not None:
                return
            deadline = self._stop_deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._exporter is not None:
            self._exporter.close(deadline)  # what is left of the time goes to the retry queue
        # Closing interrupts a retry still waiting on a dead collector; the threads then end quickly.
        close_all(self._sinks)
        for thread in self._threads:
            thread.join(1.0)
        with self._cond:
            self._dropped_shutdown += self._queued
            self._queue.clear()
            self._queued = 0

    @property
    def stats(self) -> dict[str, int]:
        """Item counts: exported (every sink took them), failed (in a batch some sink failed),
        rejected (refused by a collector as partial success), dropped_full (queue overflow),
        dropped_shutdown (added after, or still queued at the end of, shutdown), and those of
        RetryingExporter.counts (all 0 without one)."""
        with self._cond:
            stats = {
                "exported": self._exported,
                "dropped_full": self._dropped_full,
                "dropped_shutdown": self._dropped_shutdown,
                "failed": self._failed,
                "rejected": self._rejected,
                "dropped_retry": 0,
                "unsent": 0,
                "spooled": 0,
            }
        if self._exporter is not None:
            stats.update(self._exporter.counts)
        return stats

    def _run(self) -> None:
        while True:
            with self._cond:
                # Re-checked after each wake-up: another exporter thread may have taken the batch this one was
                # woken for, and what it left is a partial batch that waits for the delay.
                self._cond.wait_for(lambda: self._queued >= self._max_batch_size or self._stop_deadline is not None,
                                    self._schedule_delay_s)
                chunks = self._take()
                if chunks:
                    self._has_room.notify()
                stopping = self._stop_deadline is not None
                if not chunks and stopping:
                    return
            if chunks:
                self._export(Batch(chunks, self._encode))

    def _take(self) -> list:
        """At most max_batch_size items from the front of the queue, as chunks; the caller holds the lock."""
        chunks = []
        wanted = self._max_batch_size
        while self._queue and wanted:
            chunk = self._queue[0]
            if len(chunk) > wanted:  # the rest stays first in the queue, for the next batch
                chunk, self._queue[0] = chunk[:wanted], chunk[wanted:]
            else:
                self._queue.popleft()
            chunks.append(chunk)
            wanted -= len(chunk)
        self._queued -= self._max_batch_size - wanted
        return chunks

    def _export(self, batch: Batch) -> None:
        deadline = time.monotonic() + self._export_timeout_s
        if self._stop_deadline is not None:
            deadline = min(deadline, self._stop_deadline)
        rejected, failure = deliver(self._sinks, batch, deadline)
        with self._cond:
            self._rejected += rejected
            if failure is None:
                self._exported += len(batch)
            else:
                self._failed += len(batch)
        if failure is None:
            self._report.succeeded()
        else:
            self._report.failed(len(batch), failure)
