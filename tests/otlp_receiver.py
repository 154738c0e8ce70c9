"""A real OTLP trace and metrics receiver (gRPC and HTTP) on 127.0.0.1, for tests and the benchmark.

Exporters are tested against this instead of mocks so that framing, compression, metadata and
status codes go through the same libraries a collector would use. It can be told to answer
errors for the next N requests, and it can be stopped and started again on the same ports to
simulate a collector outage.
"""

from __future__ import annotations

import gzip
import socket
import ssl
import subprocess
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

_FAILURE_MESSAGE = "injected failure"

# Per signal: HTTP path, request type, response type and the partial-success field counting rejected items.
_SIGNALS = {
    trace_service_pb2.ExportTraceServiceRequest: (
        "/v1/traces", trace_service_pb2.ExportTraceServiceResponse, "rejected_spans"),
    metrics_service_pb2.ExportMetricsServiceRequest: (
        "/v1/metrics", metrics_service_pb2.ExportMetricsServiceResponse, "rejected_data_points"),
}
_REQUEST_BY_PATH = {path: request for request, (path, _, _) in _SIGNALS.items()}


def any_value(value: AnyValue):
    """Plain Python value of an OTLP AnyValue, so tests can compare attributes with ==."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _flatten(requests, resources: str, scopes: str, items: str) -> list[tuple[dict, object]]:
    """(resource attributes, item) for every span or metric in export requests: both signals nest alike."""
    out = []
    for request in requests:
        for group in getattr(request, resources):
            attributes = {kv.key: any_value(kv.value) for kv in group.resource.attributes}
            for scope in getattr(group, scopes):
                out.extend((attributes, item) for item in getattr(scope, items))
    return out


class _Failures:
    """What to answer instead of success, for a given number of upcoming requests."""

    def __init__(self, count: int, http_status: int, grpc_code: grpc.StatusCode, retry_after_s: float | None):
        self.count = count
        self.http_status = http_status
        self.grpc_code = grpc_code
        self.retry_after_s = retry_after_s


class OtlpReceiver:
    """Collects trace and metrics export requests over OTLP/gRPC and OTLP/HTTP; thread-safe.

    ``tls=(cert_file, key_file)`` serves both transports over TLS (endpoints become https); with ``client_ca``
    too, clients must present a certificate that CA signed (mutual TLS).
    Failures, partial success and the counters below apply to both signals alike.
    """

    def __init__(self, tls: tuple[str, str] | None = None, client_ca: str | None = None):
        self.tls = tls
        self.client_ca = client_ca
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []  # per accepted request of either signal, lower-case names
        self.attempts = 0  # every export request, including the ones answered with an error
        self.bytes_received = 0  # HTTP: body as sent (compressed if gzip); gRPC: message size
        self.partial_success: tuple[int, str] | None = None  # (rejected spans or data points, error_message)
        self._failures: _Failures | None = None
        self._cond = threading.Condition()
        self._grpc_port = 0
        self._http_port = 0
        self._grpc_server: grpc.Server | None = None
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None

    # ----- lifecycle

    def start(self) -> OtlpReceiver:
        """Listen on ephemeral ports the first time, on the same ports after a stop()."""
        self._grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), self._grpc_server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self._grpc_server)
        address = f"127.0.0.1:{self._grpc_port}"
        if self.tls:
            cert, key = (Path(path).read_bytes() for path in self.tls)
            client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
            credentials = grpc.ssl_server_credentials([(key, cert)], client_ca, require_client_auth=bool(client_ca))
            port = self._grpc_server.add_secure_port(address, credentials)
        else:
            port = self._grpc_server.add_insecure_port(address)
        self._grpc_port = port
        self._grpc_server.start()

        self._http_server = _HttpServer(("127.0.0.1", self._http_port), self)
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
            self._http_server.socket = context.wrap_socket(self._http_server.socket, server_side=True)
        self._http_port = self._http_server.server_address[1]
        self._http_thread = threading.Thread(target=self._http_server.serve_forever, args=(0.05,), daemon=True)
        self._http_thread.start()
        return self

    def stop(self) -> None:
        """Close listeners and open connections, so clients see the outage immediately."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait()
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.close_connections()
            self._http_server.server_close()
            self._http_thread.join()
            self._http_server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def grpc_endpoint(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """Traces over HTTP; gRPC serves both signals on grpc_endpoint."""
        return f"{self._scheme}://127.0.0.1:{self._http_port}/v1/traces"

    @property
    def http_metrics_endpoint(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._http_port}/v1/metrics"

    @property
    def _scheme(self) -> str:
        return "https" if self.tls else "http"

    # ----- behaviour knobs

    def fail_next(
        self,
        count: int,
        http_status: int = 503,
        grpc_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        retry_after_s: float | None = None,
    ) -> None:
        """Answer the next ``count`` requests with an error (HTTP Retry-After / gRPC RetryInfo if given)."""
        with self._cond:
            self._failures = _Failures(count, http_status, grpc_code, retry_after_s)

    # ----- results

    def spans(self) -> list[tuple[dict, Span]]:
        """Every received span with its resource attributes, in arrival order."""
        with self._cond:
            return _flatten(self.requests, "resource_spans", "scope_spans", "spans")

    def wait_for_spans(self, n: int, timeout: float = 5.0) -> list[tuple[dict, Span]]:
        """Block until at least ``n`` spans arrived; fail the test with what did arrive otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._span_count() < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"expected {n} spans within {timeout}s, got {self._span_count()} "
                        f"in {len(self.requests)} requests ({self.attempts} attempts)"
                    )
                self._cond.wait(remaining)
        return self.spans()

    def _span_count(self) -> int:
        return sum(len(ss.spans) for req in self.requests for rs in req.resource_spans for ss in rs.scope_spans)

    def metrics(self) -> list[tuple[dict, Metric]]:
        """Every received metric with its resource attributes, in arrival order."""
        with self._cond:
            return _flatten(self.metric_requests, "resource_metrics", "scope_metrics", "metrics")

    def wait_for_metric(
        self, name: str, predicate: Callable[[Metric], bool] = lambda metric: True, timeout: float = 5.0
    ) -> tuple[dict, Metric]:
        """The latest metric called ``name`` satisfying ``predicate``, waiting for it to arrive; fail otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matches = [(r, m) for r, m in self.metrics() if m.name == name and predicate(m)]
                if matches:
                    return matches[-1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({m.name for _, m in self.metrics()})
                    raise AssertionError(
                        f"no matching metric {name!r} within {timeout}s; got {len(self.metric_requests)} "
                        f"metric requests ({self.attempts} attempts) with metrics {names}"
                    )
                self._cond.wait(remaining)

    # ----- shared by both transports and signals

    def _receive(self, request: Message, headers: dict[str, str], size: int) -> _Failures | Message:
        """Record one request of either signal; return the failure to answer, or the success response."""
        _, response_type, rejected_field = _SIGNALS[type(request)]
        with self._cond:
            self.attempts += 1
            self.bytes_received += size
            failures = self._failures
            if failures is not None and failures.count > 0:
                failures.count -= 1
                return failures
            is_trace = isinstance(request, trace_service_pb2.ExportTraceServiceRequest)
            (self.requests if is_trace else self.metric_requests).append(request)
            self.headers.append(headers)
            self._cond.notify_all()
            response = response_type()
            if self.partial_success is not None:
                rejected, response.partial_success.error_message = self.partial_success
                setattr(response.partial_success, rejected_field, rejected)
            return response


@dataclass(frozen=True)
class Certificates:
    """PEM files of a test CA and of a server (for 127.0.0.1) and a client certificate it signed."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @property
    def server(self) -> tuple[str, str]:
        """What OtlpReceiver(tls=...) takes."""
        return self.server_cert, self.server_key


def make_certificates(directory: Path) -> Certificates:
    """A CA and two certificates it signed, made by the openssl command (1 day, EC P-256)."""

    def openssl_req(name: str, *args: str) -> tuple[str, str]:
        cert, key = str(directory / f"{name}.pem"), str(directory / f"{name}-key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-keyout", key, "-out", cert, "-subj", f"/CN=otel-ebpf test {name}",
                        *args], check=True, capture_output=True)
        return cert, key

    ca, ca_key = openssl_req("ca")
    leaf = ("-CA", ca, "-CAkey", ca_key, "-addext", "basicConstraints=critical,CA:FALSE")
    server = openssl_req("server", *leaf, "-addext", "subjectAltName=IP:127.0.0.1")
    client = openssl_req("client", *leaf, "-addext", "extendedKeyUsage=clientAuth")
    return Certificates(ca, *server, *client)


class _Servicer:
    """The gRPC Export method, the same for both services."""

    def __init__(self, receiver: OtlpReceiver):
        self._receiver = receiver

    def Export(self, request, context):
        headers = {key.lower(): value for key, value in context.invocation_metadata()}
        answer = self._receiver._receive(request, headers, request.ByteSize())
        if isinstance(answer, _Failures):
            if answer.retry_after_s is not None:
                context.set_trailing_metadata([("grpc-status-details-bin", _retry_status(answer).SerializeToString())])
            context.abort(answer.grpc_code, _FAILURE_MESSAGE)
        return answer


class _TraceServicer(_Servicer, trace_service_pb2_grpc.TraceServiceServicer):
    pass


class _MetricsServicer(_Servicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    pass


def _retry_status(failures: _Failures) -> status_pb2.Status:
    """google.rpc.Status carrying RetryInfo, the OTLP/gRPC throttling signal."""
    delay = Duration()
    delay.FromNanoseconds(int(failures.retry_after_s * 1e9))
    status = status_pb2.Status(code=failures.grpc_code.value[0], message=_FAILURE_MESSAGE)
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


class _HttpServer(ThreadingHTTPServer):
    """Keeps track of accepted connections so stop() can cut keep-alive clients off."""

    daemon_threads = True

    def __init__(self, address, receiver: OtlpReceiver):
        self.receiver = receiver
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _HttpHandler)

    def get_request(self):
        conn, address = super().get_request()
        with self._connections_lock:
            self._connections.add(conn)
        return conn, address

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector does
    server: _HttpServer

    def do_POST(self) -> None:
        request_type = _REQUEST_BY_PATH.get(self.path)
        if request_type is None:
            return self._reply(404, b"")
        if self.headers.get("Content-Type") != "application/x-protobuf":
            return self._reply(415, b"")
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        size = len(body)
        try:
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = request_type.FromString(body)
        except Exception as exc:  # any undecodable body is the client's fault: 400, as the spec says
            return self._reply(400, status_pb2.Status(message=str(exc)).SerializeToString())
        headers = {key.lower(): value for key, value in self.headers.items()}
        answer = self.server.receiver._receive(request, headers, size)
        if isinstance(answer, _Failures):
            extra = {} if answer.retry_after_s is None else {"Retry-After": f"{answer.retry_after_s:g}"}
            return self._reply(answer.http_status, status_pb2.Status(message=_FAILURE_MESSAGE).SerializeToString(), extra)
        self._reply(200, answer.SerializeToString())

    def _reply(self, code: int, body: bytes, extra_headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        """Silence per-request logging on stderr."""
