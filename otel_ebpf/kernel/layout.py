"""Mirrors of bpf/event.h: what the kernel sends and the numbers both sides must agree on.

Each mirror is defined here once and checked against the compiled program at start-up (check_program) and
against gcc's view of the header in tests/unit/test_event_layout.py, by name, so that a reordered C enum or a
moved field cannot silently swap meanings.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from otel_ebpf.errors import UserError

# ----- constants (bpf/event.h; "must match" on both sides)

MAX_PROBES = 1024
LATENCY_BUCKETS = 40
COOKIE_PROBE_ID_MASK = 0xFFFFFF
COOKIE_GO = 1 << 24
COOKIE_PROCESS_START = 1 << 25
COOKIE_TLS = 1 << 26
COOKIE_GO_HOOK = 1 << 27
COOKIE_CAPTURE = 1 << 28
COOKIE_INSTANT = 1 << 29
COOKIE_FILTER = 1 << 30
GO_HOOK_NEWPROC = 1
GO_HOOK_ROUND_TRIP = 2
GO_HOOK_REQUEST_WRITE = 3
TLS_READ = 1
TLS_WRITE = 2
TLS_READ_EX = 3
TLS_WRITE_EX = 4
TLS_SET_FD = 5
HTTP_TLS = 1
HTTP2_OUTBOUND = 2
COOKIE_GOID_SHIFT = 32
SPAN_REMOTE_PARENT = 1
HTTP_REQUEST_CAPTURE = 1024
HTTP_REQUEST_READS = 4
HTTP_RESPONSE_CAPTURE = 512
HTTP_RESPONSE_HEAD_WRITES = 4
HTTP_RESPONSE_TAIL = 8
HTTP2_CAPTURE = 4096
HTTP2_RECEIVED = 0
HTTP2_SENT = 1
HTTP2_CLOSED = 2
IDENTITY_FILENAME = 256
IDENTITY_ARGV = 512
IDENTITY_ENV = 1024
IDENTITY_CAPTURED = 1
IDENTITY_ARGV_CUT = 2
IDENTITY_ENV_CUT = 4
IDENTITY_HAS_PARENT = 8
IDENTITY_PARENT_SAMPLED = 16
PROCESS_CAUSE_EXEC = 1
PROCESS_CAUSE_FORK = 2
PROCESS_CAUSE_FOUND = 3
NOTICE_PROCESS = 1
NOTICE_PROCESS_EXIT = 2
NOTICE_HTTP_REQUEST = 3
NOTICE_HTTP_RESPONSE = 4
NOTICE_FDS_CLOSED = 5
NOTICE_HTTP2 = 6
NOTICE_HTTP_CLIENT = 7
NOTICE_GO_STREAM = 8
NOTICE_CAPTURE = 9
NOTICE_EXEC = 10
MAX_CAPTURES = 8
CAPTURE_RESULTS = 2
CAPTURE_STRING_MAX = 1024
CAPTURE_DATA = 2048
CAPTURE_NONE = 0
CAPTURE_VALUE = 1
CAPTURE_STRING = 2
CAPTURE_BYTES = 3
CAPTURE_GO_STRING = 4
REG_RDI = 0
REG_RSI = 1
REG_RDX = 2
REG_RCX = 3
REG_R8 = 4
REG_R9 = 5
REG_RAX = 6
REG_RBX = 7
REG_R10 = 8
REG_R11 = 9
REG_RBP = 10
REG_RSP = 11
REG_R12 = 12
REG_R13 = 13
REG_R14 = 14
REG_R15 = 15
CAPTURE_REGISTERS = 16
SLOT_MEMORY = 1
CAPTURED_CUT = 1
CAPTURED_FAULT = 2
CAPTURE_AT_ENTRY = 0
NAME_PATTERN_MAX = 64
NAME_RULES = 8
FILTER_NAME_MAX = 128
FILTER_FILE_MAX = 256
PATTERN_ANY = 0
PATTERN_EXACT = 1
PATTERN_PREFIX = 2
PATTERN_SUFFIX = 3
CAPTURE_AT_RETURN = 1
# process_info.flags (bpf/maps.h): written by user space when it registers a process itself.
PROCESS_HAS_PARENT = 1
PROCESS_PARENT_SAMPLED = 2
PROCESS_AWAIT_EXEC = 8
PROCESS_GO = 16

# The LRU maps whose entries are counted in and out (counters NAME_added and NAME_removed): their key sizes, and
# what the summary calls their entries.
COUNTED_MAPS = {"sockets": (8, "sockets"), "requests": (8, "requests"), "thread_requests": (8, "threads' requests"),
                "goroutine_requests": (16, "goroutines' requests"), "client_requests": (8, "outbound requests"),
                "h2_readers": (16, "goroutines reading HTTP/2"), "go_requests": (16, "Go requests handed over"),
                "go_writers": (16, "Go requests being written")}
# enum counter, by slot: the names metrics and the summary use.
COUNTERS = ("spans_lost", "depth_exceeded", "unmatched_return", "notices_lost", "wakeups") + tuple(
    f"{name}_{way}" for name in COUNTED_MAPS for way in ("added", "removed")) + ("filtered_unpaired",)
# The C names of the same slots, for the layout checks.
COUNTER_ENUM = tuple(f"COUNTER_{name.upper()}" for name in COUNTERS)

# Every constant above with its C name, for tests/unit/test_event_layout.py.
CONSTANTS = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, int)}

# ----- maps user space reads or writes (bpf/maps.h, bpf/event.h)

STACK_KEY_SIZE = 16  # struct stack_key: the call_stacks map's key
PROCESS_INFO = struct.Struct("<IIII16s8s")  # struct process_info: seq, flags, parent pid and seq, trace and span id
LATENCY_SLOTS = struct.Struct(f"<{LATENCY_BUCKETS + 2}Q")  # struct latency_slots: buckets, sum_ns, max_ns

# ----- struct span_record: a numpy record, so that a drained batch is one array

_SPAN_FIELDS = (
    ("start_ns", "<u8"), ("end_ns", "<u8"), ("trace_id", ("<u8", (2,))), ("span_id", "<u8"),
    ("parent_span_id", "<u8"), ("goroutine_id", "<u8"), ("pid", "<u4"), ("process_seq", "<u4"), ("probe_id", "<u4"),
    ("flags", "<u4"), ("tid", "<u4"), ("depth", "<u4"),
)
SPAN_DTYPE = np.dtype(list(_SPAN_FIELDS))
# The same record as the ring buffer holds it: an 8-byte header (length, page offset) in front. Arrays of spans
# keep this layout all the way to the encoder, so that draining is one copy. Every byte is a named field: numpy
# drops unnamed padding when it concatenates structured arrays, which would move the fields.
RING_HEADER_SIZE = 8
SPAN_RECORD_DTYPE = np.dtype([("ring_length", "<u4"), ("ring_page_offset", "<u4"), *_SPAN_FIELDS])


def words(records: np.ndarray) -> np.ndarray:
    """Span records as rows of 64-bit words (a view: writing to it writes the records)."""
    return records.view(np.uint64).reshape(len(records), SPAN_RECORD_DTYPE.itemsize // 8)


def halves(records: np.ndarray) -> np.ndarray:
    """Span records as rows of 32-bit words (a view)."""
    return records.view(np.uint32).reshape(len(records), SPAN_RECORD_DTYPE.itemsize // 4)


def span_offsets() -> dict[str, tuple[int, int]]:
    """Offset and size of each span_record field as the numpy mirror has them."""
    return {name: (SPAN_DTYPE.fields[name][1], SPAN_DTYPE.fields[name][0].itemsize) for name in SPAN_DTYPE.names}


# ----- notices: variable records, decoded one at a time (they are rare next to spans)


@dataclass(frozen=True)
class NoticeType:
    """One notice struct of bpf/event.h: its kind, its member in struct event_layouts, its fields."""

    kind: int
    member: str
    fields: tuple[tuple[str, str], ...]

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join(fmt for _, fmt in self.fields))

    def offsets(self) -> dict[str, tuple[int, int]]:
        result, offset = {}, 0
        for name, fmt in self.fields:
            size = struct.calcsize("<" + fmt)
            result[name] = (offset, size)
            offset += size
        return result


_HEADER = (("header.kind", "I"), ("header.length", "I"))
_IDENTITY = (
    ("identity.flags", "I"), ("identity.filename_length", "H"), ("identity.argv_length", "H"),
    ("identity.env_length", "H"), ("identity.traceparent_at", "H"), ("identity.pad", "I"),
    ("identity.parent_trace_id", "16s"), ("identity.parent_span_id", "8s"),
    ("identity.data", f"{IDENTITY_FILENAME + IDENTITY_ARGV + IDENTITY_ENV}s"),
)
PROCESS = NoticeType(NOTICE_PROCESS, "process", _HEADER + (
    ("pid", "I"), ("process_seq", "I"), ("parent_pid", "I"), ("parent_seq", "I"), ("cause", "I"), ("pad", "I"),
) + _IDENTITY)
HTTP_REQUEST = NoticeType(NOTICE_HTTP_REQUEST, "http_request", _HEADER + (
    ("fd", "I"), ("pid", "I"), ("tid", "I"), ("process_seq", "I"), ("start_ns", "Q"), ("trace_id", "16s"),
    ("span_id", "8s"), ("sampled", "I"), ("length", "I"), ("read", "H"), ("flags", "H"), ("family", "H"),
    ("peer_port", "H"),
    ("peer_addr", "16s"), ("local_port", "H"), ("held_length", "B"), ("pad", "B"), ("held", "4s"),
    ("local_addr", "16s"),
    ("data", f"{HTTP_REQUEST_CAPTURE}s"),
))
HTTP_RESPONSE = NoticeType(NOTICE_HTTP_RESPONSE, "http_response", _HEADER + (
    ("fd", "I"), ("pid", "I"), ("tid", "I"), ("length", "I"), ("end_ns", "Q"), ("span_id", "8s"), ("written", "Q"),
    ("write", "I"), ("closed", "H"), ("tail_length", "H"), ("tail", f"{HTTP_RESPONSE_TAIL}s"),
    ("data", f"{HTTP_RESPONSE_CAPTURE}s"),
))
FDS_CLOSED = NoticeType(NOTICE_FDS_CLOSED, "fds_closed", _HEADER + (
    ("pid", "I"), ("first", "I"), ("last", "Q"), ("end_ns", "Q"),
))
HTTP2 = NoticeType(NOTICE_HTTP2, "http2", _HEADER + (
    ("fd", "I"), ("pid", "I"), ("tid", "I"), ("process_seq", "I"), ("ns", "Q"), ("length", "Q"), ("captured", "I"),
    ("direction", "H"), ("flags", "H"), ("family", "H"), ("peer_port", "H"), ("local_port", "H"), ("pad", "H"),
    ("peer_addr", "16s"), ("local_addr", "16s"), ("trace_id", "16s"), ("parent_span_id", "8s"), ("sampled", "I"),
    ("pad2", "I"), ("data", f"{HTTP2_CAPTURE}s"),
))
HTTP_CLIENT = NoticeType(NOTICE_HTTP_CLIENT, "http_client", _HEADER + (
    ("fd", "I"), ("pid", "I"), ("tid", "I"), ("process_seq", "I"), ("start_ns", "Q"), ("trace_id", "16s"),
    ("span_id", "8s"), ("parent_span_id", "8s"), ("sampled", "I"), ("length", "I"), ("family", "H"),
    ("peer_port", "H"), ("flags", "H"), ("pad", "H"), ("peer_addr", "16s"), ("data", f"{HTTP_REQUEST_CAPTURE}s"),
))
GO_STREAM = NoticeType(NOTICE_GO_STREAM, "go_stream", _HEADER + (
    ("fd", "I"), ("pid", "I"), ("process_seq", "I"), ("sampled", "I"), ("ns", "Q"), ("trace_id", "16s"),
    ("span_id", "8s"),
))
CAPTURED_VALUE = struct.Struct("<QHHI")  # struct captured_value
CAPTURE = NoticeType(NOTICE_CAPTURE, "capture", _HEADER + (
    ("pid", "I"), ("probe_id", "I"), ("span_id", "8s"), ("at", "H"), ("count", "H"), ("data_length", "I"),
    ("values", f"{MAX_CAPTURES * CAPTURED_VALUE.size}s"), ("data", f"{2 * CAPTURE_DATA}s"),
))
EXEC = NoticeType(NOTICE_EXEC, "exec", _HEADER + (("pid", "I"), ("pad", "I")))
NOTICE_TYPES = (PROCESS, HTTP_REQUEST, HTTP_RESPONSE, FDS_CLOSED, HTTP2, HTTP_CLIENT, GO_STREAM, CAPTURE, EXEC)
# struct capture_slot, and struct capture_plan (not a notice: the value user space writes to capture_plans).
CAPTURE_SLOT = struct.Struct("<BBBBHHiI")
CAPTURE_PLAN = NoticeType(0, "capture_plan", (
    ("entry", f"{MAX_CAPTURES * CAPTURE_SLOT.size}s"), ("result", f"{CAPTURE_RESULTS * CAPTURE_SLOT.size}s"),
))
# struct name_pattern, and struct name_filter (the value user space writes to name_filters).
NAME_PATTERN = struct.Struct(f"<BB2x{NAME_PATTERN_MAX}s")
NAME_FILTER = NoticeType(0, "name_filter", (
    ("entry_file_reg", "B"), ("entry_name_reg", "B"), ("return_file_reg", "B"), ("return_name_reg", "B"),
    ("rules", "I"), ("rule", f"{NAME_RULES * 2 * NAME_PATTERN.size}s"),
))
# An exit notice is a process notice that ends before its identity.
PROCESS_HEAD_SIZE = PROCESS.offsets()["identity.flags"][0]


class Identity(NamedTuple):
    """What a process was exec'd as, as the kernel copied it (struct identity)."""

    flags: int
    filename: bytes
    argv: tuple[bytes, ...]
    environ: dict[bytes, bytes]  # "NAME=value" entries the kernel kept
    parent_trace_id: bytes
    parent_span_id: bytes


class ProcessNotice(NamedTuple):
    kind: int
    pid: int
    process_seq: int
    parent_pid: int
    parent_seq: int
    cause: int
    identity: Identity | None  # None: an exit, or a process found without its exec seen


class HttpRequestNotice(NamedTuple):
    fd: int
    pid: int
    tid: int
    process_seq: int
    start_ns: int
    trace_id: bytes
    span_id: bytes
    sampled: int
    data: bytes
    read: int = 0  # 0: the read that began the request; then later reads of its header section
    peer: tuple[str, int] | None = None  # as accept returned it
    tls: bool = False  # read in plaintext from SSL_read: HTTPS
    local: tuple[str, int] | None = None  # the server's end of the connection


class Http2Notice(NamedTuple):
    """A read or write of an HTTP/2 connection, or its close (direction): `data` is its first bytes, `length`
    all of it."""

    fd: int
    pid: int
    tid: int
    process_seq: int
    ns: int
    length: int
    direction: int  # HTTP2_RECEIVED, HTTP2_SENT, HTTP2_CLOSED
    data: bytes
    tls: bool = False
    peer: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    outbound: bool = False  # a connection the process connected: it sends the requests
    # Outbound writes: the span in flight where it was written, as the kernel knows it (zeros: none).
    trace_id: bytes = bytes(16)
    parent_span_id: bytes = bytes(8)
    sampled: int = 0


class HttpClientNotice(NamedTuple):
    """An outbound request a watched process wrote: its CLIENT span's ids, as the kernel made them."""

    fd: int
    pid: int
    tid: int
    process_seq: int
    start_ns: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes  # zeros: a root
    sampled: int
    data: bytes
    peer: tuple[str, int] | None = None  # the server, as connect was given it
    tls: bool = False  # written in plaintext to SSL_write: HTTPS


class GoStreamNotice(NamedTuple):
    """A Go program started the goroutine serving the next stream of an HTTP/2 connection: its calls' ids."""

    fd: int
    pid: int
    process_seq: int
    sampled: int
    ns: int
    trace_id: bytes
    span_id: bytes  # of the stream's SERVER span


class CapturedValue(NamedTuple):
    value: int  # CAPTURE_VALUE: the register; else unused
    data: bytes  # strings and bytes: what was copied
    flags: int  # CAPTURED_*


class CaptureNotice(NamedTuple):
    """What a call's probe read at its entry or return (at), for the span with span_id."""

    pid: int
    probe_id: int
    span_id: bytes
    at: int  # CAPTURE_AT_ENTRY, CAPTURE_AT_RETURN
    values: tuple[CapturedValue, ...]


class ExecNotice(NamedTuple):
    """A process exec'd (sent only for discovery: probes on binary path patterns)."""

    pid: int


class FdsClosedNotice(NamedTuple):
    """Descriptors first..last of a process closed at once (close_range, or its exit)."""

    pid: int
    first: int
    last: int
    end_ns: int


class HttpResponseNotice(NamedTuple):
    fd: int
    pid: int
    tid: int
    end_ns: int
    span_id: bytes
    data: bytes  # the write's first bytes (only for its first HTTP_RESPONSE_HEAD_WRITES writes)
    written: int = 0  # bytes the write wrote
    write: int = 0  # writes of the response before this one
    closed: bool = False  # the connection closed: nothing was written
    tail: bytes = b""  # its last bytes (not for sendfile and splice)


_PROCESS_HEAD = struct.Struct("<IIIIIIII")
_IDENTITY_HEAD = struct.Struct("<IHHHHI16s8s")
_REQUEST = struct.Struct("<" + "".join(fmt for _, fmt in HTTP_REQUEST.fields))
_RESPONSE = struct.Struct("<" + "".join(fmt for _, fmt in HTTP_RESPONSE.fields))
_FDS_CLOSED = FDS_CLOSED.struct
_CLIENT = HTTP_CLIENT.struct
_GO_STREAM = GO_STREAM.struct
_EXEC = EXEC.struct
_CAPTURE_HEAD = struct.Struct("<" + "".join(fmt for name, fmt in CAPTURE.fields if name != "data"))
_HTTP2_HEAD = struct.Struct("<" + "".join(fmt for name, fmt in HTTP2.fields if name != "data"))


def _identity(record: memoryview) -> Identity:
    flags, filename_length, argv_length, env_length, _, _, trace_id, span_id = _IDENTITY_HEAD.unpack_from(record)
    data = bytes(record[_IDENTITY_HEAD.size:])
    filename = data[:min(filename_length, IDENTITY_FILENAME)]
    argv = data[IDENTITY_FILENAME:IDENTITY_FILENAME + min(argv_length, IDENTITY_ARGV)].split(b"\0")[:-1]
    env_start = IDENTITY_FILENAME + IDENTITY_ARGV
    environ = {}
    for entry in data[env_start:env_start + min(env_length, IDENTITY_ENV)].split(b"\0")[:-1]:
        name, _, value = entry.partition(b"=")
        environ[name] = value
    return Identity(flags, filename, tuple(argv), environ, trace_id, span_id)


def peer_address(family: int, port: int, addr: bytes) -> tuple[str, int] | None:
    """An address as the kernel copied it from a sockaddr or the TCP stack; None when it is not an IP one, or
    its port is 0 (not known)."""
    if not port:
        return None
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, addr[:4]), port
    if family == socket.AF_INET6:
        raw = addr
        if raw[:12] == _IPV4_MAPPED_PREFIX:  # a dual-stack socket's IPv4 peer
            return socket.inet_ntop(socket.AF_INET, raw[12:]), port
        return socket.inet_ntop(socket.AF_INET6, raw), port
    return None


_IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def decode_notice(record: memoryview) -> ProcessNotice | HttpRequestNotice | HttpResponseNotice | None:
    """One notice record (without its ring header); None for a kind this version does not know."""
    kind = int.from_bytes(record[:4], "little")
    if kind in (NOTICE_PROCESS, NOTICE_PROCESS_EXIT):
        _, length, pid, seq, parent_pid, parent_seq, cause, _ = _PROCESS_HEAD.unpack_from(record)
        identity = _identity(record[PROCESS_HEAD_SIZE:]) if length > PROCESS_HEAD_SIZE else None
        return ProcessNotice(kind, pid, seq, parent_pid, parent_seq, cause, identity)
    if kind == NOTICE_HTTP_REQUEST:
        (_, _, fd, pid, tid, seq, start, trace_id, span_id, sampled, length, read, flags, family, port, addr,
         local_port, held_length, _, held, local_addr, data) = _REQUEST.unpack_from(record)
        return HttpRequestNotice(fd, pid, tid, seq, start, trace_id, span_id, sampled,
                                 held[:held_length] + data[:length], read,
                                 peer_address(family, port, addr), bool(flags & HTTP_TLS),
                                 peer_address(family, local_port, local_addr))
    if kind == NOTICE_HTTP_RESPONSE:
        if len(record) < _RESPONSE.size:  # a write without its first bytes: the record ends before them
            record = bytes(record) + bytes(_RESPONSE.size - len(record))
        (_, _, fd, pid, tid, length, end, span_id, written, write, closed, tail_length, tail,
         data) = _RESPONSE.unpack_from(record)
        return HttpResponseNotice(fd, pid, tid, end, span_id, data[:length], written, write, bool(closed),
                                  tail[:tail_length])
    if kind == NOTICE_HTTP2:
        (_, _, fd, pid, tid, seq, ns, length, captured, direction, flags, family, peer_port, local_port, _, peer_addr,
         local_addr, trace_id, parent, sampled, _) = _HTTP2_HEAD.unpack_from(record)
        data = bytes(record[_HTTP2_HEAD.size:_HTTP2_HEAD.size + captured])
        return Http2Notice(fd, pid, tid, seq, ns, length, direction, data, bool(flags & HTTP_TLS),
                           peer_address(family, peer_port, peer_addr), peer_address(family, local_port, local_addr),
                           bool(flags & HTTP2_OUTBOUND), trace_id, parent, sampled)
    if kind == NOTICE_HTTP_CLIENT:
        (_, _, fd, pid, tid, seq, start, trace_id, span_id, parent, sampled, length, family, port, flags, _, addr,
         data) = _CLIENT.unpack_from(record)
        return HttpClientNotice(fd, pid, tid, seq, start, trace_id, span_id, parent, sampled, data[:length],
                                peer_address(family, port, addr), bool(flags & HTTP_TLS))
    if kind == NOTICE_FDS_CLOSED:
        return FdsClosedNotice(*_FDS_CLOSED.unpack_from(record)[2:])
    if kind == NOTICE_GO_STREAM:
        return GoStreamNotice(*_GO_STREAM.unpack_from(record)[2:])
    if kind == NOTICE_CAPTURE:
        return _capture(record)
    if kind == NOTICE_EXEC:
        return ExecNotice(_EXEC.unpack_from(record)[2])
    return None


def _capture(record: memoryview) -> CaptureNotice:
    _, _, pid, probe_id, span_id, at, count, data_length, values = _CAPTURE_HEAD.unpack_from(record)
    data = bytes(record[_CAPTURE_HEAD.size:_CAPTURE_HEAD.size + data_length])
    decoded = []
    for i in range(min(count, MAX_CAPTURES)):
        value, length, flags, _ = CAPTURED_VALUE.unpack_from(values, i * CAPTURED_VALUE.size)
        decoded.append(CapturedValue(value, b"", flags) if length == 0 else
                       CapturedValue(value, data[value:value + length], flags))
    return CaptureNotice(pid, probe_id, span_id, at, tuple(decoded))


# ----- the checks


def _flatten(ctype, prefix: str = "", base: int = 0) -> dict[str, tuple[int, int]]:
    """(offset, size) of every leaf field of a ctypes structure, nested names dotted."""
    import ctypes

    fields = {}
    for name, field_type in ctype._fields_:
        descriptor = getattr(ctype, name)
        offset = base + descriptor.offset
        if isinstance(field_type, type) and issubclass(field_type, ctypes.Structure):
            fields.update(_flatten(field_type, f"{prefix}{name}.", offset))
        else:
            fields[f"{prefix}{name}"] = (offset, descriptor.size)
    return fields


def check_layouts(compiled: dict[str, tuple[dict[str, tuple[int, int]], int]]) -> None:
    """Refuse to run when a compiled struct and its mirror disagree: every event would be garbage.

    `compiled` maps a member of struct event_layouts to (its fields' offsets and sizes, its size)."""
    mirrors = {"span": (span_offsets(), SPAN_DTYPE.itemsize)}
    mirrors.update({t.member: (t.offsets(), t.struct.size) for t in (*NOTICE_TYPES, CAPTURE_PLAN, NAME_FILTER)})
    for member, expected in mirrors.items():
        if compiled.get(member) != expected:
            raise UserError(
                f"event layout mismatch for {member} between bpf/event.h ({compiled.get(member)}) and "
                f"otel_ebpf/kernel/layout.py ({expected})",
                "update the mirror in otel_ebpf/kernel/layout.py to match bpf/event.h",
            )


def compiled_layouts(event_layouts_ctype) -> dict[str, tuple[dict[str, tuple[int, int]], int]]:
    """What the compiler made of each member of struct event_layouts (BCC's ctypes view of the map value)."""
    import ctypes

    result = {}
    for member, member_type in event_layouts_ctype._fields_:
        result[member] = (_flatten(member_type), ctypes.sizeof(member_type))
    return result
