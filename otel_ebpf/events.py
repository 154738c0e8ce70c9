"""The kernel's span events: their layout (mirroring bpf/event.h) and draining them from the ring buffer.

The ring buffer is read through its mmap()ed pages, the way libbpf does it, so a whole batch of events is
decoded in one Python loop instead of one ctypes callback per event.
"""

from __future__ import annotations

import mmap
import select
import struct
from typing import NamedTuple

from otel_ebpf.errors import UserError

# (field, struct format) in the order of struct span_event in bpf/event.h.
EVENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("start_ns", "Q"),
    ("end_ns", "Q"),
    ("trace_id", "16s"),
    ("span_id", "8s"),
    ("parent_span_id", "8s"),
    ("pid", "I"),
    ("tid", "I"),
    ("probe_id", "I"),
    ("depth", "I"),
)
EVENT = struct.Struct("<" + "".join(fmt for _, fmt in EVENT_FIELDS))

# Slots of the kernel's `counters` map (enum counter in bpf/event.h).
COUNTERS = ("events_lost", "depth_exceeded", "unmatched_return")


class SpanEvent(NamedTuple):
    """One finished call; ids are the kernel's raw bytes, times are CLOCK_MONOTONIC nanoseconds."""

    start_ns: int
    end_ns: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    pid: int
    tid: int
    probe_id: int
    depth: int


def field_offsets() -> dict[str, tuple[int, int]]:
    """Offset and size of each field as user space decodes them."""
    result, offset = {}, 0
    for name, fmt in EVENT_FIELDS:
        size = struct.calcsize("<" + fmt)
        result[name] = (offset, size)
        offset += size
    return result


def check_layout(offsets: dict[str, tuple[int, int]], total_size: int) -> None:
    """Refuse to run when the compiled struct span_event and EVENT disagree: every span would be garbage."""
    expected = field_offsets()
    if offsets != expected or total_size != EVENT.size:
        raise UserError(
            f"event layout mismatch between bpf/event.h ({offsets}, {total_size} bytes) and "
            f"otel_ebpf/events.py ({expected}, {EVENT.size} bytes)",
            "update EVENT_FIELDS in otel_ebpf/events.py to match struct span_event",
        )


_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = struct.Struct("<I")
_POS = struct.Struct("<Q")
_HEADER_SIZE = 8


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
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        """Sleep until the kernel wakes us or the timeout passes; the kernel batches its wake-ups."""
        self._epoll.poll(timeout_s)

    def read(self, limit: int = 1 << 62) -> list[SpanEvent]:
        """Decode up to `limit` committed records and release their space to the kernel.

        Records left unread stay in the ring: it is the buffer that absorbs bursts while export lags."""
        cons = _POS.unpack_from(self._consumer, 0)[0]
        prod = _POS.unpack_from(self._producer, 0)[0]
        events: list[SpanEvent] = []
        buf, base, mask = self._producer, self._data, self._mask
        unpack_header, unpack_event = _HEADER.unpack_from, EVENT.unpack_from
        while cons < prod and len(events) < limit:
            pos = base + (cons & mask)
            length = unpack_header(buf, pos)[0]
            if length & _BUSY:
                break  # reserved but not yet submitted: later records must wait for it
            size = length & ~_DISCARD
            if not length & _DISCARD and size == EVENT.size:
                events.append(SpanEvent._make(unpack_event(buf, pos + _HEADER_SIZE)))
            cons += (size + _HEADER_SIZE + 7) & ~7
        _POS.pack_into(self._consumer, 0, cons)
        return events

    def close(self) -> None:
        self._epoll.close()
        self._consumer.close()
        self._producer.close()
