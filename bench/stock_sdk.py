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
from otel_ebpf.events import SPAN
from otel_ebpf.probes import Probe, ProbeSet, Tunables, plan

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


def record(events, tracer: trace.Tracer, ids: KernelIds, probes: list[Probe], offset_ns: int) -> None:
    """One SDK span per kernel span event, started and ended with the kernel's timestamps."""
    for e in events:
        if e.kind != SPAN.kind:
            continue
        ids.trace_id = int.from_bytes(e.trace_id, "big")
        ids.span_id = int.from_bytes(e.span_id, "big")
        context = Context()
        if e.parent_span_id != _NO_PARENT:
            parent = trace.SpanContext(ids.trace_id, int.from_bytes(e.parent_span_id, "big"), is_remote=False,
                                       trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        probe = probes[e.probe_id]
        span = tracer.start_span(
            probe.symbol.demangled,
            context=context,
            start_time=e.start_ns + offset_ns,
            attributes={"code.function.name": probe.symbol.demangled, "code.file.path": probe.binary,
                        "thread.id": e.tid, "process.pid": e.pid},
        )
        span.end(end_time=e.end_ns + offset_ns)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("binary")
    parser.add_argument("symbols", nargs="+")
    args = parser.parse_args()

    settings = config.load_settings(pid=args.pid)
    path = symbols.binary_path(args.binary)
    probes = plan(path, symbols.resolve(path, args.symbols))
    ids = KernelIds()
    provider = TracerProvider(
        resource=Resource.create({"service.name": Path(path).name, "process.pid": args.pid}), id_generator=ids)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("stock-sdk")
    offset_ns = time.time_ns() - time.monotonic_ns()  # kernel timestamps are CLOCK_MONOTONIC

    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    probe_set = ProbeSet(probes, Tunables.from_settings(settings), args.pid)  # the very kernel side otel-ebpf builds
    ring = probe_set.ring()
    print(f"{READY} pid {args.pid}", file=sys.stderr, flush=True)
    while not stop.is_set():
        ring.wait(session.POLL_S)
        record(ring.read(), tracer, ids, probes, offset_ns)
    record(ring.read(), tracer, ids, probes, offset_ns)
    ring.close()
    provider.shutdown()
    print(f"stock-sdk: kernel counters {probe_set.counters()}", file=sys.stderr, flush=True)
    probe_set.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
