"""Spans as readable lines, for the console exporter: one line per span, nested calls indented."""

from __future__ import annotations

import datetime

from otel_ebpf.otlp.encode import SPAN_KIND_CLIENT, SPAN_KIND_INTERNAL, ServerSpan, SpanChunk

NO_PARENT = "-"


class ConsoleFormat:
    """Formats a chunk of the export pipeline (SpanChunk, or a list of ServerSpan) as lines. `probes(probe_id)`
    tells what each probe is; `clock.offset_ns` turns kernel times into Unix times."""

    def __init__(self, probes, clock):
        self._probes = probes
        self._clock = clock
        self._second, self._prefix = None, ""

    def __call__(self, chunk) -> str:
        if isinstance(chunk, SpanChunk):
            return self._spans(chunk)
        return "".join(self._server(span) + "\n" for span in chunk)

    def _start(self, start_ns: int) -> str:
        """ISO 8601 in UTC to the microsecond; the date and time of day are made once per second."""
        unix_ns = start_ns + self._clock.offset_ns
        second = unix_ns // 1_000_000_000
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{unix_ns // 1000 % 1_000_000:06d}+00:00"

    def _spans(self, chunk: SpanChunk) -> str:
        """Columns to Python lists once, then one f-string per span: numpy scalars one by one cost far more."""
        r = chunk.records
        raw = r.view("u1").reshape(len(r), -1)
        trace_at = r.dtype.fields["trace_id"][1]
        traces = [bytes(row).hex() for row in raw[:, trace_at:trace_at + 16]]
        columns = [r[name].tolist() for name in ("start_ns", "end_ns", "depth", "probe_id", "pid", "process_seq",
                                                  "tid", "span_id", "parent_span_id", "goroutine_id")]
        lines = []
        for trace, (start, end, depth, probe, pid, seq, tid, span, parent, goroutine) in zip(traces, zip(*columns)):
            resource = chunk.resources.get(seq << 32 | pid)
            lines.append(
                f"{self._start(start)} {(end - start) / 1e6:10.3f} ms  {'  ' * depth}{self._probes(probe).function}  "
                f"{resource.service_name if resource else '?'} pid={pid} tid={tid} trace={trace} "
                f"span={span.to_bytes(8, 'little').hex()} "
                f"parent={parent.to_bytes(8, 'little').hex() if parent else NO_PARENT}"
                f"{f' goroutine={goroutine}' if goroutine else ''}\n")
        return "".join(lines)

    def _server(self, s: ServerSpan) -> str:
        """The request as a client would write it, and what the server answered; a function span with its
        captured values."""
        attrs = s.attributes
        if s.kind == SPAN_KIND_INTERNAL:
            shown = " ".join(f"{k}={v!r}" for k, v in attrs.items() if not k.startswith(("code.", "go.")))
            goroutine = f" goroutine={attrs['go.goroutine.id']}" if "go.goroutine.id" in attrs else ""
            return (f"{self._start(s.start_ns)} {(s.end_ns - s.start_ns) / 1e6:10.3f} ms  {'  ' * s.depth}{s.name}  "
                    f"{s.resource.service_name} pid={s.process & 0xFFFFFFFF} tid={s.tid} trace={s.trace_id.hex()} "
                    f"span={s.span_id.hex()} parent={s.parent_span_id.hex() if s.parent_span_id else NO_PARENT}"
                    f"{goroutine}  {shown}")
        target = attrs.get("url.full") or attrs.get("url.path", "") + (
            f"?{attrs['url.query']}" if "url.query" in attrs else "")
        status = attrs.get("http.response.status_code", attrs.get("rpc.response.status_code", "no response"))
        peer = f" from {attrs['client.address']}" if "client.address" in attrs else ""
        kind = "CLIENT" if s.kind == SPAN_KIND_CLIENT else "SERVER"
        return (f"{self._start(s.start_ns)} {(s.end_ns - s.start_ns) / 1e6:10.3f} ms  {kind} {s.name} {target} "
                f"-> {status}{peer}  {s.resource.service_name} pid={s.process & 0xFFFFFFFF} tid={s.tid} "
                f"trace={s.trace_id.hex()} span={s.span_id.hex()} "
                f"parent={s.parent_span_id.hex() if s.parent_span_id else NO_PARENT}")
