"""OTLP transports: already-encoded export requests to a collector over HTTP/protobuf or gRPC.

The span encoder upstream produces ExportTraceServiceRequest bytes directly, so nothing here builds SDK span
objects: transports send bytes. The same transports carry metrics (ExportMetricsServiceRequest); only the gRPC
method and the response type depend on the signal.

Each transport's _attempt makes one request and says how it ended: a response, RetryableError or ExportError.
Retry rules follow the OTLP specification: HTTP 429/502/503/504 and connection failures are retried, other HTTP
errors are not; gRPC retries CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS, and
RESOURCE_EXHAUSTED only when the server sent RetryInfo. A request refused for its size (HTTP 413, or the 400 "request
body too large" of Go servers such as the Collector; gRPC RESOURCE_EXHAUSTED "larger than max") raises
TooLargeError, which a caller can answer by sending the request in parts. send() retries on the Backoff schedule, honouring
the server's hints (Retry-After, RetryInfo); send_once() leaves retrying to its caller (RetryingExporter).
"""

from __future__ import annotations

import abc
import email.utils
import gzip
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc
import requests
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from otel_ebpf import __version__
from otel_ebpf.config import OtlpSettings
from otel_ebpf.errors import UserError
from otel_ebpf.otlp.backoff import Backoff

if TYPE_CHECKING:
    from otel_ebpf.pipeline import Batch

logger = logging.getLogger(__name__)

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


class TooLargeError(ExportError):
    """The server refused the request for its size; smaller requests with the same spans may pass."""


class RetryableError(ExportError):
    """One attempt failed in a way the spec says to retry; ``after_s`` is the server's hint, if it gave one."""

    def __init__(self, reason: str, after_s: float | None = None):
        super().__init__(reason)
        self.after_s = after_s


class Transport(abc.ABC):
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
        backoff = Backoff(self._backoff_s, self._max_backoff_s)
        while True:
            if self._closed.is_set():
                raise ExportError(f"{self.endpoint}: exporter closed")
            timeout = min(self._timeout_s, deadline - time.monotonic())
            if timeout <= 0:
                raise ExportError(f"{self.endpoint}: export deadline passed")
            try:
                response = self._attempt(body, timeout)
            except RetryableError as failure:
                wait = backoff.next(failure.after_s)
                if time.monotonic() + wait >= deadline:
                    raise ExportError(
                        f"{self.endpoint}: {failure} (retries exhausted by the export deadline)") from None
                if self._closed.wait(wait):
                    raise ExportError(f"{self.endpoint}: {failure} (exporter closed)") from None
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


class HttpTransport(Transport):
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
            hint = _parse_retry_after(response.headers.get("Retry-After"))
            raise RetryableError(f"HTTP {response.status_code}", hint)
        if not response.ok:
            message = _status_message(response.content)
            if response.status_code == 413 or (response.status_code == 400 and "too large" in message):
                raise TooLargeError(f"{self.endpoint}: HTTP {response.status_code} {message}".rstrip())
            raise ExportError(f"{self.endpoint}: HTTP {response.status_code} {message}".rstrip())
        try:
            return self._signal.response.FromString(response.content)
        except Exception:  # a 200 with an unreadable body still means the data was accepted
            return self._signal.response()

    def close(self) -> None:
        super().close()
        self._session.close()


class GrpcTransport(Transport):
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
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (exc.details() or ""):
                raise TooLargeError(f"{self.endpoint}: {reason}") from None
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
        raise UserError(f"bad OTLP/gRPC endpoint {endpoint!r}",
                        hint="use http://host:port, https://host:port or host:port")
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
            raise UserError(f"cannot read TLS file {path}: {exc.strerror}",
                            hint="check the OTLP certificate settings") from None
