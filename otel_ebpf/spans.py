"""Span events -> OTLP.

Spans are encoded straight into ExportTraceServiceRequest protobuf bytes: building an SDK span object per
call costs far more than the call being traced. Everything that does not change per call (names,
attributes of a probe, a process's resource) is encoded once and reused.
Field numbers: opentelemetry/proto/{collector/trace/v1/trace_service,trace/v1/trace,common/v1/common}.proto.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import struct
import re
from dataclasses import dataclass
from dataclasses import field as field_

from otel_ebpf import __version__, http
from otel_ebpf.clock import WallClock
from otel_ebpf.events import SpanEvent

SCOPE_NAME = "otel-ebpf"
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER = 1, 2
STATUS_CODE_ERROR = 2
# Span.flags: W3C trace flags in the low byte; bits 8 and 9 say the parent is known to be remote.
FLAGS_REMOTE_PARENT = 0x300
NO_PARENT = bytes(8)
# Process identities kept: far more than can have spans waiting for export.
MAX_PROCESSES = 4096


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def any_value(value: str | int | bool) -> bytes:
    if isinstance(value, bool):
        return varint(2 << 3) + varint(int(value))
    if isinstance(value, int):
        return varint(3 << 3) + varint(value & 0xFFFFFFFFFFFFFFFF)
    return field(1, str(value).encode())


def attribute(key: str, value: str | int | bool) -> bytes:
    """A KeyValue, wrapped as field `attributes` (number 9 in Span, 1 in Resource)."""
    return field(1, key.encode()) + field(2, any_value(value))


def attributes(number: int, attrs: dict[str, str | int | bool]) -> bytes:
    return b"".join(field(number, attribute(k, v)) for k, v in attrs.items())


@dataclass(frozen=True)
class ProbeInfo:
    """What user space knows about a probe id: the function and the file it lives in."""

    function: str
    binary: str

    def encoded(self) -> bytes:
        """Span fields shared by every call of this function: name, kind, attributes."""
        return (
            field(5, self.function.encode())
            + varint(6 << 3) + varint(SPAN_KIND_INTERNAL)
            + attributes(9, {"code.function.name": self.function, "code.file.path": self.binary})
        )


# What a process's own environment may say about its identity and the trace it belongs to.
PROCESS_ENVIRON = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "TRACEPARENT", "TRACESTATE")
# A container runtime names the cgroup of a container after its 64-hex-digit id.
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


@dataclass(frozen=True)
class ProcessInfo:
    """Identity of a traced process, read from /proc when its first span arrives."""

    pid: int
    executable: str
    command_line: str
    environ: dict[str, str] = field_(default_factory=dict)  # the PROCESS_ENVIRON entries it has
    container_id: str | None = None

    @classmethod
    def read(cls, pid: int, executable: str, command_line: str | None = None, exec_pending: bool = False
             ) -> ProcessInfo:
        """Best effort: a process may have exited (or be a zombie) when we look, and then `executable`
        stands in. A process held before exec (`exec_pending`) has its environment already, but its
        executable and command line are still the tracer's: the caller gives them."""
        if not exec_pending:
            try:
                executable = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                pass
        if command_line is None:
            args = _read(f"/proc/{pid}/cmdline").split(b"\0")
            command_line = " ".join(a.decode(errors="replace") for a in args if a)
        environ = {}
        for entry in _read(f"/proc/{pid}/environ").split(b"\0"):
            name, _, value = entry.decode(errors="replace").partition("=")
            if name in PROCESS_ENVIRON and value:
                environ[name] = value
        container_ids = _CONTAINER_ID.findall(_read(f"/proc/{pid}/cgroup").decode(errors="replace"))
        return cls(pid, executable, command_line or executable, environ,
                   container_ids[-1] if container_ids else None)

    @functools.cached_property
    def parent(self) -> http.SpanContext | None:
        """The span this process was started under: the environment carrier (TRACEPARENT, TRACESTATE)."""
        return http.parse_traceparent(self.environ.get("TRACEPARENT"), self.environ.get("TRACESTATE"))


class SpanEncoder:
    """Turns batches of SpanEvents into OTLP ExportTraceServiceRequest bytes, one ResourceSpans per process."""

    def __init__(self, probes: list[ProbeInfo], clock: WallClock, service_name: str | None = None,
                 resource_attributes: dict[str, str] | None = None):
        self.probes = probes
        self.clock = clock
        self._service_name = service_name
        self._resource_attributes = dict(resource_attributes or {})
        self._host = socket.gethostname()
        self._probe_fields = [p.encoded() for p in probes]
        self._scope = field(1, field(1, SCOPE_NAME.encode()) + field(2, __version__.encode()))
        # By (pid, process_seq): pids are reused, the kernel's process_seq tells their owners apart.
        self._processes: dict[tuple[int, int], ProcessInfo] = {}
        self._resources: dict[tuple[int, int], bytes] = {}
        self._thread_fields: dict[tuple[int, int], bytes] = {}

    def remember_process(self, info: ProcessInfo, process_seq: int = 0) -> None:
        """process_seq 0: a process user space registered itself (a COMMAND, --pid)."""
        if len(self._processes) >= MAX_PROCESSES:  # the oldest have long been exported
            oldest = next(iter(self._processes))
            del self._processes[oldest]
            self._resources.pop(oldest, None)
        self._processes[(info.pid, process_seq)] = info

    def process(self, pid: int, process_seq: int, probe_id: int | None = None) -> ProcessInfo:
        """A process's identity, read from /proc the first time it is seen, while it is most likely alive."""
        info = self._processes.get((pid, process_seq))
        if info is None:
            info = ProcessInfo.read(pid, self.probes[probe_id].binary if probe_id is not None else "")
            if info.executable:  # else it is gone already: its first span will name at least the binary
                self.remember_process(info, process_seq)
        return info

    def resource_attributes(self, pid: int, process_seq: int = 0) -> dict[str, str | int]:
        """The process's own OTEL_SERVICE_NAME wins, then ours, then the executable's name."""
        info = self._processes.get((pid, process_seq)) or ProcessInfo(pid, "", "")
        attrs: dict[str, str | int] = dict(self._resource_attributes)
        if info.container_id:
            attrs["container.id"] = info.container_id
        attrs.update({
            "service.name": info.environ.get("OTEL_SERVICE_NAME")
            or self._service_name
            or self._resource_attributes.get("service.name")
            or os.path.basename(info.executable) or "unknown_service",
            "process.pid": pid,
            "process.executable.path": info.executable,
            "process.command_line": info.command_line,
            "host.name": self._host,
            "telemetry.distro.name": SCOPE_NAME,
            "telemetry.distro.version": __version__,
        })
        return attrs

    def _resource(self, key: tuple[int, int]) -> bytes:
        resource = self._resources.get(key)
        if resource is None:
            resource = self._resources[key] = field(1, attributes(1, self.resource_attributes(*key)))
        return resource

    def _thread(self, pid: int, tid: int) -> bytes:
        key = (pid, tid)
        encoded = self._thread_fields.get(key)
        if encoded is None:
            if len(self._thread_fields) >= 65536:  # threads come and go; keep the cache bounded
                self._thread_fields.clear()
            encoded = self._thread_fields[key] = attributes(9, {"thread.id": tid, "process.pid": pid})
        return encoded

    def encode(self, items: list) -> bytes:
        """One ExportTraceServiceRequest for a batch of SpanEvents and ServerSpans."""
        offset = self.clock.offset_ns
        probe_fields, times = self._probe_fields, _TIMES.pack
        by_process: dict[tuple[int, int], list[bytes]] = {}
        for e in items:
            if type(e) is SpanEvent:
                body = b"".join((
                    b"\x0a\x10", e.trace_id, b"\x12\x08", e.span_id,
                    b"" if e.parent_span_id == NO_PARENT else b"\x22\x08" + e.parent_span_id,
                    probe_fields[e.probe_id],
                    times(0x39, e.start_ns + offset, 0x41, e.end_ns + offset),
                    self._thread(e.pid, e.tid),
                    attributes(9, {"go.goroutine.id": e.goroutine_id}) if e.goroutine_id else b"",
                ))
            else:
                body = self._server_span(e, offset)
            key = (e.pid, e.process_seq)
            spans = by_process.get(key)
            if spans is None:
                spans = by_process[key] = []
            spans.append(b"\x12" + varint(len(body)) + body)
        return b"".join(
            field(1, self._resource(key) + field(2, self._scope + b"".join(spans)))
            for key, spans in by_process.items()
        )

    def _server_span(self, s, offset: int) -> bytes:
        """A SERVER span (correlation.ServerSpan): rare next to function spans, so encoded plainly."""
        parts = [field(1, s.trace_id), field(2, s.span_id)]
        if s.parent:
            parts += [field(3, s.parent.tracestate.encode()) if s.parent.tracestate else b"", field(4, s.parent.span_id)]
        parts += [
            field(5, s.name.encode()), varint(6 << 3) + varint(SPAN_KIND_SERVER),
            _TIMES.pack(0x39, s.start_ns + offset, 0x41, s.end_ns + offset),
            attributes(9, s.attributes), self._thread(s.pid, s.tid),
        ]
        if "error.type" in s.attributes:
            parts.append(field(15, varint(3 << 3) + varint(STATUS_CODE_ERROR)))
        if s.parent:
            parts.append(varint(16 << 3 | 5) + _FLAGS.pack(FLAGS_REMOTE_PARENT | int(s.parent.sampled)))
        return b"".join(parts)

    def format(self, e) -> str:
        """One readable console line per span."""
        start = datetime.datetime.fromtimestamp(
            (e.start_ns + self.clock.offset_ns) / 1e9, datetime.timezone.utc)
        if type(e) is SpanEvent:
            name, indent = self.probes[e.probe_id].function, "  " * e.depth
            parent = "-" if e.parent_span_id == NO_PARENT else e.parent_span_id.hex()
            if e.goroutine_id:
                parent += f" goroutine={e.goroutine_id}"
        else:
            name, indent = f"{e.name} {e.attributes.get('url.path', '')} (SERVER)", ""
            parent = e.parent.span_id.hex() if e.parent else "-"
        return (
            f"{start.isoformat(timespec='microseconds')} {(e.end_ns - e.start_ns) / 1e6:10.3f} ms  "
            f"{indent}{name}  pid={e.pid} tid={e.tid} "
            f"trace={e.trace_id.hex()} span={e.span_id.hex()} parent={parent}"
        )


# start_time_unix_nano (7) and end_time_unix_nano (8) are fixed64: tag byte + 8 bytes each.
_TIMES = struct.Struct("<BQBQ")
# flags (16) is fixed32: its tag takes two bytes as a varint, then 4 bytes.
_FLAGS = struct.Struct("<I")
