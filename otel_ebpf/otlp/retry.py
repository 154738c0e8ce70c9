"""Spans surviving a backend outage: RetryingExporter puts a transport behind a RetryQueue and retries it on the
one Backoff schedule the transports use too."""

from __future__ import annotations

import collections
import logging
import threading
import time

from otel_ebpf.config import OTEL_EBPF_SPOOL_DIR, Settings
from otel_ebpf.otlp.backoff import Backoff
from otel_ebpf.otlp.queue import RetryQueue, _Payload
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ebpf.otlp.transport import ExportError, RetryableError, TooLargeError, Transport, otlp_transport
from otel_ebpf.pipeline import Batch, FailureReport

logger = logging.getLogger(__name__)


class RetryingExporter:
    """The OTLP sink for spans: a transport behind a RetryQueue, counting what it delivers and what it loses.

    While nothing waits in the queue, the export thread sends a batch at once, in one attempt, so a slow backend
    slows the drain loop and events wait in the kernel's ring buffer. A failure worth retrying queues that batch,
    and every later one then goes straight to the queue without an attempt, so the drain loop keeps emptying the
    ring buffer through an outage. One thread sends the queue oldest first, probing the backend with exponential
    backoff, capped low so that a backend that is back is noticed within seconds; once the queue is empty,
    batches are sent at once again. A request the backend refuses (HTTP 400...) is dropped alone; one it refuses
    as too large is sent in halves, as many times as it takes.
    """

    def __init__(self, transport: Transport, queue: RetryQueue, backoff_s: float = 1.0, max_backoff_s: float = 5.0,
                 report_interval_s: float = 30.0):
        self._transport = transport
        self._queue = queue
        self._backoff = Backoff(backoff_s, max_backoff_s)  # the retry thread's own
        self._report_interval_s = report_interval_s
        self._refusals = FailureReport(report_interval_s)
        self._outage_start: float | None = None
        self._last_report = 0.0
        self._counts = collections.Counter(exported=0, rejected=0, failed=0, dropped_retry=0, unsent=0, spooled=0)
        self._cond = threading.Condition()  # guards everything above; notified when the queue gets a request
        self._sending: _Payload | None = None  # taken from the queue by the retry thread
        self._stop_deadline: float | None = None
        self._closed = False
        self._wake = threading.Event()  # cuts a backoff wait short at shutdown
        self._warned_split = False
        self._thread = threading.Thread(target=self._run, name="otel-ebpf-retry", daemon=True)
        self._thread.start()

    @property
    def counts(self) -> dict[str, int]:
        """Spans exported (rejected: of those, refused as partial success), failed (refused whole), dropped_retry
        (oldest dropped from the full queue), unsent (queued in memory at shutdown), spooled (left in the spool)."""
        with self._cond:
            return dict(self._counts)

    @property
    def state(self) -> str:
        """For a person watching: `up`, or how long sends have failed and how much waits."""
        with self._cond:
            if self._outage_start is None:
                return "up"
            return (f"failing for {time.monotonic() - self._outage_start:.0f} s, {self._waiting()} spans waiting "
                    f"({self._describe_queue()})")

    @property
    def waiting(self) -> int:
        """Spans in the queue, such as those an earlier run left in the spool."""
        with self._cond:
            return self._waiting()

    def export(self, batch: Batch, deadline: float) -> None:
        spans = len(batch)
        try:
            data = batch.payload
        except Exception as exc:  # an encoder bug loses this batch, not the export thread
            logger.debug("encoding a batch raised", exc_info=True)
            return self._refused(spans, f"encoding failed: {type(exc).__name__}: {exc}")
        with self._cond:
            if self._queue or self._sending is not None:
                return self._enqueue(data, spans)
        try:
            self._send(data, spans, deadline)
        except RetryableError as exc:
            with self._cond:
                self._note_failure(str(exc))
                for part, count in exc.unsent:
                    self._enqueue(part, count)

    def close(self, deadline: float | None = None) -> None:
        """Send what waits until ``deadline`` (default: now), then stop; later calls do nothing.

        What is still queued then stays in the spool for the next run, or is counted as unsent.
        """
        with self._cond:
            if self._stop_deadline is not None:
                return
            self._stop_deadline = time.monotonic() if deadline is None else deadline
            self._cond.notify()
        self._wake.set()
        # An attempt ends by the deadline (its timeout is cut to it); the slack covers the last bookkeeping.
        self._thread.join(max(0.0, self._stop_deadline - time.monotonic()) + 1.0)
        self._transport.close()
        with self._cond:
            self._counts["spooled" if self._queue.directory else "unsent"] += self._waiting()
            self._queue.close()
            self._closed = True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self._stop_deadline is None:
                    self._cond.wait()
                if not self._queue or (self._stop_deadline is not None and time.monotonic() >= self._stop_deadline):
                    return
                payload = self._sending = self._queue.take()
            if payload.data is None:
                self._refused(payload.spans, f"cannot read {payload.path}")
                self._finish(payload)
                continue
            try:
                self._send(payload.data, payload.spans, self._stop_deadline or float("inf"))
            except RetryableError as exc:
                with self._cond:
                    self._note_failure(str(exc))
                    self._sending = None
                    if exc.unsent == [(payload.data, payload.spans)]:
                        self._counts["dropped_retry"] += self._queue.put_back(payload)
                    else:  # sent in part: what is left goes back to the front instead, before the whole goes
                        for part, count in reversed(exc.unsent):
                            try:
                                self._counts["dropped_retry"] += self._queue.push(part, count, front=True)
                            except OSError as error:  # e.g. the spool's disk is full
                                self._counts["failed"] += count
                                self._refusals.failed(count, f"cannot write to {OTEL_EBPF_SPOOL_DIR}: "
                                                             f"{error.strerror}")
                        self._queue.done(payload)
                    if self._stop_deadline is not None and self._queue.directory:
                        return  # at shutdown, what the spool holds is safe: no point waiting for the backend
                    wait = self._backoff.next(exc.after_s)
                    if self._stop_deadline is not None:
                        wait = min(wait, self._stop_deadline - time.monotonic())
                self._wake.wait(max(0.0, wait))
                self._wake.clear()
                continue
            self._finish(payload)
            self._backoff.reset()

    def _finish(self, payload: _Payload) -> None:
        with self._cond:
            self._queue.done(payload)
            self._sending = None

    def _send(self, data: bytes, spans: int, deadline: float) -> None:
        """One attempt at a request, counted as delivered or refused; a request refused as too large is split in
        halves and each sent so. Raises RetryableError whose ``unsent`` lists the parts still to deliver."""
        try:
            rejected = self._transport.send_once(data, deadline)
        except RetryableError as exc:
            exc.unsent = [(data, spans)]
            raise
        except TooLargeError as exc:
            if spans < 2:
                return self._refused(spans, f"{exc} (a single span)")
            self._note_split(str(exc), spans, len(data))
            parts = halves(data)
            for i, (part, count) in enumerate(parts):
                try:
                    self._send(part, count, deadline)
                except RetryableError as failure:
                    failure.unsent += parts[i + 1:]
                    raise
            return None
        except ExportError as exc:
            return self._refused(spans, str(exc))
        self._delivered(spans, rejected)
        return None

    def _note_split(self, reason: str, spans: int, size: int) -> None:
        if not self._warned_split:
            self._warned_split = True
            logger.warning("the backend refused %d spans (%d bytes) in one request as too large: %s; sending "
                           "such requests in halves (a lower OTEL_BSP_MAX_EXPORT_BATCH_SIZE avoids this)",
                           spans, size, reason)

    def _waiting(self) -> int:
        """Spans queued or being sent; the caller holds the lock."""
        return self._queue.spans + (self._sending.spans if self._sending is not None else 0)

    def _enqueue(self, data: bytes, spans: int) -> None:
        """Queue a request and wake the retry thread; the caller holds the lock."""
        if self._closed:  # an attempt that outlasted the shutdown deadline: too late for the queue
            self._counts["unsent"] += spans
            return
        try:
            self._counts["dropped_retry"] += self._queue.push(data, spans)
        except OSError as exc:  # e.g. the spool's disk is full
            self._counts["failed"] += spans
            self._refusals.failed(spans, f"cannot write to {OTEL_EBPF_SPOOL_DIR}: {exc.strerror}")
        self._cond.notify()

    def _note_failure(self, reason: str) -> None:
        """The first line of an outage, then a summary every report interval; the caller holds the lock."""
        now = time.monotonic()
        if self._outage_start is None:
            self._outage_start = self._last_report = now
            logger.warning("span export failed: %s; retrying with backoff, spans wait in the retry queue (%s) "
                           "meanwhile (repeats are summarised every %gs)",
                           reason, self._describe_queue(), self._report_interval_s)
        elif now - self._last_report >= self._report_interval_s:
            self._last_report = now
            logger.warning("span export failing for %.0fs: %s; %d spans (%d bytes) waiting (%s), %d dropped so far",
                           now - self._outage_start, reason, self._queue.spans, self._queue.bytes,
                           self._describe_queue(), self._counts["dropped_retry"])

    def _describe_queue(self) -> str:
        where = f"in {self._queue.directory}" if self._queue.directory else "in memory"
        return f"{where}, up to {self._queue.bound_setting}={self._queue.max_bytes} bytes"

    def _delivered(self, spans: int, rejected: int) -> None:
        with self._cond:
            self._counts["exported"] += spans
            self._counts["rejected"] += rejected
            if self._outage_start is not None:
                logger.warning("span export recovered after %.1fs; sending the %d waiting spans, oldest first",
                               time.monotonic() - self._outage_start, self._queue.spans)
                self._outage_start = None
        self._refusals.succeeded()

    def _refused(self, spans: int, reason: str) -> None:
        with self._cond:
            self._counts["failed"] += spans
            self._refusals.failed(spans, reason)


def span_exporter(settings: Settings) -> RetryingExporter:
    """The OTLP span sink ``settings`` describe: the transport behind a retry queue, in memory or spooled."""
    transport = otlp_transport(settings.otlp)
    if settings.spool_dir is None:
        queue = RetryQueue(settings.retry_queue_size)
    else:
        queue = RetryQueue(settings.spool_size, settings.spool_dir)
        if queue.spans:
            logger.warning("%d spans an earlier run left in %s are sent first", queue.spans, settings.spool_dir)
    return RetryingExporter(transport, queue)


def halves(data: bytes) -> list[tuple[bytes, int]]:
    """An encoded ExportTraceServiceRequest as two requests of half its spans each (and their span counts),
    every span under its own resource and scope."""
    request = ExportTraceServiceRequest.FromString(data)
    total = sum(len(scope.spans) for group in request.resource_spans for scope in group.scope_spans)
    parts, seen = (ExportTraceServiceRequest(), ExportTraceServiceRequest()), 0
    for group in request.resource_spans:
        added = [None, None]
        for scope in group.scope_spans:
            cut = min(max(total // 2 - seen, 0), len(scope.spans))
            seen += len(scope.spans)
            for side, spans in enumerate((scope.spans[:cut], scope.spans[cut:])):
                if not spans:
                    continue
                if added[side] is None:
                    added[side] = parts[side].resource_spans.add(resource=group.resource, schema_url=group.schema_url)
                added[side].scope_spans.add(scope=scope.scope, schema_url=scope.schema_url, spans=spans)
    return [(parts[0].SerializeToString(), total // 2), (parts[1].SerializeToString(), total - total // 2)]
