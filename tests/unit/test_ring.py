"""The ring buffer reader over memory laid out as the kernel presents it: positions, headers with BUSY and DISCARD
bits, and the data pages twice in a row so that a record that wraps around the end reads contiguously."""

import struct

import numpy as np
import pytest

from otel_ebpf.kernel.layout import SPAN_DTYPE, SPAN_RECORD_DTYPE
from otel_ebpf.kernel.ring import BUSY, DISCARD, Ring, record_size

SIZE = 4096


class Producer:
    """Writes records the way the kernel does, into a ring made by Ring.in_memory."""

    def __init__(self, ring: Ring, producer: bytearray):
        self.ring, self.memory, self.position = ring, producer, 0

    def _write(self, at: int, data: bytes) -> None:
        """At data offset `at`, in both mappings of the data pages (wrapping in each)."""
        for base in (8, 8 + SIZE):
            for i, byte in enumerate(data):
                self.memory[base + (at + i) % SIZE] = byte

    def put(self, payload: bytes, flags: int = 0) -> int:
        """A record at the producer position; returns where it starts."""
        start = self.position
        self._write(start % SIZE, struct.pack("<II", len(payload) | flags, 0) + payload)
        self.position += record_size(len(payload))
        struct.pack_into("<Q", self.memory, 0, self.position)
        return start

    def commit(self, start: int, length: int) -> None:
        """Clear the BUSY bit of the record at `start`, as bpf_ringbuf_submit does."""
        self._write(start % SIZE, struct.pack("<I", length))


def span(span_id: int) -> bytes:
    record = np.zeros(1, SPAN_DTYPE)
    record["span_id"], record["pid"] = span_id, 4242
    return record.tobytes()


@pytest.fixture
def ring():
    ring, _, producer = Ring.in_memory(SIZE)
    return ring, Producer(ring, producer)


def test_variable_records_in_order_and_released(ring):
    reader, producer = ring
    producer.put(b"one")
    producer.put(b"second record")
    assert list(reader.records()) == [b"one", b"second record"]
    assert reader.consumer_position == producer.position
    assert list(reader.records()) == []


def test_records_across_the_end_of_the_buffer(ring):
    """Positions only grow; the data offset wraps, and a record straddling the end is still read whole."""
    reader, producer = ring
    payload = bytes(range(200))
    seen = []
    for _ in range(40):  # 40 * 208 bytes: twice round a 4 KiB buffer
        producer.put(payload)
        seen += reader.records()
    assert seen == [payload] * 40
    assert producer.position > 2 * SIZE
    straddling = [p for p in range(0, producer.position, 208) if p % SIZE + 208 > SIZE]
    assert straddling, "no record crossed the end: the test would prove nothing"


def test_a_busy_record_stops_the_reader_until_it_is_committed(ring):
    """The kernel hands out space in order: the consumer can never pass a record still being written."""
    reader, producer = ring
    producer.put(b"first")
    busy = producer.put(b"in progress", BUSY)
    producer.put(b"after")
    assert list(reader.records()) == [b"first"]
    assert reader.head_busy()
    producer.commit(busy, len(b"in progress"))
    assert not reader.head_busy()
    assert list(reader.records()) == [b"in progress", b"after"]


def test_discarded_records_are_skipped(ring):
    reader, producer = ring
    producer.put(b"dropped", DISCARD)
    producer.put(b"kept")
    assert list(reader.records()) == [b"kept"]
    assert reader.consumer_position == producer.position


def test_a_limit_leaves_the_rest_in_the_ring(ring):
    reader, producer = ring
    for i in range(5):
        producer.put(bytes([i]) * 3)
    assert list(reader.records(limit=2)) == [b"\0" * 3, b"\1" * 3]
    assert list(reader.records()) == [bytes([i]) * 3 for i in range(2, 5)]


def test_records_up_to_a_position(ring):
    """The session reads spans only up to where the producer was before it read the notices."""
    reader, producer = ring
    producer.put(b"a")
    until = producer.position
    producer.put(b"b")
    assert list(reader.records(until=until)) == [b"a"]
    assert list(reader.records()) == [b"b"]


def test_spans_come_out_as_one_array(ring):
    reader, producer = ring
    for i in range(1, 31):  # 30 * 88 bytes
        producer.put(span(i))
    records = reader.spans(limit=100)
    assert records.dtype == SPAN_RECORD_DTYPE
    assert records["span_id"].tolist() == list(range(1, 31)) and set(records["pid"]) == {4242}


def test_spans_wrap_around_and_stop_at_a_limit(ring):
    reader, producer = ring
    got = []
    for i in range(1, 121):  # 120 * 88 bytes: round the buffer more than twice
        producer.put(span(i))
        if i % 7 == 0:
            got += reader.spans(limit=5)["span_id"].tolist()  # fewer than were written: the rest waits
    got += reader.spans(limit=1000)["span_id"].tolist()
    assert got == list(range(1, 121))


def test_a_busy_span_stops_the_batch_and_a_discarded_one_is_left_out(ring):
    reader, producer = ring
    producer.put(span(1))
    producer.put(span(2), DISCARD)
    busy = producer.put(span(3), BUSY)
    producer.put(span(4))
    assert reader.spans(limit=10)["span_id"].tolist() == [1]
    producer.commit(busy, SPAN_DTYPE.itemsize)
    assert reader.spans(limit=10)["span_id"].tolist() == [3, 4]


def test_a_record_of_another_size_in_the_span_ring_is_refused(ring):
    reader, producer = ring
    producer.put(span(1)[:40])
    producer.put(span(2))
    with pytest.raises(ValueError, match="corrupt"):
        reader.spans(limit=10)
