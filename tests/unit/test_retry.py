"""RetryingExporter and its Backoff: spans waiting out a backend outage, against a real OTLP receiver."""

import io
import logging
import socket
import time

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ebpf.config import load_settings
from otel_ebpf.otlp.backoff import Backoff
from otel_ebpf.otlp.queue import RetryQueue
from otel_ebpf.otlp.retry import RetryingExporter, halves, span_exporter
from otel_ebpf.otlp.transport import HttpTransport, RetryableError, TooLargeError
from otel_ebpf.pipeline import Batch, ConsoleSink, line_per_item
from tests.unit.otlp_helpers import encode, encode_chunks, names_received, processor, spool_files
from tests.waiting import wait_until


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
    """One batch of one chunk: the exporter counts its spans, not its chunks."""
    exporter.export(Batch([list(names)], encode_chunks), time.monotonic() + 5)


class CountingTransport:
    """Counts failed attempts, so that a test can wait for the retry schedule to reach a given point."""

    def __init__(self, transport):
        self.transport = transport
        self.failures = 0

    def send_once(self, payload, deadline):
        try:
            return self.transport.send_once(payload, deadline)
        except RetryableError:
            self.failures += 1
            raise

    def close(self):
        self.transport.close()


def test_outage_spans_wait_then_arrive_once_in_order(kind, receiver, transports, exporters, caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.otlp.retry")
    exporter = exporters(transports(kind, receiver))
    export(exporter, "before")
    receiver.stop()

    for i in range(5):
        export(exporter, f"during-{i}", f"during-{i}b")
    assert exporter.waiting == 10
    receiver.start()
    receiver.wait_for_spans(11)
    wait_until(lambda: exporter.waiting == 0, "the retry queue to empty")

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
    wait_until(lambda: exporter.waiting == 0, "the retry queue to empty")

    assert names_received(receiver) == ["s07", "s08", "s09"]
    assert exporter.counts["dropped_retry"] == 7 and exporter.counts["exported"] == 3


def test_a_refused_request_is_dropped_alone(kind, receiver, transports, exporters, caplog):
    exporter = exporters(transports(kind, receiver))
    receiver.stop()
    for name in ("a", "b", "c"):
        export(exporter, name)
    receiver.fail_next(1, http_status=400, grpc_code=grpc.StatusCode.INVALID_ARGUMENT)
    receiver.start()

    wait_until(lambda: exporter.waiting == 0, "the retry queue to empty")

    assert names_received(receiver) == ["b", "c"]
    assert exporter.counts["failed"] == 1 and exporter.counts["exported"] == 2
    assert any("1 spans dropped" in r.getMessage() for r in caplog.records)


def test_recovery_is_noticed_within_seconds(kind, receiver, transports, exporters):
    """Backoff is capped (here at 1 s) so a backend coming back is not left alone for long."""
    transport = CountingTransport(transports(kind, receiver))
    exporter = exporters(transport, backoff_s=0.1, max_backoff_s=1.0)
    receiver.stop()
    export(exporter, "a")
    # Failures: export's own attempt, then the retry thread's, each followed by a wait of 0.1, 0.2, 0.4, 0.8 s,
    # then 1 s, the cap, twice: after the seventh the wait would be 3.2 s without the cap.
    wait_until(lambda: transport.failures >= 7, "the backoff to reach its cap")

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
    transport = CountingTransport(transports("http", receiver))
    exporter = exporters(transport, max_backoff_s=30.0)
    receiver.stop()
    export(exporter, "a")
    # Failures: export's own attempt, then the retry thread's, waiting 0.05, 0.1, 0.2 s and now 0.4 s.
    wait_until(lambda: transport.failures >= 5, "the retry thread to be in a backoff wait")
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
    wait_until(lambda: second.waiting == 0, "the spool to be sent")

    assert names_received(receiver) == ["a", "b", "c", "d"]
    assert spool_files(tmp_path) == []


def test_processor_with_console_and_otlp_counts_what_the_backend_got(receiver, transports, exporters):
    console = io.StringIO()
    exporter = exporters(transports("http", receiver))
    bp = processor([exporter, ConsoleSink(line_per_item(str), console)], max_batch_size=10)
    receiver.stop()
    bp.add([f"s{i}" for i in range(30)])
    # The console does not wait for the backend.
    wait_until(lambda: len(console.getvalue().split()) == 30, "30 lines on the console")
    assert bp.stats["exported"] == 0

    receiver.start()
    bp.shutdown(5)

    assert sorted(names_received(receiver)) == sorted(f"s{i}" for i in range(30))
    assert bp.stats["exported"] == 30 and bp.stats["unsent"] == 0


def test_span_exporter_announces_what_an_earlier_run_spooled(receiver, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.otlp.retry")
    RetryQueue(1 << 20, str(tmp_path)).push(encode(["old"]), 1)
    settings = load_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.http_endpoint,
                              "OTEL_EBPF_SPOOL_DIR": str(tmp_path)})
    exporter = span_exporter(settings)
    try:
        receiver.wait_for_spans(1)
    finally:
        exporter.close()
    assert [r.getMessage() for r in caplog.records] == [f"1 spans an earlier run left in {tmp_path} are sent first"]


# ----- backoff


def test_backoff_doubles_up_to_its_cap_with_jitter_and_starts_again_after_reset():
    backoff = Backoff(0.1, 1.0)
    for base in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0):
        assert 0.8 * base <= backoff.next() <= 1.2 * base
    backoff.reset()
    assert 0.08 <= backoff.next() <= 0.12


def test_backoff_honours_a_server_hint_only_when_it_asks_for_longer():
    assert Backoff(0.1, 1.0).next(hint_s=7.0) == 7.0
    assert 0.08 <= Backoff(0.1, 1.0).next(hint_s=0.01) <= 0.12
    assert 0.08 <= Backoff(0.1, 1.0).next(hint_s=None) <= 0.12


class SizeLimitedTransport(CountingTransport):
    """A backend taking at most `limit` spans per request, like a Collector's max_recv_msg_size, and failing
    retryably once, at the attempt numbered `fail_at`."""

    def __init__(self, transport, limit: int, fail_at: int):
        super().__init__(transport)
        self.limit, self.fail_at, self.attempts = limit, fail_at, 0

    def send_once(self, payload, deadline):
        self.attempts += 1
        spans = sum(len(s.spans) for r in ExportTraceServiceRequest.FromString(payload).resource_spans
                    for s in r.scope_spans)
        if spans > self.limit:
            raise TooLargeError(f"{spans} spans: received message larger than max")
        if self.attempts == self.fail_at:
            raise RetryableError("UNAVAILABLE")
        return super().send_once(payload, deadline)


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
@pytest.mark.parametrize("fail_at", [0, 4, 9])
def test_a_request_too_large_is_sent_in_halves_each_span_once(kind, receiver, transports, exporters, caplog, fail_at,
                                                              spool, tmp_path):
    """13 spans to a backend taking 3 per request: halves of halves, in order; a retryable failure part way
    through queues only the parts not yet sent (in memory or as spool files), so nothing arrives twice."""
    caplog.set_level(logging.WARNING, logger="otel_ebpf.otlp.retry")
    queue = RetryQueue(1 << 20, str(tmp_path / "spool")) if spool else None
    exporter = exporters(SizeLimitedTransport(transports(kind, receiver), limit=3, fail_at=fail_at), queue)
    names = [f"s{i}" for i in range(13)]
    export(exporter, *names)
    export(exporter, "after")
    wait_until(lambda: exporter.waiting == 0 and exporter.counts["exported"] == 14, "every span delivered")
    assert names_received(receiver) == names + ["after"]
    assert exporter.counts["failed"] == 0
    assert sum("in one request as too large" in r.getMessage() for r in caplog.records) == 1
    if spool:
        assert spool_files(tmp_path / "spool") == [], "every part's file deleted once delivered"


def test_halves_keep_every_span_under_its_resource_and_scope():
    request = ExportTraceServiceRequest()
    for service, scopes in (("a", [["a1", "a2", "a3"]]), ("b", [["b1"], ["b2", "b3", "b4"]])):
        group = request.resource_spans.add()
        attribute = group.resource.attributes.add()
        attribute.key, attribute.value.string_value = "service.name", service
        for number, spans in enumerate(scopes):
            scope = group.scope_spans.add()
            scope.scope.name = f"{service}-scope{number}"
            for name in spans:
                scope.spans.add().name = name

    def layout(data):
        return [(group.resource.attributes[0].value.string_value, scope.scope.name, [s.name for s in scope.spans])
                for group in ExportTraceServiceRequest.FromString(data).resource_spans for scope in group.scope_spans]

    (first, n1), (second, n2) = halves(request.SerializeToString())
    assert (n1, n2) == (3, 4)
    assert layout(first) == [("a", "a-scope0", ["a1", "a2", "a3"])]
    assert layout(second) == [("b", "b-scope0", ["b1"]), ("b", "b-scope1", ["b2", "b3", "b4"])]
    (third, n3), (fourth, n4) = halves(second)
    assert (n3, n4, layout(third), layout(fourth)) == (
        2, 2, [("b", "b-scope0", ["b1"]), ("b", "b-scope1", ["b2"])], [("b", "b-scope1", ["b3", "b4"])])
