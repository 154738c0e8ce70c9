"""The hand-written OTLP encoder must produce what opentelemetry-proto's own parser reads back exactly."""

import os
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from otel_ebpf import __version__
from otel_ebpf.clock import WallClock, measure_offset
from otel_ebpf.events import SpanEvent
from otel_ebpf.spans import ProbeInfo, ProcessInfo, SpanEncoder, varint

PROBES = [ProbeInfo("handle_request", "/srv/app"), ProbeInfo("ns::Foo::bar(int, char)", "/usr/lib/libfoo.so")]


def attrs(key_values):
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in key_values}


@pytest.fixture
def encoder():
    enc = SpanEncoder(PROBES, WallClock(), service_name=None, resource_attributes={"deployment.environment.name": "t"})
    enc.remember_process(ProcessInfo(4242, "/srv/app", "/srv/app --port 80"))
    enc.remember_process(ProcessInfo(7, "/usr/bin/other", "other"))
    return enc


def event(**kw):
    base = dict(kind=1, start_ns=1_000, end_ns=2_500, trace_id=bytes(range(16)), span_id=b"\x01" * 8,
                parent_span_id=bytes(8), pid=4242, tid=4243, probe_id=0, depth=0, process_seq=0, goroutine_id=0)
    base.update(kw)
    return SpanEvent(**base)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32 + 5, 2**63])
def test_varint_round_trips(value):
    from google.protobuf.internal.decoder import _DecodeVarint

    assert _DecodeVarint(varint(value), 0) == (value, len(varint(value)))


def test_round_trip_through_opentelemetry_proto(encoder):
    batch = [
        event(),
        event(span_id=b"\x02" * 8, parent_span_id=b"\x01" * 8, probe_id=1, tid=99999, depth=1, end_ns=10**15),
        event(pid=7, tid=7, trace_id=b"\xff" * 16),
    ]
    request = ExportTraceServiceRequest.FromString(encoder.encode(batch))
    assert len(request.resource_spans) == 2
    by_pid = {attrs(rs.resource.attributes)["process.pid"]: rs for rs in request.resource_spans}
    app = by_pid[4242]
    assert attrs(app.resource.attributes) == {
        "service.name": "app", "process.pid": 4242, "process.executable.path": "/srv/app",
        "process.command_line": "/srv/app --port 80", "host.name": os.uname().nodename,
        "deployment.environment.name": "t", "telemetry.distro.name": "otel-ebpf",
        "telemetry.distro.version": __version__,
    }
    (scope,) = app.scope_spans
    assert scope.scope.name == "otel-ebpf"
    root, child = scope.spans
    offset = encoder.clock.offset_ns
    assert (root.name, root.kind, root.trace_id, root.span_id, root.parent_span_id) == (
        "handle_request", Span.SPAN_KIND_INTERNAL, bytes(range(16)), b"\x01" * 8, b"")
    assert (root.start_time_unix_nano, root.end_time_unix_nano) == (1_000 + offset, 2_500 + offset)
    assert attrs(root.attributes) == {"code.function.name": "handle_request", "code.file.path": "/srv/app",
                                      "thread.id": 4243, "process.pid": 4242}
    assert child.name == "ns::Foo::bar(int, char)" and child.parent_span_id == b"\x01" * 8
    assert attrs(child.attributes)["thread.id"] == 99999
    assert child.end_time_unix_nano == 10**15 + offset
    (other,) = by_pid[7].scope_spans[0].spans
    assert other.trace_id == b"\xff" * 16


def test_a_reused_pid_is_another_process(encoder):
    """The kernel numbers processes (process_seq): the new owner of a pid gets its own resource."""
    encoder.remember_process(ProcessInfo(4242, "/usr/bin/successor", "successor"), process_seq=7)
    request = ExportTraceServiceRequest.FromString(encoder.encode([event(), event(process_seq=7, span_id=b"\x02" * 8)]))
    executables = [attrs(rs.resource.attributes)["process.executable.path"] for rs in request.resource_spans]
    assert executables == ["/srv/app", "/usr/bin/successor"]


def test_service_name_precedence(encoder):
    assert encoder.resource_attributes(4242)["service.name"] == "app"
    named = SpanEncoder(PROBES, WallClock(), "checkout", {"service.name": "ignored"})
    assert named.resource_attributes(1)["service.name"] == "checkout"
    from_attrs = SpanEncoder(PROBES, WallClock(), None, {"service.name": "from-attrs"})
    assert from_attrs.resource_attributes(1)["service.name"] == "from-attrs"


def test_unknown_process_is_read_from_proc(encoder):
    encoder.process(os.getpid(), 0)
    resource = encoder.resource_attributes(os.getpid())
    assert resource["process.executable.path"] == os.path.realpath("/proc/self/exe")
    assert "pytest" in resource["process.command_line"]


def test_console_line(encoder):
    line = encoder.format(event(depth=1, parent_span_id=b"\x0a" * 8))
    assert "  handle_request  pid=4242 tid=4243" in line
    assert "0.002 ms" in line and "parent=" + "0a" * 8 in line and "trace=" + bytes(range(16)).hex() in line


def test_clock_offset_is_tight():
    offset, error = measure_offset()
    assert error < 50_000  # ns: the tool promises well under 0.1 ms
    assert abs(time.time_ns() - (time.monotonic_ns() + offset)) < 5_000_000
