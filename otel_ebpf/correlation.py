"""Which trace each span belongs to, where only user space can tell: HTTP requests and their traceparent headers,
and the TRACEPARENT of processes the kernel did not see exec.

The kernel makes every id and pairs calls; what it cannot do is parse text. So it starts each HTTP request with
a trace id of its own and makes the calls that serve the request its children; here, once the request's bytes
are parsed, a caller's traceparent replaces that trace id (and becomes the SERVER span's parent) for every span
of the request, the spans of requests the sampler drops are dropped, and those of a "request" that is not HTTP
after all lose their parent. The SERVER span ends at the write that completes its response (http1.ResponseFraming),
else at the connection's next request or its close. Requests pipelined behind it in the same reads are only seen
here: each gets a SERVER span of its own once the one before it was answered, and the calls that the kernel put in
the first request's trace after that answer move to it (_Splits). HTTP/2 connections give each stream a span of its
own (http2_connections.py), and a Go server's stream goroutine has its calls under it. Outbound requests become
CLIENT spans, placed in the trace their parent span ends up in (_place). Notices are read before the spans they explain
(session.py), so a request is always known before the calls that serve it. All of it works on whole arrays of
spans: a batch with no such span costs one comparison.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from otel_ebpf.http2_connections import Http2Connections
from otel_ebpf.protocols import http1
from otel_ebpf.tracecontext import SpanContext
from otel_ebpf.kernel import layout
from otel_ebpf.otlp.encode import SPAN_KIND_CLIENT, ServerSpan, SpanChunk, process_key
from otel_ebpf.processes import ProcessRegistry

# Requests whose decisions are remembered: far more than can be in flight, or have spans still to drain.
MAX_TRACKED = 4096
# A header section longer than this is not waited for: the request is parsed from what came.
MAX_HEADER_BYTES = layout.HTTP_REQUEST_CAPTURE * layout.HTTP_REQUEST_READS
_TRACE_LOW = layout.SPAN_RECORD_DTYPE.fields["trace_id"][1] // 8  # the trace id's two words in a record
_PARENT = layout.SPAN_RECORD_DTYPE.fields["parent_span_id"][1] // 8
_PID = layout.SPAN_RECORD_DTYPE.fields["pid"][1] // 8
_FLAGS = layout.SPAN_RECORD_DTYPE.fields["flags"][1] // 4


@dataclass(slots=True)
class _Request:
    notice: layout.HttpRequestNotice  # of its first read
    data: bytes  # what its reads brought, while its header section is open
    request: http1.Request | None
    parent: SpanContext | None
    keep: bool
    framing: http1.ResponseFraming | None = None
    last_write_ns: int = 0
    pipelined: _Request | None = None  # the next request read with this one, answered after it
    kernel_trace: bytes = b""  # the trace id the kernel gave its calls: its own, or the first pipelined one's


class _Rewrites:
    """What to do with the spans of some traces, by trace id: drop them, move them into another trace, or cut
    them off a parent span that will never be exported.

    Kept as sorted arrays for numpy, rebuilt only when a trace was added since the last batch."""

    def __init__(self, capacity: int):
        self._entries: collections.OrderedDict[bytes, tuple[bytes | None, bytes]] = collections.OrderedDict()
        self._capacity = capacity
        self._arrays = None

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, trace_id: bytes, new_trace_id: bytes | None, orphan_of: bytes = bytes(8)) -> None:
        """new_trace_id None: drop the trace's spans. orphan_of: a span id whose children become roots."""
        self._entries[trace_id] = (new_trace_id, orphan_of)
        self._entries.move_to_end(trace_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        self._arrays = None

    def _sorted(self):
        if self._arrays is None:
            keys = np.frombuffer(b"".join(self._entries), np.uint64).reshape(-1, 2)
            values = list(self._entries.values())
            new = np.frombuffer(b"".join(t or bytes(16) for t, _ in values), np.uint64).reshape(-1, 2)
            drop = np.array([t is None for t, _ in values])
            orphan = np.frombuffer(b"".join(o for _, o in values), np.uint64)
            order = np.argsort(keys[:, 1], kind="stable")
            self._arrays = keys[order], new[order], drop[order], orphan[order]
        return self._arrays

    def apply(self, words: np.ndarray) -> np.ndarray:
        """Rewrite trace ids and parents in place in `words` (records as 64-bit words); returns which spans to
        keep, and which matched a trace here (for callers that rewrite the rest)."""
        keys, new, drop, orphan = self._sorted()
        low, high = words[:, _TRACE_LOW + 1], words[:, _TRACE_LOW]
        at = np.minimum(np.searchsorted(keys[:, 1], low), len(keys) - 1)
        matched = (keys[at, 1] == low) & (keys[at, 0] == high)
        cut = matched & (orphan[at] != 0) & (words[:, _PARENT] == orphan[at])
        words[cut, _PARENT] = 0
        move = matched & ~drop[at] & (new[at] != 0).any(axis=1)
        words[move, _TRACE_LOW:_TRACE_LOW + 2] = new[at[move]]
        return ~(matched & drop[at]), matched


@dataclass(slots=True)
class _Outbound:
    notice: layout.HttpClientNotice
    request: http1.Request
    framing: http1.ResponseFraming  # where its response ends, from the reads of it
    last_read_ns: int = 0


class _Splits:
    """The calls of pipelined requests: the kernel puts them in the trace of the request read first, under its
    SERVER span; those that start once its response is complete belong to the next request (and after that
    one's, to the next). Few: one entry per pipelined request, by the kernel's trace id."""

    def __init__(self, capacity: int):
        # kernel trace id -> [(since_ns, kernel span id, new trace id or None to drop, new parent span id)], by since
        self._by_trace: collections.OrderedDict[bytes, list] = collections.OrderedDict()
        self._capacity = capacity
        self._lows = None

    def __bool__(self) -> bool:
        return bool(self._by_trace)

    def add(self, trace_id: bytes, since_ns: int, span_id: bytes, new_trace_id: bytes | None,
            new_span_id: bytes) -> None:
        self._by_trace.setdefault(trace_id, []).append(
            (since_ns, np.frombuffer(span_id, np.uint64)[0], new_trace_id, np.frombuffer(new_span_id, np.uint64)[0]))
        self._by_trace.move_to_end(trace_id)
        while len(self._by_trace) > self._capacity:
            self._by_trace.popitem(last=False)
        self._lows = None

    def apply(self, records: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Moves the spans in place; returns which spans to keep, and which moved or were dropped."""
        if self._lows is None:
            self._lows = np.frombuffer(b"".join(self._by_trace), np.uint64)[1::2].copy()
        keep, matched = np.ones(len(words), bool), np.zeros(len(words), bool)
        starts = records["start_ns"]
        for row in np.flatnonzero(np.isin(words[:, _TRACE_LOW + 1], self._lows)):
            segments = self._by_trace.get(words[row, _TRACE_LOW:_TRACE_LOW + 2].tobytes(), ())
            start = int(starts[row])
            later = [segment for segment in segments if segment[0] <= start]
            if not later:
                continue  # the first request's own
            _, span_id, new_trace_id, new_span_id = later[-1]
            matched[row] = True
            if new_trace_id is None:
                keep[row] = False
                continue
            words[row, _TRACE_LOW:_TRACE_LOW + 2] = np.frombuffer(new_trace_id, np.uint64)
            if words[row, _PARENT] == span_id:
                words[row, _PARENT] = new_span_id
        return keep, matched


class Correlator:
    """Turns drained notices and spans into what the export pipeline takes: SpanChunks with their processes'
    resources, and SERVER spans for finished requests."""

    def __init__(self, registry: ProcessRegistry, sample_root: Callable[[bytes], bool], parent_based: bool,
                 binaries: Callable[[int], str]):
        self.registry = registry
        self._sample_root = sample_root
        self._parent_based = parent_based
        self._binaries = binaries  # probe id -> binary, the executable of a process nothing else names
        # By the SERVER span id the kernel made (which a pipelined request answered later inherits).
        self._requests: collections.OrderedDict[bytes, _Request] = collections.OrderedDict()
        self._connections: dict[tuple[int, int], bytes] = {}  # (pid, fd) -> the key of its request
        self._rewrites = _Rewrites(MAX_TRACKED)
        self._splits = _Splits(MAX_TRACKED)
        # Processes whose TRACEPARENT only user space knows (found without their exec seen): by process key.
        self._user_parents: dict[int, SpanContext] = {}
        self.http2 = Http2Connections(registry, sample_root, parent_based, self._place, self._rewrites.add)
        self._clients: collections.OrderedDict[bytes, _Outbound] = collections.OrderedDict()  # by CLIENT span id
        self._client_connections: dict[tuple[int, int], bytes] = {}
        self._client_spans_owned = 0  # HTTP/1.x outbound requests with a traceparent

    @property
    def client_spans_owned(self) -> int:
        """Outbound requests that carried a traceparent: the program's own CLIENT spans, none made here."""
        return self._client_spans_owned + self.http2.client_spans_owned

    def notices(self, notices: list) -> list[ServerSpan]:
        out = []
        for notice in notices:
            if isinstance(notice, layout.ProcessNotice):
                info = self.registry.on_notice(notice)
                if info is not None and info.parent and not (notice.identity and notice.identity.flags
                                                             & layout.IDENTITY_CAPTURED):
                    self._user_parents[int(process_key(notice.pid, notice.process_seq))] = info.parent
            elif isinstance(notice, layout.HttpRequestNotice):
                out.extend(self._read(notice))
            elif isinstance(notice, layout.HttpResponseNotice):
                out.extend(self._written(notice))
            elif isinstance(notice, layout.HttpClientNotice):
                out.extend(self._outbound(notice))
            elif isinstance(notice, layout.Http2Notice):
                out.extend(self.http2.io(notice))
            elif isinstance(notice, layout.GoStreamNotice):
                self.http2.go_stream(notice)
            elif isinstance(notice, layout.FdsClosedNotice):
                closed = [key for (pid, fd), key in self._connections.items()
                          if pid == notice.pid and notice.first <= fd <= notice.last]
                for key in closed:
                    out.extend(self._finish(key, notice.end_ns))
                for key in [key for (pid, fd), key in self._client_connections.items()
                            if pid == notice.pid and notice.first <= fd <= notice.last]:
                    out.extend(self._client_done(key, notice.end_ns))
                out.extend(self.http2.closed(notice.pid, notice.first, notice.last, notice.end_ns))
        return out

    def spans(self, records: np.ndarray) -> SpanChunk:
        """The drained records as a chunk to export: moved into their traces, the unsampled ones left out."""
        records = self._placed(records)
        keys = layout.words(records)[:, _PID] if len(records) else ()
        distinct = [int(keys[0])] if len(keys) and (keys == keys[0]).all() else np.unique(keys).tolist()
        probe_ids = records["probe_id"]
        resources = {key: self.registry.resource(key, self._binaries(int(probe_ids[np.argmax(keys == key)])))
                     for key in distinct}
        return SpanChunk(records, resources)

    def _placed(self, records: np.ndarray) -> np.ndarray:
        """Records moved into the traces user space decided (in place), the unsampled ones left out."""
        words = layout.words(records)
        keep = matched = None
        if self._splits and len(records):
            keep, matched = self._splits.apply(records, words)
        if self._rewrites and len(records):
            kept, rewritten = self._rewrites.apply(words)
            keep, matched = (kept, rewritten) if keep is None else (keep & kept, matched | rewritten)
        for key, parent in self._user_parents.items():
            keep = self._adopt(records, words, key, parent, matched, keep)
        if keep is not None and not keep.all():
            records = records[keep]
        return records

    def _adopt(self, records, words, key: int, parent: SpanContext, matched, keep):
        """Spans of a process started under `parent` that no request claimed join its trace; its roots become
        children of the parent span. Returns the updated keep mask."""
        mine = words[:, _PID] == key
        if matched is not None:
            mine &= ~matched
        if not mine.any():
            return keep
        if self._parent_based and not parent.sampled:
            keep = ~mine if keep is None else keep & ~mine
            return keep
        words[mine, _TRACE_LOW:_TRACE_LOW + 2] = np.frombuffer(parent.trace_id, np.uint64)
        roots = mine & (words[:, _PARENT] == 0)
        words[roots, _PARENT] = np.frombuffer(parent.span_id, np.uint64)[0]
        halves = layout.halves(records)
        halves[roots, _FLAGS] |= np.uint32(layout.SPAN_REMOTE_PARENT)
        return keep

    def _read(self, notice: layout.HttpRequestNotice) -> list[ServerSpan]:
        """A request's read: its first begins it (and ends the connection's previous request), later ones add
        to its header section."""
        if notice.read:
            tracked = self._requests.get(notice.span_id)
            while tracked is not None and tracked.data is None:
                tracked = tracked.pipelined  # the rest of a request pipelined behind it
            if tracked is not None:
                tracked.data += notice.data
                self._decide(tracked)
            return []
        out = []
        connection = (notice.pid, notice.fd)
        previous = self._connections.pop(connection, None)
        if previous is not None:
            out.extend(self._finish(previous, None))
        tracked = _Request(notice, notice.data, None, None, False, kernel_trace=notice.trace_id)
        self._requests[notice.span_id] = tracked
        self._connections[connection] = notice.span_id
        while len(self._requests) > MAX_TRACKED:
            _, dropped = self._requests.popitem(last=False)
            self._connections.pop((dropped.notice.pid, dropped.notice.fd), None)
        self._decide(tracked)
        return out

    def _decide(self, tracked: _Request) -> None:
        """Parse what the request's reads brought and decide its trace; again after each read while its header
        section is open (a traceparent can come late)."""
        notice = tracked.notice
        request = http1.parse_request(tracked.data)
        if request is not None and notice.tls and request.scheme is None:
            request = dataclasses.replace(request, scheme="https")
        parent = request.parent if request else None
        if not notice.sampled:
            keep = False  # the kernel's sampler said no, and its calls were not emitted either
        elif not self._parent_based:
            keep = True
        else:
            keep = parent.sampled if parent else self._sample_root(notice.trace_id)
        tracked.request, tracked.parent, tracked.keep = request, parent, keep and request is not None
        if request is not None and tracked.framing is None:
            tracked.framing = http1.ResponseFraming(request.method)
        if http1.header_section_complete(tracked.data) or len(tracked.data) >= MAX_HEADER_BYTES:
            at = http1.next_request_at(tracked.data) if request is not None else None
            if at is not None:
                self._pipeline(tracked, tracked.data[at:])
            tracked.data = None
        if tracked.kernel_trace != notice.trace_id:
            return  # pipelined: no call is in its own trace, _Splits moves them
        if request is None:
            # Not HTTP after all: no SERVER span, so the calls made meanwhile are roots of their own.
            self._rewrites.add(notice.trace_id, notice.trace_id, notice.span_id)
        elif not keep:
            self._rewrites.add(notice.trace_id, None)
        elif parent is not None:
            self._rewrites.add(notice.trace_id, parent.trace_id)

    def _pipeline(self, tracked: _Request, data: bytes) -> None:
        """`data` followed `tracked`'s request in its reads: if it is a request, the next one to answer."""
        if http1.parse_request(data) is None:
            return
        notice = tracked.notice._replace(trace_id=os.urandom(16), span_id=os.urandom(8), data=data, read=0)
        tracked.pipelined = _Request(notice, data, None, None, False, kernel_trace=tracked.kernel_trace)
        self._decide(tracked.pipelined)

    def _outbound(self, notice: layout.HttpClientNotice) -> list[ServerSpan]:
        """An outbound request: it ends the connection's previous one (at its last read), and waits for its
        response, unless the program put a traceparent in it: then the program made its own CLIENT span."""
        connection = (notice.pid, notice.fd)
        previous = self._client_connections.pop(connection, None)
        out = self._client_done(previous, None) if previous else []
        request = http1.parse_request(notice.data)
        if request is None:
            return out
        if request.parent is not None:
            self._client_spans_owned += 1
            return out
        self._clients[notice.span_id] = _Outbound(notice, request, http1.ResponseFraming(request.method))
        self._client_connections[connection] = notice.span_id
        while len(self._clients) > MAX_TRACKED:
            _, dropped = self._clients.popitem(last=False)
            self._client_connections.pop((dropped.notice.pid, dropped.notice.fd), None)
        return out

    def _client_done(self, span_id: bytes, end_ns: int | None) -> list[ServerSpan]:
        """The outbound request's CLIENT span, ended at end_ns or (None) at its response's last read; placed in
        the trace its parent ends up in, and dropped with it."""
        tracked = self._clients.pop(span_id, None)
        if tracked is None:
            return []
        notice = tracked.notice
        connection = (notice.pid, notice.fd)
        if self._client_connections.get(connection) == span_id:
            del self._client_connections[connection]
        placed = self._place(notice.pid, notice.process_seq, notice.start_ns, notice.trace_id,
                             notice.parent_span_id) if notice.sampled else None
        if placed is None:
            return []
        trace_id, parent = placed
        status = tracked.framing.status
        key = int(process_key(notice.pid, notice.process_seq))
        end = end_ns or tracked.last_read_ns or notice.start_ns
        return [ServerSpan(key, self.registry.resource(key), notice.tid, trace_id, notice.span_id, parent, "",
                           notice.start_ns, end,
                           http1.server_span_name(tracked.request),
                           http1.client_span_attributes(tracked.request, status, notice.peer, notice.tls),
                           SPAN_KIND_CLIENT)]

    def _place(self, pid: int, process_seq: int, start_ns: int, trace_id: bytes,
               parent_span_id: bytes) -> tuple[bytes, bytes | None] | None:
        """Where a span the kernel made a child of (trace_id, parent_span_id) ends up, as its trace's function
        spans do: (trace id, parent span id or None for a root), or None when that trace is dropped."""
        record = np.zeros(1, layout.SPAN_RECORD_DTYPE)
        record["pid"], record["process_seq"], record["start_ns"] = pid, process_seq, start_ns
        words = layout.words(record)
        words[0, _TRACE_LOW:_TRACE_LOW + 2] = np.frombuffer(trace_id, np.uint64)
        words[0, _PARENT] = np.frombuffer(parent_span_id, np.uint64)[0]
        record = self._placed(record)
        if not len(record):
            return None
        words = layout.words(record)
        parent = words[0, _PARENT].tobytes()
        return words[0, _TRACE_LOW:_TRACE_LOW + 2].tobytes(), parent if any(parent) else None

    def _written(self, notice: layout.HttpResponseNotice) -> list[ServerSpan]:
        outbound = self._clients.get(notice.span_id)
        if outbound is not None:  # a read of an outbound request's response
            if notice.closed:
                return self._client_done(notice.span_id, notice.end_ns)
            outbound.last_read_ns = notice.end_ns
            if outbound.framing.write(notice.written, notice.data, notice.tail):
                return self._client_done(notice.span_id, notice.end_ns)
            return []
        tracked = self._requests.get(notice.span_id)
        if tracked is None:
            return []
        if notice.closed:
            return self._finish(notice.span_id, notice.end_ns)
        tracked.last_write_ns = notice.end_ns
        if tracked.framing is None or not tracked.framing.write(notice.written, notice.data, notice.tail):
            return []
        out = self._finish(notice.span_id, notice.end_ns)
        following = tracked.pipelined
        if following is not None:
            # Answered next; the kernel knows nothing of it, so its calls come in under the first one's ids.
            self._requests[notice.span_id] = following
            self._connections[(notice.pid, notice.fd)] = notice.span_id
            parent = following.parent
            self._splits.add(tracked.kernel_trace, notice.end_ns, notice.span_id,
                             (parent.trace_id if parent else following.notice.trace_id) if following.keep else None,
                             following.notice.span_id)
        return out

    def _finish(self, span_id: bytes, end_ns: int | None) -> list[ServerSpan]:
        """The request ends: at end_ns, or (None: its connection's next request came) at its last write."""
        tracked = self._requests.pop(span_id, None)
        if tracked is None:
            return []
        connection = (tracked.notice.pid, tracked.notice.fd)
        if self._connections.get(connection) == span_id:
            del self._connections[connection]
        if not tracked.keep:
            return []
        return [self._server_span(tracked, end_ns or tracked.last_write_ns or tracked.notice.start_ns)]

    def _server_span(self, tracked: _Request, end_ns: int) -> ServerSpan:
        request, notice = tracked.request, tracked.notice
        status = tracked.framing.status if tracked.framing else None
        attributes = http1.server_span_attributes(request, status, notice.local, notice.peer)
        key = int(process_key(notice.pid, notice.process_seq))
        parent = tracked.parent
        return ServerSpan(key, self.registry.resource(key), notice.tid, parent.trace_id if parent else notice.trace_id,
                          notice.span_id, parent.span_id if parent else None, parent.tracestate if parent else "",
                          notice.start_ns, end_ns, http1.server_span_name(request), attributes)
