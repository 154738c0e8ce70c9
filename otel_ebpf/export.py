"""Moving already-encoded OTLP export requests to a collector, and batching between tracer and network.

The span encoder upstream produces ExportTraceServiceRequest bytes directly, so nothing here builds
SDK span objects: transports send bytes, sinks receive batches, and one background thread does all
network I/O so the ring-buffer drain loop never waits on a collector. The same transports carry
metrics (ExportMetricsServiceRequest); only the gRPC method and the response type depend on the signal.

Retry rules follow the OTLP specification: HTTP 429/502/503/504 and connection failures are retried,
other HTTP errors are not; gRPC retries CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE,
UNAVAILABLE, DATA_LOSS, and RESOURCE_EXHAUSTED only when the server sent RetryInfo. Server hints
(Retry-After, RetryInfo) are honoured; otherwise backoff is exponential with jitter.

Spans survive a backend outage in a RetryQueue of encoded requests (in memory, or spooled to files that a
restarted sidecar sends); RetryingExporter puts a transport behind one.
"""

from __future__ import annotations

import abc
import collections
import email.utils
import fcntl
import functools
import gzip
import logging
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, TextIO
from urllib.parse import urlsplit

import grpc
import requests
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from otel_ebpf import __version__
from otel_ebpf.config import OTEL_EBPF_RETRY_QUEUE_SIZE, OTEL_EBPF_SPOOL_DIR, OTEL_EBPF_SPOOL_SIZE, OtlpSettings, Settings
from otel_ebpf.errors import UserError

logger = logging.getLogger("otel_ebpf.export")

USER_AGENT = f"otel-ebpf/{__version__}"


@dataclass(frozen=True)
class _Signal:
    """What differs between exporting traces and metrics over OTLP."""

    grpc_method: str
    response: type[Message]
    rejected_field: str  # of the response's partial_success
    noun: str  # what rejected_field counts, for messages


_SIGNALS = {
    "traces": _Signal("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                      ExportTraceServiceResponse, "rejected_spans", "spans"),
    "metrics": _Signal("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                       ExportMetricsServiceResponse, "rejected_data_points", "data points"),
}
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_COMPRESSIONS = ("none", "gzip")


class ExportError(Exception):
    """A batch could not be delivered, after any retries; the message is one short line."""


class RetryableError(ExportError):
    """One attempt failed in a way the spec says to retry; ``after_s`` is the server's hint, if it gave one."""

    def __init__(self, reason: str, after_s: float | None = None):
        super().__init__(reason)
        self.after_s = after_s


class _Transport(abc.ABC):
    """The retry loop both OTLP transports share; subclasses make one attempt."""

    def __init__(self, endpoint: str, timeout_s: float, compression: str, backoff_s: float, max_backoff_s: float,
                 signal: str):
        if compression not in _COMPRESSIONS:
            raise UserError(f"unknown OTLP compression {compression!r}", hint="use 'gzip' or 'none'")
        self.endpoint = endpoint
        self.rejected = 0  # spans or metric data points refused as a partial success, in total
        self._signal = _SIGNALS[signal]
        self._timeout_s = timeout_s
        self._gzip = compression == "gzip"
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._closed = threading.Event()
        self._warned_rejection = False

    def send(self, payload: bytes, deadline: float) -> int:
        """Deliver one export request of this transport's signal before ``deadline`` (a time.monotonic() value).

        Returns how many spans or data points the server rejected as a partial success (0 normally);
        these are not retried, as the spec requires. Raises ExportError when delivery is impossible.
        """
        body = self._body(payload)
        backoff = self._backoff_s
        while True:
            if self._closed.is_set():
                raise ExportError(f"{self.endpoint}: exporter closed")
            timeout = min(self._timeout_s, deadline - time.monotonic())
            if timeout <= 0:
                raise ExportError(f"{self.endpoint}: export deadline passed")
            try:
                response = self._attempt(body, timeout)
            except RetryableError as failure:
                wait = max(failure.after_s or 0.0, backoff * random.uniform(0.8, 1.2))
                if time.monotonic() + wait >= deadline:
                    raise ExportError(f"{self.endpoint}: {failure} (retries exhausted by the export deadline)") from None
                if self._closed.wait(wait):
                    raise ExportError(f"{self.endpoint}: {failure} (exporter closed)") from None
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            return self._note_partial_success(response)

    def send_once(self, payload: bytes, deadline: float) -> int:
        """One request, no retry, for a caller that keeps its own retry schedule (RetryingExporter).

        Returns as send() does; raises RetryableError (carrying the server's delay hint) or ExportError.
        """
        timeout = min(self._timeout_s, deadline - time.monotonic())
        if timeout <= 0:
            raise RetryableError(f"{self.endpoint}: export deadline passed")
        try:
            response = self._attempt(self._body(payload), timeout)
        except RetryableError as failure:
            raise RetryableError(f"{self.endpoint}: {failure}", failure.after_s) from None
        return self._note_partial_success(response)

    def export(self, batch: Batch, deadline: float) -> int:
        """Sink interface: send the batch's encoded bytes."""
        return self.send(batch.payload, deadline)

    def close(self) -> None:
        """Stop any retry wait in progress and release connections."""
        self._closed.set()

    def _body(self, payload: bytes) -> bytes:
        """The payload as sent; compressed once per send, not per attempt, where the transport compresses."""
        return payload

    @abc.abstractmethod
    def _attempt(self, body: bytes, timeout_s: float) -> Message:
        """One request: return the response, raise RetryableError or ExportError."""

    def _note_partial_success(self, response: Message) -> int:
        rejected = getattr(response.partial_success, self._signal.rejected_field)
        if rejected > 0:
            self.rejected += rejected
            if not self._warned_rejection:
                self._warned_rejection = True
                logger.warning(
                    "%s rejected %d %s: %s (further rejections are only counted)",
                    self.endpoint, rejected, self._signal.noun,
                    response.partial_success.error_message or "no reason given",
                )
        return rejected


class HttpTransport(_Transport):
    """OTLP/HTTP with binary protobuf, over one keep-alive requests.Session."""

    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str],
        timeout_s: float,
        compression: str = "none",
        certificate: str | None = None,
        client_key: str | None = None,
        client_certificate: str | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 32.0,
        signal: str = "traces",
    ):
        super().__init__(endpoint, timeout_s, compression, backoff_s, max_backoff_s, signal)
        self._session = requests.Session()
        self._session.headers.update(
            {"User-Agent": USER_AGENT, **headers, "Content-Type": "application/x-protobuf"}
        )
        if self._gzip:
            self._session.headers["Content-Encoding"] = "gzip"
        _check_readable(certificate, client_key, client_certificate)
        # Passed per request: requests lets REQUESTS_CA_BUNDLE override a Session's verify setting.
        self._verify = certificate or True
        self._cert = (client_certificate, client_key) if client_certificate and client_key else client_certificate

    def _body(self, payload: bytes) -> bytes:
        return gzip.compress(payload) if self._gzip else payload

    def _attempt(self, body: bytes, timeout_s: float) -> Message:
        try:
            response = self._session.post(
                self.endpoint, data=body, timeout=timeout_s, verify=self._verify, cert=self._cert
            )
        except requests.exceptions.SSLError as exc:
            raise ExportError(f"{self.endpoint}: TLS error: {_short_reason(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RetryableError(_short_reason(exc)) from None
        if response.status_code in _RETRYABLE_HTTP:
            raise RetryableError(f"HTTP {response.status_code}", _parse_retry_after(response.headers.get("Retry-After")))
        if not response.ok:
            raise ExportError(f"{self.endpoint}: HTTP {response.status_code} {_status_message(response.content)}".rstrip())
        try:
            return self._signal.response.FromString(response.content)
        except Exception:  # a 200 with an unreadable body still means the data was accepted
            return self._signal.response()

    def close(self) -> None:
        super().close()
        self._session.close()


class GrpcTransport(_Transport):
    """OTLP/gRPC sending pre-encoded request bytes through a raw unary call (no re-serialization)."""

    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str],
        timeout_s: float,
        compression: str = "none",
        certificate: str | None = None,
        client_key: str | None = None,
        client_certificate: str | None = None,
        insecure: bool = False,
        backoff_s: float = 1.0,
        max_backoff_s: float = 32.0,
        signal: str = "traces",
    ):
        """``http://`` means plaintext and ``https://`` TLS; ``insecure`` decides only without a scheme."""
        super().__init__(endpoint, timeout_s, compression, backoff_s, max_backoff_s, signal)
        target, use_tls = _grpc_target(endpoint, insecure)
        options = [
            ("grpc.primary_user_agent", USER_AGENT),
            # A collector restarting should be reached again within seconds, not after gRPC's default
            # reconnect backoff of up to two minutes: until the channel reconnects, every call fails at once,
            # so this delay adds to RetryingExporter's own backoff.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        compression_algorithm = grpc.Compression.Gzip if self._gzip else grpc.Compression.NoCompression
        if use_tls:
            _check_readable(certificate, client_key, client_certificate)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(certificate),
                private_key=_read(client_key),
                certificate_chain=_read(client_certificate),
            )
            self._channel = grpc.secure_channel(target, credentials, options, compression_algorithm)
        else:
            self._channel = grpc.insecure_channel(target, options, compression_algorithm)
        self._export = self._channel.unary_unary(
            self._signal.grpc_method, request_serializer=None, response_deserializer=self._signal.response.FromString
        )
        self._metadata = [(name.lower(), value) for name, value in headers.items()]

    def _attempt(self, payload: bytes, timeout_s: float) -> Message:
        try:
            return self._export(payload, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            reason = f"gRPC {code.name}: {exc.details()}"
            retry_delay = _grpc_retry_delay(exc.trailing_metadata())
            if code in _RETRYABLE_GRPC or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay is not None):
                raise RetryableError(reason, retry_delay) from None
            raise ExportError(f"{self.endpoint}: {reason}") from None

    def close(self) -> None:
        super().close()
        self._channel.close()


def otlp_transport(otlp: OtlpSettings) -> HttpTransport | GrpcTransport:
    """The transport ``otlp`` describes, for the signal it was resolved for."""
    options = dict(
        compression=otlp.compression, certificate=otlp.certificate, client_key=otlp.client_key,
        client_certificate=otlp.client_certificate, signal=otlp.signal,
    )
    if otlp.protocol == "grpc":
        return GrpcTransport(otlp.endpoint, otlp.headers, otlp.timeout_s, insecure=otlp.insecure, **options)
    return HttpTransport(otlp.endpoint, otlp.headers, otlp.timeout_s, **options)


def _grpc_target(endpoint: str, insecure: bool) -> tuple[str, bool]:
    """gRPC target ("host:port") and whether to use TLS, from an OTLP endpoint setting."""
    if "://" not in endpoint:
        return endpoint.rstrip("/"), not insecure
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"bad OTLP/gRPC endpoint {endpoint!r}", hint="use http://host:port, https://host:port or host:port")
    return parts.netloc, parts.scheme == "https"


def _grpc_retry_delay(trailing_metadata) -> float | None:
    """Seconds from a RetryInfo in the rich error status (grpc-status-details-bin), if any."""
    for key, value in trailing_metadata or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.ToNanoseconds() / 1e9
    return None


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _status_message(body: bytes) -> str:
    """The message of a google.rpc.Status error body, or '' if the body is something else."""
    try:
        return status_pb2.Status.FromString(body).message
    except Exception:
        return ""


def _short_reason(exc: Exception) -> str:
    """'Connection refused' instead of requests' multi-level exception text."""
    if isinstance(exc, requests.Timeout):
        return "request timed out"
    text = " ".join(str(exc).split())
    cause = re.search(r"\[(?:Errno -?\d+|SSL: \w+)\] ([^'\")\]]+)", text)
    return cause.group(1).strip() if cause else text[:160]


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _check_readable(*paths: str | None) -> None:
    """Report a missing TLS file at startup, not as a failed export later."""
    for path in paths:
        if path is None:
            continue
        try:
            _read(path)
        except OSError as exc:
            raise UserError(f"cannot read TLS file {path}: {exc.strerror}", hint="check the OTLP certificate settings") from None


# ----- batching


class Batch:
    """Items exported together; encoded at most once, however many sinks need the bytes."""

    def __init__(self, items: list, encode: Callable[[list], bytes] | None):
        self.items = items
        self._encode = encode

    @functools.cached_property
    def payload(self) -> bytes:
        if self._encode is None:
            raise ExportError("no OTLP encoder configured")
        return self._encode(self.items)


class Sink(Protocol):
    def export(self, batch: Batch, deadline: float) -> int | None:
        """Deliver the batch or raise; may return how many items the destination rejected."""

    def close(self) -> None: ...


class ConsoleSink:
    """Writes one line per item, for --console and debugging without a collector."""

    def __init__(self, format: Callable[[object], str], stream: TextIO | None = None):
        self._format = format
        self._stream = stream if stream is not None else sys.stdout

    def export(self, batch: Batch, deadline: float) -> int:
        self._stream.write("".join(f"{self._format(item)}\n" for item in batch.items))
        self._stream.flush()
        return 0

    def close(self) -> None:
        self._stream.flush()


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


# ----- surviving backend outages


@dataclass
class _Payload:
    """One encoded export request in a RetryQueue: ``data`` in memory, or only in the spool file ``path``."""

    spans: int
    size: int
    data: bytes | None = None
    path: str | None = None


_SPOOL_FILE = re.compile(r"(\d+)-(\d+)\.binpb")  # sequence number, spans in it


class RetryQueue:
    """Encoded export requests waiting for a backend that failed, oldest first, at most ``max_bytes`` of them:
    past that the oldest are dropped, since the newest say more about the present.

    With ``directory`` the queue is a spool like the Collector's persistent queue: one file per request, written
    under a temporary name and then renamed (so a file is always whole), deleted once delivered; the next run
    finds them and sends them first. Not thread-safe: RetryingExporter holds its lock around every call.
    """

    def __init__(self, max_bytes: int, directory: str | None = None):
        self.max_bytes = max_bytes
        self.directory = directory
        self.bytes = self.spans = 0
        self._entries: collections.deque[_Payload] = collections.deque()
        self._next_sequence = 0
        self._lock_file = None
        if directory is not None:
            self._open_spool(directory)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bound_setting(self) -> str:
        """The variable that sets ``max_bytes``, for messages."""
        return OTEL_EBPF_SPOOL_SIZE if self.directory else OTEL_EBPF_RETRY_QUEUE_SIZE

    def push(self, data: bytes, spans: int) -> int:
        """Queue a request last; returns the spans dropped to stay within the bound (maybe this request's).

        Raises OSError when the spool file cannot be written; the request is not queued then.
        """
        payload = _Payload(spans, len(data), data)
        if self.directory is not None:
            payload = self._write(payload)
        self._append(payload, left=False)
        return self._trim()

    def take(self) -> _Payload | None:
        """The oldest request, out of the queue (and of the bound) while it is being sent: give it back with
        put_back() or finish it with done(). Its data is None if its spool file cannot be read."""
        if not self._entries:
            return None
        payload = self._entries.popleft()
        self.bytes -= payload.size
        self.spans -= payload.spans
        if payload.path is not None:
            try:
                with open(payload.path, "rb") as f:
                    payload.data = f.read()
            except OSError:  # removed or damaged by someone else: data stays None, the caller drops it
                pass
        return payload

    def put_back(self, payload: _Payload) -> int:
        """Return an undelivered request to the front; returns the spans dropped to stay within the bound."""
        if payload.path is not None:
            payload.data = None
        self._append(payload, left=True)
        return self._trim()

    def done(self, payload: _Payload) -> None:
        """Forget a request that was delivered or refused."""
        if payload.path is not None:
            _remove(payload.path)

    def close(self) -> None:
        """Let another process use the spool directory; queued files stay for it."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _append(self, payload: _Payload, left: bool) -> None:
        (self._entries.appendleft if left else self._entries.append)(payload)
        self.bytes += payload.size
        self.spans += payload.spans

    def _trim(self) -> int:
        dropped = 0
        while self.bytes > self.max_bytes:
            oldest = self._entries.popleft()
            self.bytes -= oldest.size
            self.spans -= oldest.spans
            self.done(oldest)
            dropped += oldest.spans
        return dropped

    def _open_spool(self, directory: str) -> None:
        """Lock the directory (two writers would delete each other's files) and queue the files found there."""
        setting = f"{OTEL_EBPF_SPOOL_DIR}={directory!r}"
        try:
            os.makedirs(directory, exist_ok=True)
            self._lock_file = open(os.path.join(directory, ".lock"), "a")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            names = os.listdir(directory)
        except BlockingIOError:
            raise UserError(f"{setting} is in use by another otel-ebpf", "give each otel-ebpf its own spool directory") from None
        except OSError as exc:
            raise UserError(f"{setting} cannot be used: {exc.strerror}",
                            f"make {OTEL_EBPF_SPOOL_DIR} a directory otel-ebpf can create and write") from None
        found = []
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".tmp"):  # a write interrupted by a crash: never complete, never renamed
                _remove(path)
            elif match := _SPOOL_FILE.fullmatch(name):
                found.append((int(match[1]), int(match[2]), path))
        for sequence, spans, path in sorted(found):
            self._append(_Payload(spans, os.path.getsize(path), path=path), left=False)
            self._next_sequence = sequence + 1

    def _write(self, payload: _Payload) -> _Payload:
        path = os.path.join(self.directory, f"{self._next_sequence:020d}-{payload.spans}.binpb")
        self._next_sequence += 1
        try:
            with open(f"{path}.tmp", "wb") as f:
                f.write(payload.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(f"{path}.tmp", path)
        except OSError:
            _remove(f"{path}.tmp")
            raise
        return _Payload(payload.spans, payload.size, path=path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class RetryingExporter:
    """The OTLP sink for spans: a transport behind a RetryQueue, counting what it delivers and what it loses.

    While nothing waits in the queue, the export thread sends a batch at once, in one attempt, so a slow backend
    slows the drain loop and events wait in the kernel's ring buffer. A failure worth retrying queues that batch,
    and every later one then goes straight to the queue without an attempt, so the drain loop keeps emptying the
    ring buffer through an outage. One thread sends the queue oldest first, probing the backend with exponential
    backoff, capped low so that a backend that is back is noticed within seconds; once the queue is empty,
    batches are sent at once again. A request the backend refuses (HTTP 400...) is dropped alone.
    """

    def __init__(self, transport: _Transport, queue: RetryQueue, backoff_s: float = 1.0, max_backoff_s: float = 5.0,
                 report_interval_s: float = 30.0):
        self._transport = transport
        self._queue = queue
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
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
        self._thread = threading.Thread(target=self._run, name="otel-ebpf-retry", daemon=True)
        self._thread.start()

    @property
    def counts(self) -> dict[str, int]:
        """Spans exported (rejected: of those, refused as partial success), failed (refused whole), dropped_retry
        (oldest dropped from the full queue), unsent (queued in memory at shutdown), spooled (left in the spool)."""
        with self._cond:
            return dict(self._counts)

    @property
    def waiting(self) -> int:
        """Spans in the queue, such as those an earlier run left in the spool."""
        with self._cond:
            return self._waiting()

    def export(self, batch: Batch, deadline: float) -> None:
        spans = len(batch.items)
        try:
            data = batch.payload
        except Exception as exc:  # an encoder bug loses this batch, not the export thread
            logger.debug("encoding a batch raised", exc_info=True)
            return self._refused(spans, f"encoding failed: {type(exc).__name__}: {exc}")
        with self._cond:
            if self._queue or self._sending is not None:
                return self._enqueue(data, spans)
        try:
            rejected = self._transport.send_once(data, deadline)
        except RetryableError as exc:
            with self._cond:
                self._note_failure(str(exc))
                return self._enqueue(data, spans)
        except ExportError as exc:
            return self._refused(spans, str(exc))
        self._delivered(spans, rejected)

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
        backoff = self._backoff_s
        while True:
            with self._cond:
                while not self._queue and self._stop_deadline is None:
                    self._cond.wait()
                if not self._queue or (self._stop_deadline is not None and time.monotonic() >= self._stop_deadline):
                    return
                payload = self._sending = self._queue.take()
            try:
                if payload.data is None:
                    raise ExportError(f"cannot read {payload.path}")
                rejected = self._transport.send_once(payload.data, self._stop_deadline or float("inf"))
            except RetryableError as exc:
                with self._cond:
                    self._note_failure(str(exc))
                    self._sending = None
                    self._counts["dropped_retry"] += self._queue.put_back(payload)
                    if self._stop_deadline is not None and self._queue.directory:
                        return  # at shutdown, what the spool holds is safe: no point waiting for the backend
                    wait = max(exc.after_s or 0.0, backoff * random.uniform(0.8, 1.2))
                    if self._stop_deadline is not None:
                        wait = min(wait, self._stop_deadline - time.monotonic())
                self._wake.wait(max(0.0, wait))
                self._wake.clear()
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            except ExportError as exc:
                self._refused(payload.spans, str(exc))
            else:
                self._delivered(payload.spans, rejected)
            with self._cond:
                self._queue.done(payload)
                self._sending = None
            backoff = self._backoff_s

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


class BatchProcessor:
    """Bounded queue between the ring-buffer drain loop (producer, must never block) and one export thread.

    The drain loop asks for room() before reading the ring buffer, so a slow exporter leaves events in
    the kernel's ring buffer (compact, bounded, counted when full) instead of piling up Python objects.

    Spans are counted where they can be lost: by the RetryingExporter among the sinks if there is one (the
    console cannot lose them), else here."""

    def __init__(
        self,
        encode: Callable[[list], bytes] | None,
        sinks: list[Sink],
        max_queue_size: int,
        max_batch_size: int,
        schedule_delay_s: float,
        export_timeout_s: float,
        report_interval_s: float = 30.0,
    ):
        self._encode = encode
        self._sinks = sinks
        self._exporter = next((sink for sink in sinks if isinstance(sink, RetryingExporter)), None)
        self._max_queue_size = max_queue_size
        self._max_batch_size = max_batch_size
        self._schedule_delay_s = schedule_delay_s
        self._export_timeout_s = export_timeout_s
        self._report = FailureReport(report_interval_s)
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()  # items queued, or shutdown
        self._has_room = threading.Condition(self._cond)  # the export thread took items
        self._stop_deadline: float | None = None
        self._exported = self._dropped_full = self._dropped_shutdown = self._failed = self._rejected = 0
        self._thread = threading.Thread(target=self._run, name="otel-ebpf-export", daemon=True)
        self._thread.start()

    def add(self, items: list) -> None:
        """Queue items without blocking; what does not fit is dropped and counted."""
        with self._cond:
            if self._stop_deadline is not None:
                self._dropped_shutdown += len(items)
                return
            room = self._max_queue_size - len(self._queue)
            if len(items) > room:
                self._dropped_full += len(items) - room
                items = items[:room]
            self._queue.extend(items)
            if len(self._queue) >= self._max_batch_size:
                self._cond.notify()

    def room(self) -> int:
        with self._cond:
            return self._max_queue_size - len(self._queue)

    def wait_for_room(self, timeout_s: float) -> None:
        with self._cond:
            if len(self._queue) >= self._max_queue_size:
                self._has_room.wait(timeout_s)

    def shutdown(self, timeout_s: float) -> None:
        """Export everything queued within ``timeout_s``, then close the sinks; later calls do nothing."""
        with self._cond:
            if self._stop_deadline is not None:
                return
            deadline = self._stop_deadline = time.monotonic() + timeout_s
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._exporter is not None:
            self._exporter.close(deadline)  # what is left of the time goes to the retry queue
        # Closing interrupts a retry still waiting on a dead collector; the thread then ends quickly.
        close_all(self._sinks)
        self._thread.join(1.0)
        with self._cond:
            self._dropped_shutdown += len(self._queue)
            self._queue.clear()

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
                if len(self._queue) < self._max_batch_size and self._stop_deadline is None:
                    self._cond.wait(self._schedule_delay_s)
                take = min(len(self._queue), self._max_batch_size)
                items = [self._queue.popleft() for _ in range(take)]
                if items:
                    self._has_room.notify()
                stopping = self._stop_deadline is not None
                if not items and stopping:
                    return
            if items:
                self._export(items)

    def _export(self, items: list) -> None:
        deadline = time.monotonic() + self._export_timeout_s
        if self._stop_deadline is not None:
            deadline = min(deadline, self._stop_deadline)
        rejected, failure = deliver(self._sinks, Batch(items, self._encode), deadline)
        with self._cond:
            self._rejected += rejected
            if failure is None:
                self._exported += len(items)
            else:
                self._failed += len(items)
        if failure is None:
            self._report.succeeded()
        else:
            self._report.failed(len(items), failure)
