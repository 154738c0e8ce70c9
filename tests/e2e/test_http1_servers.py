"""Debian's nginx, an event-loop server, as it really answers: static files with sendfile, writev'd error pages,
keep-alive connections with several requests, several connections at once on its one worker, a connection kept
open after its responses, a traceparent past the first KiB of headers. Every SERVER span is checked against what
the client sent and received (its trace, parent, status, path and peer port) and against the client's own clock
readings; each request's ngx_http_process_request call is a child of its own SERVER span only."""

from __future__ import annotations

import os
import re
import secrets
import signal
import time

import pytest

from tests.e2e.servers import (LIBC, NGINX_FUNCTION, Exchange, Nginx, command_pid, connect, exported_spans,
                               self_signed, traced_nginx, traces_to, wait_for_tls_in)
from tests.e2e.spancheck import CLOCK_SLACK_NS, attributes

# Larger than anything the loopback's socket buffers can hold (tcp_wmem's and tcp_rmem's maxima here: 4 and 6 MiB):
# nginx's last sendfile returns only after the client has read at least BIG - BUFFERED bytes.
BIG = 32 << 20
BUFFERED = 16 << 20


class Client:
    """HTTP/1.1 over a raw socket (or TLS over it), so that the test decides what shares a connection and when
    bytes go out."""

    def __init__(self, port: int, tls: bool):
        self.port = port
        self.conn = connect(port, tls)
        self.buffer = b""
        self.exchanges: list[Exchange] = []

    def send(self, method: str = "GET", path: str = "/", padding: int = 0) -> Exchange:
        """A request with a traceparent of its own; `padding` bytes of another header before it."""
        return self.pipeline([(method, path)], padding)[0]

    def pipeline(self, requests: list[tuple[str, str]], padding: int = 0) -> list[Exchange]:
        """(method, path) requests sent in one write, each with a traceparent of its own."""
        exchanges, data = [], b""
        for method, path in requests:
            exchange = Exchange(method, path, secrets.token_hex(16), secrets.token_hex(8), self.conn.getsockname()[1])
            pad = f"X-Padding: {'p' * padding}\r\n" if padding else ""
            data += (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{pad}"
                     f"traceparent: 00-{exchange.trace_id}-{exchange.span_id}-01\r\n\r\n").encode()
            exchanges.append(exchange)
        sent_ns = time.time_ns()
        self.conn.sendall(data)
        for exchange in exchanges:
            exchange.sent_ns = sent_ns
        self.exchanges += exchanges
        return exchanges

    def _fill(self) -> None:
        data = self.conn.recv(1 << 20)
        assert data, "nginx closed the connection"
        self.buffer += data

    def receive(self, exchange: Exchange) -> Exchange:
        """Its response, read to the last byte of the body its Content-Length announces."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        exchange.status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        left = 0 if exchange.method == "HEAD" else int(headers.get("content-length", 0))
        big = left > BUFFERED
        while left:
            if not self.buffer:
                self._fill()
            taken = min(left, len(self.buffer))
            self.buffer, left = self.buffer[taken:], left - taken
            if big and left <= BUFFERED and not exchange.drained_ns:
                exchange.drained_ns = time.time_ns()
        exchange.received_ns = time.time_ns()
        return exchange

    def ask(self, method: str = "GET", path: str = "/", padding: int = 0) -> Exchange:
        return self.receive(self.send(method, path, padding))

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_nginx_requests_as_an_event_loop_serves_them(tracer, receiver, tmp_path, scheme):
    """With https the same requests are read in plaintext at OpenSSL's SSL_read and SSL_write (the big file is
    written with SSL_write, not sendfile)."""
    tls = scheme == "https"
    nginx = Nginx(tmp_path / "nginx", workers=1, big_file=BIG, tls=tls)
    clients = []
    try:
        t = traced_nginx(tracer, receiver, nginx)
        kept = Client(nginx.port, tls)  # keep-alive: four requests, then kept open while the others run
        clients.append(kept)
        kept.ask("GET", "/")
        kept.ask("GET", "/busy")
        kept.ask("HEAD", "/")
        kept.ask("GET", "/missing")
        first, second = Client(nginx.port, tls), Client(nginx.port, tls)  # two connections at once on the one worker
        clients += [first, second]
        a, b = first.send("GET", "/"), second.send("GET", "/busy")
        second.receive(b)
        first.receive(a)
        late = Client(nginx.port, tls)  # the traceparent comes after 1.5 KiB of headers: nginx reads 1 KiB first
        clients.append(late)
        late.ask("GET", "/", padding=1536)
        big = Client(nginx.port, tls)
        clients.append(big)
        big.ask("GET", "/big.bin")
        piped = Client(nginx.port, tls)  # pipelined: three requests in one write, answered in order
        clients.append(piped)
        for exchange in piped.pipeline([("GET", "/busy"), ("HEAD", "/"), ("GET", "/")]):
            piped.receive(exchange)
        kept.ask("GET", "/")  # the kept connection, once more
    finally:
        for client in clients:
            client.close()
        nginx.stop()
    assert t.finish() == 0, t.stderr
    exchanges = [e for client in clients for e in client.exchanges]
    assert [e.status for e in exchanges] == [200, 503, 200, 404, 200, 200, 503, 200, 200, 503, 200, 200]  # by connection
    received = receiver.wait_for_spans(2 * len(exchanges), timeout=20)
    servers = [s for _, s in received if s.kind == s.SPAN_KIND_SERVER]
    assert len(servers) == len(exchanges), [(s.name, attributes(s).get("url.path")) for s in servers]
    functions = [s for _, s in received if s.name == NGINX_FUNCTION]
    for e in exchanges:
        mine = [s for s in servers if s.trace_id.hex() == e.trace_id]
        assert len(mine) == 1, f"{e.method} {e.path}: {len(mine)} SERVER spans in its trace"
        server = mine[0]
        attrs = attributes(server)
        assert (server.name, server.parent_span_id.hex()) == (e.method, e.span_id)
        assert (attrs["http.response.status_code"], attrs["url.path"], attrs["url.scheme"]) == (e.status, e.path,
                                                                                             scheme)
        assert (attrs["network.peer.address"], attrs["network.peer.port"]) == ("127.0.0.1", e.client_port)
        assert (attrs["network.local.address"], attrs["network.local.port"]) == ("127.0.0.1", nginx.port)
        assert (server.status.code == server.status.STATUS_CODE_ERROR) == (e.status >= 500)
        assert attrs.get("error.type") == (str(e.status) if e.status >= 500 else None)
        # Within the client's own readings: read after it was sent, answered before it was received in full.
        assert e.sent_ns - CLOCK_SLACK_NS <= server.start_time_unix_nano
        assert server.end_time_unix_nano <= e.received_ns + CLOCK_SLACK_NS, f"{e.path} ends after its response"
        if e.drained_ns:  # ended at the last sendfile, not the first
            assert server.end_time_unix_nano >= e.drained_ns - CLOCK_SLACK_NS
        calls = [s for s in functions if s.trace_id.hex() == e.trace_id]
        assert [s.parent_span_id for s in calls] == [server.span_id], f"{e.method} {e.path}"
    assert len(functions) == len(exchanges)


# Python's own server, a thread per connection, keep-alive: "/" answers 200, "/drop" closes its connection with
# close_range and answers nothing, "/hang" prints "hanging" and answers nothing, any other path 503. With
# `--worker-thread` each request starts a thread that calls getpid; with `--tls CERT KEY` HTTPS, for which the ssl
# module (and with it libssl) is loaded once the program runs, and CPython reads and writes with SSL_read_ex and
# SSL_write_ex.
PYTHON_SERVER = """
import http.server, os, signal, sys, threading, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # the tracer passes its SIGINT on: a clean exit
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/drop":
            fd = self.connection.detach()  # the socket object lets go of it: closed once, here
            os.closerange(fd, fd + 1)  # glibc's close_range
            self.close_connection = True
            return
        if self.path == "/hang":
            print("hanging", flush=True)
            time.sleep(600)
        if "--worker-thread" in sys.argv:
            worker = threading.Thread(target=os.getpid)  # a thread started while the request is served
            worker.start()
            worker.join()
        body = b"hello\\n"
        self.send_response(200 if self.path == "/" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if "--tls" in sys.argv:
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    at = sys.argv.index("--tls")
    context.load_cert_chain(sys.argv[at + 1], sys.argv[at + 2])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def python_server(tracer, receiver, function: str, *options: str, tls: bool = False) -> tuple[list, list]:
    """PYTHON_SERVER under `otel-ebpf trace libc FUNCTION`, asked GET / and GET /busy on one connection: the
    exchanges and the spans exported."""
    t = tracer(["trace", LIBC, function, "--", "/usr/bin/python3", "-c", PYTHON_SERVER, *options],
               **traces_to(receiver))
    try:
        port = int(t.wait_stdout(r"^(\d+)$")[1])
        if tls:
            server_pid = command_pid(t)
            wait_for_tls_in(t, lambda pid: pid == server_pid)
        client = Client(port, tls)
        exchanges = [client.ask("GET", "/"), client.ask("GET", "/busy")]
        client.close()
    finally:
        t.proc.send_signal(signal.SIGINT)
    assert t.finish() == 0, t.stderr
    assert [e.status for e in exchanges] == [200, 503]
    return exchanges, exported_spans(t, receiver)


def test_python_https_server_and_the_libssl_it_loads_later(tracer, receiver, tmp_path):
    certificate, key = self_signed(tmp_path)
    exchanges, received = python_server(tracer, receiver, "close", "--tls", str(certificate), str(key), tls=True)
    servers = [s for _, s in received if s.kind == s.SPAN_KIND_SERVER]
    assert len(servers) == len(exchanges)
    for e in exchanges:
        (server,) = [s for s in servers if s.trace_id.hex() == e.trace_id]
        attrs = attributes(server)
        assert (server.name, server.parent_span_id.hex(), attrs["url.scheme"]) == ("GET", e.span_id, "https")
        assert (attrs["http.response.status_code"], attrs["url.path"]) == (e.status, e.path)
        assert attrs["network.peer.port"] == e.client_port
        assert e.sent_ns - CLOCK_SLACK_NS <= server.start_time_unix_nano
        assert server.end_time_unix_nano <= e.received_ns + CLOCK_SLACK_NS


def test_threads_started_while_a_request_is_served_serve_it_too(tracer, receiver):
    """Each request starts a thread that calls getpid; that call is a child of its own request's SERVER span,
    though another thread read the request."""
    exchanges, received = python_server(tracer, receiver, "getpid", "--worker-thread")
    for e in exchanges:
        mine = [s for _, s in received if s.trace_id.hex() == e.trace_id]
        (server,) = [s for s in mine if s.kind == s.SPAN_KIND_SERVER]
        (call,) = [s for s in mine if s.name == "getpid"]
        assert (server.parent_span_id.hex(), attributes(server)["url.path"]) == (e.span_id, e.path)
        assert call.parent_span_id == server.span_id
        assert attributes(call)["thread.id"] != attributes(server)["thread.id"]


def test_a_file_that_starts_like_a_request_is_not_one(tracer, receiver, tmp_path):
    """dd reads a file that starts with "GET ": only accepted sockets can carry requests, so no SERVER span;
    dd's probed libc reads are the positive control."""
    request_file = tmp_path / "request.txt"
    request_file.write_text("GET / HTTP/1.1\r\nHost: example.com\r\ntraceparent: 00-"
                            f"{secrets.token_hex(16)}-{secrets.token_hex(8)}-01\r\n\r\n")
    t = tracer(["trace", LIBC, "read", "--", "dd", f"if={request_file}", "of=/dev/null", "status=none"],
               **traces_to(receiver))
    assert t.finish() == 0, t.stderr
    received = exported_spans(t, receiver)
    assert received and {s.name for _, s in received} == {"read"}


def test_requests_end_when_their_descriptors_close_at_once(tracer, receiver):
    """A request whose connection goes with close_range, and one in flight when its server is killed: each SERVER
    span ends then (no close() says so), without a status, before its client saw the connection end."""
    t = tracer(["trace", LIBC, "getpid", "--", "/usr/bin/python3", "-c", PYTHON_SERVER], **traces_to(receiver))
    port = int(t.wait_stdout(r"^(\d+)$")[1])
    dropped, hung = Client(port, tls=False), Client(port, tls=False)
    drop = dropped.send("GET", "/drop")
    assert dropped.conn.recv(1) == b""
    drop.received_ns = time.time_ns()
    hang = hung.send("GET", "/hang")
    t.wait_stdout(r"^hanging$")
    killed_ns = time.time_ns()
    os.kill(command_pid(t), signal.SIGKILL)
    assert hung.conn.recv(1) == b""
    hang.received_ns = time.time_ns()
    assert t.finish() == 128 + signal.SIGKILL, t.stderr
    received = exported_spans(t, receiver)
    servers = {s.trace_id.hex(): s for _, s in received if s.kind == s.SPAN_KIND_SERVER}
    assert len(servers) == 2
    for e, after_ns in ((drop, drop.sent_ns), (hang, killed_ns)):
        server = servers[e.trace_id]
        attrs = attributes(server)
        assert (attrs["url.path"], server.parent_span_id.hex()) == (e.path, e.span_id)
        assert "http.response.status_code" not in attrs
        assert after_ns - CLOCK_SLACK_NS <= server.end_time_unix_nano <= e.received_ns + CLOCK_SLACK_NS, e.path


def test_what_the_kernel_cannot_keep_is_counted(tracer, receiver, tmp_path):
    """With room for 64 connections (OTEL_EBPF_MAX_THREADS=64), 100 kept open at once on nginx's one worker: the
    kernel forgets at least 36 of them to make room (more: the LRU frees entries in batches), and says so; each
    request was read right after its accept, so every one still has its SERVER span."""
    nginx = Nginx(tmp_path / "nginx", workers=1, connections=256)
    clients = []
    try:
        t = traced_nginx(tracer, receiver, nginx, OTEL_EBPF_MAX_THREADS="64")
        for _ in range(100):
            clients.append(Client(nginx.port, tls=False))
            clients[-1].ask("GET", "/")
    finally:
        for client in clients:
            client.close()
        nginx.stop()
    assert t.finish() == 0, t.stderr
    forgotten = re.search(r"the kernel forgot (\d+) sockets(, (\d+) requests)?", t.stderr)
    assert forgotten, t.stderr
    assert 36 <= int(forgotten[1]) <= 100 and 36 <= int(forgotten[3] or 0) <= 100, t.stderr
    received = exported_spans(t, receiver)
    servers = {s.trace_id.hex() for _, s in received if s.kind == s.SPAN_KIND_SERVER}
    assert servers == {client.exchanges[0].trace_id for client in clients}
