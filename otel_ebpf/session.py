"""One tracing session: attach, drain the ring buffer into the exporters, shut down without losing spans."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Callable, TextIO

from otel_ebpf.clock import WallClock
from otel_ebpf.command import Command
from otel_ebpf.config import OTEL_EBPF_RETRY_QUEUE_SIZE, OTEL_EBPF_SPOOL_SIZE, Settings
from otel_ebpf.correlation import Correlator
from otel_ebpf.events import RingReader
from otel_ebpf.export import BatchProcessor, ConsoleSink, Sink, otlp_transport, span_exporter
from otel_ebpf.metrics import FunctionLatency, MetricsEncoder, MetricsExporter, sidecar_resource
from otel_ebpf.probes import Probe, ProbeSet, Tunables
from otel_ebpf.spans import ProbeInfo, ProcessInfo, SpanEncoder

# How often the ring buffer is read: the kernel does not wake us for span events (it would cost every
# traced call), so this bounds their delay; at 80 bytes an event, 8 MiB hold ~100k events per period.
POLL_S = 0.05


def _sinks(exporters: tuple[str, ...], make_otlp: Callable[[], Sink], console_format, console: TextIO) -> list:
    return [ConsoleSink(console_format, console) if name == "console" else make_otlp() for name in exporters]


def _describe(settings: Settings) -> str:
    names = [f"otlp {settings.otlp.protocol} {settings.otlp.endpoint}" if name == "otlp" else name
             for name in settings.traces_exporters]
    return ", ".join(names) or "nowhere (OTEL_TRACES_EXPORTER=none)"


def _loss_counters(stats: dict, kernel: dict) -> dict[str, dict[str, int]]:
    """Every call that did not become an exported span, by reason, in the metrics' vocabulary."""
    failed = stats["failed"] + stats["dropped_retry"] + stats["unsent"]  # given up on after export began
    return {
        "otel.sdk.processor.span.processed": {"": stats["exported"] + failed, "queue_full": stats["dropped_full"]},
        "otel.sdk.exporter.span.exported": {"": stats["exported"] - stats["rejected"],
                                            "rejected": stats["rejected"], "export_failed": failed},
        "otel_ebpf.calls.unrecorded": {"ring_buffer_full": kernel["events_lost"],
                                       "depth_exceeded": kernel["depth_exceeded"],
                                       "unmatched_return": kernel["unmatched_return"]},
    }


def _metrics(settings: Settings, probes: list[Probe], probe_set: ProbeSet, processor: BatchProcessor,
             console: TextIO) -> MetricsExporter | None:
    """Per-function latency histograms and loss counters, on their own schedule."""
    encoder = MetricsEncoder(sidecar_resource(settings.service_name, settings.resource_attributes), time.time_ns())
    # No retry queue for metrics: they are cumulative, the next export carries what a failed one had.
    sinks = _sinks(settings.metrics_exporters, lambda: otlp_transport(settings.otlp_metrics), str, console)
    if not sinks:
        return None

    def collect():
        latencies = [FunctionLatency(p.symbol.demangled, p.binary, tuple(counts), total)
                     for p, (counts, total) in zip(probes, probe_set.latencies())]
        counters = _loss_counters(processor.stats, probe_set.counters())
        counters["otel_ebpf.call_stacks"] = {"": probe_set.call_stacks()}
        return latencies, counters

    return MetricsExporter(collect, encoder, sinks, settings.metric_export_interval_s, settings.metric_export_timeout_s)


def run(settings: Settings, probes: list[Probe], command: Command | None = None,
        console: TextIO = sys.stdout, log: TextIO = sys.stderr) -> int:
    """Trace until the command exits (returning its status) or SIGINT/SIGTERM arrives (returning 0)."""
    pid = command.spawn_paused() if command else settings.pid
    try:
        probe_set = ProbeSet(probes, Tunables.from_settings(settings), pid)
    except BaseException:
        if command:
            command.abandon()
        raise
    try:
        encoder = SpanEncoder([ProbeInfo(p.symbol.demangled, p.binary) for p in probes], WallClock(),
                              settings.service_name, settings.resource_attributes)
        correlator = Correlator(encoder, settings.sampler.samples, settings.sampler.parent_based)
        if command:
            encoder.remember_process(ProcessInfo.read(pid, command.path, " ".join(command.argv), exec_pending=True))
        if pid:
            probe_set.register_process(pid)
        processor = BatchProcessor(
            encoder.encode,
            _sinks(settings.traces_exporters, lambda: span_exporter(settings), encoder.format, console),
            max_queue_size=settings.bsp_max_queue_size,
            max_batch_size=settings.bsp_max_export_batch_size,
            schedule_delay_s=settings.bsp_schedule_delay_s,
            export_timeout_s=settings.bsp_export_timeout_s,
        )
        metrics = _metrics(settings, probes, probe_set, processor, console)
        stop = threading.Event()

        def on_signal(signum, _frame):
            stop.set()
            if command:
                command.signal(signum)  # the command decides when to end; we trace until it does

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        ring = probe_set.ring()
        try:
            functions = ", ".join(sorted({p.symbol.demangled for p in probes}))
            target = f"pid {pid}" if pid else "all processes"
            print(f"otel-ebpf: tracing {len(probes)} function(s) [{functions}] in {target}; "
                  f"exporting to {_describe(settings)}", file=log, flush=True)
            if command:
                command.release()
            while not (command.poll() is not None if command else stop.is_set()):
                _wait(ring, processor)
                _drain(ring, correlator, processor, encoder.clock)
            _drain_all(ring, correlator, processor, encoder.clock, time.monotonic() + settings.bsp_export_timeout_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            ring.close()
            processor.shutdown(settings.bsp_export_timeout_s)
            if metrics:
                metrics.shutdown(settings.metric_export_timeout_s)
            _summarise(processor.stats, probe_set.counters(), settings, log)
        return command.exit_status if command else 0
    finally:
        probe_set.close()


def _wait(ring: RingReader, processor: BatchProcessor) -> None:
    """Sleep until there are events and room for them; without room, events wait in the ring buffer."""
    if processor.room():
        ring.wait(POLL_S)
    else:
        processor.wait_for_room(POLL_S)


def _drain(ring: RingReader, correlator: Correlator, processor: BatchProcessor, clock: WallClock) -> int:
    batch = ring.read(processor.room())
    if batch:
        processor.add(correlator.accept(batch))
    clock.maybe_refresh()
    return len(batch)


def _drain_all(ring: RingReader, correlator: Correlator, processor: BatchProcessor, clock: WallClock,
               deadline: float) -> None:
    """After the end: everything still in the ring buffer goes to the exporters, within the deadline."""
    while time.monotonic() < deadline:
        if not processor.room():
            processor.wait_for_room(POLL_S)
        elif not _drain(ring, correlator, processor, clock):
            return


def _summarise(stats: dict, kernel: dict, settings: Settings, log: TextIO) -> None:
    """One line on shutdown: every span that did not reach the exporters is accounted for, or said to be spooled."""
    retry_bound = f"spool full ({OTEL_EBPF_SPOOL_SIZE})" if settings.spool_dir else (
        f"retry queue full ({OTEL_EBPF_RETRY_QUEUE_SIZE})")
    lost = {
        "ring buffer full": kernel["events_lost"],
        "export queue full (OTEL_BSP_MAX_QUEUE_SIZE)": stats["dropped_full"],
        f"oldest dropped, {retry_bound}": stats["dropped_retry"],
        "export failed": stats["failed"],
        "export timed out at shutdown (OTEL_BSP_EXPORT_TIMEOUT)": stats["dropped_shutdown"] + stats["unsent"],
    }
    line = f"otel-ebpf: {stats['exported']} spans exported, {sum(lost.values())} lost"
    details = [f"{n} {why}" for why, n in lost.items() if n]
    if details:
        line += f" ({', '.join(details)})"
    if kernel["depth_exceeded"]:
        line += f"; {kernel['depth_exceeded']} calls nested deeper than OTEL_EBPF_MAX_DEPTH not recorded"
    if kernel["unmatched_return"]:
        line += f"; {kernel['unmatched_return']} returns without a recorded entry"
    if kernel["notices_lost"]:
        line += f"; {kernel['notices_lost']} HTTP or process events lost to a full ring buffer"
    if stats["spooled"]:
        line += f"; {stats['spooled']} spans kept in {settings.spool_dir} for the next run"
    print(line, file=log, flush=True)
