"""Which trace each event belongs to: HTTP requests seen on sockets, their traceparent headers, a
process's own TRACEPARENT, and the sampling decisions that follow from them.

The kernel makes every id and pairs calls; what it cannot do is parse text. So it starts each HTTP
request with a trace id of its own and makes the calls that serve the request its children; here, once
the request's bytes are parsed, a caller's traceparent replaces that trace id (and becomes the SERVER
span's parent) for every span of the request. Events arrive in the order the kernel emitted them, so a
request is always known before the calls that serve it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from otel_ebpf import http
from otel_ebpf.events import HTTP_REQUEST, HTTP_RESPONSE, PROCESS_START, SPAN, HttpRequestEvent
from otel_ebpf.spans import NO_PARENT, SpanEncoder

# Requests whose decisions are remembered: far more than can be in flight, or waiting for export.
MAX_TRACKED = 65536


@dataclass(frozen=True, slots=True)
class ServerSpan:
    """A finished HTTP request, ready to encode."""

    pid: int
    process_seq: int
    tid: int
    trace_id: bytes
    span_id: bytes
    parent: http.SpanContext | None  # the caller's span, from traceparent
    start_ns: int
    end_ns: int
    name: str
    attributes: dict = field(default_factory=dict)


@dataclass(slots=True)
class _Request:
    event: HttpRequestEvent
    request: http.Request | None
    parent: http.SpanContext | None
    keep: bool
    addresses: tuple | None


class Correlator:
    """Turns a drained batch into the items to export: function spans moved into the traces they belong
    to (or dropped when their trace is not sampled) and SERVER spans for finished requests."""

    def __init__(self, encoder: SpanEncoder, sample_root: Callable[[bytes], bool], parent_based: bool):
        self._encoder = encoder
        self._sample_root = sample_root
        self._parent_based = parent_based
        self._traces: dict[bytes, _Request] = {}  # by the kernel's trace id of a request
        self._requests: dict[bytes, _Request] = {}  # in flight, by the SERVER span id
        self._sockets: dict[tuple[int, int], tuple[str, tuple | None]] = {}

    def accept(self, batch: list) -> list:
        out = []
        for event in batch:
            if event.kind == SPAN.kind:
                span = self._place(event)
                if span is not None:
                    out.append(span)
            elif event.kind == HTTP_REQUEST.kind:
                self._start(event)
            elif event.kind == HTTP_RESPONSE.kind:
                request = self._requests.pop(event.span_id, None)
                if request is not None and request.keep and request.request is not None:
                    out.append(self._server_span(request, event))
            elif event.kind == PROCESS_START.kind:
                self._encoder.process(event.pid, event.process_seq)  # now: it may not live long
        return out

    def _place(self, span):
        """The span as it should be exported, or None when its trace is not sampled."""
        info = self._encoder.process(span.pid, span.process_seq, span.probe_id)
        request = self._traces.get(span.trace_id)
        if request is not None:
            if not request.keep:
                return None
            return span if request.parent is None else span._replace(trace_id=request.parent.trace_id)
        parent = info.parent
        if parent is None:
            return span
        if self._parent_based and not parent.sampled:
            return None
        root = span.parent_span_id == NO_PARENT
        return span._replace(trace_id=parent.trace_id, parent_span_id=parent.span_id if root else span.parent_span_id)

    def _start(self, event: HttpRequestEvent) -> None:
        self._encoder.process(event.pid, event.process_seq)
        request = http.parse_request(event.data[:event.length])
        parent = request.parent if request else None
        if not event.sampled:
            keep = False  # the kernel's sampler said no, and its calls were not emitted either
        elif not self._parent_based:
            keep = True
        else:
            keep = parent.sampled if parent else self._sample_root(event.trace_id)
        tracked = _Request(event, request, parent, keep, self._addresses(event.pid, event.fd))
        for table, key in ((self._traces, event.trace_id), (self._requests, event.span_id)):
            if len(table) >= MAX_TRACKED:
                del table[next(iter(table))]
            table[key] = tracked

    def _server_span(self, tracked: _Request, response) -> ServerSpan:
        request, event = tracked.request, tracked.event
        status = http.parse_response(response.data[:response.length]) if response.length else None
        local, peer = tracked.addresses or (None, None)
        attributes = http.server_span_attributes(request, status, local, peer)
        trace_id = tracked.parent.trace_id if tracked.parent else event.trace_id
        return ServerSpan(event.pid, event.process_seq, event.tid, trace_id, event.span_id, tracked.parent, event.start_ns,
                          response.end_ns, http.server_span_name(request), attributes)

    def _addresses(self, pid: int, fd: int):
        """The connection's addresses, read while it is open; cached while the fd names the same socket."""
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            return None
        cached = self._sockets.get((pid, fd))
        if cached is None or cached[0] != link:
            if len(self._sockets) >= MAX_TRACKED:
                self._sockets.clear()
            cached = self._sockets[(pid, fd)] = (link, http.socket_addresses(pid, fd))
        return cached[1]
