"""What the export tests share: real OTLP requests to send, transports and processors aimed at the test receiver."""

from __future__ import annotations

import os

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ebpf.otlp.transport import GrpcTransport, HttpTransport
from otel_ebpf.pipeline import BatchProcessor
from tests.otlp_receiver import OtlpReceiver

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


def encode_chunks(chunks) -> bytes:
    """encode() as BatchProcessor calls it: with the batch's chunks."""
    return encode(name for chunk in chunks for name in chunk)


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


def names_received(receiver, signal="traces"):
    received = receiver.spans() if signal == "traces" else receiver.metrics()
    return [item.name for _, item in received]


def processor(sinks, encode=encode_chunks, **kwargs):
    options = dict(max_queue_size=1000, max_batch_size=64, schedule_delay_s=0.05, export_timeout_s=5.0) | kwargs
    return BatchProcessor(encode, sinks, **options)


def spool_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))
