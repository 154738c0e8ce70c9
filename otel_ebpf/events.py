"""The kernel's span events: their layout (mirroring bpf/event.h) and draining them from the ring buffer.

The ring buffer is read through its mmap()ed pages, the way libbpf does it, so a whole batch of events is
decoded in one Python loop instead of one ctypes callback per event.
"""

from __future__ import annotations

import mmap
import select
import struct
from dataclasses import dataclass
from typing import NamedTuple

from otel_ebpf.errors import UserError

# Mirrors of the structs in bpf/event.h: (field, struct format) in declaration order.
SPAN_FIELDS = (
    ("kind", "I"), ("probe_id", "I"), ("start_ns", "Q"), ("end_ns", "Q"), ("trace_id", "16s"),
    ("span_id", "8s"), ("parent_span_id", "8s"), ("pid", "I"), ("tid", "I"), ("depth", "I"),
    ("process_seq", "I"), ("goroutine_id", "Q"),
)
HTTP_REQUEST_CAPTURE = 1024
HTTP_RESPONSE_CAPTURE = 32
HTTP_REQUEST_FIELDS = (
    ("kind", "I"), ("fd", "I"), ("start_ns", "Q"), ("trace_id", "16s"), ("span_id", "8s"), ("pid", "I"),
    ("tid", "I"), ("length", "I"), ("sampled", "I"), ("process_seq", "I"), ("pad", "I"),
    ("data", f"{HTTP_REQUEST_CAPTURE}s"),
)
HTTP_RESPONSE_FIELDS = (
    ("kind", "I"), ("fd", "I"), ("end_ns", "Q"), ("span_id", "8s"), ("pid", "I"), ("tid", "I"),
    ("length", "I"), ("pad", "I"), ("data", f"{HTTP_RESPONSE_CAPTURE}s"),
)

PROCESS_FIELDS = (("kind", "I"), ("pid", "I"), ("process_seq", "I"), ("pad", "I"))

# Slots of the kernel's `counters` map (enum counter in bpf/event.h).
COUNTERS = ("events_lost", "depth_exceeded", "unmatched_return", "notices_lost")


class SpanEvent(NamedTuple):
    """One finished call; ids are the kernel's raw bytes, times are CLOCK_MONOTONIC nanoseconds."""

    kind: int
    probe_id: int
    start_ns: int
    end_ns: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    pid: int
    tid: int
    depth: int
    process_seq: int
    goroutine_id: int


class HttpRequestEvent(NamedTuple):
    kind: int
    fd: int
    start_ns: int
    trace_id: bytes
    span_id: bytes
    pid: int
    tid: int
    length: int
    sampled: int
    process_seq: int
    pad: int
    data: bytes


class HttpResponseEvent(NamedTuple):
    kind: int
    fd: int
    end_ns: int
    span_id: bytes
    pid: int
    tid: int
    length: int
    pad: int
    data: bytes


class ProcessEvent(NamedTuple):
    kind: int
    pid: int
    process_seq: int
    pad: int


@dataclass(frozen=True)
class EventType:
    """One struct of bpf/event.h: its kind, its member name in struct event_layouts, its decoding."""

    kind: int
    member: str
    fields: tuple[tuple[str, str], ...]
    tuple_type: type

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join(fmt for _, fmt in self.fields))

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Offset and size of each field as user space decodes them."""
        result, offset = {}, 0
        for name, fmt in self.fields:
            size = struct.calcsize("<" + fmt)
            result[name] = (offset, size)
            offset += size
        return result


SPAN = EventType(1, "span", SPAN_FIELDS, SpanEvent)
HTTP_REQUEST = EventType(2, "http_request", HTTP_REQUEST_FIELDS, HttpRequestEvent)
HTTP_RESPONSE = EventType(3, "http_response", HTTP_RESPONSE_FIELDS, HttpResponseEvent)
PROCESS_START = EventType(4, "process", PROCESS_FIELDS, ProcessEvent)
PROCESS_EXIT = EventType(5, "process", PROCESS_FIELDS, ProcessEvent)
EVENT_TYPES = (SPAN, HTTP_REQUEST, HTTP_RESPONSE, PROCESS_START, PROCESS_EXIT)


def check_layout(event_type: EventType, offsets: dict[str, tuple[int, int]], total_size: int) -> None:
    """Refuse to run when a compiled struct and its mirror disagree: every event would be garbage."""
    expected = event_type.offsets()
    if offsets != expected or total_size != event_type.struct.size:
        raise UserError(
            f"event layout mismatch for {event_type.member} between bpf/event.h ({offsets}, {total_size} bytes) "
            f"and otel_ebpf/events.py ({expected}, {event_type.struct.size} bytes)",
            "update the mirror in otel_ebpf/events.py to match bpf/event.h",
        )


_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = struct.Struct("<I")
_POS = struct.Struct("<Q")
_HEADER_SIZE = 8


def _decoder(event_type: EventType):
    unpack, make = event_type.struct.unpack_from, event_type.tuple_type._make
    return lambda buf, offset: make(unpack(buf, offset))


class RingReader:
    """Consumer side of a BPF ring buffer map, read through mmap.

    Layout (kernel ABI): page 0 holds the consumer position (ours to write); the next page holds the
    producer position, followed by the data pages mapped twice in a row so a record that wraps around the
    end is still contiguous. Each record has an 8-byte header: length with BUSY/DISCARD bits, page offset.
    """

    def __init__(self, map_fd: int, size: int):
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = page  # data starts after the producer page
        self._decoders = {t.kind: _decoder(t) for t in EVENT_TYPES}
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        """Sleep until the kernel wakes us or the timeout passes; the kernel batches its wake-ups."""
        self._epoll.poll(timeout_s)

    def read(self, limit: int = 1 << 62) -> list[SpanEvent | HttpRequestEvent | HttpResponseEvent]:
        """Decode up to `limit` committed records and release their space to the kernel.

        Records left unread stay in the ring: it is the buffer that absorbs bursts while export lags."""
        cons = _POS.unpack_from(self._consumer, 0)[0]
        prod = _POS.unpack_from(self._producer, 0)[0]
        events: list = []
        buf, base, mask = self._producer, self._data, self._mask
        unpack_header, decoders = _HEADER.unpack_from, self._decoders
        while cons < prod and len(events) < limit:
            pos = base + (cons & mask)
            length = unpack_header(buf, pos)[0]
            if length & _BUSY:
                break  # reserved but not yet submitted: later records must wait for it
            size = length & ~_DISCARD
            if not length & _DISCARD:
                decode = decoders.get(unpack_header(buf, pos + _HEADER_SIZE)[0])
                if decode:
                    events.append(decode(buf, pos + _HEADER_SIZE))
            cons += (size + _HEADER_SIZE + 7) & ~7
        _POS.pack_into(self._consumer, 0, cons)
        return events

    def close(self) -> None:
        self._epoll.close()
        self._consumer.close()
        self._producer.close()
