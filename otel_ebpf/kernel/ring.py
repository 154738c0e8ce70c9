"""The consumer side of a BPF ring buffer, read through its memory a batch at a time.

Layout (the kernel's ABI): one page holds the consumer position (ours to write), the next page the producer
position, followed by the data pages mapped twice in a row, so that a record that wraps around the end of the
buffer is still contiguous. Each record starts with an 8-byte header: its length, with a BUSY bit while the
producer has reserved but not yet submitted it and a DISCARD bit when it was dropped, then its page offset.

The same code reads the kernel's mmap() or, in tests, a bytearray laid out the same way (Ring.in_memory).
"""

from __future__ import annotations

import mmap
import select
from typing import Iterator

import numpy as np

from otel_ebpf.kernel.layout import RING_HEADER_SIZE, SPAN_DTYPE, SPAN_RECORD_DTYPE

BUSY = 1 << 31
DISCARD = 1 << 30


def record_size(length: int) -> int:
    """Bytes a record of `length` payload bytes takes in the ring: header included, rounded up to 8."""
    return (length + RING_HEADER_SIZE + 7) & ~7


class Ring:
    """One ring buffer: `consumer` holds our position, `producer` the kernel's and, from `data_offset`, the
    data (2 * size bytes, the second half the same as the first)."""

    def __init__(self, consumer, producer, size: int, data_offset: int, fd: int | None = None, keep=()):
        self.size = size
        self._mask = size - 1
        self._producer = producer
        self._data = data_offset
        self._fd = fd
        self._keep = keep  # what must be closed with the ring (mmaps)
        # The positions are read and written as whole 64-bit words, in one instruction each, as the kernel does:
        # the struct module moves bytes one at a time, and the kernel reading a consumer position half written
        # (its low bytes new, its high bytes old) sees a ring buffer far fuller than it is, and drops events.
        self._consumer_position = np.frombuffer(consumer, np.uint64, 1)
        self._producer_position = np.frombuffer(producer, np.uint64, 1)
        self._headers = np.frombuffer(producer, np.uint32)  # record headers, read whole for the same reason

    @classmethod
    def from_map(cls, fd: int, size: int) -> Ring:
        page = mmap.PAGESIZE
        consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        return cls(consumer, producer, size, page, fd, (consumer, producer))

    @classmethod
    def in_memory(cls, size: int) -> tuple[Ring, bytearray, bytearray]:
        """A ring over plain memory, for tests: (ring, consumer page, producer page + data). A test acting as
        the producer must write each record twice (at p and p + size), as the double mapping would show it."""
        consumer, producer = bytearray(8), bytearray(8 + 2 * size)
        return cls(consumer, producer, size, 8), consumer, producer

    @property
    def consumer_position(self) -> int:
        return int(self._consumer_position[0])

    @property
    def producer_position(self) -> int:
        return int(self._producer_position[0])

    def _release(self, position: int) -> None:
        self._consumer_position[0] = position

    def records(self, until: int | None = None, limit: int = 1 << 30) -> Iterator[bytes]:
        """Committed records (payloads, without headers, copied) up to the producer position or `until`, each
        released to the kernel as it is read.

        Stops at a BUSY record: the consumer can never pass one, since the kernel hands out space in order."""
        cons, prod = self.consumer_position, self.producer_position if until is None else until
        count = 0
        while cons < prod and count < limit:
            at = self._data + (cons & self._mask)
            length = int(self._headers[at // 4])
            if length & BUSY:
                break
            payload = length & ~DISCARD
            record = None if length & DISCARD else bytes(self._producer[at + RING_HEADER_SIZE:
                                                                         at + RING_HEADER_SIZE + payload])
            cons += record_size(payload)
            self._release(cons)
            if record is not None:
                count += 1
                yield record

    def head_busy(self) -> bool:
        """Whether the oldest unread record is still being written (reserved, not yet submitted)."""
        cons = self.consumer_position
        if cons >= self.producer_position:
            return False
        return bool(self._headers[(self._data + (cons & self._mask)) // 4] & BUSY)

    def spans(self, limit: int, until: int | None = None) -> np.ndarray:
        """Up to `limit` committed span records as one array (SPAN_RECORD_DTYPE), copied out and released.

        Every record in this ring is a span_record, so the committed ones are an array where they lie. Headers
        are read first and the records copied after: x86 does not reorder loads, so a record whose header said
        committed is read whole."""
        cons = self.consumer_position
        prod = self.producer_position if until is None else until
        stride = SPAN_RECORD_DTYPE.itemsize
        count = min(limit, (prod - cons) // stride)
        if count <= 0:
            return np.empty(0, SPAN_RECORD_DTYPE)
        view = np.frombuffer(self._producer, SPAN_RECORD_DTYPE, count, self._data + (cons & self._mask))
        lengths = view["ring_length"].copy()
        busy = np.flatnonzero(lengths & BUSY)
        if busy.size:
            count = int(busy[0])
            lengths = lengths[:count]
        if np.any((lengths & ~np.uint32(DISCARD)) != SPAN_DTYPE.itemsize):
            raise ValueError("a record of the span ring buffer is not a span_record: the ring is corrupt")
        records = view[:count].copy()
        self._release(cons + count * stride)
        discarded = (lengths & DISCARD) != 0
        return records[~discarded] if discarded.any() else records

    def close(self) -> None:
        del self._consumer_position, self._producer_position, self._headers  # views: mmaps cannot close under them
        for m in self._keep:
            m.close()
        self._keep = ()


class Waiter:
    """Sleeps until the kernel wakes us for one of the rings, or a timeout passes.

    Edge-triggered: a ring buffer's fd polls readable whenever it holds any data, so level-triggered epoll would
    return at once after every partial read and spin, reading a few records at a time. Edge-triggered, it returns
    when the kernel wakes the ring's waiters: for spans in bursts only (see SPAN_WAKE_EVERY), for notices when we
    had read everything before."""

    def __init__(self, rings: list[Ring]):
        self._epoll = select.epoll()
        for ring in rings:
            if ring._fd is not None:
                self._epoll.register(ring._fd, select.EPOLLIN | select.EPOLLET)

    def wait(self, timeout_s: float) -> None:
        self._epoll.poll(timeout_s)

    def close(self) -> None:
        self._epoll.close()
