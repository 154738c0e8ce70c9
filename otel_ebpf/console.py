"""Spans as readable lines, for the console exporter: one line per span, nested calls indented."""

from __future__ import annotations

import datetime

from otel_ebpf.otlp.encode import ServerSpan, SpanChunk

NO_PARENT = "-"


class ConsoleFormat:
    """Formats a chunk of the export pipeline (SpanChunk, or a list of ServerSpan) as lines. `probes(probe_id)`
    tells what each probe is; `clock.offset_ns` turns kernel times into Unix times."""

    def __init__(self, probes, clock):
        self._probes = probes
        self._clock = clock

    def __call__(self, chunk) -> str:
        if isinstance(chunk, SpanChunk):
            return "".join(self._span(record, chunk.resources) + "\n" for record in chunk.records)
        return "".join(self._server(span) + "\n" for span in chunk)

    def _start(self, start_ns: int) -> str:
        start = datetime.datetime.fromtimestamp((start_ns + self._clock.offset_ns) / 1e9, datetime.timezone.utc)
        return start.isoformat(timespec="microseconds")

    def _span(self, r, resources) -> str:
        key = int(r["process_seq"]) << 32 | int(r["pid"])
        service = resources[key].service_name if key in resources else "?"
        span_id, parent = (int(r[name]).to_bytes(8, "little").hex() for name in ("span_id", "parent_span_id"))
        goroutine = f" goroutine={int(r['goroutine_id'])}" if r["goroutine_id"] else ""
        return (f"{self._start(int(r['start_ns']))} {(int(r['end_ns']) - int(r['start_ns'])) / 1e6:10.3f} ms  "
                f"{'  ' * int(r['depth'])}{self._probes(int(r['probe_id'])).function}  {service} pid={int(r['pid'])} "
                f"tid={int(r['tid'])} trace={r['trace_id'].tobytes().hex()} span={span_id} "
                f"parent={parent if r['parent_span_id'] else NO_PARENT}{goroutine}")

    def _server(self, s: ServerSpan) -> str:
        """The request as a client would write it, and what the server answered."""
        attrs = s.attributes
        target = attrs.get("url.path", "") + (f"?{attrs['url.query']}" if "url.query" in attrs else "")
        status = attrs.get("http.response.status_code", "no response")
        peer = f" from {attrs['client.address']}" if "client.address" in attrs else ""
        return (f"{self._start(s.start_ns)} {(s.end_ns - s.start_ns) / 1e6:10.3f} ms  SERVER {s.name} {target} "
                f"-> {status}{peer}  {s.resource.service_name} pid={s.process & 0xFFFFFFFF} tid={s.tid} "
                f"trace={s.trace_id.hex()} span={s.span_id.hex()} "
                f"parent={s.parent_span_id.hex() if s.parent_span_id else NO_PARENT}")
