"""Function latency and the tracer's own losses as OTLP metrics, from cumulative numbers kept elsewhere.

The kernel keeps a log2 histogram of the duration of every call of each probed function, sampled or not, and
counters of calls it could not record; the export pipeline counts spans dropped and exported. Nothing here
aggregates: every interval the current totals are read and sent with cumulative temporality, so a lost export
loses no data. Metrics are few and rare, so they are built with the opentelemetry-proto classes, not by hand.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from otel_ebpf import __version__
from otel_ebpf.pipeline import Batch, FailureReport, Sink, close_all, deliver
from otel_ebpf.otlp.encode import SCOPE_NAME

logger = logging.getLogger("otel_ebpf.metrics")

NBUCKETS = 40
"""Buckets of a kernel latency histogram: counts[0] holds calls of at most 1 ns, counts[i] those with
2**(i-1) < duration_ns <= 2**i, and the last one everything longer (it is open-ended)."""

BOUNDS_S = tuple(2**i / 1e9 for i in range(NBUCKETS - 1))
"""The histogram's explicit bounds in seconds; OTLP buckets are (bound[i-1], bound[i]] like the kernel's."""

DURATION = "otel_ebpf.function.duration"
_CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


@dataclass(frozen=True)
class CounterInfo:
    """What the OTLP Sum for one counter says besides its values."""

    unit: str
    description: str
    attributes: tuple[tuple[str, str], ...] = ()
    monotonic: bool = True  # False: a current level, exported as a Gauge


COUNTERS = {
    # Semantic conventions for OpenTelemetry SDK metrics; our export pipeline is one batching span processor.
    "otel.sdk.processor.span.processed": CounterInfo(
        "{span}", "The number of spans for which the processing has finished, either successful or failed.",
        (("otel.component.type", "batching_span_processor"), ("otel.component.name", "batching_span_processor/0")),
    ),
    "otel.sdk.exporter.span.exported": CounterInfo(
        "{span}", "The number of spans for which the export has finished, either successful or failed.",
    ),
    "otel_ebpf.calls.unrecorded": CounterInfo(
        "{call}", "Finished calls of probed functions that the kernel could not turn into spans.",
    ),
    "otel_ebpf.http.evicted": CounterInfo(
        "{entry}", "Entries the kernel forgot to make room (OTEL_EBPF_MAX_THREADS each), by map: connections, "
        "requests, threads' and goroutines' requests, outbound requests, HTTP/2 readers: requests on them go "
        "untraced, or unparented.",
    ),
    "otel_ebpf.http2.unfollowed": CounterInfo(
        "{connection}", "HTTP/2 connections whose frames were not all seen (a read or write too large to copy, one "
        "lost, or a connection older than the run): their requests are not reported.",
    ),
    "otel_ebpf.call_stacks": CounterInfo(
        "{thread}", "Threads and goroutines with a call stack in the kernel; follows the live ones unless state leaks.",
        monotonic=False,
    ),
}
"""The counters :meth:`MetricsEncoder.encode` knows; each value is keyed by error.type ('' for success)."""


@dataclass(frozen=True)
class FunctionLatency:
    """One probed function's cumulative latency histogram, as the kernel keeps it."""

    function: str
    binary: str
    counts: tuple[int, ...]
    sum_ns: int


def sidecar_resource(service_name: str | None, resource_attributes: dict[str, str]) -> dict[str, str]:
    """The tracer's own resource: its metrics cover every traced process at once, so no process.* attributes."""
    return {
        **resource_attributes,
        "service.name": service_name or resource_attributes.get("service.name") or SCOPE_NAME,
        "host.name": socket.gethostname(),
        "telemetry.distro.name": SCOPE_NAME,
        "telemetry.distro.version": __version__,
    }


def quantile_ns(counts: tuple[int, ...], q: float) -> float | None:
    """Estimate of the q-quantile, interpolating linearly inside its bucket like Prometheus' histogram_quantile.

    A quantile in the open-ended last bucket is reported as that bucket's lower bound. None without calls.
    """
    rank = q * sum(counts)
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            lower = 0 if i == 0 else 2 ** (i - 1)
            if i == len(counts) - 1:
                return float(lower)
            return lower + (2**i - lower) * (rank - seen) / n
        seen += n
    return None


def _human(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def _key_values(attributes: dict[str, str | int]) -> list[KeyValue]:
    return [
        KeyValue(key=key, value=AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value))
        for key, value in attributes.items()
    ]


def _merged(latencies: list[FunctionLatency]) -> list[FunctionLatency]:
    """One histogram per (function, binary): static functions of one name in one binary are several probes,
    and OTLP forbids two points with the same attributes in one metric."""
    merged: dict[tuple[str, str], FunctionLatency] = {}
    for latency in latencies:
        if len(latency.counts) != NBUCKETS:
            raise ValueError(f"{latency.function}: {len(latency.counts)} latency buckets, expected {NBUCKETS}")
        key = (latency.function, latency.binary)
        if key in merged:
            other = merged[key]
            latency = FunctionLatency(*key, tuple(map(sum, zip(other.counts, latency.counts))),
                                      other.sum_ns + latency.sum_ns)
        merged[key] = latency
    return list(merged.values())


class MetricsEncoder:
    """Cumulative numbers -> one ExportMetricsServiceRequest, or readable console lines."""

    def __init__(self, resource_attributes: dict[str, str | int], start_time_ns: int):
        """``start_time_ns`` (Unix ns) is when counting began: the start of every cumulative series."""
        self._resource = Resource(attributes=_key_values(resource_attributes))
        self._scope = InstrumentationScope(name=SCOPE_NAME, version=__version__)
        self._start_time_ns = start_time_ns

    def encode(self, latencies: list[FunctionLatency], counters: dict[str, dict[str, int]], now_ns: int) -> bytes:
        """``counters`` maps a name in COUNTERS to counts by error.type; ``now_ns`` is when they were read."""
        metrics = [self._duration(latencies, now_ns)] if latencies else []
        metrics += [self._counter(name, values, now_ns) for name, values in counters.items()]
        scope_metrics = ScopeMetrics(scope=self._scope, metrics=metrics)
        request = ExportMetricsServiceRequest(
            resource_metrics=[ResourceMetrics(resource=self._resource, scope_metrics=[scope_metrics])]
        )
        return request.SerializeToString()

    def format(self, latencies: list[FunctionLatency], counters: dict[str, dict[str, int]]) -> list[str]:
        """One line per function (calls, mean, estimated p50 and p99), then one line with every counter."""
        lines = []
        for latency in _merged(latencies):
            calls = sum(latency.counts)
            line = f"{DURATION}  {latency.function} ({latency.binary}): {calls} calls"
            if calls:
                p50, p99 = (quantile_ns(latency.counts, q) for q in (0.5, 0.99))
                line += f", mean {_human(latency.sum_ns / calls)}, p50 ~{_human(p50)}, p99 ~{_human(p99)}"
            lines.append(line)
        if counters:
            lines.append("counters  " + "; ".join(
                f"{name} " + " ".join(f"{error or 'ok'}={count}" for error, count in values.items())
                for name, values in counters.items()
            ))
        return lines

    def _duration(self, latencies: list[FunctionLatency], now_ns: int) -> Metric:
        points = [
            HistogramDataPoint(
                attributes=_key_values({"code.function.name": latency.function, "code.file.path": latency.binary}),
                start_time_unix_nano=self._start_time_ns,
                time_unix_nano=now_ns,
                count=sum(latency.counts),
                sum=latency.sum_ns / 1e9,
                bucket_counts=latency.counts,
                explicit_bounds=BOUNDS_S,
            )
            for latency in _merged(latencies)
        ]
        return Metric(
            name=DURATION, unit="s",
            description="Duration of calls of a probed function, sampled or not.",
            histogram=Histogram(data_points=points, aggregation_temporality=_CUMULATIVE),
        )

    def _counter(self, name: str, values: dict[str, int], now_ns: int) -> Metric:
        info = COUNTERS.get(name)
        if info is None:
            raise ValueError(f"unknown counter {name!r}: add it to otel_ebpf.metrics.COUNTERS")
        points = [
            NumberDataPoint(
                attributes=_key_values(dict(info.attributes) | ({"error.type": error} if error else {})),
                start_time_unix_nano=self._start_time_ns,
                time_unix_nano=now_ns,
                as_int=count,
            )
            for error, count in values.items()
        ]
        if not info.monotonic:
            return Metric(name=name, unit=info.unit, description=info.description, gauge=Gauge(data_points=points))
        return Metric(
            name=name, unit=info.unit, description=info.description,
            sum=Sum(data_points=points, aggregation_temporality=_CUMULATIVE, is_monotonic=True),
        )


class MetricsExporter:
    """Reads the totals every ``interval_s`` on a background thread and sends them to every sink; once more at shutdown.

    ``collect`` runs on that thread and returns (latencies, counters) as MetricsEncoder.encode takes them.
    Sinks are those of pipeline.py: a ConsoleSink(line_per_item(str)) prints the lines of MetricsEncoder.format,
    an OTLP transport made for signal "metrics" sends the encoded request.
    """

    def __init__(
        self,
        collect: Callable[[], tuple[list[FunctionLatency], dict[str, dict[str, int]]]],
        encoder: MetricsEncoder,
        sinks: list[Sink],
        interval_s: float,
        timeout_s: float,
        report_interval_s: float = 30.0,
    ):
        self._collect = collect
        self._encoder = encoder
        self._sinks = sinks
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._report = FailureReport(report_interval_s, signal="metric", noun="data points")
        self._stop = threading.Event()
        self._stop_deadline = math.inf
        self._thread = threading.Thread(target=self._run, name="otel-ebpf-metrics", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        """Export the final totals within ``timeout_s``, then close the sinks; later calls do nothing."""
        if self._stop.is_set():
            return
        self._stop_deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout_s)
        close_all(self._sinks)  # interrupts a retry still waiting on a dead collector
        self._thread.join(1.0)

    def _run(self) -> None:
        # The interval runs from the start of one export to the start of the next, as for the SDK's reader.
        next_export = time.monotonic() + self._interval_s
        while not self._stop.wait(max(0.0, next_export - time.monotonic())):
            next_export = time.monotonic() + self._interval_s
            self._export()
        self._export()

    def _export(self) -> None:
        deadline = min(time.monotonic() + self._timeout_s, self._stop_deadline)
        now_ns = time.time_ns()
        try:
            latencies, counters = self._collect()
            lines = self._encoder.format(latencies, counters)
        except Exception as exc:  # reading the kernel's maps failing must not end the thread
            logger.debug("collecting metrics raised", exc_info=True)
            self._report.failed(0, f"reading the totals failed: {type(exc).__name__}: {exc}")
            return
        batch = Batch([lines], lambda _chunks: self._encoder.encode(latencies, counters, now_ns))
        _, failure = deliver(self._sinks, batch, deadline)
        if failure is None:
            self._report.succeeded()
        else:
            points = len({(latency.function, latency.binary) for latency in latencies})
            self._report.failed(points + sum(map(len, counters.values())), failure)
