"""HTTP/2 server connections of traced processes -> a SERVER span per stream (gRPC's named by its method).

The frames and their HPACK state are protocols/http2.py's, the names and codes of gRPC protocols/grpc.py's; here
each connection is kept by (pid, fd), its streams become spans in their callers' traces as the sampler decides,
and a connection that cannot be followed is said once and counted. No probed call is linked to a stream (a thread
serves many streams at once), so nothing here touches function spans.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Callable

from otel_ebpf.kernel import layout
from otel_ebpf.otlp.encode import ServerSpan, process_key
from otel_ebpf.processes import ProcessRegistry
from otel_ebpf.protocols import grpc, http1, http2
from otel_ebpf.tracecontext import parse_traceparent

# Connections followed at once: beyond, the oldest is forgotten.
MAX_CONNECTIONS = 4096
_log = logging.getLogger("otel_ebpf.http2_servers")


class Http2Servers:
    """The HTTP/2 connections of traced servers, fed the kernel's notices of their reads, writes and closes."""

    def __init__(self, registry: ProcessRegistry, sample_root: Callable[[bytes], bool], parent_based: bool):
        self.registry = registry
        self._sample_root = sample_root
        self._parent_based = parent_based
        # By (pid, fd), with the notice of their first read (process, addresses).
        self._connections: collections.OrderedDict[tuple[int, int], tuple[http2.Connection, layout.Http2Notice]] = (
            collections.OrderedDict())
        self.broken = 0  # connections that could not be followed to their end

    def io(self, notice: layout.Http2Notice) -> list[ServerSpan]:
        """A read or write of an HTTP/2 connection, or its close: the streams it completed, as SERVER spans."""
        key = (notice.pid, notice.fd)
        if notice.direction == layout.HTTP2_CLOSED:
            connection, first = self._connections.pop(key, (None, None))
            return self._stream_spans(connection.close(notice.ns), first) if connection else []
        connection, first = self._connections.get(key, (None, notice))
        if connection is None:
            connection = http2.Connection()
            self._connections[key] = connection, notice
            while len(self._connections) > MAX_CONNECTIONS:
                self._connections.popitem(last=False)
            if not notice.data.startswith(http2.PREFACE[:len(notice.data)]):
                connection.feed(False, b"", 1, notice.ns, notice.tid)  # its start was not seen: broken
        was_broken = connection.broken
        streams = connection.feed(notice.direction == layout.HTTP2_SENT, notice.data, notice.length, notice.ns,
                                  notice.tid)
        if connection.broken and not was_broken:
            self.broken += 1
            if self.broken == 1:
                _log.warning("an HTTP/2 connection of pid %d could not be followed (a frame header or header block "
                             "was not seen: more than %d bytes in one read or write, or lost to a full ring buffer); "
                             "its requests are not reported, nor those of others like it", notice.pid,
                             layout.HTTP2_CAPTURE)
        return self._stream_spans(streams, first)

    def _stream_spans(self, streams: list[http2.Stream], notice: layout.Http2Notice) -> list[ServerSpan]:
        """SERVER spans of finished HTTP/2 streams, in their callers' traces, as the sampler decides. `notice`: the
        connection's first, which tells its process and addresses."""
        out = []
        for stream in streams:
            headers = stream.headers
            parent = parse_traceparent(headers.get("traceparent"), headers.get("tracestate"))
            trace_id = parent.trace_id if parent else os.urandom(16)
            if not (parent.sampled if parent and self._parent_based else self._sample_root(trace_id)):
                continue
            peer, local = notice.peer, notice.local
            if grpc.is_grpc(stream):
                name, attributes = grpc.server_span(stream, peer, local)
            else:
                scheme = headers.get(":scheme") or ("https" if notice.tls else "http")
                fields = {k: v for k, v in headers.items() if not k.startswith(":")}
                fields.setdefault("host", headers.get(":authority", ""))
                request = dataclasses.replace(http1.request_from(headers.get(":method", ""), headers.get(":path", ""),
                                                                 "2", fields), scheme=scheme)
                name, attributes = http1.server_span_name(request), http1.server_span_attributes(
                    request, stream.status, local, peer)
            key = int(process_key(notice.pid, notice.process_seq))
            out.append(ServerSpan(key, self.registry.resource(key), stream.tid, trace_id, os.urandom(8),
                                  parent.span_id if parent else None, parent.tracestate if parent else "",
                                  stream.start_ns, stream.end_ns, name, attributes))
        return out

    def closed(self, pid: int, first: int, last: int, ns: int) -> list[ServerSpan]:
        """Descriptors first..last of process `pid` closed at once: their streams end."""
        out = []
        for key in [key for key in self._connections if key[0] == pid and first <= key[1] <= last]:
            connection, notice = self._connections.pop(key)
            out.extend(self._stream_spans(connection.close(ns), notice))
        return out
