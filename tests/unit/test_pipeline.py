"""BatchProcessor, Batch and ConsoleSink: chunks in, bounded batches out, every item counted."""

import io
import logging
import threading
import time

import numpy as np

from otel_ebpf.otlp.transport import ExportError
from otel_ebpf.pipeline import Batch, ConsoleSink, line_per_item
from tests.unit.otlp_helpers import encode_chunks, names_received, processor
from tests.waiting import never_within, wait_until

# Long enough to see a batch being exported, which a positive control checks before a test relies on it.
QUIET_S = 0.2


def items_of(batch) -> list:
    return [item for chunk in batch.chunks for item in chunk]


class GatedSink:
    """Records batches; blocks in export until the gate opens, to hold the export thread."""

    def __init__(self):
        self.batches = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def export(self, batch, deadline):
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(items_of(batch))

    def close(self):
        self.gate.set()


class FlakySink:
    """Fails with the given exceptions, one per batch, then succeeds."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.items = []

    def export(self, batch, deadline):
        if self.failures:
            raise self.failures.pop(0)
        self.items.extend(items_of(batch))

    def close(self):
        pass


class RecordingSink:
    """Keeps what each batch held and encoded to."""

    def __init__(self):
        self.batches = []

    def export(self, batch, deadline):
        self.batches.append((batch.chunks, len(batch), batch.payload))

    def close(self):
        pass


def processed(bp) -> int:
    stats = bp.stats
    return stats["exported"] + stats["failed"]


def test_all_items_delivered_in_bounded_batches(kind, receiver, transports):
    bp = processor([transports(kind, receiver)])
    for start in range(0, 250, 10):
        bp.add([f"s{i}" for i in range(start, start + 10)])

    receiver.wait_for_spans(250)
    bp.shutdown(5)

    assert sorted(names_received(receiver)) == sorted(f"s{i}" for i in range(250))
    assert all(len(r.resource_spans[0].scope_spans[0].spans) <= 64 for r in receiver.requests)
    assert bp.stats == {"exported": 250, "dropped_full": 0, "dropped_shutdown": 0, "failed": 0, "rejected": 0,
                        "dropped_retry": 0, "unsent": 0, "spooled": 0}


def test_queue_overflow_is_counted_exactly():
    sink = GatedSink()
    bp = processor([sink], encode=None, max_queue_size=10, max_batch_size=5)
    bp.add(list(range(5)))
    assert sink.entered.wait(5)  # the thread now holds those 5 and the queue is empty

    bp.add(list(range(100, 125)))
    assert bp.stats["dropped_full"] == 15

    sink.gate.set()
    bp.shutdown(5)
    assert [item for batch in sink.batches for item in batch] == [0, 1, 2, 3, 4, *range(100, 110)]
    assert bp.stats["exported"] == 15


def test_shutdown_flushes_everything_without_waiting_for_the_schedule():
    def scheduled(sink):
        return processor([sink], encode=None, max_batch_size=100, max_queue_size=5000, schedule_delay_s=60)

    control = FlakySink()
    full = scheduled(control)
    full.add(list(range(100)))
    wait_until(lambda: control.items, "a full batch to be exported", timeout_s=QUIET_S)
    full.shutdown(5)

    sink = FlakySink()
    bp = scheduled(sink)
    bp.add(list(range(7)))
    never_within(lambda: sink.items, "fewer than a batch were exported before the schedule", QUIET_S)
    assert sink.items == []  # fewer than a batch: waits for the schedule

    bp.add(list(range(7, 1007)))
    start = time.monotonic()
    bp.shutdown(5)

    assert time.monotonic() - start < 2
    assert sorted(sink.items) == list(range(1007))
    bp.shutdown(5)  # idempotent
    assert bp.stats["exported"] == 1007


def test_several_exporter_threads_send_only_full_batches_before_the_schedule():
    """A thread woken for a full batch that another thread took meanwhile goes back to waiting, instead of
    exporting the rest as a partial batch (seen in CI: a batch of 255 out of a 60 s schedule)."""
    sink = FlakySink()
    lengths = []
    sink.export = lambda batch, deadline: lengths.append(len(batch))
    bp = processor([sink], encode=None, max_batch_size=50, max_queue_size=100_000, schedule_delay_s=60, exporters=4)
    for item in range(5025):
        bp.add([item])
    wait_until(lambda: processed(bp) >= 5000, "the full batches to be exported")
    never_within(lambda: processed(bp) > 5000, "the partial batch was exported before the schedule", QUIET_S)
    assert lengths == [50] * 100
    bp.shutdown(5)
    assert processed(bp) == 5025


def test_encode_runs_once_per_batch_for_several_byte_sinks(receiver, transports):
    calls = []

    def counting_encode(chunks):
        calls.append(sum(len(chunk) for chunk in chunks))
        return encode_chunks(chunks)

    bp = processor([transports("grpc", receiver), transports("http", receiver)], encode=counting_encode)
    bp.add([f"s{i}" for i in range(100)])
    bp.shutdown(5)

    assert sum(calls) == 100
    assert sorted(names_received(receiver)) == sorted(f"s{i}" for i in range(100) for _ in range(2))


def test_failing_sink_is_counted_and_reported_without_killing_the_thread(caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.pipeline")
    flaky = FlakySink(ExportError("collector:4317: gRPC UNAVAILABLE"), RuntimeError("encoder bug"), ExportError("x"))
    console = io.StringIO()
    bp = processor([flaky, ConsoleSink(line_per_item(str), console)], encode=None, max_batch_size=2,
                   schedule_delay_s=0.01)
    for i in range(5):
        bp.add([i, i + 100])
        wait_until(lambda: processed(bp) == 2 * (i + 1), f"batch {i} to be exported alone")
    bp.shutdown(5)

    assert bp.stats["failed"] == 6
    assert bp.stats["exported"] == 4
    assert flaky.items == [3, 103, 4, 104]
    assert console.getvalue().split() == [str(n) for i in range(5) for n in (i, i + 100)]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gRPC UNAVAILABLE" in messages[0] and "\n" not in messages[0]
    assert "recovered after 3 failed batches" in messages[1]
    assert not any(r.exc_info for r in caplog.records)


def test_continuing_failures_are_summarised(caplog):
    caplog.set_level(logging.WARNING, logger="otel_ebpf.pipeline")
    flaky = FlakySink(*[ExportError("down")] * 4)
    bp = processor([flaky], encode=None, max_batch_size=1, schedule_delay_s=0.01, report_interval_s=0.0)
    bp.add([1, 2, 3, 4])
    bp.shutdown(5)

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert messages[1:] == ["1 batches / 1 spans failed in the last 0s: down"] * 3


def test_shutdown_is_bounded_when_the_collector_is_down(kind, receiver, transports):
    receiver.stop()
    bp = processor([transports(kind, receiver, backoff_s=0.2)], export_timeout_s=30)
    bp.add(list(range(200)))

    start = time.monotonic()
    bp.shutdown(0.5)

    assert time.monotonic() - start < 2.0
    stats = bp.stats
    assert stats["exported"] == 0
    assert stats["failed"] + stats["dropped_shutdown"] == 200


def test_console_sink_writes_one_line_per_item():
    out = io.StringIO()
    bp = processor([ConsoleSink(line_per_item(lambda item: f"{item[0]} took {item[1]}us"), out)], encode=None)
    bp.add([("main", 12), ("parse", 3)])
    bp.add([("write", 7)])
    bp.shutdown(5)

    assert out.getvalue() == "main took 12us\nparse took 3us\nwrite took 7us\n"


# ----- chunks


def test_a_batch_takes_whole_chunks_and_cuts_the_last():
    sink = RecordingSink()
    bp = processor([sink], encode=lambda chunks: repr(chunks).encode(), max_batch_size=5, schedule_delay_s=60)
    bp.add([0, 1])
    bp.add([2, 3, 4, 5])  # now a batch is due: [0, 1] and [2, 3, 4]; [5] stays queued
    bp.add([6])
    bp.shutdown(5)

    assert sink.batches == [([[0, 1], [2, 3, 4]], 5, b"[[0, 1], [2, 3, 4]]"), ([[5], [6]], 2, b"[[5], [6]]")]
    assert bp.stats["exported"] == 7


def test_numpy_chunks_are_queued_cut_and_counted_in_items():
    sink = RecordingSink()
    bp = processor([sink], encode=lambda chunks: b"".join(chunk.tobytes() for chunk in chunks), max_queue_size=6,
                   max_batch_size=4, schedule_delay_s=60)
    bp.add(np.arange(3, dtype=np.uint8))
    assert bp.room() == 3

    bp.add(np.arange(3, 8, dtype=np.uint8))  # room for 3 of these 5
    assert bp.stats["dropped_full"] == 2
    bp.shutdown(5)

    assert [[chunk.tolist() for chunk in chunks] for chunks, _, _ in sink.batches] == [[[0, 1, 2], [3]], [[4, 5]]]
    assert [(items, payload) for _, items, payload in sink.batches] == [(4, bytes([0, 1, 2, 3])), (2, bytes([4, 5]))]
    assert all(isinstance(chunk, np.ndarray) for chunks, _, _ in sink.batches for chunk in chunks)
    assert bp.stats["exported"] == 6


def test_console_sink_formats_each_chunk_once():
    calls = []

    def format_chunk(chunk):
        calls.append(chunk)
        return "".join(f"{item}\n" for item in chunk)

    out = io.StringIO()
    batch = Batch([["a", "b"], ["c"]], None)
    ConsoleSink(format_chunk, out).export(batch, time.monotonic() + 5)

    assert calls == [["a", "b"], ["c"]]
    assert (out.getvalue(), len(batch)) == ("a\nb\nc\n", 3)
