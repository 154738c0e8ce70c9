"""The benchmark's baseline: otel-ebpf's kernel side with user space written the obvious OpenTelemetry SDK way.

Probes, ring buffer and event decoding are otel-ebpf's own (set up as otel_ebpf/session.py does), so the only
difference measured is user space: one SDK span object per call, the SDK's BatchSpanProcessor with its default
settings (the OTEL_BSP_* variables, read by the SDK, change them) and the SDK's OTLP/HTTP exporter (endpoint
from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, as for any SDK application).

    python bench/stock_sdk.py --pid PID BINARY SYMBOL [SYMBOL ...]

Traces PID until SIGINT/SIGTERM, then exports what is left and exits. The line starting with READY goes to
stderr once the probes are attached; the last line gives the kernel's loss counters.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator

from otel_ebpf import config, session, symbols
from otel_ebpf.kernel.attach import Attacher, choose_mode
from otel_ebpf.kernel.program import Program, Tunables
from otel_ebpf.kernel.ring import Waiter
from otel_ebpf.probes import ProbeTable, plan

READY = "stock-sdk: tracing"
_NO_PARENT = bytes(8)


class KernelIds(IdGenerator):
    """The kernel already made each span's ids; the SDK asks its IdGenerator, so this hands them over."""

    def __init__(self):
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id


def record(records, tracer: trace.Tracer, ids: KernelIds, table: ProbeTable, offset_ns: int) -> None:
    """One SDK span per kernel span record, started and ended with the kernel's timestamps."""
    for r in records:
        ids.trace_id = int.from_bytes(r["trace_id"].tobytes(), "big")
        ids.span_id = int.from_bytes(int(r["span_id"]).to_bytes(8, "little"), "big")
        context = Context()
        parent_span_id = int(r["parent_span_id"]).to_bytes(8, "little")
        if parent_span_id != _NO_PARENT:
            parent = trace.SpanContext(ids.trace_id, int.from_bytes(parent_span_id, "big"), is_remote=False,
                                       trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        probe = table.probes[int(r["probe_id"])]
        span = tracer.start_span(
            probe.symbol.demangled,
            context=context,
            start_time=int(r["start_ns"]) + offset_ns,
            attributes={"code.function.name": probe.symbol.demangled, "code.file.path": probe.binary,
                        "thread.id": int(r["tid"])},
        )
        span.end(end_time=int(r["end_ns"]) + offset_ns)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("binary")
    parser.add_argument("symbols", nargs="+")
    args = parser.parse_args()

    settings = config.load_settings(pids=(args.pid,))
    path = symbols.binary_path(args.binary)
    table = ProbeTable()
    table.add(plan(path, symbols.resolve(path, args.symbols)))
    ids = KernelIds()
    provider = TracerProvider(
        resource=Resource.create({"service.name": Path(path).name, "process.pid": args.pid}), id_generator=ids)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("stock-sdk")
    offset_ns = time.time_ns() - time.monotonic_ns()  # kernel timestamps are CLOCK_MONOTONIC

    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    # The very kernel side otel-ebpf builds, following the process.
    mode = choose_mode(settings.attach)
    program = Program(Tunables.from_settings(settings, follow_only=True), mode)
    program.follow(args.pid)
    attacher = Attacher(program, mode)
    for binary, probes in table.by_binary().items():
        attacher.attach(binary, [site for probe_id, probe in probes for site in probe.sites(probe_id)], args.pid)
    spans, notices = program.rings()
    waiter = Waiter([spans, notices])
    print(f"{READY} pid {args.pid}", file=sys.stderr, flush=True)
    while not stop.is_set():
        waiter.wait(session.POLL_S)
        list(notices.records())  # processes announced: nothing the SDK way would use
        record(spans.spans(1 << 30), tracer, ids, table, offset_ns)
    attacher.close()
    record(spans.spans(1 << 30), tracer, ids, table, offset_ns)
    waiter.close()
    spans.close()
    notices.close()
    provider.shutdown()
    print(f"stock-sdk: kernel counters {program.counters()}", file=sys.stderr, flush=True)
    program.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
