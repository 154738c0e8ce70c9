"""W3C Trace Context (Level 1): the traceparent and tracestate a caller passes, in an HTTP header or in the
TRACEPARENT and TRACESTATE environment variables of a process it starts."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SpanContext:
    """A remote parent from a valid traceparent; tracestate is normalised, "" when absent or invalid."""

    trace_id: bytes
    span_id: bytes
    sampled: bool
    tracestate: str = ""


# version-format 00 (and the prefix a higher version must share): version, trace-id, parent-id, trace-flags.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_ZERO_TRACE_ID, _ZERO_SPAN_ID = "0" * 32, "0" * 16
_TRACESTATE_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"  # simple-key
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"  # multi-tenant-key: tenant-id@system-id
)
_TRACESTATE_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TRACESTATE_MAX_MEMBERS = 32


def parse_traceparent(value: str | None, tracestate: str | None = None) -> SpanContext | None:
    """The remote parent a traceparent names, or None when the header must be ignored (W3C section 3.2).

    Version 00 must match its format exactly. A higher version is parsed as far as 00 defines it: at least
    55 characters, then the next character, if any, must be "-" (section 3.2.4). Version ff, upper-case hex
    and all-zero ids are invalid. Only the sampled flag is read. tracestate is looked at only when the
    traceparent is valid (section 3.3).
    """
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    return SpanContext(bytes.fromhex(trace_id), bytes.fromhex(span_id), bool(int(flags, 16) & 1),
                       parse_tracestate(tracestate) if tracestate else "")


def parse_tracestate(value: str) -> str:
    """The tracestate list without optional whitespace and empty members; "" if the header is invalid.

    An invalid member, a repeated key or more than 32 members make the whole header invalid, and the
    processing model (W3C section 4.3) allows discarding it: passing on part of it could pass on a state
    its vendor never wrote.
    """
    members = []
    keys = set()
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        key, equals, member_value = member.partition("=")
        if not equals or key in keys or not _TRACESTATE_KEY.fullmatch(key) \
                or not _TRACESTATE_VALUE.fullmatch(member_value):
            return ""
        keys.add(key)
        members.append(member)
    return ",".join(members) if len(members) <= _TRACESTATE_MAX_MEMBERS else ""
