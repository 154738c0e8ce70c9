"""The span encoder must produce what opentelemetry-proto's own parser reads back exactly, with its compiled inner
loop and with the numpy one alike."""

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otel_ebpf import __version__
from otel_ebpf.kernel.layout import SPAN_RECORD_DTYPE, SPAN_REMOTE_PARENT
from otel_ebpf.otlp import encode
from otel_ebpf.otlp.encode import (SCHEMA_URL, ProbeInfo, Resource, ServerSpan, SpanChunk, SpanEncoder, process_key,
                                   resource, varint)
from tests.otlp_receiver import any_value

PROBES = [ProbeInfo("handle_request", "/srv/app"), ProbeInfo("ns::Foo::bar(int, char)", "/usr/lib/libfoo.so"),
          ProbeInfo("main.(*Server).handle", "/srv/goapp")]
OFFSET = 1_700_000_000_123_456_789


class Clock:
    offset_ns = OFFSET


def records(*spans: dict) -> np.ndarray:
    out = np.zeros(len(spans), SPAN_RECORD_DTYPE)
    for i, fields in enumerate(spans):
        base = dict(start_ns=1_000, end_ns=2_500, trace_id=(0x0706050403020100, 0x0F0E0D0C0B0A0908),
                    span_id=0x0101010101010101, pid=4242, tid=4243, ring_length=80)
        base.update(fields)
        for name, value in base.items():
            out[i][name] = value
    return out


def resources(*keys: tuple[int, int]) -> dict:
    return {int(process_key(pid, seq)): Resource(resource({"service.name": f"s{pid}", "process.pid": pid}),
                                                 f"s{pid}") for pid, seq in keys}


def attrs(key_values) -> dict:
    return {kv.key: any_value(kv.value) for kv in key_values}


def decode(data: bytes) -> list[tuple[dict, Span]]:
    request = ExportTraceServiceRequest.FromString(data)
    return [(attrs(rs.resource.attributes), span) for rs in request.resource_spans for ss in rs.scope_spans
            for span in ss.spans]


NATIVE = [pytest.param(True, id="compiled"), pytest.param(False, id="numpy")]


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32 + 5, 2**63])
def test_varint_round_trips(value):
    from google.protobuf.internal.decoder import _DecodeVarint

    assert _DecodeVarint(varint(value), 0) == (value, len(varint(value)))


@pytest.mark.parametrize("value", [0, 1, 127, 128, 2**21, 2**28 - 1])
def test_padded_varints_are_read_as_the_value(value):
    """The fixed-width varints (thread.id) must decode to the value itself: protobuf allows the padding."""
    data = SpanEncoder(PROBES.__getitem__, Clock(), native=False).encode(
        [SpanChunk(records(dict(tid=value)), resources((4242, 0)))])
    ((_, span),) = decode(data)
    assert attrs(span.attributes)["thread.id"] == value


def test_the_compiled_encoder_is_built():
    """make setup builds it; without it the hot path is several times slower, which the bench would show."""
    assert encode._native is not None


@pytest.mark.parametrize("native", NATIVE)
def test_round_trip_through_opentelemetry_proto(native):
    chunk = SpanChunk(records(
        dict(),
        dict(span_id=2, parent_span_id=0x0101010101010101, probe_id=1, tid=99999, depth=1, end_ns=10**15),
        dict(span_id=3, pid=7, tid=7, trace_id=(2**64 - 1, 2**64 - 1), process_seq=3),
        dict(span_id=4, probe_id=2, goroutine_id=2**62 + 5, parent_span_id=9, flags=SPAN_REMOTE_PARENT),
    ), resources((4242, 0), (7, 3)))
    spans = decode(SpanEncoder(PROBES.__getitem__, Clock(), native=native).encode([chunk]))
    assert len(spans) == 4
    by_id = {span.span_id: (res, span) for res, span in spans}
    res, root = by_id[b"\x01" * 8]
    assert res == {"service.name": "s4242", "process.pid": 4242}
    assert (root.name, root.kind, root.trace_id, root.parent_span_id) == (
        "handle_request", Span.SPAN_KIND_INTERNAL, bytes(range(16)), b"")
    assert (root.start_time_unix_nano, root.end_time_unix_nano) == (1_000 + OFFSET, 2_500 + OFFSET)
    assert attrs(root.attributes) == {"code.function.name": "handle_request", "code.file.path": "/srv/app",
                                      "thread.id": 4243}
    assert root.flags == 0x101  # sampled, parent not remote
    _, child = by_id[(2).to_bytes(8, "little")]
    assert child.name == "ns::Foo::bar(int, char)" and child.parent_span_id == b"\x01" * 8
    assert attrs(child.attributes)["thread.id"] == 99999 and child.end_time_unix_nano == 10**15 + OFFSET
    ((other_res, other),) = [(r, s) for r, s in spans if r["process.pid"] == 7]
    assert other.trace_id == b"\xff" * 16 and other_res["service.name"] == "s7"
    _, go = by_id[(4).to_bytes(8, "little")]
    assert attrs(go.attributes)["go.goroutine.id"] == 2**62 + 5
    assert go.flags == 0x301  # the parent is remote (a TRACEPARENT)


def test_requests_carry_the_scope_and_the_schema():
    data = SpanEncoder(PROBES.__getitem__, Clock()).encode([SpanChunk(records({}), resources((4242, 0)))])
    (rs,) = ExportTraceServiceRequest.FromString(data).resource_spans
    assert rs.schema_url == SCHEMA_URL and rs.scope_spans[0].schema_url == SCHEMA_URL
    assert (rs.scope_spans[0].scope.name, rs.scope_spans[0].scope.version) == ("otel-ebpf", __version__)


def test_both_encoders_give_the_same_bytes():
    """Many processes, probes and shapes mixed in one batch, in random order."""
    rng = np.random.default_rng(7)
    n = 5000
    chunk = np.zeros(n, SPAN_RECORD_DTYPE)
    chunk["start_ns"] = rng.integers(0, 2**40, n, dtype=np.uint64)
    chunk["end_ns"] = chunk["start_ns"] + rng.integers(0, 2**30, n, dtype=np.uint64)
    chunk["trace_id"] = rng.integers(0, 2**63, (n, 2), dtype=np.uint64)
    chunk["span_id"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    chunk["parent_span_id"] = rng.integers(0, 2, n, dtype=np.uint64) * rng.integers(1, 2**63, n, dtype=np.uint64)
    chunk["goroutine_id"] = rng.integers(0, 2, n, dtype=np.uint64) * rng.integers(1, 2**63, n, dtype=np.uint64)
    chunk["flags"] = rng.integers(0, 2, n, dtype=np.uint32)
    chunk["pid"] = rng.integers(1, 4, n, dtype=np.uint32)
    chunk["process_seq"] = rng.integers(0, 2, n, dtype=np.uint32)
    chunk["tid"] = rng.integers(1, 2**22, n, dtype=np.uint32)
    chunk["probe_id"] = rng.integers(0, len(PROBES), n, dtype=np.uint32)
    keys = resources(*((pid, seq) for pid in range(1, 4) for seq in range(2)))
    compiled = SpanEncoder(PROBES.__getitem__, Clock(), native=True)
    plain = SpanEncoder(PROBES.__getitem__, Clock(), native=False)
    chunks = [SpanChunk(chunk[:1234], keys), SpanChunk(chunk[1234:], keys)]
    data = compiled.encode(chunks)
    assert sorted(s.SerializeToString() for _, s in decode(data)) == sorted(
        s.SerializeToString() for _, s in decode(plain.encode(chunks)))
    assert len(decode(data)) == n


def test_a_server_span():
    res = resources((4242, 0))[int(process_key(4242, 0))]
    span = ServerSpan(int(process_key(4242, 0)), res, 4243, bytes(range(16)), b"\x05" * 8, b"\x06" * 8, "a=1",
                      1_000, 9_000, "GET", {"http.response.status_code": 503, "error.type": "503"})
    ((resource_attrs, decoded),) = decode(SpanEncoder(PROBES.__getitem__, Clock()).encode([[span]]))
    assert resource_attrs["service.name"] == "s4242"
    assert (decoded.kind, decoded.name, decoded.parent_span_id, decoded.trace_state) == (
        Span.SPAN_KIND_SERVER, "GET", b"\x06" * 8, "a=1")
    assert decoded.status.code == Status.STATUS_CODE_ERROR and decoded.flags == 0x301
    assert attrs(decoded.attributes)["thread.id"] == 4243


def test_arrays_of_strings():
    assert attrs(ExportTraceServiceRequest.FromString(encode.request([(resource(
        {"process.command_args": ["a", "b c"]}), [])])).resource_spans[0].resource.attributes) == {
        "process.command_args": ["a", "b c"]}


def test_slices_of_a_chunk_keep_its_resources():
    chunk = SpanChunk(records({}, {"span_id": 2}), resources((4242, 0)))
    assert len(chunk[1:]) == 1 and chunk[1:].resources is chunk.resources
