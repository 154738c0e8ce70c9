"""Correlator fed notices and span records as the ring buffers give them: which trace each span lands in, which
are dropped, and the SERVER spans it makes, read back through opentelemetry-proto as a collector would."""

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otel_ebpf.clock import WallClock
from otel_ebpf.config import SamplerSettings
from otel_ebpf.correlation import MAX_TRACKED, Correlator
from otel_ebpf.kernel.layout import (SPAN_RECORD_DTYPE, SPAN_REMOTE_PARENT, FdsClosedNotice, HttpRequestNotice,
                                     HttpResponseNotice)
from otel_ebpf.otlp.encode import ProbeInfo, SpanEncoder
from otel_ebpf.processes import ProcessInfo, ProcessRegistry

PID = 4_000_000_000  # above any pid_max: no process of this machine
TID = 4_000_001
KERNEL_TRACE = bytes.fromhex("aa" * 16)  # the trace id the kernel gave the request
SERVER_SPAN = b"\x5e" * 8  # the kernel's id for the SERVER span
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
PROBES = [ProbeInfo("handle_request", "/srv/app"), ProbeInfo("fib", "/srv/app")]


def traceparent(flags: str = "01") -> str:
    return f"00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}"


def request(*headers: str, trace_id=KERNEL_TRACE, span_id=SERVER_SPAN, sampled=1, pid=PID, fd=3):
    data = ("GET /work?n=3 HTTP/1.1\r\nHost: example.com:8080\r\n"
            + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()
    return HttpRequestNotice(fd, pid, TID, 0, 1_000, trace_id, span_id, sampled, data)


def response(status: int = 200, span_id=SERVER_SPAN, pid=PID, fd=3, end_ns=9_000):
    """A whole response in one write: its header section and an empty body."""
    data = f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode()
    return HttpResponseNotice(fd, pid, TID, end_ns, span_id, data, len(data), 0, False, data[-8:])


def closed(span_id=SERVER_SPAN, pid=PID, fd=3, end_ns=9_500):
    return HttpResponseNotice(fd, pid, TID, end_ns, span_id, b"", 0, 0, True, b"")


def span(span_id: bytes, parent: bytes | None = SERVER_SPAN, trace_id=KERNEL_TRACE, probe_id=0, pid=PID):
    """A call the kernel attributed to the request (parent = SERVER span), nested in another call, or a root."""
    record = np.zeros(1, SPAN_RECORD_DTYPE)
    raw = record.view(np.uint8)
    at = {name: SPAN_RECORD_DTYPE.fields[name][1] for name in ("trace_id", "span_id", "parent_span_id")}
    raw[at["trace_id"]:at["trace_id"] + 16] = np.frombuffer(trace_id, np.uint8)
    raw[at["span_id"]:at["span_id"] + 8] = np.frombuffer(span_id, np.uint8)
    raw[at["parent_span_id"]:at["parent_span_id"] + 8] = np.frombuffer(parent or bytes(8), np.uint8)
    record["probe_id"], record["pid"], record["tid"] = probe_id, pid, TID
    record["start_ns"], record["end_ns"] = 2_000, 3_000
    return record


def correlator(sampler: str = "parentbased_always_on", ratio: float = 1.0, **environ: str):
    """A Correlator with a real registry; the traced process is remembered with `environ` as its own and, like a
    process found without its exec seen, its TRACEPARENT is user space's to apply."""
    registry = ProcessRegistry(None, {})
    info = ProcessInfo(PID, "/srv/app", ("/srv/app", "8080"), environ)
    registry.remember(info)
    settings = SamplerSettings(name=sampler, ratio=ratio)
    c = Correlator(registry, settings.samples, settings.parent_based, lambda probe_id: "/srv/app")
    if info.parent:
        c._user_parents[PID] = info.parent
    return c


def accept(c: Correlator, *items):
    """Notices first, then the spans, as a drain does: (span records kept, SERVER spans)."""
    server = c.notices([item for item in items if not isinstance(item, np.ndarray)])
    arrays = [item for item in items if isinstance(item, np.ndarray)]
    chunk = c.spans(np.concatenate(arrays) if arrays else np.zeros(0, SPAN_RECORD_DTYPE))
    return chunk.records, server


def ids(records: np.ndarray, field: str) -> list[bytes]:
    raw = records.view(np.uint8).reshape(len(records), -1)
    at, width = SPAN_RECORD_DTYPE.fields[field][1], 16 if field == "trace_id" else 8
    return [bytes(row[at:at + width]) for row in raw]


def test_traceparent_moves_the_request_into_the_callers_trace():
    c = correlator()
    kept, (server,) = accept(c, request(f"traceparent: {traceparent()}", "tracestate: a=1"), span(b"\x01" * 8),
                             span(b"\x02" * 8, parent=b"\x01" * 8, probe_id=1), response())
    caller = bytes.fromhex(CALLER_TRACE)
    assert ids(kept, "trace_id") == [caller, caller]
    assert ids(kept, "parent_span_id") == [SERVER_SPAN, b"\x01" * 8]  # parents untouched
    assert (server.trace_id, server.span_id, server.parent_span_id, server.tracestate) == (
        caller, SERVER_SPAN, bytes.fromhex(CALLER_SPAN), "a=1")
    assert (server.start_ns, server.end_ns, server.name) == (1_000, 9_000, "GET")
    assert server.attributes["http.response.status_code"] == 200 and server.attributes["url.query"] == "n=3"


def test_request_without_traceparent_keeps_the_kernels_trace():
    kept, (server,) = accept(correlator(), request(), span(b"\x01" * 8), response())
    assert ids(kept, "trace_id") == [KERNEL_TRACE] and server.trace_id == KERNEL_TRACE
    assert server.parent_span_id is None


@pytest.mark.parametrize("sampler, flags, kept", [
    ("parentbased_always_on", "00", False),  # the caller decided not to sample: so do we
    ("parentbased_always_off", "01", True),  # ... and to sample, whatever our own root rule says
    ("always_on", "00", True),  # not parent-based: the caller's flag is not consulted
])
def test_callers_sampled_flag_decides_under_parent_based(sampler, flags, kept):
    records, server = accept(correlator(sampler), request(f"traceparent: {traceparent(flags)}"), span(b"\x01" * 8),
                             response())
    assert (len(records), len(server)) == ((1, 1) if kept else (0, 0))


def test_request_the_kernel_did_not_sample_is_dropped():
    """Not parent-based, the kernel's root rule decided, and it emitted none of the request's calls."""
    records, server = accept(correlator("traceidratio", 0.5), request(f"traceparent: {traceparent('01')}", sampled=0),
                             span(b"\x01" * 8), response())
    assert (len(records), server) == (0, [])


@pytest.mark.parametrize("low_half, kept", [(0, True), (2**63 - 1, True), (2**63, False), (2**64 - 1, False)])
def test_ratio_rule_decides_requests_without_traceparent(low_half, kept):
    """The kernel leaves a parent-based root to user space, which applies TraceIdRatioBased to the kernel's
    trace id: the lower 64 bits, big-endian, below ratio * 2**64."""
    trace_id = bytes(8) + low_half.to_bytes(8, "big")
    records, server = accept(correlator("parentbased_traceidratio", 0.5), request(trace_id=trace_id),
                             span(b"\x01" * 8, trace_id=trace_id), response())
    assert (len(records), len(server)) == ((1, 1) if kept else (0, 0))


def test_traceparent_wins_over_the_ratio_rule():
    records, server = accept(correlator("parentbased_traceidratio", 0.0), request(f"traceparent: {traceparent('01')}"),
                             span(b"\x01" * 8), response())
    assert (len(records), len(server)) == (1, 1)


def test_a_request_that_is_not_http_parents_nothing():
    """A read that started like a method but does not parse: no SERVER span, so its calls lose that parent and
    the calls below them keep theirs."""
    garbage = request()._replace(data=b"GET \x00\x01 binary stuff\n\n")
    records, server = accept(correlator(), garbage, span(b"\x01" * 8), span(b"\x02" * 8, parent=b"\x01" * 8),
                             response())
    assert server == []
    assert ids(records, "span_id") == [b"\x01" * 8, b"\x02" * 8]
    assert ids(records, "parent_span_id") == [bytes(8), b"\x01" * 8]


def test_a_late_traceparent_in_a_later_read_still_moves_the_request():
    """The header section came in two reads: the second brought the traceparent."""
    first = request()._replace(data=b"GET /work HTTP/1.1\r\nHost: example.com\r\n")
    rest = request()._replace(data=f"traceparent: {traceparent()}\r\n\r\n".encode(), read=1)
    records, (server,) = accept(correlator(), first, rest, span(b"\x01" * 8), response())
    assert ids(records, "trace_id") == [bytes.fromhex(CALLER_TRACE)]
    assert server.parent_span_id == bytes.fromhex(CALLER_SPAN)


def write(data: bytes, written: int | None = None, tail: bytes | None = None, end_ns=9_000, write_no=1):
    """A response write as the kernel reports it: `data` its captured first bytes, written its length."""
    written = len(data) if written is None else written
    return HttpResponseNotice(3, PID, TID, end_ns, SERVER_SPAN, data, written, write_no, False,
                              data[-8:] if tail is None else tail)


@pytest.mark.parametrize("writes, end_ns", [
    # Content-Length: the header section, then the body in two writes of which only the lengths are known.
    ([write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", end_ns=5_000, write_no=0),
      write(b"", 4, b"0123", end_ns=6_000), write(b"", 6, b"456789", end_ns=7_000)], 7_000),
    # chunked: the last chunk ends a later write.
    ([write(b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", end_ns=5_000, write_no=0),
      write(b"", 12, b"\r\nab\r\n0\r\n\r\n"[-8:], end_ns=6_500)], 6_500),
    # no length: the connection's close ends it.
    ([write(b"HTTP/1.0 200 OK\r\n\r\nsome body", end_ns=5_000, write_no=0), closed(end_ns=8_000)], 8_000),
    # an interim 100 Continue first, then the final response with its body in the same write.
    ([write(b"HTTP/1.1 100 Continue\r\n\r\n", end_ns=4_000, write_no=0),
      write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", end_ns=5_500)], 5_500),
])
def test_the_server_span_ends_with_the_write_that_completes_its_response(writes, end_ns):
    c = correlator()
    _, spans = accept(c, request(), *writes[:-1])
    assert spans == []
    _, (server,) = accept(c, writes[-1])
    assert server.end_ns == end_ns
    assert accept(c, closed())[1] == []  # nothing more when the connection closes later


def test_keep_alive_a_response_of_unknown_length_ends_at_the_connections_next_request():
    second = request(span_id=b"\x77" * 8)._replace(start_ns=20_000)
    c = correlator()
    _, first_spans = accept(c, request(), write(b"HTTP/1.1 200 OK\r\n\r\nbody...", end_ns=6_000, write_no=0))
    _, (server,) = accept(c, second)
    assert first_spans == [] and server.span_id == SERVER_SPAN and server.end_ns == 6_000


@pytest.mark.parametrize("sampler, flags, kept", [
    ("parentbased_always_on", "01", True), ("parentbased_always_on", "00", False), ("always_on", "00", True)])
def test_process_started_with_traceparent_joins_that_trace(sampler, flags, kept):
    c = correlator(sampler, TRACEPARENT=traceparent(flags), TRACESTATE="a=1")
    records, _ = accept(c, span(b"\x01" * 8, parent=None, trace_id=b"\x11" * 16),
                        span(b"\x02" * 8, parent=b"\x01" * 8, trace_id=b"\x11" * 16))
    if not kept:
        assert len(records) == 0
        return
    caller = bytes.fromhex(CALLER_TRACE)
    assert ids(records, "trace_id") == [caller, caller]
    assert ids(records, "parent_span_id") == [bytes.fromhex(CALLER_SPAN), b"\x01" * 8]
    assert records["flags"].tolist() == [SPAN_REMOTE_PARENT, 0]


def test_request_in_a_process_started_with_traceparent_follows_its_own_header():
    """The request's caller is the nearer parent than whoever started the process."""
    c = correlator(TRACEPARENT=f"00-{'1' * 32}-{'2' * 16}-01")
    records, (server,) = accept(c, request(f"traceparent: {traceparent()}"), span(b"\x01" * 8), response())
    assert ids(records, "trace_id") == [bytes.fromhex(CALLER_TRACE)] == [server.trace_id]


def test_response_without_request_is_ignored():
    c = correlator()
    assert accept(c, response())[1] == []
    assert len(accept(c, request(), response(), response())[1]) == 1  # one response per request


def test_tables_are_bounded_and_forget_the_oldest_requests():
    """A request whose response never comes (a killed server) must not pin memory forever."""
    c = correlator("parentbased_always_off")  # no traceparent: every request is dropped, and remembered
    requests = [(i.to_bytes(16, "big"), i.to_bytes(8, "big")) for i in range(1, MAX_TRACKED + 2)]
    accept(c, *(request(trace_id=t, span_id=s) for t, s in requests))
    (oldest_trace, oldest_span), (newest_trace, _) = requests[0], requests[-1]
    assert len(accept(c, span(b"\x01" * 8, trace_id=newest_trace))[0]) == 0  # still known: dropped with its trace
    assert len(accept(c, span(b"\x01" * 8, trace_id=oldest_trace))[0]) == 1  # forgotten: as the kernel made it
    assert accept(c, response(span_id=oldest_span))[1] == []


def test_spans_carry_the_resource_of_their_process():
    c = correlator()
    chunk = c.spans(np.concatenate([span(b"\x01" * 8), span(b"\x02" * 8)]))
    (resource,) = chunk.resources.values()
    assert resource.service_name == "app"


def decode(c: Correlator, *items) -> list:
    records, server = accept(c, *items)
    encoder = SpanEncoder(PROBES.__getitem__, WallClock())
    data = encoder.encode([c.spans(records), server])
    (resource_spans,) = ExportTraceServiceRequest.FromString(data).resource_spans
    return list(resource_spans.scope_spans[0].spans)


@pytest.mark.parametrize("flags, tracestate", [("01", "a=1,b=2"), ("00", "")])
def test_server_span_round_trip_with_remote_parent(flags, tracestate):
    headers = [f"traceparent: {traceparent(flags)}"] + ([f"tracestate: {tracestate}"] if tracestate else [])
    function, server = decode(correlator("always_on"), request(*headers), span(b"\x01" * 8), response(404))
    assert (server.kind, server.name) == (Span.SPAN_KIND_SERVER, "GET")
    assert server.trace_id == function.trace_id == bytes.fromhex(CALLER_TRACE)
    assert (server.span_id, server.parent_span_id) == (SERVER_SPAN, bytes.fromhex(CALLER_SPAN))
    assert function.parent_span_id == SERVER_SPAN
    assert server.trace_state == tracestate
    assert server.flags == 0x301  # exported, and "the parent is remote"
    assert server.status.code == Status.STATUS_CODE_UNSET  # a 404 is the client's error, not the server's


@pytest.mark.parametrize("status, code", [(200, Status.STATUS_CODE_UNSET), (499, Status.STATUS_CODE_UNSET),
                                          (500, Status.STATUS_CODE_ERROR), (503, Status.STATUS_CODE_ERROR)])
def test_server_span_is_an_error_for_5xx_only(status, code):
    (server,) = decode(correlator(), request(), response(status))
    assert server.status.code == code
    assert server.parent_span_id == b"" and server.trace_state == "" and not server.flags & 0x200
    attributes = {kv.key: kv.value for kv in server.attributes}
    assert ("error.type" in attributes) == (code == Status.STATUS_CODE_ERROR)


@pytest.mark.parametrize("peer", [("127.0.0.1", 50123), ("::1", 443), ("10.1.2.3", 8)])
def test_server_span_addresses_are_the_peer_accept_returned(peer):
    _, (server_span,) = accept(correlator(), request()._replace(peer=peer), response())
    attributes = server_span.attributes
    assert (attributes["network.peer.address"], attributes["network.peer.port"]) == peer
    assert attributes["client.address"] == peer[0]
    assert (attributes["server.address"], attributes["server.port"]) == ("example.com", 8080)  # Host wins


@pytest.mark.parametrize("tls, scheme", [(False, "http"), (True, "https")])
def test_a_request_read_from_ssl_read_is_https(tls, scheme):
    _, (server_span,) = accept(correlator(), request()._replace(tls=tls), response())
    assert server_span.attributes["url.scheme"] == scheme


def test_pipelined_requests_get_their_own_spans_and_calls():
    """Two requests in one read, each with its traceparent: the second's SERVER span begins at that read and ends
    at its own response; calls the kernel put under the first after its response move to the second."""
    second_trace, second_parent = "11" * 16, "22" * 8
    first = request(f"traceparent: {traceparent()}")
    both = first._replace(data=first.data + (f"GET /b HTTP/1.1\r\ntraceparent: 00-{second_trace}-{second_parent}-01"
                                             "\r\n\r\n").encode())
    before, after = span(b"\x01" * 8), span(b"\x02" * 8)
    nested = span(b"\x03" * 8, parent=b"\x02" * 8)
    after["start_ns"], nested["start_ns"] = 9_500, 9_600
    c = correlator()
    kept, servers = accept(c, both, response(end_ns=9_000), before, after, nested)
    _, later = accept(c, response(503, end_ns=12_000))
    (one,), (two,) = servers, later
    assert (one.trace_id.hex(), one.end_ns, one.attributes["url.path"]) == (CALLER_TRACE, 9_000, "/work")
    assert (two.trace_id.hex(), two.parent_span_id.hex(), two.attributes["url.path"]) == (second_trace,
                                                                                         second_parent, "/b")
    assert (two.start_ns, two.end_ns, two.attributes["http.response.status_code"]) == (1_000, 12_000, 503)
    assert two.span_id not in (one.span_id, SERVER_SPAN)
    assert [t.hex() for t in ids(kept, "trace_id")] == [CALLER_TRACE, second_trace, second_trace]
    assert ids(kept, "parent_span_id") == [SERVER_SPAN, two.span_id, b"\x02" * 8]


def test_requests_end_when_their_descriptors_close_at_once():
    c = correlator()
    accept(c, request(fd=3), request(fd=9, span_id=b"\x77" * 8, trace_id=b"\x66" * 16))
    _, servers = accept(c, FdsClosedNotice(PID, 5, 2**32 - 1, 7_000))
    assert [(s.span_id, s.end_ns) for s in servers] == [(b"\x77" * 8, 7_000)]  # fd 3 is below the range
    _, servers = accept(c, closed(end_ns=8_000))
    assert [(s.span_id, s.end_ns) for s in servers] == [(SERVER_SPAN, 8_000)]
