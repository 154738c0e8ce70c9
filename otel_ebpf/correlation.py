"""Which trace each span belongs to, where only user space can tell: HTTP requests and their traceparent headers,
and the TRACEPARENT of processes the kernel did not see exec.

The kernel makes every id and pairs calls; what it cannot do is parse text. So it starts each HTTP request with
a trace id of its own and makes the calls that serve the request its children; here, once the request's bytes
are parsed, a caller's traceparent replaces that trace id (and becomes the SERVER span's parent) for every span
of the request, and the spans of requests the sampler drops are dropped. Notices are read before the spans they
explain (session.py), so a request is always known before the calls that serve it. All of it works on whole
arrays of spans: a batch with no such span costs one comparison.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

import numpy as np

from otel_ebpf import http
from otel_ebpf.kernel import layout
from otel_ebpf.otlp.encode import ServerSpan, SpanChunk, process_key
from otel_ebpf.processes import ProcessRegistry

# Requests whose decisions are remembered: far more than can be in flight, or have spans still to drain.
MAX_TRACKED = 4096
_TRACE_LOW = layout.SPAN_RECORD_DTYPE.fields["trace_id"][1] // 8  # the trace id's two words in a record
_PARENT = layout.SPAN_RECORD_DTYPE.fields["parent_span_id"][1] // 8
_PID = layout.SPAN_RECORD_DTYPE.fields["pid"][1] // 8
_FLAGS = layout.SPAN_RECORD_DTYPE.fields["flags"][1] // 4


@dataclass(slots=True)
class _Request:
    notice: layout.HttpRequestNotice
    request: http.Request | None
    parent: http.SpanContext | None
    keep: bool
    addresses: tuple | None  # (local, peer), read from /proc while the connection is open


class _Rewrites:
    """What to do with the spans of some traces, by trace id: drop them, or move them into another trace.

    Kept as sorted arrays for numpy, rebuilt only when a trace was added since the last batch."""

    def __init__(self, capacity: int):
        self._entries: collections.OrderedDict[bytes, bytes | None] = collections.OrderedDict()
        self._capacity = capacity
        self._arrays = None

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, trace_id: bytes, new_trace_id: bytes | None) -> None:
        """new_trace_id None: drop the trace's spans."""
        self._entries[trace_id] = new_trace_id
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        self._arrays = None

    def _sorted(self):
        if self._arrays is None:
            keys = np.frombuffer(b"".join(self._entries), np.uint64).reshape(-1, 2)
            new = np.frombuffer(b"".join(t or bytes(16) for t in self._entries.values()), np.uint64).reshape(-1, 2)
            drop = np.array([t is None for t in self._entries.values()])
            order = np.argsort(keys[:, 1], kind="stable")
            self._arrays = keys[order], new[order], drop[order]
        return self._arrays

    def apply(self, words: np.ndarray) -> np.ndarray:
        """Rewrite trace ids in place in `words` (records as 64-bit words); returns which spans to keep, and
        which matched a trace here (for callers that rewrite the rest)."""
        keys, new, drop = self._sorted()
        low, high = words[:, _TRACE_LOW + 1], words[:, _TRACE_LOW]
        at = np.minimum(np.searchsorted(keys[:, 1], low), len(keys) - 1)
        matched = (keys[at, 1] == low) & (keys[at, 0] == high)
        move = matched & ~drop[at]
        words[move, _TRACE_LOW:_TRACE_LOW + 2] = new[at[move]]
        return ~(matched & drop[at]), matched


class Correlator:
    """Turns drained notices and spans into what the export pipeline takes: SpanChunks with their processes'
    resources, and SERVER spans for finished requests."""

    def __init__(self, registry: ProcessRegistry, sample_root: Callable[[bytes], bool], parent_based: bool,
                 binaries: Callable[[int], str]):
        self.registry = registry
        self._sample_root = sample_root
        self._parent_based = parent_based
        self._binaries = binaries  # probe id -> binary, the executable of a process nothing else names
        self._requests: collections.OrderedDict[bytes, _Request] = collections.OrderedDict()  # by SERVER span id
        self._rewrites = _Rewrites(MAX_TRACKED)
        # Processes whose TRACEPARENT only user space knows (found without their exec seen): by process key.
        self._user_parents: dict[int, http.SpanContext] = {}

    def notices(self, notices: list) -> list[ServerSpan]:
        out = []
        for notice in notices:
            if isinstance(notice, layout.ProcessNotice):
                info = self.registry.on_notice(notice)
                if info is not None and info.parent and not (notice.identity and notice.identity.flags
                                                             & layout.IDENTITY_CAPTURED):
                    self._user_parents[int(process_key(notice.pid, notice.process_seq))] = info.parent
            elif isinstance(notice, layout.HttpRequestNotice):
                self._start(notice)
            elif isinstance(notice, layout.HttpResponseNotice):
                tracked = self._requests.pop(notice.span_id, None)
                if tracked is not None and tracked.keep and tracked.request is not None:
                    out.append(self._server_span(tracked, notice))
        return out

    def spans(self, records: np.ndarray) -> SpanChunk:
        """The drained records as a chunk to export: moved into their traces, the unsampled ones left out."""
        words = layout.words(records)
        keep = matched = None
        if self._rewrites and len(records):
            keep, matched = self._rewrites.apply(words)
        for key, parent in self._user_parents.items():
            keep = self._adopt(records, words, key, parent, matched, keep)
        if keep is not None and not keep.all():
            records = records[keep]
        keys = layout.words(records)[:, _PID] if len(records) else ()
        distinct = [int(keys[0])] if len(keys) and (keys == keys[0]).all() else np.unique(keys).tolist()
        probe_ids = records["probe_id"]
        resources = {key: self.registry.resource(key, self._binaries(int(probe_ids[np.argmax(keys == key)])))
                     for key in distinct}
        return SpanChunk(records, resources)

    def _adopt(self, records, words, key: int, parent: http.SpanContext, matched, keep):
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

    def _start(self, notice: layout.HttpRequestNotice) -> None:
        request = http.parse_request(notice.data)
        parent = request.parent if request else None
        if not notice.sampled:
            keep = False  # the kernel's sampler said no, and its calls were not emitted either
        elif not self._parent_based:
            keep = True
        else:
            keep = parent.sampled if parent else self._sample_root(notice.trace_id)
        if request is None:
            keep = False  # not HTTP after all: no SERVER span, so nothing may be its child
        addresses = http.socket_addresses(notice.pid, notice.fd) if keep else None
        self._requests[notice.span_id] = _Request(notice, request, parent, keep, addresses)
        while len(self._requests) > MAX_TRACKED:
            self._requests.popitem(last=False)
        if not keep:
            self._rewrites.add(notice.trace_id, None)
        elif parent is not None:
            self._rewrites.add(notice.trace_id, parent.trace_id)

    def _server_span(self, tracked: _Request, response: layout.HttpResponseNotice) -> ServerSpan:
        request, notice = tracked.request, tracked.notice
        status = http.parse_response(response.data) if response.data else None
        local, peer = tracked.addresses or (None, None)
        attributes = http.server_span_attributes(request, status, local, peer)
        key = int(process_key(notice.pid, notice.process_seq))
        parent = tracked.parent
        return ServerSpan(key, self.registry.resource(key), notice.tid, parent.trace_id if parent else notice.trace_id,
                          notice.span_id, parent.span_id if parent else None, parent.tracestate if parent else "",
                          notice.start_ns, response.end_ns, http.server_span_name(request), attributes)
