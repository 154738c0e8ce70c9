"""What a user opening Jaeger sees: otel-ebpf's spans sent to a real Jaeger v2, directly or through a real
OpenTelemetry Collector, read back through Jaeger's query API (the JSON its UI reads, and /api/v3) and checked
against the traced programs' own ground truth; and the limits those backends enforce, against the retry
behaviour the README promises."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.backends import Collector, Jaeger, build_backends, own_spans, validate
from tests.e2e.conftest import clean_env
from tests.e2e.spancheck import check_tree, match, named
from tests.e2e.test_http import CLIENT_REQUESTS, FUNCTIONS, check_http, client_lines
from tests.ground_truth import HTTP_CLIENT, HTTPSERVER, NESTED, expected_counts, parse

IN_NESTED = ("handle_request", "parse_request", "compute", "fib")


@pytest.fixture(scope="module", autouse=True)
def backends_built():
    build_backends()


@pytest.fixture
def jaeger(tmp_path):
    """A Jaeger of the test's own: what it stores came from this test."""
    with Jaeger(tmp_path) as j:
        yield j


@pytest.fixture
def collector(tmp_path, jaeger):
    """Starts Collectors exporting to the test's Jaeger over OTLP/HTTP, unless told where; stops them after."""
    started: list[Collector] = []

    def start(export_to: str | None = None, ready: bool = True, **options) -> Collector:
        c = Collector(tmp_path, export_to or f"http://127.0.0.1:{jaeger.http_port}", **options)
        started.append(c)
        return c.start(ready)

    yield start
    for c in started:
        c.stop()


def export_env(target, protocol: str = "grpc", compression: str = "none", **extra: str) -> dict[str, str]:
    endpoint = target.grpc_endpoint if protocol == "grpc" else target.http_endpoint
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_COMPRESSION": compression, **extra}


def tags(span: dict) -> dict:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


def parent_of(span: dict) -> str | None:
    refs = [ref for ref in span["references"] if ref["refType"] == "CHILD_OF"]
    assert len(refs) <= 1, span
    return refs[0]["spanID"] if refs else None


def all_spans(jaeger: Jaeger) -> list[tuple[dict, object]]:
    """Every span Jaeger holds, from /api/v3, trace by trace as the UI finds them."""
    ids = {trace["traceID"] for service in jaeger.services() for trace in jaeger.ui_traces(service)}
    return [pair for trace_id in sorted(ids) for pair in jaeger.otlp_trace(trace_id)]


def check_ui_nested(jaeger: Jaeger, service: str, truth, counts) -> None:
    """The UI's view of nested's traces: one per handle_request, each a tree of the functions in the call
    order the program made them, under the service and process that ran them."""
    traces = jaeger.ui_traces(service)
    assert len(traces) == counts["handle_request"]
    operations = sorted(span["operationName"] for trace in traces for span in trace["spans"])
    assert operations == sorted(fn for fn in IN_NESTED for _ in range(counts[fn]))
    for trace in traces:
        [process] = trace["processes"].values()
        assert process["serviceName"] == service
        assert tags(process)["process.pid"] == truth.pid
        spans = {span["spanID"]: span for span in trace["spans"]}
        [root] = [span for span in spans.values() if parent_of(span) is None]
        assert root["operationName"] == "handle_request"
        for span in spans.values():
            assert tags(span)["span.kind"] == "internal"
            assert tags(span)["code.function.name"] == span["operationName"]
            if span is not root:
                parent = spans[parent_of(span)]
                assert span["operationName"] != "handle_request"
                assert parent["startTime"] <= span["startTime"]
                assert span["startTime"] + span["duration"] <= parent["startTime"] + parent["duration"] + 1


@pytest.mark.parametrize("route,protocol,compression", [
    ("jaeger", "grpc", "none"), ("jaeger", "http/protobuf", "gzip"), ("collector", "grpc", "gzip")])
def test_function_spans_in_jaeger(tracer, jaeger, collector, tmp_path, route, protocol, compression):
    """nested traced with its spans sent straight to Jaeger, or through a Collector (OTLP/gRPC in, OTLP/HTTP
    out); Jaeger's API shows the service, one trace per request, every call with its exact times and parent."""
    target = jaeger if route == "jaeger" else collector()
    truth_file, service = tmp_path / "truth.txt", f"nested-{route}"
    t = tracer(["trace", str(NESTED), *IN_NESTED, "--", str(NESTED), "2", "3"], NESTED_GROUND_TRUTH=str(truth_file),
               OTEL_SERVICE_NAME=service, **export_env(target, protocol, compression))
    assert t.finish() == 0, t.stderr
    truth, counts = parse(truth_file.read_text()), expected_counts(2, 3)
    expected = sum(counts[fn] for fn in IN_NESTED)
    assert f"{expected} spans exported, 0 lost" in t.stderr, t.stderr
    jaeger.wait_for_spans(service, expected)
    assert jaeger.services() == {service}
    check_ui_nested(jaeger, service, truth, counts)
    received = all_spans(jaeger)
    assert len(received) == expected
    check_tree(match(received, truth, named(*IN_NESTED)), truth)  # exact times: Jaeger keeps nanoseconds
    assert {r["service.name"] for r, _ in received} == {service}


@pytest.mark.parametrize("route", ["jaeger", "collector"])
def test_http_requests_in_the_clients_traces(tracer, jaeger, collector, route):
    """httpserver traced by otel-ebpf, called by the OTel-SDK client, both exporting to the same place: in
    Jaeger each client request's trace is the client's CLIENT span (service http-client), the SERVER span under
    it (service httpserver) and the functions that served it under that."""
    target = jaeger if route == "jaeger" else collector()
    t = tracer(["trace", str(HTTPSERVER), *FUNCTIONS, "--", str(HTTPSERVER), "0", str(CLIENT_REQUESTS)],
               **export_env(target))
    port = int(t.wait_stdout(r"listening port=(\d+)", timeout=120).group(1))
    client = subprocess.Popen([sys.executable, str(HTTP_CLIENT), str(port), str(CLIENT_REQUESTS)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean_env(**export_env(target, "http/protobuf")))
    lines = client_lines(client)
    assert t.finish() == 0, t.stderr
    truth = parse(t.stdout)
    functions = sum(c.fn in FUNCTIONS for c in truth.calls)
    assert f"otel-ebpf: {CLIENT_REQUESTS + functions} spans exported, 0 lost" in t.stderr, t.stderr
    jaeger.wait_for_spans("httpserver", CLIENT_REQUESTS + functions)
    jaeger.wait_for_spans("http-client", CLIENT_REQUESTS)
    assert jaeger.services() == {"httpserver", "http-client"}

    for line in lines:
        trace = jaeger.ui_trace(line.trace_id)
        spans = {span["spanID"]: span for span in trace["spans"]}
        service = {span["spanID"]: trace["processes"][span["processID"]]["serviceName"] for span in spans.values()}
        client_span = spans[line.span_id]
        assert (service[line.span_id], tags(client_span)["span.kind"]) == ("http-client", "client")
        assert parent_of(client_span) not in spans, "the root (the tracestate request's parent is upstream)"
        servers = [s for s in spans.values() if tags(s)["span.kind"] == "server"]
        if line.traceparent is None:  # the server's span starts a trace of its own
            assert list(spans) == [line.span_id]
            continue
        [server] = servers
        assert (service[server["spanID"]], server["operationName"], parent_of(server)) == \
            ("httpserver", "GET", line.span_id)
        assert tags(server)["url.path"] == line.target.split("?")[0]
        assert tags(server)["http.response.status_code"] == line.status
        for span in spans.values():
            if span is client_span or span is server:
                continue
            assert (service[span["spanID"]], tags(span)["span.kind"]) == ("httpserver", "internal")
            assert span["operationName"] in FUNCTIONS
            ancestor = span
            while parent_of(ancestor) != server["spanID"]:
                ancestor = spans[parent_of(ancestor)]
                assert ancestor is not client_span, f"{span['operationName']} outside its SERVER span"
    check_http(all_spans(jaeger), truth, [lines], port, {}, correlated=lambda request: True)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_requests_too_large_for_the_collector_are_sent_in_halves(tracer, jaeger, collector, tmp_path, protocol):
    """A Collector taking at most 1 MiB per request (gRPC max_recv_msg_size_mib, HTTP max_request_body_size)
    refuses otel-ebpf's one big batch; otel-ebpf sends it in halves, and every span reaches Jaeger."""
    limit = 1 << 20
    target = collector(grpc={"max_recv_msg_size_mib": 1}, http={"max_request_body_size": limit})
    truth_file, service = tmp_path / "truth.txt", "nested-big"
    t = tracer(["trace", str(NESTED), *IN_NESTED, "--", str(NESTED), "2", "400"],
               NESTED_GROUND_TRUTH=str(truth_file), OTEL_SERVICE_NAME=service,
               **export_env(target, protocol, OTEL_BSP_MAX_EXPORT_BATCH_SIZE="65536",
                            OTEL_BSP_MAX_QUEUE_SIZE="65536", OTEL_BSP_SCHEDULE_DELAY="600000"))
    assert t.finish() == 0, t.stderr
    counts = expected_counts(2, 400)
    expected = sum(counts[fn] for fn in IN_NESTED)
    assert "in one request as too large" in t.stderr, t.stderr
    assert f"{expected} spans exported, 0 lost" in t.stderr, t.stderr
    traces = jaeger.wait_for_spans(service, expected, timeout_s=60)
    assert sum(own_spans(trace, service) for trace in traces) == expected, "each span once"
    check_ui_nested(jaeger, service, parse(truth_file.read_text()), counts)


REFUSING = {
    # The memory limiter refuses everything: its limit is below any Collector's heap.
    "memory_limiter": dict(processors={"memory_limiter": {"check_interval": "100ms", "limit_mib": 1,
                                                          "spike_limit_mib": 0}}),
    # The exporter's queue holds one request while its backend is down; the receiver refuses the rest.
    "sending_queue": dict(exporter={"sending_queue": {"queue_size": 1},
                                    "retry_on_failure": {"initial_interval": "200ms", "max_interval": "1s"}}),
}


@pytest.mark.parametrize("refusal", list(REFUSING))
def test_spans_a_collector_refuses_are_retried_until_delivered(tracer, jaeger, collector, tmp_path, refusal):
    """A Collector that refuses data (UNAVAILABLE: memory_limiter over its limit, or a full sending_queue while
    its Jaeger is down) makes otel-ebpf keep the spans in its retry queue; once the Collector takes data again
    (restarted without the limit, or its Jaeger started) every span reaches Jaeger, each once."""
    if refusal == "memory_limiter":
        refusing, downstream = collector(**REFUSING[refusal]), jaeger
    else:  # exports to a port nothing listens on yet: its Jaeger starts later
        downstream = Jaeger(tmp_path)
        refusing = collector(export_to=f"http://127.0.0.1:{downstream.http_port}", **REFUSING[refusal])
    service, truth_file = "nested-retried", tmp_path / "truth.txt"
    t = tracer(["run"], OTEL_EBPF_PROBES=f"{NESTED}:{','.join(IN_NESTED)}", OTEL_SERVICE_NAME=service,
               **export_env(refusing, OTEL_BSP_MAX_EXPORT_BATCH_SIZE="20"))
    t.wait_ready()
    assert subprocess.run([str(NESTED), "2", "3"], env=clean_env(NESTED_GROUND_TRUTH=str(truth_file))).returncode == 0
    t.wait_stderr(r"otel-ebpf: span export failed: .*UNAVAILABLE")
    if refusal == "memory_limiter":
        refusing.stop()
        collector(ports=(refusing.grpc_port, refusing.http_port))
    else:
        downstream.start()
    counts = expected_counts(2, 3)
    expected = sum(counts[fn] for fn in IN_NESTED)
    try:
        traces = downstream.wait_for_spans(service, expected, timeout_s=60)
        assert t.finish(signal.SIGTERM) == 0, t.stderr
        assert f"{expected} spans exported, 0 lost" in t.stderr, t.stderr
        assert "span export recovered" in t.stderr, t.stderr
        assert sum(own_spans(trace, service) for trace in traces) == expected, "each span once"
        check_ui_nested(downstream, service, parse(truth_file.read_text()), counts)
    finally:
        downstream.stop()


def test_the_gateway_configuration_is_one_the_collector_accepts(tmp_path):
    """deploy/gateway-collector.yaml through the built Collector's own `validate` (k8sattributes needs a cluster
    to run, not to validate); the same file with a misspelt key is refused, naming it."""
    gateway = Path(__file__).resolve().parents[2] / "deploy" / "gateway-collector.yaml"
    result = validate(gateway)
    assert result.returncode == 0, result.stderr
    misspelt = tmp_path / "gateway.yaml"
    misspelt.write_text(gateway.read_text().replace("pod_association:", "pod_asociation:"))
    result = validate(misspelt)
    assert result.returncode != 0 and "pod_asociation" in result.stderr, result.stderr
