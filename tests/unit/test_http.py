"""HTTP seen from outside the process: request/response parsing of truncated bytes, W3C trace context,
server span attributes, socket addresses from /proc, and the example server and client that the end-to-end
tests of HTTP tracing rely on."""

import contextlib
import http.client
import os
import re
import socket
import subprocess
import sys
from collections import Counter

import pytest
from opentelemetry import propagate
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.trace import TracerProvider

from otel_ebpf.kernel import layout
from otel_ebpf.protocols.http1 import (
    KNOWN_METHODS,
    client_span_attributes,
    next_request_at,
    parse_request,
    parse_response,
    server_span_attributes,
    server_span_name,
    split_host_port,
)
from otel_ebpf.tracecontext import SpanContext, parse_traceparent, parse_tracestate
from tests.ground_truth import (
    HTTP_CLIENT,
    HTTPSERVER,
    Call,
    ClientRequest,
    Request,
    build_examples,
    expected_http_counts,
    parse,
    parse_client,
)
from tests.otlp_receiver import OtlpReceiver, any_value

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
REQUEST = (
    b"GET /work?n=5 HTTP/1.1\r\n"
    b"Host: localhost:8080\r\n"
    b"User-Agent: Python-urllib/3.11\r\n"
    b"Accept: */*\r\n"
    b"traceparent: " + TRACEPARENT.encode() + b"\r\n"
    b"tracestate: congo=t61rcWkgMzE\r\n"
    b"\r\n"
)


def request_bytes(*header_lines: str, line: str = "GET / HTTP/1.1", eol: str = "\r\n") -> bytes:
    return eol.join([line, *header_lines, "", ""]).encode()


# ----- parse_request


@pytest.mark.parametrize("method", sorted(KNOWN_METHODS - {"CONNECT"}))
@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_every_known_method_and_version(method, version):
    req = parse_request(request_bytes("Host: a", line=f"{method} /x?y=1 HTTP/{version}"))
    assert (req.method, req.path, req.query, req.version, req.authority) == (method, "/x", "y=1", version, "a")


def test_full_request():
    req = parse_request(REQUEST)
    assert (req.method, req.path, req.query, req.version) == ("GET", "/work", "n=5", "1.1")
    assert req.authority == "localhost:8080" and req.scheme is None
    assert req.user_agent == "Python-urllib/3.11"
    assert req.headers == {"host": "localhost:8080", "user-agent": "Python-urllib/3.11",
                           "traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}
    assert req.parent == SpanContext(bytes.fromhex(TRACE_ID), bytes.fromhex(SPAN_ID), True, "congo=t61rcWkgMzE")


@pytest.mark.parametrize("data", [
    b"",
    b"\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # TLS ClientHello
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    b"*1\r\n$4\r\nPING\r\n",  # redis
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 connection preface
    b"GET / HTTP/1.2\r\n\r\n",
    b"GET / HTTP/2\r\n\r\n",
    b"GET / http/1.1\r\n\r\n",
    b"GET /\r\n\r\n",  # HTTP/0.9
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 \r\n\r\n",
    b"GET /a b HTTP/1.1\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"G(T / HTTP/1.1\r\n\r\n",
    b" GET / HTTP/1.1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",  # a response is not a request
    b"GET",  # cut before the target: not enough to tell
    b"GET ",
    b"FOO /x",  # cut, and an unknown method: not credible as HTTP
    b"get /x",
])
def test_non_http_data_is_ignored(data):
    assert parse_request(data) is None


@pytest.mark.parametrize("line, method", [
    ("PROPFIND /dav HTTP/1.1", "PROPFIND"),
    ("get /x HTTP/1.1", "get"),  # methods are case-sensitive: not GET
    ("M-SEARCH * HTTP/1.1", "M-SEARCH"),
])
def test_unknown_method_in_a_complete_request_line_is_http(line, method):
    req = parse_request(request_bytes(line=line))
    assert req.method == method and req.version == "1.1"
    assert server_span_name(req) == "HTTP"
    attrs = server_span_attributes(req, 200, None, None)
    assert attrs["http.request.method"] == "_OTHER"
    assert attrs["http.request.method_original"] == method


def test_every_cut_of_a_request_parses_what_is_complete():
    """The kernel may cut the bytes anywhere: never raise, never report a header whose line was cut."""
    header_ends = {}
    for line in REQUEST.split(b"\r\n")[1:-2]:
        name = line.partition(b":")[0].lower().decode()
        if name in ("host", "user-agent", "traceparent", "tracestate"):
            header_ends[name] = REQUEST.index(line) + len(line) + 2
    request_line_end = REQUEST.index(b"\r\n") + 2
    for cut in range(len(REQUEST) + 1):
        req = parse_request(REQUEST[:cut])
        if cut < len(b"GET /"):
            assert req is None, cut
            continue
        assert req.method == "GET"
        assert "/work?n=5".startswith(req.path + ("" if req.query is None else "?" + req.query))
        assert (req.version == "1.1") == (cut >= request_line_end)
        assert set(req.headers) == {name for name, end in header_ends.items() if cut >= end}, cut


def test_cut_request_line_keeps_the_visible_target():
    req = parse_request(b"GET /a/very/long/path?q=abc")
    assert (req.method, req.path, req.query) == ("GET", "/a/very/long/path", "q=abc")
    assert (req.version, req.headers) == (None, {})
    assert "network.protocol.version" not in server_span_attributes(req, 200, None, None)


def test_cut_header_value_is_not_used():
    req = parse_request(b"GET / HTTP/1.1\r\ntraceparent: " + TRACEPARENT[:40].encode())
    assert req.headers == {} and req.parent is None


def test_pipelined_requests_and_bodies_are_not_read_as_headers():
    first = request_bytes("Host: a", line="POST /first HTTP/1.1")
    body = b"traceparent: " + TRACEPARENT.encode() + b"\r\n"
    second = request_bytes(f"traceparent: {TRACEPARENT}", line="GET /second HTTP/1.1")
    req = parse_request(first + body + second)
    assert (req.path, req.headers) == ("/first", {"host": "a"})


@pytest.mark.parametrize("name", ["traceparent", "TraceParent", "TRACEPARENT", "TrAcEpArEnT"])
def test_header_names_are_case_insensitive(name):
    req = parse_request(request_bytes(f"{name}: {TRACEPARENT}", "HOST: h", "user-AGENT: ua"))
    assert req.headers == {"traceparent": TRACEPARENT, "host": "h", "user-agent": "ua"}


@pytest.mark.parametrize("name", ["trace-parent", "trace.parent", "traceparent "])
def test_other_header_names_are_not_traceparent(name):
    assert parse_request(request_bytes(f"{name}: {TRACEPARENT}")).parent is None


def test_lf_only_line_endings():
    req = parse_request(request_bytes("Host: h", f"traceparent: {TRACEPARENT}", line="GET /lf HTTP/1.0", eol="\n"))
    assert (req.path, req.version, req.authority) == ("/lf", "1.0", "h")
    assert req.parent.span_id == bytes.fromhex(SPAN_ID)


def test_empty_lines_before_the_request_line_are_skipped():
    assert parse_request(b"\r\n\r\n" + REQUEST).path == "/work"


def test_header_values_lose_optional_whitespace_and_invalid_utf8_does_not_raise():
    assert parse_request(request_bytes("Host: \t h:1 \t")).authority == "h:1"
    req = parse_request(b"GET / HTTP/1.1\r\nUser-Agent: caf\xe9\r\n\r\n")
    assert req.user_agent == "caf\ufffd"


def test_repeated_headers_are_combined_in_order():
    req = parse_request(request_bytes(f"traceparent: {TRACEPARENT}", "tracestate: foo=1,bar=2",
                                      "tracestate: rojo=1,congo=2", "tracestate:", "tracestate: baz=3"))
    assert req.parent.tracestate == "foo=1,bar=2,rojo=1,congo=2,baz=3"


def test_two_traceparent_headers_are_ignored():
    """Which one is the parent cannot be told: the W3C test suite expects a new trace."""
    other = TRACEPARENT.replace("4bf9", "1111")
    assert parse_request(request_bytes(f"traceparent: {TRACEPARENT}", f"traceparent: {other}")).parent is None


def test_obsolete_line_folding_continues_the_value():
    req = parse_request(b"GET / HTTP/1.1\r\nUser-Agent: a\r\n  b\r\nX-Other: 1\r\n c\r\n\r\n")
    assert req.headers == {"user-agent": "a b"}


@pytest.mark.parametrize("line, path, query, authority, scheme", [
    ("GET /a?b=1#frag HTTP/1.1", "/a", "b=1", "h", None),
    ("GET /a? HTTP/1.1", "/a", "", "h", None),
    ("GET http://example.com:8080/p/q?x=1 HTTP/1.1", "/p/q", "x=1", "example.com:8080", "http"),
    ("GET HTTPS://example.com HTTP/1.1", "/", None, "example.com", "https"),
    ("GET http://example.com?x HTTP/1.1", "/", "x", "example.com", "http"),
    ("OPTIONS * HTTP/1.1", "*", None, "h", None),
    ("CONNECT example.com:443 HTTP/1.1", "", None, "example.com:443", None),
])
def test_request_target_forms(line, path, query, authority, scheme):
    req = parse_request(request_bytes("Host: h", line=line))
    assert (req.path, req.query, req.authority, req.scheme) == (path, query, authority, scheme)


# ----- parse_response


@pytest.mark.parametrize("data, status", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
    (b"HTTP/1.0 404 Not Found\r\n", 404),
    (b"HTTP/1.1 503 \r\n", 503),
    (b"HTTP/1.1 204", 204),
    (b"HTTP/1.1 204\r\n", 204),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n", 201),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n", 200),
    (b"HTTP/1.1 100 Continue\n\nHTTP/1.1 500 Oops\n", 500),
    (b"HTTP/1.1 100 Continue\r\n\r\n", 100),  # the final response comes in a later write
    (b"HTTP/1.1 100 Continue\r\n", 100),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x05hello", 101),
    (b"HTTP/1.1 20", None),
    (b"HTTP/1.1 2000 X\r\n", None),
    (b"HTTP/1.1 600 X\r\n", None),
    (b"HTTP/1.1 099 X\r\n", None),
    (b"HTTP/2 200\r\n", None),
    (b"http/1.1 200 OK\r\n", None),
    (b"GET / HTTP/1.1\r\n\r\n", None),
    (b"", None),
    (b"\x00\x00\x12\x04\x00\x00\x00\x00\x00", None),  # an HTTP/2 SETTINGS frame
])
def test_parse_response(data, status):
    assert parse_response(data) == status


# ----- W3C trace context: the cases of the W3C test suite (w3c/trace-context test/test.py) and the spec

ID32 = "12345678901234567890123456789012"
ID16 = "1234567890123456"


@pytest.mark.parametrize("value, sampled", [
    (TRACEPARENT, True),
    (f"00-{TRACE_ID}-{SPAN_ID}-00", False),
    (f"00-{TRACE_ID}-{SPAN_ID}-03", True),  # trace context level 2 "random" flag next to sampled
    (f"00-{TRACE_ID}-{SPAN_ID}-02", False),
    (f"00-{TRACE_ID}-{SPAN_ID}-09", True),  # a bit field: mask, do not compare
    (f"00-{TRACE_ID}-{SPAN_ID}-fe", False),
    (f" 00-{TRACE_ID}-{SPAN_ID}-01", True),
    (f"\t00-{TRACE_ID}-{SPAN_ID}-01 \t", True),
    (f"cc-{TRACE_ID}-{SPAN_ID}-01", True),  # a future version, parsed as far as 00 defines it
    (f"cc-{TRACE_ID}-{SPAN_ID}-01-what-the-future-will-be-like", True),
    (f"01-{TRACE_ID}-{SPAN_ID}-00-", False),
])
def test_valid_traceparent(value, sampled):
    assert parse_traceparent(value) == SpanContext(bytes.fromhex(TRACE_ID), bytes.fromhex(SPAN_ID), sampled, "")


@pytest.mark.parametrize("value", [
    None,
    "",
    f"00-{ID32}-{ID16}-01.",
    f"00-{ID32}-{ID16}-01-what-the-future-will-be-like",  # version 00 has exactly four fields
    f"cc-{ID32}-{ID16}-01.what-the-future-will-be-like",
    f"ff-{ID32}-{ID16}-01",
    f".0-{ID32}-{ID16}-01",
    f"0.-{ID32}-{ID16}-01",
    f"000-{ID32}-{ID16}-01",
    f"0000-{ID32}-{ID16}-01",
    f"0-{ID32}-{ID16}-01",
    f"CC-{ID32}-{ID16}-01",
    f"00-{'0' * 32}-{ID16}-01",
    f"00-.{ID32[1:]}-{ID16}-01",
    f"00-{ID32[:-1]}.-{ID16}-01",
    f"00-{ID32}3-{ID16}-01",
    f"00-{ID32[:-1]}-{ID16}-01",
    f"00-{ID32}-{'0' * 16}-01",
    f"00-{ID32}-.{ID16[1:]}-01",
    f"00-{ID32}-{ID16[:-1]}.-01",
    f"00-{ID32}-{ID16}7-01",
    f"00-{ID32}-{ID16[:-1]}-01",
    f"00-{ID32}-{ID16}-.0",
    f"00-{ID32}-{ID16}-0.",
    f"00-{ID32}-{ID16}-001",
    f"00-{ID32}-{ID16}-1",
    f"cc-{ID32}-{ID16}-1",  # a future version shorter than 55 characters
    f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",  # lower-case hex only
    f"00-{TRACE_ID}-{SPAN_ID.upper()}-01",
    f"00-{TRACE_ID}-{SPAN_ID}-0A",
    f"00_{TRACE_ID}_{SPAN_ID}_01",
    f"{TRACEPARENT},{TRACEPARENT}",  # two headers, combined
])
def test_invalid_traceparent_is_ignored(value):
    assert parse_traceparent(value, "foo=1") is None


def test_tracestate_comes_with_a_valid_traceparent_only():
    assert parse_traceparent(TRACEPARENT, " rojo=00f067aa0ba902b7 , congo=t61rcWkgMzE").tracestate \
        == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert parse_traceparent(TRACEPARENT, "foo=1,foo=2").tracestate == ""
    assert parse_traceparent(TRACEPARENT).tracestate == ""
    assert parse_request(request_bytes("tracestate: foo=1")).parent is None


KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE_CHARS = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))


@pytest.mark.parametrize("value, normalised", [
    ("foo=1,bar=2", "foo=1,bar=2"),
    ("foo=1 \t , \t bar=2, \t baz=3", "foo=1,bar=2,baz=3"),
    ("foo=1\t \t,\t \tbar=2,\t \tbaz=3", "foo=1,bar=2,baz=3"),
    (" foo=1", "foo=1"),
    ("\tfoo=1", "foo=1"),
    ("foo=1 ", "foo=1"),
    ("foo=1\t", "foo=1"),
    ("\t foo=1 \t", "foo=1"),
    ("foo= 1", "foo= 1"),  # leading spaces belong to the value
    ("", ""),
    (" , ,", ""),
    ("foo=1,,bar=2", "foo=1,bar=2"),
    (f"{KEY_CHARS}={VALUE_CHARS}", f"{KEY_CHARS}={VALUE_CHARS}"),
    (f"{KEY_CHARS}@a-z0-9_-*/={VALUE_CHARS}", f"{KEY_CHARS}@a-z0-9_-*/={VALUE_CHARS}"),
    ("1tenant@vendor=x", "1tenant@vendor=x"),
    ("z" * 256 + "=1", "z" * 256 + "=1"),
    ("t" * 241 + "@" + "v" * 14 + "=1", "t" * 241 + "@" + "v" * 14 + "=1"),
    ("k=" + "v" * 256, "k=" + "v" * 256),
    (",".join(f"bar{i:02}={i:02}" for i in range(1, 33)), ",".join(f"bar{i:02}={i:02}" for i in range(1, 33))),
])
def test_valid_tracestate(value, normalised):
    assert parse_tracestate(value) == normalised


@pytest.mark.parametrize("value", [
    "foo=1,foo=1",
    "foo=1,foo=2",
    "foo =1",
    "FOO=1",
    "foo.bar=1",
    "1foo=1",  # a simple key starts with a letter
    "foo@=1,bar=2",
    "@foo=1,bar=2",
    "foo@@bar=1,bar=2",
    "foo@bar@baz=1,bar=2",
    "foo@1bar=1",
    "foo=bar=baz",
    "foo=,bar=3",
    "foo",
    "foo=1\x7f",
    "foo=\t1",
    ",".join(f"bar{i:02}={i:02}" for i in range(1, 34)),
    "foo=1," + "z" * 257 + "=1",
    "foo=1," + "t" * 242 + "@v=1",
    "foo=1,t@" + "v" * 15 + "=1",
    "k=" + "v" * 257,
])
def test_invalid_tracestate_is_discarded_whole(value):
    assert parse_tracestate(value) == ""


# ----- semantic conventions


def test_server_span_attributes_of_a_plain_request():
    attrs = server_span_attributes(parse_request(REQUEST), 200, ("127.0.0.1", 8080), ("127.0.0.1", 51000))
    assert attrs == {
        "http.request.method": "GET",
        "url.path": "/work",
        "url.query": "n=5",
        "url.scheme": "http",
        "http.response.status_code": 200,
        "server.address": "localhost",
        "server.port": 8080,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": 51000,
        "network.local.address": "127.0.0.1",
        "network.local.port": 8080,
        "client.address": "127.0.0.1",
        "user_agent.original": "Python-urllib/3.11",
        "network.protocol.version": "1.1",
    }
    assert server_span_name(parse_request(REQUEST)) == "GET"


@pytest.mark.parametrize("status, error", [(200, None), (302, None), (404, None), (499, None), (500, "500"),
                                           (503, "503"), (None, None)])
def test_only_5xx_is_an_error_of_a_server_span(status, error):
    attrs = server_span_attributes(parse_request(REQUEST), status, None, None)
    assert attrs.get("error.type") == error
    assert attrs.get("http.response.status_code") == status


@pytest.mark.parametrize("headers, local, server", [
    ((), ("10.0.0.1", 8080), ("10.0.0.1", 8080)),
    ((), None, None),
    (("Host: example.com",), ("10.0.0.1", 8080), ("example.com", 80)),
    (("Host: example.com:8443",), None, ("example.com", 8443)),
    (("Host: [::1]:9000",), None, ("::1", 9000)),
    (("Host: [::1]",), None, ("::1", 80)),
    (("Host: example.com:port",), None, ("example.com", 80)),
    (("Host: example.com", "X-Forwarded-Host: front.example, proxy.local", "X-Forwarded-Proto: https"), None,
     ("front.example", 443)),
    (("Host: example.com", 'Forwarded: host="public.example:8000";proto=https, host=inner'), None,
     ("public.example", 8000)),
])
def test_server_address_and_port(headers, local, server):
    attrs = server_span_attributes(parse_request(request_bytes(*headers)), 200, local, ("127.0.0.1", 1))
    assert (attrs.get("server.address"), attrs.get("server.port")) == (server or (None, None))


@pytest.mark.parametrize("headers, client", [
    ((), "192.0.2.9"),
    (("X-Forwarded-For: 203.0.113.7, 10.0.0.1",), "203.0.113.7"),
    (('Forwarded: for="[2001:db8:cafe::17]:4711", for=10.0.0.1',), "2001:db8:cafe::17"),
    (("Forwarded: For=198.51.100.17;proto=http",), "198.51.100.17"),
    (("Forwarded: for=unknown",), "192.0.2.9"),
    (("Forwarded: for=_hidden",), "192.0.2.9"),
])
def test_client_address_prefers_what_proxies_say(headers, client):
    attrs = server_span_attributes(parse_request(request_bytes(*headers)), 200, None, ("192.0.2.9", 5000))
    assert attrs["client.address"] == client
    assert (attrs["network.peer.address"], attrs["network.peer.port"]) == ("192.0.2.9", 5000)


@pytest.mark.parametrize("headers, scheme", [
    ((), "http"),
    (("X-Forwarded-Proto: HTTPS",), "https"),
    (("Forwarded: proto=https",), "https"),
])
def test_url_scheme(headers, scheme):
    assert server_span_attributes(parse_request(request_bytes(*headers)), 200, None, None)["url.scheme"] == scheme


def test_without_peer_or_user_agent_those_attributes_are_absent():
    attrs = server_span_attributes(parse_request(request_bytes(line="GET /x HTTP/1.0")), 200, None, None)
    assert attrs.keys() == {"http.request.method", "url.path", "url.scheme", "http.response.status_code",
                            "network.protocol.version"}
    assert attrs["network.protocol.version"] == "1.0"


@pytest.mark.parametrize("query, shown", [
    ("a=1", "a=1"),
    ("", ""),
    ("design=x&assign=y", "design=x&assign=y"),
    ("sig=abc&a=1&Signature=s&X-Goog-Signature=g&AWSAccessKeyId=k&sig", "sig=REDACTED&a=1&Signature=REDACTED&"
     "X-Goog-Signature=REDACTED&AWSAccessKeyId=REDACTED&sig"),
])
def test_url_query_redacts_credentials(query, shown):
    req = parse_request(request_bytes(line=f"GET /p?{query} HTTP/1.1"))
    assert server_span_attributes(req, 200, None, None)["url.query"] == shown


def test_a_tunnel_has_no_url_path():
    req = parse_request(request_bytes(line="CONNECT example.com:443 HTTP/1.1"))
    attrs = server_span_attributes(req, 200, None, None)
    assert "url.path" not in attrs
    assert (attrs["server.address"], attrs["server.port"]) == ("example.com", 443)


@pytest.mark.parametrize("value, expected", [
    ("example.com", ("example.com", None)),
    ("example.com:0", ("example.com", 0)),
    ("example.com:65536", ("example.com", None)),
    ("example.com:٣", ("example.com", None)),  # a digit, but not an ASCII one
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("[2001:db8::1", ("2001:db8::1", None)),
    ("", ("", None)),
])
def test_split_host_port(value, expected):
    assert split_host_port(value) == expected


# ----- the peer address, as accept wrote it into its sockaddr and the kernel copied it


@pytest.mark.parametrize("family, raw, expected", [
    (socket.AF_INET, socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(12), ("10.1.2.3", 8080)),
    (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), ("2001:db8::1", 8080)),
    (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1"), ("127.0.0.1", 8080)),  # dual stack
    (socket.AF_UNIX, bytes(16), None), (0, bytes(16), None),  # not an IP peer, or accept had no sockaddr
])
def test_peer_address_of_every_family(family, raw, expected):
    assert layout.peer_address(family, 8080, raw) == expected


def test_real_client_bytes_parse_to_the_client_span():
    """What the OpenTelemetry SDK and http.client really put on the wire, read from the accepted socket."""
    tracer = TracerProvider().get_tracer("test")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with tracer.start_as_current_span("GET") as span:
            headers = {}
            propagate.inject(headers)
            connection.request("GET", "/work?n=3", headers=headers)
        client_port = connection.sock.getsockname()[1]
        server, peer = listener.accept()
        with server:
            req = parse_request(server.recv(1024))
        connection.close()
    ids = span.get_span_context()
    assert req.parent == SpanContext(ids.trace_id.to_bytes(16, "big"), ids.span_id.to_bytes(8, "big"), True)
    assert peer == ("127.0.0.1", client_port)
    attrs = server_span_attributes(req, 200, None, peer)
    assert (attrs["url.path"], attrs["url.query"]) == ("/work", "n=3")
    assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1", port)  # from Host
    assert (attrs["network.peer.address"], attrs["network.peer.port"]) == ("127.0.0.1", client_port)


# ----- the example server and client


@pytest.fixture(scope="module", autouse=True)
def examples_built():
    build_examples()


class Server:
    """examples/httpserver on a free port, answering `max_requests` requests, then exiting."""

    def __init__(self, max_requests: int):
        self.proc = subprocess.Popen([str(HTTPSERVER), "0", str(max_requests)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        pid, listening = self.proc.stdout.readline(), self.proc.stdout.readline()
        if not listening.startswith("listening port="):
            self.proc.kill()
            pytest.fail(f"httpserver did not start: {self.proc.communicate()[1]}")
        self.head = pid + listening
        self.port = int(listening.removeprefix("listening port="))

    def finish(self):
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return parse(self.head + out)


@contextlib.contextmanager
def serving(max_requests: int):
    server = Server(max_requests)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()


def run_client(port: int, count: int, **env: str):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env)
    result = subprocess.run([sys.executable, str(HTTP_CLIENT), str(port), str(count)], env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return parse_client(result.stdout)


ROUNDS_REQUESTS = 14  # two rounds of the client's plan


@pytest.fixture(scope="module")
def exchange():
    """One run of the client against the server: (server ground truth, client lines)."""
    with serving(ROUNDS_REQUESTS) as server:
        clients = run_client(server.port, ROUNDS_REQUESTS, OTEL_TRACES_EXPORTER="none")
        truth = server.finish()
    return truth, clients


def test_client_plan_covers_the_cases_tracing_needs(exchange):
    _, clients = exchange
    assert len(clients) == ROUNDS_REQUESTS
    shared = [c for c in clients if c.conn == 0]
    assert len(shared) >= 3, "several requests on one keep-alive connection"
    assert len({c.conn for c in clients}) >= 4, "several connections"
    assert {c.status for c in clients} == {200, 404}
    assert any(c.traceparent is None for c in clients)
    assert any(c.tracestate for c in clients)
    for c in clients:
        if c.traceparent is not None:
            assert parse_traceparent(c.traceparent) == SpanContext(
                bytes.fromhex(c.trace_id), bytes.fromhex(c.span_id), True, "")


def test_server_answers_every_client_request_once(exchange):
    truth, clients = exchange
    assert len(truth.requests) == len(clients)
    assert Counter((r.method, r.target, r.status) for r in truth.requests) \
        == Counter(("GET", c.target, c.status) for c in clients)


def test_server_sees_the_traceparent_each_client_span_sent(exchange):
    truth, clients = exchange
    by_traceparent = {r.traceparent: r for r in truth.requests}
    for c in clients:
        if c.traceparent is None:
            continue
        served = by_traceparent[c.traceparent]
        assert (served.target, served.status) == (c.target, c.status)
        parent = parse_traceparent(served.traceparent)
        assert (parent.trace_id.hex(), parent.span_id.hex()) == (c.trace_id, c.span_id)
    assert sum(r.traceparent is None for r in truth.requests) == sum(c.traceparent is None for c in clients)


def test_keep_alive_requests_share_a_thread_and_connections_do_not(exchange):
    truth, clients = exchange
    served = {r.traceparent: r for r in truth.requests}
    tids = {}
    for c in clients:
        if c.traceparent is not None:
            tids.setdefault(c.conn, set()).add((served[c.traceparent].tid, served[c.traceparent].fd))
    assert all(len(ends) == 1 for ends in tids.values()), tids
    assert len({next(iter(ends))[0] for ends in tids.values()}) == len(tids), "a connection thread was shared"
    assert truth.pid not in {r.tid for r in truth.requests}


def test_probed_calls_happen_inside_their_request(exchange):
    truth, _ = exchange
    for request in truth.requests:
        assert request.start <= request.end
        calls = truth.calls_during(request)
        assert Counter(c.fn for c in calls) == expected_http_counts([request.target]), request
        assert all(c.end <= request.end for c in calls)
        assert all(c.parent == 0 for c in calls if c.fn == "handle_request")
    assert Counter(c.fn for c in truth.calls) == expected_http_counts([r.target for r in truth.requests])
    assert truth.done == len(truth.calls)
    per_thread = {}
    for request in sorted(truth.requests, key=lambda r: r.start):
        assert request.start >= per_thread.get(request.tid, 0), "requests of one thread overlap"
        per_thread[request.tid] = request.end


@pytest.mark.parametrize("protocol, endpoint", [("http/protobuf", "http_endpoint"), ("grpc", "grpc_endpoint")])
def test_client_spans_reach_an_otlp_receiver(protocol, endpoint):
    with OtlpReceiver() as receiver, serving(7) as server:
        clients = run_client(server.port, 7, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=protocol,
                             OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=getattr(receiver, endpoint))
        server.finish()
        spans = {(s.trace_id.hex(), s.span_id.hex()): (resource, s) for resource, s in receiver.wait_for_spans(7)}
    assert len(spans) == len(clients) == 7
    for c in clients:
        resource, span = spans[(c.trace_id, c.span_id)]
        attrs = {kv.key: any_value(kv.value) for kv in span.attributes}
        assert resource["service.name"] == "http-client"
        assert (span.name, span.kind) == ("GET", Span.SPAN_KIND_CLIENT)
        assert attrs["http.response.status_code"] == c.status
        assert (span.status.code == Status.STATUS_CODE_ERROR) == (c.status >= 400)
        assert span.trace_state == (c.tracestate or "")


@pytest.mark.parametrize("data, answers", [
    (b"GET /health HTTP/1.1\r\n\r\nGET /work?n=1 HTTP/1.1\r\n\r\n", [("GET", "/health", 200), ("GET", "/work", 200)]),
    (b"GET /work?n=2 HTTP/1.1\nHost: x\n\n", [("GET", "/work", 200)]),
    (b"POST /health HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\n\r\n",
     [("POST", "/health", 405), ("GET", "/health", 200)]),
    (b"GET /work?n=21 HTTP/1.1\r\n\r\n", [("GET", "/work", 400)]),
    (b"GET /work HTTP/1.1\r\n\r\n", [("GET", "/work", 400)]),
    (b"NONSENSE\r\n\r\nGET /health HTTP/1.1\r\n\r\n", [("-", "-", 400)]),
    (b"GET /health HTTP/1.0\r\n\r\nGET /health HTTP/1.0\r\n\r\n", [("GET", "/health", 200)]),
])
def test_server_handles_raw_exchanges(data, answers):
    with serving(len(answers)) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := s.recv(4096):
                received += chunk
        truth = server.finish()
    statuses = [status for _, _, status in answers]
    assert [(r.method, r.path, r.status) for r in truth.requests] == answers
    assert [int(code) for code in re.findall(rb"^HTTP/1\.1 (\d{3}) ", received, re.MULTILINE)] == statuses
    assert parse_response(received) == statuses[0]


@pytest.mark.parametrize("args", [(), ("x",), ("-1",), ("70000",), ("0", "y"), ("0", "1", "2")])
def test_httpserver_rejects_bad_arguments(args):
    result = subprocess.run([str(HTTPSERVER), *args], capture_output=True, text=True, timeout=10)
    assert (result.returncode, result.stdout) == (2, "")
    assert "usage:" in result.stderr


def test_ground_truth_parses_server_and_client_lines():
    truth = parse(
        "pid 7\n"
        "listening port=8080\n"
        "call fn=handle_request tid=8 seq=1 parent=0 start=110 end=190\n"
        f"request tid=8 fd=4 method=GET path=/work query=n=1 status=200 traceparent={TRACEPARENT} start=100 end=200\n"
        "request tid=9 fd=5 method=GET path=/health query=- status=200 traceparent=- start=300 end=400\n"
        "request tid=9 fd=5 method=GET path=/ query= status=404 traceparent=- start=500 end=600\n"
        "done calls=1\n"
    )
    assert truth.port == 8080
    assert truth.requests == [
        Request(8, 4, "GET", "/work", "n=1", 200, TRACEPARENT, 100, 200),
        Request(9, 5, "GET", "/health", None, 200, None, 300, 400),
        Request(9, 5, "GET", "/", "", 404, None, 500, 600),
    ]
    assert [r.target for r in truth.requests] == ["/work?n=1", "/health", "/?"]
    assert truth.calls_during(truth.requests[0]) == [Call("handle_request", 8, 1, 0, 110, 190)]
    assert truth.calls_during(truth.requests[1]) == []
    assert parse_client(
        f"client conn=0 trace_id={TRACE_ID} span_id={SPAN_ID} path=/x?y=1 status=200 traceparent={TRACEPARENT} "
        "tracestate=a=1\nother output\n"
        f"client conn=2 trace_id={TRACE_ID} span_id={SPAN_ID} path=/ status=404 traceparent=- tracestate=-\n"
    ) == [ClientRequest(0, TRACE_ID, SPAN_ID, "/x?y=1", 200, TRACEPARENT, "a=1"),
          ClientRequest(2, TRACE_ID, SPAN_ID, "/", 404, None, None)]


@pytest.mark.parametrize("parser, text", [
    (parse, "pid 1\nrequest tid=1 fd=2 method=GET path=/ status=200\ndone calls=0\n"),
    (parse, "pid 1\nlistening port=x\ndone calls=0\n"),
    (parse_client, "client conn=0 trace_id=abc span_id=def path=/ status=200 traceparent=- tracestate=-\n"),
])
def test_ground_truth_rejects_malformed_lines(parser, text):
    with pytest.raises(ValueError, match="malformed"):
        parser(text)


@pytest.mark.parametrize("data, at", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n\r\n", 27),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),  # nothing follows
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n", 41),  # after its body
    (b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabcGET", None),  # its body goes on
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n", None),  # not followed
    (b"GET / HTTP/1.1\nHost: a\n\nGET /x", 24),  # LF-only lines
    (b"\r\nGET / HTTP/1.1\r\n\r\nGET /x", 20),  # the CRLF a client may send after a body
    (b"GET / HTTP/1.1\r\nHost: a\r\n", None),  # header section not seen whole
])
def test_where_a_pipelined_request_begins(data, at):
    assert next_request_at(data) == at


def test_client_span_attributes_keep_the_query_keys_only():
    req = parse_request(b"GET /search?q=secret&flag HTTP/1.1\r\nHost: api.example:8443\r\n\r\n")
    attrs = client_span_attributes(req, 503, ("10.0.0.9", 8443), tls=True)
    assert attrs == {"http.request.method": "GET", "server.address": "api.example", "server.port": 8443,
                     "url.full": "https://api.example:8443/search?q=REDACTED&flag", "http.response.status_code": 503,
                     "error.type": "503", "network.peer.address": "10.0.0.9", "network.peer.port": 8443,
                     "network.protocol.version": "1.1"}
    no_host = parse_request(b"GET / HTTP/1.0\r\n\r\n")
    assert client_span_attributes(no_host, 404, ("::1", 80), tls=False)["url.full"] == "http://[::1]:80/"
