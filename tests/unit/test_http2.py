"""HTTP/2 frames as the kernel hands them over (the first bytes of each read and write, and its length) -> streams,
and gRPC's names for them. Frames are built by hand and header blocks by hpack's encoder, as a peer would."""

import struct

import hpack
import pytest

from otel_ebpf.protocols import grpc, http2
from otel_ebpf.protocols.http2 import (CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS, PADDED, PREFACE,
                                       RST_STREAM, SETTINGS, Connection, FrameReader)


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


class Peer:
    """One side's encoder: its header blocks fill the table the other side decodes with."""

    def __init__(self):
        self.encoder = hpack.Encoder()

    def headers(self, stream_id: int, fields, flags: int = END_HEADERS) -> bytes:
        return frame(HEADERS, flags, stream_id, self.encoder.encode(fields))


def request_fields(path: str = "/demo.Greeter/SayHello", **extra: str):
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1:50051"),
            ("content-type", "application/grpc"), *extra.items()]


def test_a_unary_call_from_preface_to_trailers():
    client, server, connection = Peer(), Peer(), Connection()
    received = PREFACE + frame(SETTINGS, 0, 0, b"") + client.headers(1, request_fields(traceparent="tp")) + frame(
        DATA, END_STREAM, 1, b"\0\0\0\0\1x")
    assert connection.feed(False, received, len(received), 1_000, 7) == []
    response = server.headers(1, [(":status", "200"), ("content-type", "application/grpc")]) + frame(
        DATA, 0, 1, b"\0\0\0\0\2hi")
    assert connection.feed(True, response, len(response), 2_000, 7) == []
    trailers = server.headers(1, [("grpc-status", "5"), ("grpc-message", "gone")], END_HEADERS | END_STREAM)
    (stream,) = connection.feed(True, trailers, len(trailers), 3_000, 7)
    assert (stream.start_ns, stream.end_ns, stream.tid, stream.status) == (1_000, 3_000, 7, 200)
    assert stream.headers["traceparent"] == "tp" and stream.response["grpc-status"] == "5"
    name, attrs = grpc.server_span(stream, ("127.0.0.1", 40000), ("127.0.0.1", 50051))
    assert name == "demo.Greeter/SayHello"
    assert attrs == {"rpc.system.name": "grpc", "rpc.method": "demo.Greeter/SayHello",
                     "rpc.response.status_code": "NOT_FOUND", "server.address": "127.0.0.1", "server.port": 50051,
                     "network.peer.address": "127.0.0.1", "network.peer.port": 40000, "client.address": "127.0.0.1"}


def test_frames_split_anywhere_across_reads_and_streams_interleaved():
    """Byte by byte, a header block in HEADERS + CONTINUATION with padding, two streams at once: the same
    streams as if it came whole; the encoder's table carries from one block to the next."""
    client, server, connection = Peer(), Peer(), Connection()
    block = client.encoder.encode(request_fields("/a.B/One"))
    padded = bytes([3]) + block[:10] + b"\0\0\0"
    received = (PREFACE + frame(HEADERS, PADDED, 1, padded) + frame(CONTINUATION, END_HEADERS, 1, block[10:])
                + client.headers(3, request_fields("/a.B/Two")))
    for i in range(len(received)):
        assert connection.feed(False, received[i:i + 1], 1, 10 + i, 1) == []
    done = []
    for stream_id in (3, 1):
        sent = server.headers(stream_id, [(":status", "200"), ("grpc-status", "0")], END_HEADERS | END_STREAM)
        done += connection.feed(True, sent, len(sent), 5_000, 2)
    assert [(s.stream_id, s.headers[":path"]) for s in done] == [(3, "/a.B/Two"), (1, "/a.B/One")]
    assert not connection.broken and connection.streams == {}


def test_data_the_kernel_did_not_copy_is_skipped_by_length():
    """A 100 KB DATA frame of which only the first bytes were copied, then the response in a later write: still
    followed. A frame header in the bytes not copied breaks the direction for good."""
    reader = FrameReader()
    big = frame(DATA, 0, 1, bytes(100_000))
    assert [f.type for f in reader.feed(big[:4096], len(big))] == [DATA]
    tail = frame(RST_STREAM, 0, 1, b"\0\0\0\x08")
    assert [(f.type, f.payload) for f in reader.feed(tail, len(tail))] == [(RST_STREAM, b"\0\0\0\x08")]
    assert not reader.broken
    two = frame(DATA, 0, 1, b"x" * 10) + frame(HEADERS, END_HEADERS, 1, b"\x88")
    assert [f.type for f in reader.feed(two[:12], len(two))] == [DATA]
    assert reader.broken and reader.feed(tail, len(tail)) == []


def test_a_reset_ends_a_stream_and_a_close_ends_the_rest():
    client, connection = Peer(), Connection()
    received = PREFACE + client.headers(1, request_fields()) + client.headers(3, request_fields())
    connection.feed(False, received, len(received), 1, 1)
    reset = frame(RST_STREAM, 0, 1, b"\0\0\0\x08")
    (stream,) = connection.feed(False, reset, len(reset), 2, 1)
    assert (stream.stream_id, stream.reset, stream.end_ns) == (1, True, 2)
    assert [(s.stream_id, s.end_ns, s.status) for s in connection.close(9)] == [(3, 9, None)]


def test_a_header_block_that_does_not_decode_breaks_the_connection():
    connection = Connection()
    received = PREFACE + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff")  # an index far past the table
    assert connection.feed(False, received, len(received), 1, 1) == []
    assert connection.broken and connection.close(2) == []


@pytest.mark.parametrize("path, method", [("/pkg.Service/Method", "pkg.Service/Method"), ("/Service/M", "Service/M"),
                                          ("/", None), ("/a/b/c", None), ("x/y", None), ("//m", None)])
def test_grpc_method_from_the_path(path, method):
    assert grpc.method(path) == method


@pytest.mark.parametrize("code, name, error", [("0", "OK", False), ("5", "NOT_FOUND", False),
                                               ("2", "UNKNOWN", True), ("13", "INTERNAL", True),
                                               ("14", "UNAVAILABLE", True), ("16", "UNAUTHENTICATED", False),
                                               ("99", "99", False)])
def test_only_server_side_codes_are_errors_of_a_server_span(code, name, error):
    stream = http2.Stream(1, 0, 0, {":path": "/a.B/C", "content-type": "application/grpc"},
                          response={"grpc-status": code})
    _, attrs = grpc.server_span(stream, None, None)
    assert attrs["rpc.response.status_code"] == name
    assert attrs.get("error.type") == (name if error else None)


def test_a_client_connection_opens_streams_where_it_writes():
    """Seen from the client: the preface and requests go out (written), responses come in (read); each stream
    keeps the context its request's write was given, and ends at the response's END_STREAM."""
    client, server, connection = Peer(), Peer(), Connection(client=True)
    sent = PREFACE + frame(SETTINGS, 0, 0, b"") + client.headers(1, request_fields("/a.B/One"), END_HEADERS | END_STREAM)
    assert connection.feed(True, sent, len(sent), 1_000, 7, "first write") == []
    more = client.headers(3, request_fields("/a.B/Two"), END_HEADERS | END_STREAM)
    assert connection.feed(True, more, len(more), 1_500, 8, "second write") == []
    answer = (frame(SETTINGS, 0, 0, b"") + server.headers(3, [(":status", "200")]) + frame(DATA, END_STREAM, 3, b"x")
              + server.headers(1, [(":status", "200"), ("grpc-status", "14")], END_HEADERS | END_STREAM))
    two, one = connection.feed(False, answer, len(answer), 2_000, 9)
    assert [(s.stream_id, s.start_ns, s.end_ns, s.tid, s.context) for s in (one, two)] == [
        (1, 1_000, 2_000, 7, "first write"), (3, 1_500, 2_000, 8, "second write")]
    assert one.response["grpc-status"] == "14" and two.status == 200


@pytest.mark.parametrize("code, name", [("0", "OK"), ("5", "NOT_FOUND"), ("16", "UNAUTHENTICATED"), ("2", "UNKNOWN")])
def test_every_code_but_ok_is_an_error_of_a_client_span(code, name):
    stream = http2.Stream(1, 0, 0, {":path": "/a.B/C", ":authority": "svc:50051", "content-type": "application/grpc"},
                          response={"grpc-status": code})
    span_name, attrs = grpc.client_span(stream, ("10.0.0.1", 50051))
    assert span_name == "a.B/C" and attrs == {
        "rpc.system.name": "grpc", "rpc.method": "a.B/C", "rpc.response.status_code": name,
        **({} if name == "OK" else {"error.type": name}), "server.address": "svc", "server.port": 50051,
        "network.peer.address": "10.0.0.1", "network.peer.port": 50051}
