"""HTTP/2 connections of traced processes -> a SERVER span per stream they serve, a CLIENT span per stream they
open (gRPC's named by its method).

The frames and their HPACK state are protocols/http2.py's, the names and codes of gRPC protocols/grpc.py's; here
each connection is kept by (pid, fd), its streams become spans as the sampler decides, and a connection that cannot
be followed is said once and counted. A served stream's SERVER span is in its caller's trace (traceparent); in a
Go server the goroutine started to serve it (a go_stream notice, given to the connection's oldest stream without
one) has its calls under that span, with the ids the kernel gave them: the decision about that trace is taken
there (`decide`). Elsewhere streams are not linked to probed calls (a thread serves many at once). An opened
stream is the child of what the kernel found in flight where its request was written (the notice of that
write), placed where that span ends up.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Callable

from otel_ebpf.kernel import layout
from otel_ebpf.otlp.encode import SPAN_KIND_CLIENT, ServerSpan, process_key
from otel_ebpf.processes import ProcessRegistry
from otel_ebpf.protocols import grpc, http1, http2
from otel_ebpf.tracecontext import SpanContext, parse_traceparent

# Connections followed at once: beyond, the oldest is forgotten.
MAX_CONNECTIONS = 4096
_log = logging.getLogger("otel_ebpf.http2_connections")
# (pid, process_seq, start_ns, trace id, parent span id) -> (trace id, parent span id or None) where that span
# ends up, or None when it is dropped: the Correlator's placing of a span among rewritten traces.
Place = Callable[[int, int, int, bytes, bytes], "tuple[bytes, bytes | None] | None"]
# (kernel trace id, new trace id or None to drop, span id whose children become roots): what becomes of the
# spans the kernel put in a trace.
Decide = Callable[[bytes, "bytes | None", bytes], None]


@dataclass(slots=True)
class _Served:
    """What a served stream's SERVER span is, decided when the Go goroutine serving it started."""

    trace_id: bytes
    span_id: bytes
    parent: SpanContext | None
    keep: bool


class Http2Connections:
    """The HTTP/2 connections of traced processes, fed the kernel's notices of their reads, writes and closes."""

    def __init__(self, registry: ProcessRegistry, sample_root: Callable[[bytes], bool], parent_based: bool,
                 place: Place, decide: Decide):
        self.registry = registry
        self._sample_root = sample_root
        self._parent_based = parent_based
        self._place = place
        self._decide = decide
        # By (pid, fd), with the notice of their first read or write (process, addresses, role).
        self._connections: collections.OrderedDict[tuple[int, int], tuple[http2.Connection, layout.Http2Notice]] = (
            collections.OrderedDict())
        self.broken = 0  # connections that could not be followed to their end
        self.client_spans_owned = 0  # opened streams with a traceparent: the program's own CLIENT spans

    def io(self, notice: layout.Http2Notice) -> list[ServerSpan]:
        """A read or write of an HTTP/2 connection, or its close: the streams it completed, as spans."""
        key = (notice.pid, notice.fd)
        if notice.direction == layout.HTTP2_CLOSED:
            connection, first = self._connections.pop(key, (None, None))
            return self._stream_spans(connection.close(notice.ns), first) if connection else []
        connection, first = self._connections.get(key, (None, notice))
        if connection is None:
            connection = http2.Connection(client=notice.outbound)
            self._connections[key] = connection, notice
            while len(self._connections) > MAX_CONNECTIONS:
                self._connections.popitem(last=False)
            if not notice.data.startswith(http2.PREFACE[:len(notice.data)]):
                connection.feed(notice.outbound, b"", 1, notice.ns, notice.tid)  # its start was not seen: broken
        was_broken = connection.broken
        streams = connection.feed(notice.direction == layout.HTTP2_SENT, notice.data, notice.length, notice.ns,
                                  notice.tid, notice if notice.outbound else None)
        if connection.broken and not was_broken:
            self.broken += 1
            if self.broken == 1:
                _log.warning("an HTTP/2 connection of pid %d could not be followed (a frame header or header block "
                             "was not seen: more than %d bytes in one read or write, or lost to a full ring buffer); "
                             "its requests are not reported, nor those of others like it", notice.pid,
                             layout.HTTP2_CAPTURE)
        return self._stream_spans(streams, first)

    def go_stream(self, notice: layout.GoStreamNotice) -> None:
        """A Go server started the goroutine for the connection's next stream: the oldest without one. Its
        trace is decided now, before its calls are drained: the caller's (traceparent), or the kernel's."""
        connection, _ = self._connections.get((notice.pid, notice.fd), (None, None))
        stream = None
        if connection is not None and not connection.broken:
            stream = next((s for s in connection.streams.values() if s.context is None), None)
        if stream is None:  # a stream not seen: no SERVER span for its calls to be under
            self._decide(notice.trace_id, notice.trace_id, notice.span_id)
            return
        headers = stream.headers
        parent = parse_traceparent(headers.get("traceparent"), headers.get("tracestate"))
        if not notice.sampled:
            keep = False
        elif not self._parent_based:
            keep = True
        else:
            keep = parent.sampled if parent else self._sample_root(notice.trace_id)
        stream.context = _Served(parent.trace_id if parent else notice.trace_id, notice.span_id, parent, keep)
        if not keep:
            self._decide(notice.trace_id, None, bytes(8))
        elif parent is not None:
            self._decide(notice.trace_id, parent.trace_id, bytes(8))

    def closed(self, pid: int, first: int, last: int, ns: int) -> list[ServerSpan]:
        """Descriptors first..last of process `pid` closed at once: their streams end."""
        out = []
        for key in [key for key in self._connections if key[0] == pid and first <= key[1] <= last]:
            connection, notice = self._connections.pop(key)
            out.extend(self._stream_spans(connection.close(ns), notice))
        return out

    def _stream_spans(self, streams: list[http2.Stream], notice: layout.Http2Notice) -> list[ServerSpan]:
        """Spans of finished streams. `notice`: the connection's first, which tells its process and addresses."""
        spans = (self._client_span(stream, notice) if notice.outbound else self._server_span(stream, notice)
                 for stream in streams)
        return [span for span in spans if span is not None]

    def _server_span(self, stream: http2.Stream, notice: layout.Http2Notice) -> ServerSpan | None:
        """In its caller's trace (traceparent), as the sampler decides, with the ids its goroutine's calls have."""
        served: _Served | None = stream.context
        if served is None:
            headers = stream.headers
            parent = parse_traceparent(headers.get("traceparent"), headers.get("tracestate"))
            trace_id = parent.trace_id if parent else os.urandom(16)
            keep = parent.sampled if parent and self._parent_based else self._sample_root(trace_id)
            served = _Served(trace_id, os.urandom(8), parent, keep)
        if not served.keep:
            return None
        parent = served.parent
        peer, local = notice.peer, notice.local
        if grpc.is_grpc(stream):
            name, attributes = grpc.server_span(stream, peer, local)
        else:
            request = _request(stream, notice)
            name, attributes = http1.server_span_name(request), http1.server_span_attributes(
                request, stream.status, local, peer)
        key = int(process_key(notice.pid, notice.process_seq))
        return ServerSpan(key, self.registry.resource(key), stream.tid, served.trace_id, served.span_id,
                          parent.span_id if parent else None, parent.tracestate if parent else "",
                          stream.start_ns, stream.end_ns, name, attributes)

    def _client_span(self, stream: http2.Stream, notice: layout.Http2Notice) -> ServerSpan | None:
        """The child of the span in flight where its request was written, else a root; none for a request the
        program propagated its own context with."""
        if "traceparent" in stream.headers:
            self.client_spans_owned += 1
            return None
        written: layout.Http2Notice = stream.context
        if any(written.trace_id):
            if not written.sampled:
                return None
            placed = self._place(written.pid, written.process_seq, stream.start_ns, written.trace_id,
                                 written.parent_span_id)
            if placed is None:
                return None
            trace_id, parent = placed
        else:
            trace_id, parent = os.urandom(16), None
            if not self._sample_root(trace_id):
                return None
        if grpc.is_grpc(stream):
            name, attributes = grpc.client_span(stream, notice.peer)
        else:
            request = _request(stream, notice)
            name = http1.server_span_name(request)
            attributes = http1.client_span_attributes(request, stream.status, notice.peer, notice.tls)
        key = int(process_key(notice.pid, notice.process_seq))
        return ServerSpan(key, self.registry.resource(key), stream.tid, trace_id, os.urandom(8), parent, "",
                          stream.start_ns, stream.end_ns, name, attributes, SPAN_KIND_CLIENT)


def _request(stream: http2.Stream, notice: layout.Http2Notice) -> http1.Request:
    """A stream's request as an HTTP/1.x one would be parsed: pseudo-header fields as the request line, Host."""
    headers = stream.headers
    fields = {k: v for k, v in headers.items() if not k.startswith(":")}
    fields.setdefault("host", headers.get(":authority", ""))
    request = http1.request_from(headers.get(":method", ""), headers.get(":path", ""), "2", fields)
    return dataclasses.replace(request, scheme=headers.get(":scheme") or ("https" if notice.tls else "http"))
