"""Spans -> OTLP ExportTraceServiceRequest bytes, a whole batch at a time.

Building an SDK span object per call costs far more than the call being traced, and so does encoding spans one
by one in Python. Function spans arrive as arrays of the kernel's records (kernel/layout.py), and every span of
one probe has the same shape: the same name and attributes, ids and times at the same places. So each probe
gets a template, encoded once, and a batch is encoded with numpy: spans grouped by process and template, each
group one 2-D array where the template is broadcast and the variable columns (ids, times, thread) are copied
from the records. Integers that vary per span (thread.id, go.goroutine.id) are written as varints of a fixed
width, padded with continuation bytes, which every protobuf decoder accepts; so every span of a template has
the same length.

Field numbers: opentelemetry/proto/{collector/trace/v1/trace_service,trace/v1/trace,common/v1/common}.proto.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from otel_ebpf import __version__
from otel_ebpf.kernel import layout
from otel_ebpf.kernel.layout import MAX_PROBES, SPAN_RECORD_DTYPE, SPAN_REMOTE_PARENT

try:
    from otel_ebpf.otlp import _encode as _native
except ImportError:  # not built: the numpy code below does the same, slower
    _native = None

SCOPE_NAME = "otel-ebpf"
# The semantic conventions this version's attribute names follow: the schema of every span and resource.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 1, 2, 3
STATUS_CODE_ERROR = 2
# Span.flags: W3C trace flags in the low byte (all exported spans are sampled); bit 8 says whether the parent
# is remote is known, bit 9 that it is.
FLAG_SAMPLED, FLAG_HAS_IS_REMOTE, FLAG_IS_REMOTE = 0x1, 0x100, 0x200


# ----- protobuf wire format, for what is encoded once (templates, resources) or rarely (SERVER spans)


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


AttributeValue = str | int | bool | Sequence[str]


def any_value(value: AttributeValue) -> bytes:
    if isinstance(value, bool):
        return varint(2 << 3) + varint(int(value))
    if isinstance(value, int):
        return varint(3 << 3) + varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, (list, tuple)):  # ArrayValue (field 5) of string values
        return field(5, b"".join(field(1, any_value(item)) for item in value))
    return field(1, str(value).encode("utf-8", "replace"))


def attribute(key: str, value: AttributeValue) -> bytes:
    """A KeyValue's bytes: key (1) and value (2)."""
    return field(1, key.encode()) + field(2, any_value(value))


def attributes(number: int, attrs: dict[str, AttributeValue]) -> bytes:
    """Each attribute as field `number` (9 in Span, 1 in Resource)."""
    return b"".join(field(number, attribute(k, v)) for k, v in attrs.items())


def resource(attrs: dict[str, AttributeValue]) -> bytes:
    """ResourceSpans.resource (field 1)."""
    return field(1, attributes(1, attrs))


SCOPE = field(1, field(1, SCOPE_NAME.encode()) + field(2, __version__.encode()))  # ScopeSpans.scope
_SCHEMA = field(3, SCHEMA_URL.encode())  # ResourceSpans.schema_url and ScopeSpans.schema_url are both field 3


def request(groups: Iterable[tuple[bytes, list[bytes]]]) -> bytes:
    """An ExportTraceServiceRequest: one ResourceSpans per (resource bytes, encoded Span fields of ScopeSpans).

    Joined once: the spans are most of the bytes, and wrapping them field by field would copy them each time."""
    parts = []
    for res, spans in groups:
        scope_spans = len(SCOPE) + sum(map(len, spans)) + len(_SCHEMA)
        scope_tag = b"\x12" + varint(scope_spans)
        parts += [b"\x0a", varint(len(res) + len(scope_tag) + scope_spans + len(_SCHEMA)), res, scope_tag, SCOPE,
                  *spans, _SCHEMA, _SCHEMA]
    return b"".join(parts)


# ----- templates for function spans

_THREAD_WIDTH = 4  # varint bytes for thread.id: 28 bits, more than Linux's largest pid_max (2^22)
_GOROUTINE_WIDTH = 9  # varint bytes for go.goroutine.id: 63 bits, every non-negative int64


def _padded_int_value(width: int) -> bytes:
    """An AnyValue int_value whose varint has `width` bytes, all zero but the continuation bits: a placeholder."""
    return varint(3 << 3) + b"\x80" * (width - 1) + b"\x00"


@dataclass(frozen=True)
class _Template:
    """The bytes of one kind of function span, and where its variable fields go (offsets into `row`)."""

    row: np.ndarray  # uint8: the ScopeSpans.spans tag and length, then the Span
    slots: dict[str, int]


class _Builder:
    """Concatenates a span's fields, noting where the placeholders of the variable ones start."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0
        self.slots: dict[str, int] = {}

    def add(self, data: bytes, slot: str | None = None, width: int = 0) -> None:
        """Append data; `slot` names its last `width` bytes."""
        self.parts.append(data)
        self.size += len(data)
        if slot:
            self.slots[slot] = self.size - width


def _template(name: str, attrs: dict[str, AttributeValue], parent: bool, goroutine: bool, remote: bool) -> _Template:
    span = _Builder()
    span.add(b"\x0a\x10" + bytes(16), "trace_id", 16)
    span.add(b"\x12\x08" + bytes(8), "span_id", 8)
    if parent:
        span.add(b"\x22\x08" + bytes(8), "parent_span_id", 8)
    span.add(field(5, name.encode()) + varint(6 << 3) + varint(SPAN_KIND_INTERNAL))
    span.add(b"\x39" + bytes(8), "start", 8)
    span.add(b"\x41" + bytes(8), "end", 8)
    span.add(attributes(9, attrs))
    span.add(field(9, field(1, b"thread.id") + field(2, _padded_int_value(_THREAD_WIDTH))), "thread", _THREAD_WIDTH)
    if goroutine:
        span.add(field(9, field(1, b"go.goroutine.id") + field(2, _padded_int_value(_GOROUTINE_WIDTH))),
                 "goroutine", _GOROUTINE_WIDTH)
    span.add(varint(16 << 3 | 5) + struct.pack("<I", FLAG_SAMPLED | FLAG_HAS_IS_REMOTE |
                                               (FLAG_IS_REMOTE if remote else 0)))
    prefix = b"\x12" + varint(span.size)
    return _Template(np.frombuffer(prefix + b"".join(span.parts), np.uint8),
                     {slot: len(prefix) + at for slot, at in span.slots.items()})


# ----- what is encoded


@dataclass(frozen=True)
class Resource:
    """A process's resource, encoded once (ResourceSpans.resource), and its service.name for console lines."""

    encoded: bytes
    service_name: str


class SpanChunk:
    """Function spans ready to export: kernel records (SPAN_RECORD_DTYPE), their ids already moved into the
    traces they belong to, and the resources of their processes by key (see process_key). Slicing keeps the
    resources, so the export pipeline can split a chunk between batches."""

    __slots__ = ("records", "resources")

    def __init__(self, records: np.ndarray, resources: dict[int, Resource]):
        self.records = records
        self.resources = resources

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: slice) -> SpanChunk:
        return SpanChunk(self.records[index], self.resources)


def process_key(pid, process_seq):
    """One 64-bit number per process: its pid and process_seq as a span record holds them side by side, read as
    one little-endian word (so arrays of records give it without arithmetic)."""
    return (np.asarray(process_seq, np.uint64) << np.uint64(32)) | np.asarray(pid, np.uint64)


@dataclass(frozen=True, slots=True)
class ServerSpan:
    """A span encoded on its own, not from a template: a finished request seen by the kernel (a SERVER span, or a
    CLIENT span for an outbound request, whose parent is then a local span), or a function span whose
    attributes vary from call to call (captured arguments: INTERNAL)."""

    process: int  # process_key
    resource: Resource
    tid: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes | None  # the caller's span, from traceparent; None: a root
    tracestate: str
    start_ns: int
    end_ns: int
    name: str
    attributes: dict
    kind: int = SPAN_KIND_SERVER
    remote_parent: bool = False  # INTERNAL: the parent is the process's TRACEPARENT
    depth: int = 0  # INTERNAL: nesting among probed calls, for console lines


@dataclass(frozen=True)
class ProbeInfo:
    """What a span of a probe says besides its ids and times: the function and the file it lives in."""

    function: str
    binary: str

    @property
    def attributes(self) -> dict[str, AttributeValue]:
        return {"code.function.name": self.function, "code.file.path": self.binary}


# Where the encoder finds things in a record, as bytes (_AT), 64-bit words (_WORD) and 32-bit words (_HALF).
_AT = {name: SPAN_RECORD_DTYPE.fields[name][1] for name in SPAN_RECORD_DTYPE.names}
_WORD = {name: at // 8 for name, at in _AT.items() if at % 8 == 0}
_HALF = {name: at // 4 for name, at in _AT.items() if at % 4 == 0}
_PARENT, _GOROUTINE, _REMOTE = 1, 2, 4  # template variants: bits below the probe id in a group number


def _varint_bytes(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8: each value as a varint of exactly `width` bytes (at most 9, 63 bits), continuation
    bits set on all but the last. Spread 7 bits per byte with shifts on whole words, not byte by byte."""
    values = values.astype(np.uint64)
    low = np.zeros(len(values), np.uint64)
    for i in range(min(width, 8)):
        low |= ((values >> np.uint64(7 * i)) & np.uint64(0x7F)) << np.uint64(8 * i)
    out = np.empty((len(values), width), np.uint8)
    out[:, :min(width, 8)] = low.view(np.uint8).reshape(-1, 8)[:, :min(width, 8)]
    if width == 9:
        out[:, 8] = (values >> np.uint64(56)) & np.uint64(0x7F)
    out[:, :width - 1] |= 0x80
    return out


# The slot columns of the compiled encoder's template table, and the record fields it reads (see _encode.c).
_TABLE_SLOTS = ("trace_id", "span_id", "parent_span_id", "start", "end", "thread", "goroutine")
_NATIVE_FIELDS = tuple(_AT[name] for name in ("trace_id", "span_id", "parent_span_id", "start_ns", "end_ns", "tid",
                                              "goroutine_id", "pid", "probe_id", "flags"))


class SpanEncoder:
    """Turns the export pipeline's chunks (SpanChunk and lists of ServerSpan) into ExportTraceServiceRequest
    bytes, one ResourceSpans per process. `probes(probe_id)` tells what each probe is; `clock.offset_ns` turns
    the kernel's monotonic times into Unix times. With `native` (the default when otel_ebpf.otlp._encode was
    built) the spans are written by compiled code, else by numpy; both give the same bytes."""

    def __init__(self, probes, clock, native: bool | None = None):
        self._probes = probes
        self.clock = clock
        self._native = _native if native is None else (_native if native else None)
        if native and _native is None:
            raise RuntimeError("otel_ebpf.otlp._encode was not built")
        self._templates: list[_Template] = []
        self._row_of_kind = np.full(MAX_PROBES << 3, -1, np.int32)
        self._table = np.zeros((0, 2 + len(_TABLE_SLOTS)), np.int32)
        self._blob = b""

    def encode(self, chunks: list) -> bytes:
        offset = np.uint64(self.clock.offset_ns)
        groups: dict[int, tuple[Resource, list[bytes]]] = {}
        for chunk in chunks:
            if isinstance(chunk, SpanChunk):
                if len(chunk):
                    self._encode_records(chunk.records, chunk.resources, offset, groups)
            else:
                for span in chunk:
                    groups.setdefault(span.process, (span.resource, []))[1].append(
                        field(2, self._server_span(span, int(offset))))
        return request((res.encoded, spans) for res, spans in groups.values())

    def _encode_records(self, records: np.ndarray, resources: dict[int, Resource], offset: np.uint64,
                        groups: dict) -> None:
        """Spans written process by process (a batch rarely holds more than a few)."""
        keys = layout.words(records)[:, _WORD["pid"]]
        for key in [int(keys[0])] if (keys == keys[0]).all() else np.unique(keys).tolist():
            if self._native is not None:
                encoded = self._fill_native(records, key, offset)
            else:
                encoded = self._fill_by_template(records[keys == key], offset)
            groups.setdefault(key, (resources[key], []))[1].append(encoded)

    def _fill_native(self, records: np.ndarray, key: int, offset: np.uint64) -> bytes:
        while True:
            encoded = self._native.fill(records, records.itemsize, key, self._row_of_kind, self._table, self._blob,
                                        _NATIVE_FIELDS, int(offset))
            if isinstance(encoded, bytes):
                return encoded
            self._add_template(encoded)

    @staticmethod
    def _kinds(records: np.ndarray) -> np.ndarray:
        """Each span's template kind: probe_id << 3 | variant bits."""
        n = len(records)
        words = layout.words(records)
        halves = layout.halves(records)
        return (halves[:, _HALF["probe_id"]] << np.uint32(3)
                | (words[:, _WORD["parent_span_id"]] != 0).astype(np.uint32) * np.uint32(_PARENT)
                | (words[:, _WORD["goroutine_id"]] != 0).astype(np.uint32) * np.uint32(_GOROUTINE)
                | ((halves[:, _HALF["flags"]] & SPAN_REMOTE_PARENT) != 0).astype(np.uint32) * np.uint32(_REMOTE))

    def _add_template(self, kind: int) -> None:
        probe, variant = self._probes(kind >> 3), kind & 7
        template = _template(probe.function, probe.attributes, bool(variant & _PARENT), bool(variant & _GOROUTINE),
                             bool(variant & _REMOTE))
        row = [len(self._blob), len(template.row), *(template.slots.get(slot, -1) for slot in _TABLE_SLOTS)]
        self._blob += template.row.tobytes()
        self._table = np.vstack([self._table, np.array([row], np.int32)])
        self._row_of_kind[kind] = len(self._templates)
        self._templates.append(template)

    def _fill_by_template(self, records: np.ndarray, offset: np.uint64) -> bytes:
        """The numpy way: spans grouped by template, each group one 2-D array."""
        kinds = self._kinds(records)
        for kind in np.unique(kinds[self._row_of_kind[kinds] < 0]).tolist():
            self._add_template(kind)
        rows = self._row_of_kind[kinds]
        if not (rows == rows[0]).all():
            order = np.argsort(rows, kind="stable")
            records, rows = records[order], rows[order]
        bounds = [0, *(np.flatnonzero(rows[1:] != rows[:-1]) + 1).tolist(), len(records)]
        return b"".join(self._fill(records[a:b], self._templates[int(rows[a])], offset)
                        for a, b in zip(bounds, bounds[1:]))

    @staticmethod
    def _fill(records: np.ndarray, template: _Template, offset: np.uint64) -> bytes:
        n, slots = len(records), template.slots
        out = np.empty((n, len(template.row)), np.uint8)
        out[:] = template.row
        raw = records.view(np.uint8).reshape(n, -1)
        words = layout.words(records)
        for name, width in (("trace_id", 16), ("span_id", 8), ("parent_span_id", 8)):
            if name in slots:
                out[:, slots[name]:slots[name] + width] = raw[:, _AT[name]:_AT[name] + width]
        for name, column in (("start", "start_ns"), ("end", "end_ns")):
            out[:, slots[name]:slots[name] + 8] = (words[:, _WORD[column]] + offset).view(np.uint8).reshape(n, 8)
        halves = layout.halves(records)
        out[:, slots["thread"]:slots["thread"] + _THREAD_WIDTH] = _varint_bytes(halves[:, _HALF["tid"]],
                                                                               _THREAD_WIDTH)
        if "goroutine" in slots:
            out[:, slots["goroutine"]:slots["goroutine"] + _GOROUTINE_WIDTH] = _varint_bytes(
                words[:, _WORD["goroutine_id"]], _GOROUTINE_WIDTH)
        return out.tobytes()

    @staticmethod
    def _server_span(s: ServerSpan, offset: int) -> bytes:
        """A SERVER or CLIENT span: rare next to function spans, so encoded plainly."""
        parts = [field(1, s.trace_id), field(2, s.span_id)]
        if s.tracestate:
            parts.append(field(3, s.tracestate.encode()))
        if s.parent_span_id:
            parts.append(field(4, s.parent_span_id))
        parts += [
            field(5, s.name.encode()), varint(6 << 3) + varint(s.kind),
            b"\x39" + struct.pack("<Q", s.start_ns + offset), b"\x41" + struct.pack("<Q", s.end_ns + offset),
            attributes(9, {**s.attributes, "thread.id": s.tid}),
        ]
        if "error.type" in s.attributes:
            parts.append(field(15, varint(3 << 3) + varint(STATUS_CODE_ERROR)))
        remote = s.parent_span_id and (s.kind == SPAN_KIND_SERVER or s.remote_parent)
        flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | (FLAG_IS_REMOTE if remote else 0)
        parts.append(varint(16 << 3 | 5) + struct.pack("<I", flags))
        return b"".join(parts)
