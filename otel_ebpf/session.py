"""One tracing session: attach, drain the ring buffer into the exporters, shut down without losing spans."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TextIO

from otel_ebpf.clock import WallClock
from otel_ebpf.command import Command
from otel_ebpf.config import Settings
from otel_ebpf.export import BatchProcessor, ConsoleSink, GrpcTransport, HttpTransport
from otel_ebpf.probes import Probe, ProbeSet, Tunables
from otel_ebpf.spans import ProbeInfo, ProcessInfo, SpanEncoder

# How often the ring buffer is read when the kernel has not woken us: bounds the delay of the last
# events of a quiet period (the kernel wakes us once per batch of events, not per event).
POLL_S = 0.05


def _sinks(settings: Settings, encoder: SpanEncoder, console: TextIO) -> list:
    sinks = []
    for name in settings.traces_exporters:
        if name == "console":
            sinks.append(ConsoleSink(encoder.format, console))
        elif name == "otlp":
            o = settings.otlp
            tls = dict(certificate=o.certificate, client_key=o.client_key, client_certificate=o.client_certificate)
            if o.protocol == "grpc":
                sinks.append(GrpcTransport(o.endpoint, o.headers, o.timeout_s, o.compression, insecure=o.insecure, **tls))
            else:
                sinks.append(HttpTransport(o.endpoint, o.headers, o.timeout_s, o.compression, **tls))
    return sinks


def _tunables(settings: Settings) -> Tunables:
    return Tunables(max_depth=settings.max_depth, max_threads=settings.max_threads,
                    ring_buffer_size=settings.ring_buffer_size)


def _describe(settings: Settings) -> str:
    names = []
    for name in settings.traces_exporters:
        names.append(f"otlp {settings.otlp.protocol} {settings.otlp.endpoint}" if name == "otlp" else name)
    return ", ".join(names) or "nowhere (OTEL_TRACES_EXPORTER=none)"


def run(settings: Settings, probes: list[Probe], command: Command | None = None,
        console: TextIO = sys.stdout, log: TextIO = sys.stderr) -> int:
    """Trace until the command exits (returning its status) or SIGINT/SIGTERM arrives (returning 0)."""
    pid = command.spawn_paused() if command else settings.pid
    try:
        probe_set = ProbeSet(probes, _tunables(settings), pid)
    except BaseException:
        if command:
            command.abandon()
        raise
    try:
        encoder = SpanEncoder([ProbeInfo(p.symbol.demangled, p.binary) for p in probes], WallClock(),
                              settings.service_name, settings.resource_attributes)
        if command:
            encoder.remember_process(ProcessInfo.read(pid, command.path, " ".join(command.argv), exec_pending=True))
        processor = BatchProcessor(
            encoder.encode,
            _sinks(settings, encoder, console),
            max_queue_size=settings.bsp_max_queue_size,
            max_batch_size=settings.bsp_max_export_batch_size,
            schedule_delay_s=settings.bsp_schedule_delay_s,
            export_timeout_s=settings.bsp_export_timeout_s,
        )
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
                ring.wait(POLL_S)
                _drain(ring, encoder, processor)
            _drain(ring, encoder, processor)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            ring.close()
            processor.shutdown(settings.bsp_export_timeout_s)
            _summarise(processor.stats, probe_set.counters(), log)
        return command.exit_status if command else 0
    finally:
        probe_set.close()


def _drain(ring, encoder: SpanEncoder, processor: BatchProcessor) -> None:
    batch = ring.read()
    if batch:
        encoder.see(batch)
        processor.add(batch)
    encoder.clock.maybe_refresh()


def _summarise(stats: dict, kernel: dict, log: TextIO) -> None:
    """One line on shutdown: every span that did not reach the exporters is accounted for."""
    lost = {
        "ring buffer full": kernel["events_lost"],
        "export queue full (OTEL_BSP_MAX_QUEUE_SIZE)": stats["dropped_full"],
        "export failed": stats["failed"],
        "export timed out at shutdown (OTEL_BSP_EXPORT_TIMEOUT)": stats["dropped_shutdown"],
    }
    line = f"otel-ebpf: {stats['exported']} spans exported, {sum(lost.values())} lost"
    details = [f"{n} {why}" for why, n in lost.items() if n]
    if details:
        line += f" ({', '.join(details)})"
    if kernel["depth_exceeded"]:
        line += f"; {kernel['depth_exceeded']} calls nested deeper than OTEL_EBPF_MAX_DEPTH not recorded"
    if kernel["unmatched_return"]:
        line += f"; {kernel['unmatched_return']} returns without a recorded entry"
    print(line, file=log, flush=True)
