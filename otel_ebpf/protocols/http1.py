"""HTTP/1.x requests and responses seen from outside the process -> what a SERVER span needs.

The kernel hands user space the first bytes of a request's first reads (1 KiB each, possibly cut in the middle
of a header), and of each write of its response the byte count, the first bytes of the first few writes and
the last bytes. So nothing here may trust the input to be complete or even to be HTTP: non-HTTP traffic
yields None, and a line without its terminating LF is treated as cut off and ignored (except the request
line, whose visible part is still worth reporting). Where a response ends is found from RFC 9112's
message-length rules (ResponseFraming). Parses only the few fields a span uses.

References: RFC 9110/9112 (HTTP), RFC 7239 (Forwarded), W3C Trace Context Level 1 (traceparent,
tracestate), OpenTelemetry semantic conventions for HTTP server spans (stable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from otel_ebpf.tracecontext import SpanContext, parse_traceparent

Address = tuple[str, int]

# RFC 9110 section 9 plus PATCH (RFC 5789): the methods the semantic conventions call "known".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

# Headers a span uses; all others are skipped without being decoded.
_CAPTURED = frozenset({
    b"host", b"user-agent", b"traceparent", b"tracestate",
    b"forwarded", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-for",
})

# Complete request line: method (an RFC 9110 token) SP request-target SP HTTP-version.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([!-~]+) HTTP/(1\.[01])")
# A request line cut off by the capture limit: only a known method makes it credible as HTTP.
_CUT_REQUEST_LINE = re.compile(rb"([A-Z]+) ([!-~]+)")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?![0-9])")
_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")
_ABSOLUTE_FORM = re.compile(r"(https?)://([^/?#]*)(.*)", re.IGNORECASE | re.DOTALL)

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Query parameters whose values the semantic conventions say to replace by REDACTED.
_REDACTED_QUERY_KEYS = frozenset({"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"})


@dataclass(frozen=True, slots=True)
class Request:
    """The visible part of one request.

    `version` is None when the request line was cut before the version ("1.0" or "1.1" otherwise).
    `authority` is the host[:port] the client asked for: the absolute-form target's if there is one (RFC
    9112 section 3.2.2 says to ignore Host then), else the Host header. `headers` holds the captured headers
    present in full, lower-case names; repeated fields are joined with "," as RFC 9110 section 5.3 says.
    """

    method: str
    path: str
    query: str | None
    version: str | None
    authority: str | None
    scheme: str | None
    headers: dict[str, str]

    @property
    def user_agent(self) -> str | None:
        return self.headers.get("user-agent")

    @property
    def parent(self) -> SpanContext | None:
        """The caller's span, from traceparent and tracestate."""
        return parse_traceparent(self.headers.get("traceparent"), self.headers.get("tracestate"))


def _text(raw: bytes) -> str:
    """Never raises: OTLP strings must be UTF-8, and bytes on the wire need not be."""
    return raw.decode("utf-8", "replace")


def parse_request(data: bytes) -> Request | None:
    """The request at the start of `data`, or None if the data does not start like an HTTP/1.x request."""
    # RFC 9112 section 2.2: ignore empty lines before the request line (some clients send CRLF after a body).
    lines = data.lstrip(b"\r\n").split(b"\n")
    # The last element is whatever follows the last LF: a line that may have been cut.
    complete = lines[:-1]
    if complete:
        match = _REQUEST_LINE.fullmatch(complete[0].removesuffix(b"\r"))
        if match is None:
            return None
        method, target, version = match.groups()
    else:
        match = _CUT_REQUEST_LINE.match(lines[0])
        if match is None or _text(match.group(1)) not in KNOWN_METHODS:
            return None
        method, target = match.groups()
        version = None

    headers: dict[str, str] = {}
    name = None
    for line in complete[1:]:
        line = line.removesuffix(b"\r")
        if not line:
            break  # end of the header section: what follows is a body or the next, pipelined, request
        if line[0] in b" \t":
            # Obsolete line folding (RFC 9112 section 5.2): the line continues the previous field.
            if name in headers:
                headers[name] += " " + _text(line.strip(b" \t"))
            continue
        raw_name, colon, value = line.partition(b":")
        raw_name = raw_name.lower()
        name = _text(raw_name) if colon and raw_name in _CAPTURED else None
        if name is not None:
            value_text = _text(value.strip(b" \t"))
            headers[name] = headers[name] + "," + value_text if name in headers else value_text

    return request_from(_text(method), _text(target), None if version is None else _text(version), headers)


def header_section_complete(data: bytes) -> bool:
    """Whether `data` holds a request's whole header section (its empty line)."""
    return _EMPTY_LINE.search(data.lstrip(b"\r\n")) is not None


_REQUEST_CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([0-9]+)[ \t]*\r?\n", re.IGNORECASE)
_REQUEST_CHUNKED = re.compile(rb"\ntransfer-encoding:[^\n]*chunked", re.IGNORECASE)


def next_request_at(data: bytes) -> int | None:
    """Where a pipelined request after the first in `data` begins (RFC 9112 section 9.3.2): past the first's
    header section and its Content-Length body. None when nothing follows in `data`, or where the first ends is
    not known (a chunked body, or a header section not seen whole)."""
    start = len(data) - len(data.lstrip(b"\r\n"))
    end = _EMPTY_LINE.search(data, start)
    if end is None or _REQUEST_CHUNKED.search(data, start, end.start() + 1):
        return None
    length = _REQUEST_CONTENT_LENGTH.search(data, start, end.start() + 2)
    at = end.end() + (int(length.group(1)) if length else 0)
    return at if at < len(data) else None


def request_from(method: str, target: str, version: str | None, headers: dict[str, str]) -> Request:
    """Splits the request-target (RFC 9112 section 3.2; HTTP/2's :path is one too) into the pieces a span
    reports. `headers`: lower-case names, of those a span uses."""
    authority, scheme = headers.get("host"), None
    absolute = _ABSOLUTE_FORM.match(target)
    if absolute:
        scheme, authority, target = absolute.group(1).lower(), absolute.group(2), absolute.group(3)
    elif method == "CONNECT":
        authority, target = target, ""  # authority-form: a tunnel has no path
    path, question, query = target.partition("#")[0].partition("?")
    if absolute and not path:
        path = "/"  # RFC 9110 section 4.2.3: an empty path of an http(s) URI is "/"
    return Request(method, path, query if question else None, version, authority, scheme, headers)


def parse_response(data: bytes) -> int | None:
    """Status code of the response at the start of `data`.

    Interim 1xx responses other than 101 (RFC 9110 section 15.2) are skipped when the final response follows
    in `data`; if it does not, the interim code is returned: the caller recognises it by its range.
    """
    status = None
    while True:
        match = _STATUS_LINE.match(data)
        if match is None:
            return status
        status = int(match.group(1))
        if status >= 200 or status == 101:
            return status
        end = _EMPTY_LINE.search(data)
        if end is None:
            return status
        data = data[end.end():]


_HEADER_END = b"\r\n\r\n"
_LAST_CHUNK = b"\r\n0\r\n\r\n"  # the end of the last data chunk, then the zero-length chunk (no trailers)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*\r", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked[ \t]*\r", re.IGNORECASE)


def _ends_chunked(whole: bytes, tail: bytes) -> bool:
    """Whether a write ends a chunked body: its last bytes are the last chunk, or the write is (`whole`, when
    all of it is known) nothing but the zero-length chunk."""
    return tail.endswith(_LAST_CHUNK) or whole == _LAST_CHUNK[2:]


class ResponseFraming:
    """Where the response to one request ends (RFC 9112 section 6.3), from the writes of it the kernel saw.

    `write()` takes each write: its byte count, its first bytes (only for the first writes, b"" when not
    captured) and its last bytes; it returns True at the write that completes the response. Without a length
    (no Content-Length, not chunked), or when the header section could not be seen whole, the response ends
    with the connection (or the connection's next request): `write()` never returns True then.
    """

    def __init__(self, method: str):
        self._method = method
        self._head = b""  # captured bytes since the current message's first, while its header section is open
        self._gap = False  # a write's bytes went uncaptured before the header section's end: blind
        self._remaining: int | None = None  # body bytes still to come, when Content-Length says
        self._chunked = False
        self._in_head = True  # the final response's header section has not ended yet
        self.status: int | None = None
        self.complete = False

    def write(self, written: int, data: bytes, tail: bytes) -> bool:
        if self.complete:
            return True
        if self._in_head:
            if self._gap:
                return False
            self._head += data
            self._gap = len(data) < written
            return self._header_section(written - len(data), tail)
        if self._chunked:
            self.complete = _ends_chunked(tail if len(tail) == written else b"", tail)
        elif self._remaining is not None:
            self._remaining -= written
            self.complete = self._remaining <= 0
        return self.complete

    def _header_section(self, uncaptured: int, tail: bytes) -> bool:
        """Parses what `_head` holds of the header sections (1xx interim responses first); `uncaptured`: bytes
        of the last write after its captured ones."""
        while True:
            end = self._head.find(_HEADER_END)
            if end < 0:
                return False
            end += len(_HEADER_END)
            head, body = self._head[:end], self._head[end:]
            status = parse_response(head)
            if status is None:
                self._gap = True  # not a response this can follow
                return False
            self.status = status
            if 100 <= status < 200 and status != 101:
                self._head = body  # an interim response: the final one follows
                continue
            self._head, self._in_head = b"", False
            body_seen = len(body) + uncaptured
            if self._method == "HEAD" or status in (101, 204, 304):
                self.complete = True  # no body (101: the connection is another protocol's now)
            elif _CHUNKED.search(head):
                self._chunked = True
                self.complete = _ends_chunked(b"" if uncaptured else body, tail)
            elif (length := _CONTENT_LENGTH.search(head)) is not None:
                self._remaining = int(length.group(1)) - body_seen
                self.complete = self._remaining <= 0
            return self.complete


def server_span_name(req: Request) -> str:
    """`{method}`: `{method} {target}` needs a low-cardinality route, which bytes on a socket do not tell,
    and the URI path must not stand in for it. An unknown method is named "HTTP"."""
    return req.method if req.method in KNOWN_METHODS else "HTTP"


def server_span_attributes(req: Request, status: int | None, local: Address | None,
                           peer: Address | None) -> dict[str, str | int]:
    """Attributes of the HTTP server span (semantic conventions, stable HTTP).

    `error.type` is present exactly when the span status must be Error: a 5xx status. 4xx responses are not
    errors of a server span. `status` None means no response was seen.
    """
    forwarded = _forwarded(req.headers.get("forwarded"))
    scheme = (forwarded.get("proto") or _first(req.headers.get("x-forwarded-proto")) or req.scheme or "http").lower()
    attrs = _method(req)
    if req.path:
        attrs["url.path"] = req.path
    if req.query is not None:
        attrs["url.query"] = _redact_query(req.query)
    attrs["url.scheme"] = scheme
    if status is not None:
        attrs["http.response.status_code"] = status
        if status >= 500:
            attrs["error.type"] = str(status)
    server = _server_address(req, forwarded, scheme) or local
    if server is not None:
        attrs["server.address"] = server[0]
        if server[1] is not None:
            attrs["server.port"] = server[1]
    if peer is not None:
        attrs["network.peer.address"], attrs["network.peer.port"] = peer
    if local is not None:
        attrs["network.local.address"], attrs["network.local.port"] = local
    client = _client_address(req, forwarded) or (peer and peer[0])
    if client:
        attrs["client.address"] = client
    if req.user_agent:
        attrs["user_agent.original"] = req.user_agent
    if req.version is not None:
        attrs["network.protocol.version"] = req.version
    return attrs


def client_span_attributes(req: Request, status: int | None, peer: Address | None,
                           tls: bool) -> dict[str, str | int]:
    """Attributes of the HTTP client span (semantic conventions, stable HTTP). url.full carries the query's
    keys, never its values. `error.type` is present exactly when the status is an error: 4xx or 5xx."""
    attrs = _method(req)
    scheme = req.scheme or ("https" if tls else "http")
    host, port = split_host_port(req.authority) if req.authority else (peer or (None, None))
    if host:
        attrs["server.address"] = host
        attrs["server.port"] = port if port is not None else _DEFAULT_PORTS.get(scheme)
        query = "" if req.query is None else "?" + "&".join(
            f"{key}=REDACTED" if equals else key for key, equals, _ in (p.partition("=") for p in req.query.split("&")))
        attrs["url.full"] = f"{scheme}://{req.authority or _authority(host, port)}{req.path}{query}"
    if status is not None:
        attrs["http.response.status_code"] = status
        if status >= 400:
            attrs["error.type"] = str(status)
    if peer is not None:
        attrs["network.peer.address"], attrs["network.peer.port"] = peer
    if req.version is not None:
        attrs["network.protocol.version"] = req.version
    return attrs


def _authority(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


def _method(req: Request) -> dict[str, str | int]:
    """http.request.method as the conventions name it: a method they do not know is _OTHER."""
    if req.method in KNOWN_METHODS:
        return {"http.request.method": req.method}
    return {"http.request.method": "_OTHER", "http.request.method_original": req.method}


def _first(value: str | None) -> str | None:
    """First element of a comma-separated header: the one the client-most proxy wrote."""
    return value.partition(",")[0].strip() if value else None


def _forwarded(value: str | None) -> dict[str, str]:
    """for/host/proto of the first element of a Forwarded header (RFC 7239), names lower-case."""
    params = {}
    for pair in (_first(value) or "").split(";"):
        name, equals, param = pair.partition("=")
        if equals:
            params[name.strip().lower()] = param.strip().strip('"')
    return params


def split_host_port(value: str) -> tuple[str, int | None]:
    """"example.com:8080", "[::1]:8080", "example.com" -> host (IPv6 without brackets) and port or None."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
    port = rest[1:]
    valid = rest[:1] == ":" and port.isascii() and port.isdigit() and int(port) <= 65535
    return host, int(port) if valid else None


def _server_address(req: Request, forwarded: dict[str, str], scheme: str) -> tuple[str, int | None] | None:
    """The host the client addressed, as semconv ranks the sources: proxies' headers first, then Host."""
    for value in (forwarded.get("host"), _first(req.headers.get("x-forwarded-host")), req.authority):
        if value:
            host, port = split_host_port(value)
            if host:
                return host, port if port is not None else _DEFAULT_PORTS.get(scheme)
    return None


def _client_address(req: Request, forwarded: dict[str, str]) -> str | None:
    """The original client behind proxies, when a proxy says who it was ("unknown" and "_hidden" do not)."""
    value = forwarded.get("for")
    if value:
        host = split_host_port(value)[0]
        return None if host == "unknown" or host.startswith("_") else host
    return _first(req.headers.get("x-forwarded-for"))


def _redact_query(query: str) -> str:
    if not any(key in query for key in _REDACTED_QUERY_KEYS):
        return query
    params = []
    for param in query.split("&"):
        key, equals, _ = param.partition("=")
        params.append(f"{key}=REDACTED" if equals and key in _REDACTED_QUERY_KEYS else param)
    return "&".join(params)
