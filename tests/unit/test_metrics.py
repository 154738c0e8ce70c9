"""Metrics: what the encoder's requests say when parsed with opentelemetry-proto, and delivery to a real receiver."""

import io
import logging
import math
import socket
import threading
import time

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from otel_ebpf import __version__
from otel_ebpf.metrics import (
    BOUNDS_S,
    DURATION,
    NBUCKETS,
    FunctionLatency,
    MetricsEncoder,
    MetricsExporter,
    quantile_ns,
    sidecar_resource,
)
from otel_ebpf.otlp.transport import GrpcTransport, HttpTransport
from otel_ebpf.pipeline import ConsoleSink, line_per_item
from tests.otlp_receiver import OtlpReceiver, any_value
from tests.waiting import never_within, wait_until

START_NS = 1_700_000_000_000_000_000
NOW_NS = START_NS + 60_000_000_000
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
UNRECORDED = {"ring_buffer_full": 1, "depth_exceeded": 2, "unmatched_return": 0}
# Long enough to see a metrics request arrive, which a positive control checks before a test relies on it.
QUIET_S = 0.5


def kernel_bucket(ns: int) -> int:
    """The kernel's rule: bucket 0 holds d <= 1 ns, bucket i holds 2**(i-1) < d <= 2**i, the last is open."""
    return 0 if ns <= 1 else min((ns - 1).bit_length(), NBUCKETS - 1)


def latency(function: str, durations_ns: list[int], binary: str = "/app/server") -> FunctionLatency:
    counts = [0] * NBUCKETS
    for ns in durations_ns:
        counts[kernel_bucket(ns)] += 1
    return FunctionLatency(function, binary, tuple(counts), sum(durations_ns))


def attributes(point) -> dict:
    return {kv.key: any_value(kv.value) for kv in point.attributes}


def decode(payload: bytes) -> tuple[dict, dict]:
    """(resource attributes, metrics by name) of a request holding one resource and one scope."""
    request = ExportMetricsServiceRequest.FromString(payload)
    (resource_metrics,) = request.resource_metrics
    (scope_metrics,) = resource_metrics.scope_metrics
    assert (scope_metrics.scope.name, scope_metrics.scope.version) == ("otel-ebpf", __version__)
    return attributes(resource_metrics.resource), {m.name: m for m in scope_metrics.metrics}


def encoder() -> MetricsEncoder:
    return MetricsEncoder({"service.name": "shop", "host.name": "h1"}, START_NS)


# ----- encoding


def test_duration_histogram_has_the_kernels_buckets_in_seconds():
    durations = [1, 2, 3, 700, 1024, 1025, 5_000_000, 2**45]
    resource, metrics = decode(encoder().encode([latency("handle", durations)], {}, NOW_NS))

    assert resource == {"service.name": "shop", "host.name": "h1"}
    metric = metrics[DURATION]
    assert (metric.unit, metric.WhichOneof("data")) == ("s", "histogram")
    assert metric.histogram.aggregation_temporality == CUMULATIVE
    (point,) = metric.histogram.data_points
    assert list(point.explicit_bounds) == [2**i / 1e9 for i in range(NBUCKETS - 1)]
    assert len(point.bucket_counts) == len(point.explicit_bounds) + 1
    assert point.count == len(durations) == sum(point.bucket_counts)
    assert math.isclose(point.sum, sum(durations) / 1e9)
    assert (point.start_time_unix_nano, point.time_unix_nano) == (START_NS, NOW_NS)
    assert attributes(point) == {"code.function.name": "handle", "code.file.path": "/app/server"}
    for ns in durations:  # OTLP bucket i is (bounds[i-1], bounds[i]]: the kernel's bucket of the same index
        i = kernel_bucket(ns)
        assert point.bucket_counts[i] > 0
        assert (i == 0 or BOUNDS_S[i - 1] < ns / 1e9) and (i == NBUCKETS - 1 or ns / 1e9 <= BOUNDS_S[i])


def test_one_histogram_per_function_and_binary():
    latencies = [latency("f", [10, 20]), latency("f", [30]), latency("f", [40], binary="/lib/libx.so"),
                 latency("g", [])]
    _, metrics = decode(encoder().encode(latencies, {}, NOW_NS))

    points = {(attributes(p)["code.function.name"], attributes(p)["code.file.path"]): p
              for p in metrics[DURATION].histogram.data_points}
    assert {key: (p.count, round(p.sum * 1e9)) for key, p in points.items()} == {
        ("f", "/app/server"): (3, 60), ("f", "/lib/libx.so"): (1, 40), ("g", "/app/server"): (0, 0)}
    assert list(points["f", "/app/server"].bucket_counts) == [
        a + b for a, b in zip(latency("f", [10, 20]).counts, latency("f", [30]).counts)]


@pytest.mark.parametrize(
    "name, values, unit, constant_attributes",
    [
        ("otel.sdk.processor.span.processed", {"": 90, "queue_full": 7}, "{span}",
         {"otel.component.type": "batching_span_processor", "otel.component.name": "batching_span_processor/0"}),
        ("otel.sdk.exporter.span.exported", {"": 80, "export_failed": 10}, "{span}", {}),
        ("otel_ebpf.calls.unrecorded", UNRECORDED, "{call}", {}),
    ],
)
def test_counters_are_cumulative_monotonic_sums_by_error_type(name, values, unit, constant_attributes):
    _, metrics = decode(encoder().encode([], {name: values}, NOW_NS))

    assert list(metrics) == [name], "no histogram without latencies"
    metric = metrics[name]
    assert (metric.unit, metric.WhichOneof("data")) == (unit, "sum")
    assert metric.sum.is_monotonic and metric.sum.aggregation_temporality == CUMULATIVE
    received = {}
    for point in metric.sum.data_points:
        assert (point.start_time_unix_nano, point.time_unix_nano) == (START_NS, NOW_NS)
        point_attributes = attributes(point)
        error_type = point_attributes.pop("error.type", None)
        assert error_type != "", "success has no error.type at all, not an empty one"
        assert point_attributes == constant_attributes
        received[error_type or ""] = point.as_int
    assert received == values


def test_call_stacks_is_a_gauge_of_the_current_level():
    _, metrics = decode(encoder().encode([], {"otel_ebpf.call_stacks": {"": 3}}, NOW_NS))
    metric = metrics["otel_ebpf.call_stacks"]
    assert (metric.unit, metric.WhichOneof("data")) == ("{thread}", "gauge")
    (point,) = metric.gauge.data_points
    assert (point.as_int, point.time_unix_nano, attributes(point)) == (3, NOW_NS, {})


@pytest.mark.parametrize(
    "latencies, counters, reason",
    [
        ([FunctionLatency("f", "/app", (1, 2, 3), 10)], {}, "3 latency buckets, expected 40"),
        ([], {"spans.lost": {"": 1}}, "unknown counter 'spans.lost'"),
    ],
)
def test_bad_input_is_a_programming_error(latencies, counters, reason):
    with pytest.raises(ValueError, match=reason):
        encoder().encode(latencies, counters, NOW_NS)


@pytest.mark.parametrize(
    "durations, q, expected",
    [
        ([], 0.5, None),
        ([1], 0.5, 0.5),  # bucket [0, 1]
        ([1000] * 100, 0.5, 768.0),  # bucket (512, 1024], half way
        ([1000] * 100, 0.99, 1024 - 512 * 0.01),
        ([100] * 99 + [10_000], 0.99, 128.0),  # the 99th of 100 calls is the last in (64, 128]
        ([100] * 98 + [10_000] * 2, 0.99, 8192 + 8192 * 0.5),
        ([2**45], 0.5, 2.0**38),  # open-ended last bucket: its lower bound
    ],
)
def test_quantile_estimate(durations, q, expected):
    assert quantile_ns(latency("f", durations).counts, q) == expected


def test_console_lines():
    lines = encoder().format(
        [latency("handle", [1000] * 99 + [3_000_000]), latency("idle", [])],
        {"otel.sdk.processor.span.processed": {"": 95, "queue_full": 5}, "otel_ebpf.calls.unrecorded": UNRECORDED},
    )
    assert lines == [
        f"{DURATION}  handle (/app/server): 100 calls, mean 31 µs, p50 ~771 ns, p99 ~1.02 µs",
        f"{DURATION}  idle (/app/server): 0 calls",
        "counters  otel.sdk.processor.span.processed ok=95 queue_full=5; "
        "otel_ebpf.calls.unrecorded ring_buffer_full=1 depth_exceeded=2 unmatched_return=0",
    ]


@pytest.mark.parametrize(
    "service_name, attributes, expected",
    [
        (None, {}, "otel-ebpf"),
        (None, {"service.name": "from-attributes"}, "from-attributes"),
        ("from-variable", {"service.name": "from-attributes"}, "from-variable"),
    ],
)
def test_sidecar_resource(service_name, attributes, expected):
    resource = sidecar_resource(service_name, {**attributes, "deployment.environment.name": "test"})
    assert resource == {
        "service.name": expected, "deployment.environment.name": "test", "host.name": socket.gethostname(),
        "telemetry.distro.name": "otel-ebpf", "telemetry.distro.version": __version__,
    }


# ----- exporter


class Totals:
    """A stand-in for the kernel's maps: every read sees more calls than the one before."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def collect(self):
        with self.lock:
            self.calls += 1
            return [latency("handle", [1000] * self.calls)], {"otel_ebpf.calls.unrecorded": {"depth_exceeded": 0}}


def transport(kind, receiver, **kwargs):
    options = dict(headers={}, timeout_s=2.0, signal="metrics", backoff_s=0.01, max_backoff_s=0.05) | kwargs
    if kind == "grpc":
        return GrpcTransport(receiver.grpc_endpoint, **options)
    return HttpTransport(receiver.http_metrics_endpoint, **options)


def handle_calls(metric) -> int:
    return metric.histogram.data_points[0].count


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_exports_periodically_and_once_more_at_shutdown(kind, receiver):
    totals = Totals()
    exporter = MetricsExporter(totals.collect, encoder(), [transport(kind, receiver)], interval_s=0.1, timeout_s=2)

    receiver.wait_for_metric(DURATION, lambda metric: handle_calls(metric) >= 3)
    exporter.shutdown(5)

    counts = [handle_calls(m) for _, m in receiver.metrics() if m.name == DURATION]
    assert counts == list(range(1, totals.calls + 1)), "one request per read, cumulative totals"
    resource, _ = receiver.metrics()[0]
    assert resource["service.name"] == "shop"
    assert "otel_ebpf.calls.unrecorded" in {m.name for _, m in receiver.metrics()}


def test_shutdown_exports_without_waiting_for_the_interval(receiver):
    def exporter_to(target, interval_s):
        """An exporter to ``target`` and to a console, and that console."""
        console = io.StringIO()
        sinks = [transport("http", target), ConsoleSink(line_per_item(str), console)]
        return MetricsExporter(Totals().collect, encoder(), sinks, interval_s=interval_s, timeout_s=2), console

    with OtlpReceiver() as control:
        early, _ = exporter_to(control, interval_s=0.01)
        wait_until(lambda: control.metric_requests, "a request once the interval passed", timeout_s=QUIET_S)
        early.shutdown(5)

    exporter, console = exporter_to(receiver, interval_s=60)
    never_within(lambda: receiver.metric_requests, "a request arrived before the interval passed", QUIET_S)
    assert receiver.metric_requests == []

    start = time.monotonic()
    exporter.shutdown(5)
    exporter.shutdown(5)  # idempotent

    assert time.monotonic() - start < 2
    assert len(receiver.metric_requests) == 1
    assert console.getvalue().splitlines()[0].startswith(f"{DURATION}  handle (/app/server): 1 calls")


def test_shutdown_is_bounded_when_the_collector_is_down(receiver, caplog):
    receiver.stop()
    exporter = MetricsExporter(Totals().collect, encoder(), [transport("grpc", receiver, backoff_s=0.2)],
                               interval_s=60, timeout_s=30)
    start = time.monotonic()
    exporter.shutdown(0.5)

    assert time.monotonic() - start < 2
    assert any("metric export failed, 2 data points dropped" in r.getMessage() for r in caplog.records)


def test_a_failing_read_is_reported_and_the_next_one_exported(receiver, caplog):
    caplog.set_level(logging.WARNING)
    reads = iter([OSError("map read failed")])
    totals = Totals()

    def collect():
        error = next(reads, None)
        if error:
            raise error
        return totals.collect()

    exporter = MetricsExporter(collect, encoder(), [transport("http", receiver)], interval_s=0.05, timeout_s=2)
    receiver.wait_for_metric(DURATION)
    exporter.shutdown(5)

    messages = [r.getMessage() for r in caplog.records]
    assert "map read failed" in messages[0]
    assert "metric export recovered after 1 failed batches" in messages[1]
