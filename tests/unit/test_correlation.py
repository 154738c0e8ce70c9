"""Correlator fed the event tuples the ring buffer yields: which trace each span lands in, which are dropped,
and the SERVER spans it makes, read back through opentelemetry-proto as a collector would."""

import os
import socket

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otel_ebpf.clock import WallClock
from otel_ebpf.config import SamplerSettings
from otel_ebpf.correlation import MAX_TRACKED, Correlator, ServerSpan
from otel_ebpf.events import HTTP_REQUEST, HTTP_RESPONSE, SPAN, HttpRequestEvent, HttpResponseEvent, SpanEvent
from otel_ebpf.http import SpanContext
from otel_ebpf.spans import NO_PARENT, ProbeInfo, ProcessInfo, SpanEncoder

PID = 4_000_000_000  # above any pid_max: /proc has no such process, so nothing is read from it
TID = PID + 1
KERNEL_TRACE = bytes.fromhex("aa" * 16)  # the trace id the kernel gave the request
SERVER_SPAN = b"\x5e" * 8  # the kernel's id for the SERVER span
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def traceparent(flags: str = "01") -> str:
    return f"00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}"


def request(*headers: str, trace_id=KERNEL_TRACE, span_id=SERVER_SPAN, sampled=1, pid=PID, fd=3):
    data = ("GET /work?n=3 HTTP/1.1\r\nHost: example.com:8080\r\n"
            + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()
    return HttpRequestEvent(HTTP_REQUEST.kind, fd, 1_000, trace_id, span_id, pid, TID, len(data), sampled, 0, 0, data)


def response(status: int = 200, span_id=SERVER_SPAN, pid=PID, fd=3):
    data = f"HTTP/1.1 {status} X\r\n".encode()
    return HttpResponseEvent(HTTP_RESPONSE.kind, fd, 9_000, span_id, pid, TID, len(data), 0, data)


def span(span_id: bytes, parent=SERVER_SPAN, trace_id=KERNEL_TRACE, probe_id=0, pid=PID):
    """A call the kernel attributed to the request (parent = SERVER span) or nested in another call."""
    return SpanEvent(SPAN.kind, probe_id, 2_000, 3_000, trace_id, span_id, parent, pid, TID, 0, 0, 0)


def correlator(sampler: str = "parentbased_always_on", ratio: float = 1.0, **environ: str):
    """A Correlator with a real encoder; the traced process is remembered with `environ` as its own."""
    encoder = SpanEncoder([ProbeInfo("handle_request", "/srv/app"), ProbeInfo("fib", "/srv/app")], WallClock())
    encoder.remember_process(ProcessInfo(PID, "/srv/app", "/srv/app 8080", environ))
    settings = SamplerSettings(name=sampler, ratio=ratio)
    return Correlator(encoder, settings.samples, settings.parent_based), encoder


def test_traceparent_moves_the_request_into_the_callers_trace():
    c, _ = correlator()
    root, child = span(b"\x01" * 8), span(b"\x02" * 8, parent=b"\x01" * 8, probe_id=1)
    out = c.accept([request(f"traceparent: {traceparent()}", "tracestate: a=1"), root, child, response()])
    caller = bytes.fromhex(CALLER_TRACE)
    assert out[:2] == [root._replace(trace_id=caller), child._replace(trace_id=caller)]  # parents untouched
    (server,) = out[2:]
    assert server == ServerSpan(PID, 0, TID, caller, SERVER_SPAN, SpanContext(caller, bytes.fromhex(CALLER_SPAN), True,
                                                                           "a=1"),
                                1_000, 9_000, "GET", server.attributes)
    assert server.attributes["http.response.status_code"] == 200 and server.attributes["url.query"] == "n=3"


def test_request_without_traceparent_keeps_the_kernels_trace():
    c, _ = correlator()
    root = span(b"\x01" * 8)
    out = c.accept([request(), root, response()])
    assert out[0] == root and out[1].trace_id == KERNEL_TRACE and out[1].parent is None


@pytest.mark.parametrize("sampler, flags, kept", [
    ("parentbased_always_on", "00", False),  # the caller decided not to sample: so do we
    ("parentbased_always_off", "01", True),  # ... and to sample, whatever our own root rule says
    ("always_on", "00", True),  # not parent-based: the caller's flag is not consulted
])
def test_callers_sampled_flag_decides_under_parent_based(sampler, flags, kept):
    c, _ = correlator(sampler)
    out = c.accept([request(f"traceparent: {traceparent(flags)}"), span(b"\x01" * 8), response()])
    assert len(out) == (2 if kept else 0)


def test_request_the_kernel_did_not_sample_is_dropped():
    """Not parent-based, the kernel's root rule decided, and it emitted none of the request's calls."""
    c, _ = correlator("traceidratio", 0.5)
    assert c.accept([request(f"traceparent: {traceparent('01')}", sampled=0), span(b"\x01" * 8), response()]) == []


@pytest.mark.parametrize("low_half, kept", [(0, True), (2**63 - 1, True), (2**63, False), (2**64 - 1, False)])
def test_ratio_rule_decides_requests_without_traceparent(low_half, kept):
    """The kernel leaves a parent-based root to user space, which applies TraceIdRatioBased to the kernel's
    trace id: the lower 64 bits, big-endian, below ratio * 2**64."""
    c, _ = correlator("parentbased_traceidratio", 0.5)
    trace_id = bytes(8) + low_half.to_bytes(8, "big")
    out = c.accept([request(trace_id=trace_id), span(b"\x01" * 8, trace_id=trace_id), response()])
    assert len(out) == (2 if kept else 0)


def test_traceparent_wins_over_the_ratio_rule():
    c, _ = correlator("parentbased_traceidratio", 0.0)
    assert len(c.accept([request(f"traceparent: {traceparent('01')}"), span(b"\x01" * 8), response()])) == 2


@pytest.mark.parametrize("sampler, flags, kept", [
    ("parentbased_always_on", "01", True), ("parentbased_always_on", "00", False), ("always_on", "00", True)])
def test_process_started_with_traceparent_joins_that_trace(sampler, flags, kept):
    c, _ = correlator(sampler, TRACEPARENT=traceparent(flags), TRACESTATE="a=1")
    root, child = span(b"\x01" * 8, parent=NO_PARENT), span(b"\x02" * 8, parent=b"\x01" * 8)
    out = c.accept([root, child])
    if not kept:
        assert out == []
        return
    caller = bytes.fromhex(CALLER_TRACE)
    assert out == [root._replace(trace_id=caller, parent_span_id=bytes.fromhex(CALLER_SPAN)),
                   child._replace(trace_id=caller)]


def test_request_in_a_process_started_with_traceparent_follows_its_own_header():
    """The request's caller is the nearer parent than whoever started the process."""
    c, _ = correlator(TRACEPARENT=f"00-{'1' * 32}-{'2' * 16}-01")
    out = c.accept([request(f"traceparent: {traceparent()}"), span(b"\x01" * 8), response()])
    assert out[0].trace_id == out[1].trace_id == bytes.fromhex(CALLER_TRACE)


def test_response_without_request_is_ignored():
    c, _ = correlator()
    assert c.accept([response()]) == []
    assert c.accept([request(), response(), response()])[1:] == []  # one response per request


def test_tables_are_bounded_and_forget_the_oldest_requests():
    """A request whose response never comes (a killed server) must not pin memory forever."""
    c, _ = correlator("parentbased_always_off")  # no traceparent: every request is dropped, and remembered
    ids = [(i.to_bytes(16, "big"), i.to_bytes(8, "big")) for i in range(1, MAX_TRACKED + 2)]
    c.accept([request(trace_id=t, span_id=s) for t, s in ids])
    oldest, newest = ids[0], ids[-1]
    assert c.accept([span(b"\x01" * 8, *reversed(newest))]) == []  # still known: dropped with its trace
    late = span(b"\x01" * 8, *reversed(oldest))
    assert c.accept([late]) == [late]  # forgotten: exported as the kernel made it
    assert c.accept([response(span_id=oldest[1])]) == []


def decode(encoder: SpanEncoder, items: list) -> list:
    (resource_spans,) = ExportTraceServiceRequest.FromString(encoder.encode(items)).resource_spans
    return list(resource_spans.scope_spans[0].spans)


@pytest.mark.parametrize("flags, tracestate", [("01", "a=1,b=2"), ("00", "")])
def test_server_span_round_trip_with_remote_parent(flags, tracestate):
    c, encoder = correlator("always_on")
    headers = [f"traceparent: {traceparent(flags)}"] + ([f"tracestate: {tracestate}"] if tracestate else [])
    function, server = decode(encoder, c.accept([request(*headers), span(b"\x01" * 8), response(404)]))
    assert (server.kind, server.name) == (Span.SPAN_KIND_SERVER, "GET")
    assert server.trace_id == function.trace_id == bytes.fromhex(CALLER_TRACE)
    assert (server.span_id, server.parent_span_id) == (SERVER_SPAN, bytes.fromhex(CALLER_SPAN))
    assert function.parent_span_id == SERVER_SPAN
    assert server.trace_state == tracestate
    assert server.flags == 0x300 | int(flags)  # W3C flags, and "the parent is remote"
    assert server.status.code == Status.STATUS_CODE_UNSET  # a 404 is the client's error, not the server's
    offset = encoder.clock.offset_ns
    assert (server.start_time_unix_nano, server.end_time_unix_nano) == (1_000 + offset, 9_000 + offset)


@pytest.mark.parametrize("status, code", [(200, Status.STATUS_CODE_UNSET), (499, Status.STATUS_CODE_UNSET),
                                          (500, Status.STATUS_CODE_ERROR), (503, Status.STATUS_CODE_ERROR)])
def test_server_span_is_an_error_for_5xx_only(status, code):
    c, encoder = correlator()
    (server,) = decode(encoder, c.accept([request(), response(status)]))
    assert server.status.code == code
    assert server.parent_span_id == b"" and server.trace_state == "" and not server.flags & 0x200
    attributes = {kv.key: kv.value for kv in server.attributes}
    assert ("error.type" in attributes) == (code == Status.STATUS_CODE_ERROR)


def test_server_span_addresses_come_from_the_live_socket():
    """The connection is looked up by pid and fd while it is open: here a real one of this process."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            c, encoder = correlator()
            encoder.remember_process(ProcessInfo(os.getpid(), "/srv/app", "app"))
            event = request(pid=os.getpid(), fd=accepted.fileno())
            (server_span,) = c.accept([event, response(pid=os.getpid(), fd=accepted.fileno())])
        peer = client.getsockname()
    attributes = server_span.attributes
    assert (attributes["network.peer.address"], attributes["network.peer.port"]) == peer
    assert attributes["client.address"] == "127.0.0.1"
    assert (attributes["server.address"], attributes["server.port"]) == ("example.com", 8080)  # Host wins
