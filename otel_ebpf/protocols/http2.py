"""HTTP/2 connections seen from outside the process -> the streams SERVER and CLIENT spans are made of.

The kernel hands user space the first HTTP2_CAPTURE bytes of every read and write of a connection that began with
the client's preface (read by a server, or written by a client), with how many bytes there were. Each direction is one byte stream of frames (RFC 9113
section 4): it is followed here frame by frame, DATA payloads skipped by their length (also where the kernel did
not copy them), header blocks (HEADERS or PUSH_PROMISE, then CONTINUATION) decoded with HPACK (RFC 7541), one
decoder per direction, as the peer's encoder filled its table. Bytes that held a frame header or a header block
and were not captured leave that table unknowable for good: the connection is then broken, and none of its
streams is reported rather than any guessed at.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

import hpack

logging.getLogger("hpack").setLevel(logging.WARNING)  # at debug it logs every header field it decodes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE = 0x1
_FRAME_HEADER = struct.Struct(">3sBBI")  # length (24 bits), type, flags, stream id (31 bits)
_SETTING = struct.Struct(">HI")
# Bytes of unfinished frames held for one direction before it is given up: a header block this large is not
# worth following.
MAX_PENDING = 1 << 20


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes | None  # None for DATA: its payload is skipped


class FrameReader:
    """One direction of a connection: what the kernel captured of each read or write in, whole frames out."""

    def __init__(self, skip: int = 0):
        self._pending = b""  # the captured start of a frame not yet whole
        self._skip = skip  # bytes still to pass over: the preface, or the rest of a DATA payload
        self.broken = False

    def feed(self, data: bytes, length: int) -> list[Frame]:
        """`data`: the first bytes of a read or write of `length` bytes."""
        if self.broken:
            return []
        frames, pending, at = [], self._pending + data, 0
        while True:
            if self._skip:
                taken = min(self._skip, len(pending) - at)
                self._skip, at = self._skip - taken, at + taken
                if self._skip:
                    break
            if len(pending) - at < _FRAME_HEADER.size:
                break
            size, kind, flags, stream_id = _FRAME_HEADER.unpack_from(pending, at)
            size, stream_id = int.from_bytes(size, "big"), stream_id & 0x7FFFFFFF
            if kind == DATA:
                frames.append(Frame(DATA, flags, stream_id, None))
                at += _FRAME_HEADER.size
                self._skip = size
                continue
            end = at + _FRAME_HEADER.size + size
            if len(pending) < end:
                break
            frames.append(Frame(kind, flags, stream_id, pending[at + _FRAME_HEADER.size:end]))
            at = end
        self._pending = pending[at:]
        missing = length - len(data)
        if missing and (self._pending or self._skip < missing) or len(self._pending) > MAX_PENDING:
            self.broken = True  # a frame header, or part of a frame that is not DATA, went uncaptured
        elif missing:
            self._skip -= missing
        return frames


@dataclass(slots=True)
class Stream:
    """One request and its response, as far as the frames told."""

    stream_id: int
    start_ns: int  # when the read with its request's header block returned
    tid: int  # the thread that read it (a client: wrote it)
    headers: dict[str, str]  # the request's header fields, pseudo-header fields included; repeated ones joined
    status: int | None = None  # :status of the final response
    response: dict[str, str] = field(default_factory=dict)  # the response's header and trailer fields
    end_ns: int | None = None
    reset: bool = False  # ended by RST_STREAM, from either side
    context: object = None  # what Connection.feed was given with its request's header block


class Connection:
    """Both directions of one connection and its streams in flight, seen from the server or (`client`) from the
    client: requests go the way the preface went. `feed` takes each read (sent False) or write and returns the
    streams it completed: those whose response ended (END_STREAM) or were reset."""

    def __init__(self, client: bool = False):
        self.client = client
        self._readers = {client: FrameReader(len(PREFACE)), not client: FrameReader()}
        # Each direction's blocks are decoded with the table its sender's encoder filled.
        self._decoders = {False: hpack.Decoder(), True: hpack.Decoder()}
        self._blocks: dict[bool, tuple[int, int, list[bytes]] | None] = {False: None, True: None}
        self.streams: dict[int, Stream] = {}

    @property
    def broken(self) -> bool:
        return self._readers[False].broken or self._readers[True].broken

    def feed(self, sent: bool, data: bytes, length: int, ns: int, tid: int, context: object = None) -> list[Stream]:
        """`context`: kept with the streams whose requests this brings."""
        done: list[Stream] = []
        for frame in self._readers[sent].feed(data, length):
            try:
                self._frame(sent, frame, ns, tid, context, done)
            except (hpack.HPACKError, IndexError, ValueError):
                self._readers[sent].broken = True  # a block that does not decode: the table is unknowable now
            if self.broken:
                return []
        return done

    def close(self, ns: int) -> list[Stream]:
        """The connection closed: its streams in flight end now, with what was seen of them."""
        streams = [] if self.broken else list(self.streams.values())
        for stream in streams:
            stream.end_ns = ns
        self.streams.clear()
        return streams

    def _frame(self, sent: bool, frame: Frame, ns: int, tid: int, context: object, done: list[Stream]) -> None:
        block = self._blocks[sent]
        if block is not None and frame.type != CONTINUATION:
            raise ValueError("a header block interrupted")  # RFC 9113 section 6.10: a connection error
        if frame.type in (HEADERS, PUSH_PROMISE):
            self._blocks[sent] = (frame.stream_id, frame.flags if frame.type == HEADERS else 0,
                                  [_fragment(frame)])
        elif frame.type == CONTINUATION and block is not None:
            block[2].append(frame.payload)
        elif frame.type == SETTINGS and not frame.flags & ACK:
            for offset in range(0, len(frame.payload) - _SETTING.size + 1, _SETTING.size):
                key, value = _SETTING.unpack_from(frame.payload, offset)
                if key == SETTINGS_HEADER_TABLE_SIZE:  # bounds the peer's encoder: the other direction's table
                    self._decoders[not sent].max_allowed_table_size = value
        elif frame.type == RST_STREAM:
            stream = self.streams.pop(frame.stream_id, None)
            if stream is not None:
                stream.end_ns, stream.reset = ns, True
                done.append(stream)
        elif frame.type == DATA and sent != self.client and frame.flags & END_STREAM:  # a response's
            self._end(frame.stream_id, ns, done)
        if frame.type in (HEADERS, PUSH_PROMISE, CONTINUATION) and frame.flags & END_HEADERS:
            stream_id, flags, fragments = self._blocks[sent]
            self._blocks[sent] = None
            fields = self._decoders[sent].decode(b"".join(fragments), raw=False)
            self._headers(sent, stream_id, flags, fields, ns, tid, context, done)

    def _headers(self, sent: bool, stream_id: int, flags: int, fields, ns: int, tid: int, context: object,
                 done: list[Stream]) -> None:
        if sent == self.client:  # a request's
            if stream_id not in self.streams and ":method" in dict(fields):
                self.streams[stream_id] = Stream(stream_id, ns, tid, _joined(fields), context=context)
            return  # else the request's trailers
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a pushed stream's, or one that began before tracing
        headers = _joined(fields)
        status = headers.pop(":status", "")
        if stream.status is None and status.isdigit() and int(status) >= 200:  # 1xx: interim responses
            stream.status = int(status)
        stream.response.update(headers)  # grpc-status comes in the trailers, or a trailers-only response
        if flags & END_STREAM:
            self._end(stream_id, ns, done)

    def _end(self, stream_id: int, ns: int, done: list[Stream]) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.end_ns = ns
            done.append(stream)


def _fragment(frame: Frame) -> bytes:
    """The header block fragment of a HEADERS or PUSH_PROMISE frame, without padding and priority fields."""
    payload = frame.payload
    if frame.flags & PADDED:
        payload = payload[1:len(payload) - payload[0]]
    if frame.type == HEADERS and frame.flags & PRIORITY_FLAG:
        payload = payload[5:]
    elif frame.type == PUSH_PROMISE:
        payload = payload[4:]  # the promised stream id
    return payload


def _joined(fields) -> dict[str, str]:
    """Header fields by lower-case name, repeated ones joined with "," (RFC 9110 section 5.3)."""
    headers: dict[str, str] = {}
    for name, value in fields:
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers
