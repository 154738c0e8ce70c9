"""Transports and BatchProcessor against a real OTLP receiver on 127.0.0.1."""

import io
import logging
import os
import shutil
import socket
import threading
import time

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ebpf.config import load_settings
from otel_ebpf.errors import UserError
from otel_ebpf.export import (
    USER_AGENT,
    Batch,
    BatchProcessor,
    ConsoleSink,
    ExportError,
    GrpcTransport,
    HttpTransport,
    RetryableError,
    RetryingExporter,
    RetryQueue,
    _parse_retry_after,
    otlp_transport,
    span_exporter,
)
from tests.otlp_receiver import OtlpReceiver, make_certificates

FAST = dict(backoff_s=0.01, max_backoff_s=0.05)


def encode(names) -> bytes:
    """A real ExportTraceServiceRequest with one span per name."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", "test-svc"
    scope_spans = resource_spans.scope_spans.add()
    for name in names:
        span = scope_spans.spans.add()
        span.name = str(name)
        span.trace_id = b"\x01" * 16
        span.span_id = b"\x02" * 8
    return request.SerializeToString()


def encode_metrics(names) -> bytes:
    """A real ExportMetricsServiceRequest with one gauge per name."""
    request = ExportMetricsServiceRequest()
    scope_metrics = request.resource_metrics.add().scope_metrics.add()
    for name in names:
        metric = scope_metrics.metrics.add()
        metric.name = str(name)
        metric.gauge.data_points.add().as_int = 1
    return request.SerializeToString()


ENCODE = {"traces": encode, "metrics": encode_metrics}


def make_transport(kind: str, receiver: OtlpReceiver, signal: str = "traces", **kwargs):
    options = dict(headers={}, timeout_s=2.0, signal=signal, **FAST) | kwargs
    if kind == "grpc":
        return GrpcTransport(receiver.grpc_endpoint, **options)
    return HttpTransport(receiver.http_endpoint if signal == "traces" else receiver.http_metrics_endpoint, **options)


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(params=["grpc", "http"])
def kind(request):
    return request.param


@pytest.fixture
def transports():
    """Transports made by a test, closed afterwards even when it fails."""
    made = []

    def make(kind, receiver, signal="traces", **kwargs):
        made.append(make_transport(kind, receiver, signal, **kwargs))
        return made[-1]

    yield make
    for transport in made:
        transport.close()


@pytest.fixture(params=["traces", "metrics"])
def signal(request):
    return request.param


def names_received(receiver, signal="traces"):
    received = receiver.spans() if signal == "traces" else receiver.metrics()
    return [item.name for _, item in received]


# ----- transports


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_payload_and_headers_arrive(kind, compression, receiver, transports):
    transport = transports(kind, receiver, headers={"Authorization": "Bearer s3cret"}, compression=compression)
    payload = encode(f"span-{i}" for i in range(50))

    assert transport.send(payload, time.monotonic() + 5) == 0

    spans = receiver.wait_for_spans(50)
    assert [span.name for _, span in spans] == [f"span-{i}" for i in range(50)]
    assert spans[0][0] == {"service.name": "test-svc"}
    headers = receiver.headers[0]
    assert headers["authorization"] == "Bearer s3cret"
    assert headers["user-agent"].startswith(USER_AGENT)
    if kind == "http":  # a gRPC server never sees the wire encoding, so only HTTP can show it
        assert headers["content-type"] == "application/x-protobuf"
        if compression == "gzip":
            assert headers["content-encoding"] == "gzip"
            assert receiver.bytes_received < len(payload) / 2
        else:
            assert receiver.bytes_received == len(payload)


def test_retryable_failures_are_retried_and_delivered_once(kind, signal, receiver, transports):
    transport = transports(kind, receiver, signal)
    receiver.fail_next(3, http_status=503, grpc_code=grpc.StatusCode.UNAVAILABLE)

    transport.send(ENCODE[signal](["a"]), time.monotonic() + 5)

    assert receiver.attempts == 4
    assert names_received(receiver, signal) == ["a"]


@pytest.mark.parametrize("http_status", [429, 502, 504])
def test_other_retryable_http_statuses(http_status, receiver, transports):
    transport = transports("http", receiver)
    receiver.fail_next(1, http_status=http_status)

    transport.send(encode(["a"]), time.monotonic() + 5)

    assert receiver.attempts == 2
    assert names_received(receiver) == ["a"]


def test_server_retry_delay_is_honoured(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.fail_next(1, retry_after_s=0.4)

    start = time.monotonic()
    transport.send(encode(["a"]), start + 5)

    assert time.monotonic() - start >= 0.4
    assert names_received(receiver) == ["a"]


def test_resource_exhausted_is_retried_only_with_retry_info(receiver, transports):
    transport = transports("grpc", receiver)
    receiver.fail_next(1, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=0.05)
    transport.send(encode(["a"]), time.monotonic() + 5)
    assert names_received(receiver) == ["a"]

    receiver.fail_next(1, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(ExportError, match="RESOURCE_EXHAUSTED"):
        transport.send(encode(["b"]), time.monotonic() + 5)
    assert receiver.attempts == 3


def test_non_retryable_failure_raises_at_once(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.fail_next(1, http_status=400, grpc_code=grpc.StatusCode.INVALID_ARGUMENT)

    start = time.monotonic()
    with pytest.raises(ExportError, match="400|INVALID_ARGUMENT") as info:
        transport.send(encode(["a"]), start + 10)

    assert time.monotonic() - start < 1
    assert receiver.attempts == 1
    assert "injected failure" in str(info.value)
    assert "\n" not in str(info.value)


def test_deadline_is_respected_when_collector_is_down(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.stop()

    start = time.monotonic()
    with pytest.raises(ExportError) as info:
        transport.send(encode(["a"]), start + 0.5)

    assert time.monotonic() - start < 0.5 + 0.3
    assert str(info.value).startswith(transport.endpoint)
    assert "\n" not in str(info.value)


def test_delivery_resumes_after_collector_restart(kind, receiver, transports):
    transport = transports(kind, receiver)
    transport.send(encode(["before"]), time.monotonic() + 5)
    receiver.stop()
    with pytest.raises(ExportError):
        transport.send(encode(["lost"]), time.monotonic() + 0.3)

    receiver.start()
    transport.send(encode(["after"]), time.monotonic() + 10)

    assert names_received(receiver) == ["before", "after"]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_metrics_arrive_at_the_metrics_service(kind, compression, receiver, transports):
    transport = transports(kind, receiver, "metrics", compression=compression)

    assert transport.send(encode_metrics(["a.count", "b.count"]), time.monotonic() + 5) == 0

    assert names_received(receiver, "metrics") == ["a.count", "b.count"]
    assert receiver.requests == [], "a metrics request must not reach the trace service"


def test_partial_success_is_counted_not_retried(kind, signal, receiver, transports, caplog):
    transport = transports(kind, receiver, signal)
    receiver.partial_success = (2, "name too long")

    assert transport.send(ENCODE[signal](["a", "b", "c"]), time.monotonic() + 5) == 2
    assert transport.send(ENCODE[signal](["d"]), time.monotonic() + 5) == 2

    assert transport.rejected == 4
    assert receiver.attempts == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "otel_ebpf.export"]
    assert len(warnings) == 1 and "name too long" in warnings[0]
    assert ("spans" if signal == "traces" else "data points") in warnings[0]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_transport_from_settings_reaches_the_signals_service(protocol, signal, receiver):
    """The generic endpoint variable, resolved per signal, ends up at that signal's service."""
    base = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint.removesuffix("/v1/traces")
    settings = load_settings({"OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": base})
    transport = otlp_transport(settings.otlp if signal == "traces" else settings.otlp_metrics)
    try:
        transport.send(ENCODE[signal](["x"]), time.monotonic() + 5)
    finally:
        transport.close()

    assert isinstance(transport, GrpcTransport if protocol == "grpc" else HttpTransport)
    assert names_received(receiver, signal) == ["x"]


def test_retry_after_header_forms():
    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 < _parse_retry_after(in_a_minute) <= 60


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="compression"):
        HttpTransport("http://127.0.0.1:1/v1/traces", {}, 1.0, compression="zstd")
    with pytest.raises(UserError, match="endpoint"):
        GrpcTransport("ftp://127.0.0.1:1", {}, 1.0)
    with pytest.raises(UserError, match="TLS file"):
        GrpcTransport("https://127.0.0.1:1", {}, 1.0, certificate=str(tmp_path / "missing.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    return make_certificates(tmp_path_factory.mktemp("pki"))


def test_tls_with_custom_ca(kind, pki, transports):
    with OtlpReceiver(tls=pki.server) as receiver:
        transport = transports(kind, receiver, certificate=pki.ca)
        transport.send(encode(["secure"]), time.monotonic() + 5)
        assert names_received(receiver) == ["secure"]


def test_mutual_tls_with_client_certificate_and_auth_header(kind, pki, transports):
    with OtlpReceiver(tls=pki.server, client_ca=pki.ca) as receiver:
        transport = transports(kind, receiver, certificate=pki.ca, client_key=pki.client_key,
                               client_certificate=pki.client_cert, headers={"authorization": "Bearer x"})
        transport.send(encode(["mutual"]), time.monotonic() + 5)
        assert names_received(receiver) == ["mutual"]
        assert receiver.headers[0]["authorization"] == "Bearer x"


def test_mutual_tls_without_client_certificate_fails(kind, pki, transports):
    with OtlpReceiver(tls=pki.server, client_ca=pki.ca) as receiver:
        transport = transports(kind, receiver, certificate=pki.ca)
        with pytest.raises(ExportError):
            transport.send(encode(["a"]), time.monotonic() + 0.5)
        assert receiver.attempts == 0


def test_untrusted_server_certificate_fails(kind, pki, transports):
    with OtlpReceiver(tls=pki.server) as receiver:
        transport = transports(kind, receiver)
        start = time.monotonic()
        with pytest.raises(ExportError) as info:
            transport.send(encode(["a"]), start + 0.5)
        assert time.monotonic() - start < 0.8
        assert receiver.attempts == 0
        if kind == "http":
            assert "certificate verify failed" in str(info.value)


def test_send_once_makes_one_attempt_and_passes_the_server_hint_on(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.fail_next(1, retry_after_s=7)

    with pytest.raises(RetryableError) as info:
        transport.send_once(encode(["a"]), time.monotonic() + 5)

    assert receiver.attempts == 1
    assert info.value.after_s == pytest.approx(7)
    assert str(info.value).startswith(transport.endpoint)
    assert transport.send_once(encode(["b"]), time.monotonic() + 5) == 0
    assert names_received(receiver) == ["b"]


# ----- batch processor


class GatedSink:
    """Records batches; blocks in export until the gate opens, to hold the export thread."""

    def __init__(self):
        self.batches = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def export(self, batch, deadline):
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(list(batch.items))

    def close(self):
        self.gate.set()


class FlakySink:
    """Fails with the given exceptions, one per batch, then succeeds."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.items = []

    def export(self, batch, deadline):
        if self.failures:
            raise self.failures.pop(0)
        self.items.extend(batch.items)

    def close(self):
        pass


def processor(sinks, encode=encode, **kwargs):
    options = dict(max_queue_size=1000, max_batch_size=64, schedule_delay_s=0.05, export_timeout_s=5.0) | kwargs
    return BatchProcessor(encode, sinks, **options)


def test_all_items_delivered_in_bounded_batches(kind, receiver, transports):
    bp = processor([transports(kind, receiver)])
    for start in range(0, 250, 10):
        bp.add([f"s{i}" for i in range(start, start + 10)])

    receiver.wait_for_spans(250)
    bp.shutdown(5)

    assert sorted(names_received(receiver)) == sorted(f"s{i}" for i in range(250))
    assert all(len(r.resource_spans[0].scope_spans[0].spans) <= 64 for r in receiver.requests)
    assert bp.stats == {"exported": 250, "dropped_full": 0, "dropped_shutdown": 0, "failed": 0, "rejected": 0,
                        "dropped_retry": 0, "unsent": 0, "spooled": 0}


def test_queue_overflow_is_counted_exactly():
    sink = GatedSink()
    bp = processor([sink], encode=None, max_queue_size=10, max_batch_size=5)
    bp.add(list(range(5)))
    assert sink.entered.wait(5)  # the thread now holds those 5 and the queue is empty

    bp.add(list(range(100, 125)))
    assert bp.stats["dropped_full"] == 15

    sink.gate.set()
    bp.shutdown(5)
    assert [item for batch in sink.batches for item in batch] == [0, 1, 2, 3, 4, *range(100, 110)]
    assert bp.stats["exported"] == 15


def test_shutdown_flushes_everything_without_waiting_for_the_schedule():
    sink = FlakySink()
    bp = processor([sink], encode=None, max_batch_size=100, max_queue_size=5000, schedule_delay_s=60)
    bp.add(list(range(7)))
    time.sleep(0.1)
    assert sink.items == []  # fewer than a batch: waits for the schedule

    bp.add(list(range(7, 1007)))
    start = time.monotonic()
    bp.shutdown(5)

    assert time.monotonic() - start < 2
    assert sorted(sink.items) == list(range(1007))
    bp.shutdown(5)  # idempotent
    assert bp.stats["exported"] == 1007


def test_encode_runs_once_per_batch_for_several_byte_sinks(receiver, transports):
    calls = []

    def counting_encode(items):
        calls.append(len(items))
        return encode(items)

    bp = processor([transports("grpc", receiver), transports("http", receiver)], encode=counting_encode)
    bp.add([f"s{i}" for i in range(100)])
    bp.shutdown(5)

    assert sum(calls) == 100
    assert sorted(names_received(receiver)) == sorted(f"s{i}" for i in range(100) for _ in range(2))


def test_failing_sink_is_counted_and_reported_without_killing_the_thread(caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.export")
    flaky = FlakySink(ExportError("collector:4317: gRPC UNAVAILABLE"), RuntimeError("encoder bug"), ExportError("x"))
    console = io.StringIO()
    bp = processor([flaky, ConsoleSink(str, console)], encode=None, max_batch_size=2, schedule_delay_s=0.01)
    for i in range(5):
        bp.add([i, i + 100])
        time.sleep(0.05)  # one batch each
    bp.shutdown(5)

    assert bp.stats["failed"] == 6
    assert bp.stats["exported"] == 4
    assert flaky.items == [3, 103, 4, 104]
    assert console.getvalue().split() == [str(n) for i in range(5) for n in (i, i + 100)]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gRPC UNAVAILABLE" in messages[0] and "\n" not in messages[0]
    assert "recovered after 3 failed batches" in messages[1]
    assert not any(r.exc_info for r in caplog.records)


def test_continuing_failures_are_summarised(caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.export")
    flaky = FlakySink(*[ExportError("down")] * 4)
    bp = processor([flaky], encode=None, max_batch_size=1, schedule_delay_s=0.01, report_interval_s=0.0)
    bp.add([1, 2, 3, 4])
    bp.shutdown(5)

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert messages[1:] == ["1 batches / 1 spans failed in the last 0s: down"] * 3


def test_shutdown_is_bounded_when_the_collector_is_down(kind, receiver, transports):
    receiver.stop()
    bp = processor([transports(kind, receiver, backoff_s=0.2)], export_timeout_s=30)
    bp.add(list(range(200)))

    start = time.monotonic()
    bp.shutdown(0.5)

    assert time.monotonic() - start < 2.0
    stats = bp.stats
    assert stats["exported"] == 0
    assert stats["failed"] + stats["dropped_shutdown"] == 200


def test_console_sink_writes_one_line_per_item():
    out = io.StringIO()
    bp = processor([ConsoleSink(lambda item: f"{item[0]} took {item[1]}us", out)], encode=None)
    bp.add([("main", 12), ("parse", 3)])
    bp.add([("write", 7)])
    bp.shutdown(5)

    assert out.getvalue() == "main took 12us\nparse took 3us\nwrite took 7us\n"


# ----- retry queue


def test_retry_queue_drops_the_oldest_past_its_bound():
    queue = RetryQueue(max_bytes=25)
    assert queue.push(b"a" * 10, 1) == 0
    assert queue.push(b"b" * 10, 2) == 0
    assert queue.push(b"c" * 10, 3) == 1  # 30 bytes > 25: a goes

    assert (len(queue), queue.bytes, queue.spans) == (2, 20, 5)
    assert [queue.take().data for _ in range(2)] == [b"b" * 10, b"c" * 10]
    assert queue.take() is None
    assert queue.push(b"x" * 26, 4) == 4, "a request larger than the bound is dropped itself"


def test_a_request_being_sent_is_outside_the_bound_and_goes_back_first():
    queue = RetryQueue(max_bytes=20)
    queue.push(b"a" * 10, 1)
    sending = queue.take()
    assert queue.push(b"b" * 10, 1) == 0 and queue.push(b"c" * 10, 1) == 0

    assert queue.put_back(sending) == 1, "back in the queue it is the oldest, so it is dropped first"
    assert [queue.take().data for _ in range(2)] == [b"b" * 10, b"c" * 10]


def spool_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def test_spool_keeps_requests_across_runs_in_order(tmp_path):
    spool = tmp_path / "spool"
    first = RetryQueue(1 << 20, str(spool))
    for i in range(3):
        first.push(encode([f"s{i}"]), 1)
    first.close()
    assert len(spool_files(spool)) == 3 and not any(name.endswith(".tmp") for name in os.listdir(spool))

    second = RetryQueue(1 << 20, str(spool))
    assert (len(second), second.spans) == (3, 3)
    second.push(encode(["s3"]), 1)
    taken = [second.take() for _ in range(4)]
    assert [ExportTraceServiceRequest.FromString(p.data).resource_spans[0].scope_spans[0].spans[0].name
            for p in taken] == ["s0", "s1", "s2", "s3"]
    for payload in taken:
        second.done(payload)
    assert spool_files(spool) == []
    second.close()


def test_spool_size_cap_is_respected_dropping_the_oldest_files(tmp_path):
    cap = 10_000
    queue = RetryQueue(cap, str(tmp_path))
    dropped = sum(queue.push(encode([f"s{i}"] * 10), 10) for i in range(100))

    on_disk = sum(os.path.getsize(tmp_path / name) for name in spool_files(tmp_path))
    assert on_disk == queue.bytes <= cap
    assert dropped == 100 * 10 - queue.spans > 0
    newest = ExportTraceServiceRequest.FromString((tmp_path / spool_files(tmp_path)[-1]).read_bytes())
    assert newest.resource_spans[0].scope_spans[0].spans[0].name == "s99"
    queue.close()


def test_spool_discards_interrupted_writes_and_leaves_other_files_alone(tmp_path):
    (tmp_path / "00000000000000000007-5.binpb.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "00000000000000000003-2.binpb").write_bytes(encode(["a", "b"]))

    queue = RetryQueue(1 << 20, str(tmp_path))

    assert queue.spans == 2
    assert sorted(os.listdir(tmp_path)) == [".lock", "00000000000000000003-2.binpb", "notes.txt"]
    queue.push(encode(["c"]), 1)
    assert spool_files(tmp_path)[1].startswith("00000000000000000004-"), "numbering goes on after the last file"
    queue.close()


def test_spool_directory_serves_one_otel_ebpf_at_a_time(tmp_path):
    first = RetryQueue(1 << 20, str(tmp_path))
    with pytest.raises(UserError, match=f"OTEL_EBPF_SPOOL_DIR='{tmp_path}' is in use") as info:
        RetryQueue(1 << 20, str(tmp_path))
    assert info.value.hint
    first.close()
    RetryQueue(1 << 20, str(tmp_path)).close()


def test_unusable_spool_directory_is_a_user_error(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(UserError, match="OTEL_EBPF_SPOOL_DIR=.* cannot be used: File exists"):
        RetryQueue(1 << 20, str(not_a_directory))


# ----- retrying exporter


@pytest.fixture
def exporters():
    """RetryingExporters with a fast backoff, closed afterwards (closing their transports)."""
    made = []

    def make(transport, queue=None, **kwargs):
        options = dict(backoff_s=0.05, max_backoff_s=0.2) | kwargs
        made.append(RetryingExporter(transport, RetryQueue(1 << 20) if queue is None else queue, **options))
        return made[-1]

    yield make
    for exporter in made:
        exporter.close()


def export(exporter, *names):
    exporter.export(Batch(list(names), encode), time.monotonic() + 5)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_outage_spans_wait_then_arrive_once_in_order(kind, receiver, transports, exporters, caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.export")
    exporter = exporters(transports(kind, receiver))
    export(exporter, "before")
    receiver.stop()

    for i in range(5):
        export(exporter, f"during-{i}", f"during-{i}b")
    assert exporter.waiting == 10
    receiver.start()
    receiver.wait_for_spans(11)
    wait_until(lambda: exporter.waiting == 0)

    assert names_received(receiver) == ["before"] + [f"during-{i}{b}" for i in range(5) for b in ("", "b")]
    assert exporter.counts == {"exported": 11, "rejected": 0, "failed": 0, "dropped_retry": 0, "unsent": 0,
                               "spooled": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "span export failed" in messages[0] and "retrying with backoff" in messages[0]
    assert "span export recovered" in messages[1]
    assert not any(r.exc_info for r in caplog.records)
    export(exporter, "after")
    receiver.wait_for_spans(12)
    assert names_received(receiver)[-1] == "after"


def test_no_attempt_per_batch_while_the_backend_is_failing(transports, exporters):
    """A backend that accepts connections but never answers costs one request timeout, not one per batch."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        transport = HttpTransport(f"http://127.0.0.1:{blackhole.getsockname()[1]}/v1/traces", {}, 0.5)
        exporter = exporters(transport, max_backoff_s=5.0)
        start = time.monotonic()
        export(exporter, "first")
        assert 0.5 <= time.monotonic() - start < 1.5

        start = time.monotonic()
        for i in range(20):
            export(exporter, f"s{i}")
        assert time.monotonic() - start < 0.2
        assert exporter.waiting == 21


def test_full_retry_queue_drops_the_oldest_and_counts_them(kind, receiver, transports, exporters):
    size = len(encode(["s00"]))
    exporter = exporters(transports(kind, receiver), RetryQueue(3 * size))
    receiver.stop()
    for i in range(10):
        export(exporter, f"s{i:02d}")

    receiver.start()
    wait_until(lambda: exporter.waiting == 0)

    assert names_received(receiver) == ["s07", "s08", "s09"]
    assert exporter.counts["dropped_retry"] == 7 and exporter.counts["exported"] == 3


def test_a_refused_request_is_dropped_alone(kind, receiver, transports, exporters, caplog):
    exporter = exporters(transports(kind, receiver))
    receiver.stop()
    for name in ("a", "b", "c"):
        export(exporter, name)
    receiver.fail_next(1, http_status=400, grpc_code=grpc.StatusCode.INVALID_ARGUMENT)
    receiver.start()

    wait_until(lambda: exporter.waiting == 0)

    assert names_received(receiver) == ["b", "c"]
    assert exporter.counts["failed"] == 1 and exporter.counts["exported"] == 2
    assert any("1 spans dropped" in r.getMessage() for r in caplog.records)


def test_recovery_is_noticed_within_seconds(kind, receiver, transports, exporters):
    """Backoff is capped (here at 1 s) so a backend coming back is not left alone for long."""
    exporter = exporters(transports(kind, receiver), backoff_s=0.1, max_backoff_s=1.0)
    receiver.stop()
    export(exporter, "a")
    time.sleep(3)  # the backoff reaches its cap

    receiver.start()
    back = time.monotonic()
    receiver.wait_for_spans(1, timeout=10)

    # gRPC adds its own reconnection backoff to ours, up to a few seconds.
    assert time.monotonic() - back < (1.5 if kind == "http" else 6.0)


def test_shutdown_with_the_backend_down_counts_what_is_left_as_unsent(kind, receiver, transports, exporters):
    exporter = exporters(transports(kind, receiver))
    receiver.stop()
    for name in ("a", "b", "c"):
        export(exporter, name)

    start = time.monotonic()
    exporter.close(start + 0.5)

    assert time.monotonic() - start < 1.5
    assert exporter.counts["unsent"] == 3 and exporter.counts["exported"] == 0


def test_shutdown_flushes_the_queue_when_the_backend_is_back(receiver, transports, exporters):
    exporter = exporters(transports("http", receiver), max_backoff_s=30.0)
    receiver.stop()
    export(exporter, "a")
    time.sleep(0.5)
    receiver.start()

    exporter.close(time.monotonic() + 5)  # does not wait out the backoff

    assert names_received(receiver) == ["a"]
    assert exporter.counts["exported"] == 1 and exporter.counts["unsent"] == 0


def test_spool_left_at_shutdown_is_sent_by_the_next_run(kind, receiver, transports, exporters, tmp_path):
    first = exporters(transports(kind, receiver), RetryQueue(1 << 20, str(tmp_path)))
    receiver.stop()
    for name in ("a", "b", "c"):
        export(first, name)
    start = time.monotonic()
    first.close(start + 30)

    assert time.monotonic() - start < 1, "spooled spans are safe: no waiting for the backend"
    assert first.counts["spooled"] == 3 and len(spool_files(tmp_path)) == 3

    receiver.start()
    second = exporters(transports(kind, receiver), RetryQueue(1 << 20, str(tmp_path)))
    export(second, "d")
    wait_until(lambda: second.waiting == 0)

    assert names_received(receiver) == ["a", "b", "c", "d"]
    assert spool_files(tmp_path) == []


def test_processor_with_console_and_otlp_counts_what_the_backend_got(receiver, transports, exporters):
    console = io.StringIO()
    exporter = exporters(transports("http", receiver))
    bp = processor([exporter, ConsoleSink(str, console)], max_batch_size=10)
    receiver.stop()
    bp.add([f"s{i}" for i in range(30)])
    wait_until(lambda: len(console.getvalue().split()) == 30)  # the console does not wait for the backend
    assert bp.stats["exported"] == 0

    receiver.start()
    bp.shutdown(5)

    assert sorted(names_received(receiver)) == sorted(f"s{i}" for i in range(30))
    assert bp.stats["exported"] == 30 and bp.stats["unsent"] == 0


def test_retry_settings():
    settings = load_settings({"OTEL_EBPF_RETRY_QUEUE_SIZE": "16K", "OTEL_EBPF_SPOOL_DIR": "/var/spool/x",
                              "OTEL_EBPF_SPOOL_SIZE": "2M"})
    assert (settings.retry_queue_size, settings.spool_dir, settings.spool_size) == (16 << 10, "/var/spool/x", 2 << 20)
    defaults = load_settings({})
    assert (defaults.retry_queue_size, defaults.spool_dir, defaults.spool_size) == (64 << 20, None, 256 << 20)
    for variable, value, reason in [("OTEL_EBPF_RETRY_QUEUE_SIZE", "lots", "suffix K or M"),
                                    ("OTEL_EBPF_SPOOL_SIZE", "0", "greater than 0")]:
        with pytest.raises(UserError, match=f"{variable}='{value}' is invalid: .*{reason}"):
            load_settings({variable: value})


def test_span_exporter_announces_what_an_earlier_run_spooled(receiver, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.export")
    RetryQueue(1 << 20, str(tmp_path)).push(encode(["old"]), 1)
    settings = load_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.http_endpoint,
                              "OTEL_EBPF_SPOOL_DIR": str(tmp_path)})
    exporter = span_exporter(settings)
    try:
        receiver.wait_for_spans(1)
    finally:
        exporter.close()
    assert [r.getMessage() for r in caplog.records] == [f"1 spans an earlier run left in {tmp_path} are sent first"]
