"""An HTTP client instrumented with the OpenTelemetry SDK, calling examples/httpserver: its CLIENT spans are
the parents that otel-ebpf's SERVER spans must join through the traceparent header.

    http_client.py PORT [REQUESTS]

Makes REQUESTS (default: one round of PLAN) GET requests to 127.0.0.1:PORT, going round PLAN: requests on one
keep-alive connection, requests on connections of their own, a 404, one without traceparent, one carrying a
tracestate. Each request is made inside a CLIENT span; once its response is read, one line on stdout:

    client conn=N trace_id=<32 hex> span_id=<16 hex> path=<target> status=<code> traceparent=<sent|->
           tracestate=<sent|->                      (one line)

conn numbers the client's connections (0 is the shared keep-alive one). Spans go where the standard variables
say: OTEL_TRACES_EXPORTER (otlp, console, none; default otlp), OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (grpc or
http/protobuf), endpoints, headers, OTEL_BSP_*. service.name is http-client.
"""

import http.client
import os
import sys
from dataclasses import dataclass

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Step:
    target: str
    own_connection: bool = False  # False: on the shared keep-alive connection
    propagate: bool = True  # False: no traceparent, the server starts a trace of its own
    tracestate: str | None = None  # made as part of an upstream trace that carries this tracestate


PLAN = (
    Step("/work?n=5"),
    Step("/health"),
    Step("/work?n=3"),
    Step("/work?n=4", own_connection=True),
    Step("/no/such/page", own_connection=True),
    Step("/health", own_connection=True, propagate=False),
    Step("/work?n=2", tracestate="upstream=t61rcWkgMzE"),
)


def exporters():
    """The exporters OTEL_TRACES_EXPORTER names, configured by the SDK from the other OTEL_* variables."""
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
        name = name.strip()
        if name == "console":
            yield ConsoleSpanExporter(out=sys.stderr)  # stdout carries the client lines
        elif name == "otlp":
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            yield OTLPSpanExporter()
        elif name not in ("none", ""):
            sys.exit(f"http_client: unknown exporter {name!r} in OTEL_TRACES_EXPORTER")


def upstream(tracestate: str):
    """A context as if this client were serving a request from a traced caller that sent `tracestate`: the
    SDK passes a parent's tracestate on to its children, and so into the traceparent's companion header."""
    ids = RandomIdGenerator()
    parent = SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=TraceState.from_header([tracestate]))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def request(tracer, connection: http.client.HTTPConnection, number: int, port: int, step: Step) -> None:
    """One GET inside a CLIENT span (HTTP client semantic conventions); prints the client line."""
    context = upstream(step.tracestate) if step.tracestate else None
    attributes = {"http.request.method": "GET", "server.address": HOST, "server.port": port,
                  "url.full": f"http://{HOST}:{port}{step.target}"}
    with tracer.start_as_current_span("GET", context=context, kind=SpanKind.CLIENT, attributes=attributes) as span:
        headers: dict[str, str] = {}
        if step.propagate:
            propagate.inject(headers)
        connection.request("GET", step.target, headers=headers)
        response = connection.getresponse()
        response.read()  # all of it, so the connection can carry the next request
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 400:
            span.set_attribute("error.type", str(response.status))
            span.set_status(StatusCode.ERROR)
        ids = span.get_span_context()
    print(f"client conn={number} trace_id={ids.trace_id:032x} span_id={ids.span_id:016x} path={step.target} "
          f"status={response.status} traceparent={headers.get('traceparent', '-')} "
          f"tracestate={headers.get('tracestate', '-')}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not all(arg.isdigit() for arg in argv[1:]):
        print(f"usage: {argv[0]} PORT [REQUESTS]", file=sys.stderr)
        return 2
    port = int(argv[1])
    count = int(argv[2]) if len(argv) == 3 else len(PLAN)

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "http-client"}))
    for exporter in exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("http_client")

    shared = http.client.HTTPConnection(HOST, port, timeout=30)
    connections = 0
    for i in range(count):
        step = PLAN[i % len(PLAN)]
        if step.own_connection:
            connections += 1
            own = http.client.HTTPConnection(HOST, port, timeout=30)
            request(tracer, own, connections, port, step)
            own.close()
        else:
            request(tracer, shared, 0, port, step)
    shared.close()
    provider.shutdown()  # exports what is still queued
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
