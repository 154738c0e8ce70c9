"""HTTP requests to the real httpserver become SERVER spans in the caller's trace, parents of the probed calls
that serve them: checked against the server's and the OTel-SDK client's own ground truth, and the client's own
CLIENT spans, all received by one real OTLP receiver."""

import re
import secrets
import signal
import socket
import subprocess
import sys

import pytest

from tests.e2e.conftest import Output, clean_env
from tests.e2e.servers import LIBCURL
from tests.e2e.spancheck import CLOCK_SLACK_NS, attributes, check_tree, match, match_requests, named
from tests.ground_truth import HTTP_CLIENT, HTTPSERVER, NESTED, ClientRequest, GroundTruth, parse, parse_client

FUNCTIONS = ("handle_request", "parse_query", "compute", "render")
CLIENT_REQUESTS = 7  # one round of http_client's PLAN
RAW_USER_AGENT = "otel-ebpf-e2e/1"
PER_SPAN = ("thread.id", "network.peer.port")  # checked apart from the other attributes
# The peer as accept (or getpeername) returned it: there for every request, however short its connection.
FROM_ACCEPT = {"network.peer.address": "127.0.0.1", "client.address": "127.0.0.1"}
PIPELINED = ("/work?n=7&via=pipelined", "/work?n=3&via=pipelined")


def otlp_env(receiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}


def start_client(port: int, receiver) -> subprocess.Popen:
    """http_client.py exports its CLIENT spans to the same receiver, so the test sees whole traces."""
    return subprocess.Popen([sys.executable, str(HTTP_CLIENT), str(port), str(CLIENT_REQUESTS)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(**otlp_env(receiver)))


def client_lines(client: subprocess.Popen) -> list[ClientRequest]:
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    return parse_client(out)


def raw_pipelined(port: int, targets: tuple[str, ...]) -> list[int]:
    """HTTP/1.1 requests without traceparent sent at once in one write (RFC 9112 section 9.3.2), the last with
    Connection: close; returns the statuses of the responses, in order."""
    requests = [f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" for target in targets]
    requests[-1] += "Connection: close\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall("".join(request + "\r\n" for request in requests).encode())
        response = b"".join(iter(lambda: conn.recv(4096), b""))
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]  # no body holds one


def raw_get(port: int, target: str) -> tuple[int, int]:
    """A hand-written HTTP/1.0 request: a User-Agent, no Host, no traceparent; the server closes the connection.
    Returns the status and the client's port, which the SERVER span must name as the peer's."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"GET {target} HTTP/1.0\r\nUser-Agent: {RAW_USER_AGENT}\r\n\r\n".encode())
        response = b"".join(iter(lambda: conn.recv(4096), b""))
        return int(response.split()[1]), conn.getsockname()[1]


@pytest.fixture
def server():
    """httpserver started by the test itself (not under `otel-ebpf trace`), its stdout kept in a file."""
    started = []

    def start(requests: int) -> tuple[subprocess.Popen, Output]:
        out = Output()
        proc = subprocess.Popen([str(HTTPSERVER), "0", str(requests)], stdout=out.file, env=clean_env())
        started.append(proc)
        return proc, out

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def expected_attributes(request, port: int) -> dict:
    """What the bytes on the socket say, as the ground truth knows them; raw_get's requests carry `via=raw`.
    server.address and .port come from the Host header, or without one (raw_get) from the local address."""
    raw = "via=raw" in (request.query or "")
    expected = {"http.request.method": request.method, "url.path": request.path, "url.scheme": "http",
                "http.response.status_code": request.status, "network.protocol.version": "1.0" if raw else "1.1",
                "server.address": "127.0.0.1", "server.port": port,
                "network.local.address": "127.0.0.1", "network.local.port": port}
    if request.query is not None:
        expected["url.query"] = request.query
    if raw:
        expected["user_agent.original"] = RAW_USER_AGENT  # http.client sends none
    return expected


def check_http(received, truth: GroundTruth, clients: list[list[ClientRequest]], port: int, raw_ports: dict[str, int],
               correlated, options: tuple[str, ...] = ()) -> None:
    """Every SERVER span against its request and its client (or raw_get's port, by target); every function
    span under its request's SERVER span. `correlated(request)` says which requests must have a SERVER span."""
    command_line = " ".join([str(HTTPSERVER), "0", str(len(truth.requests)), *options])
    for resource, span in received:
        if resource.get("process.pid") == truth.pid:
            assert (resource["service.name"], resource["process.command_line"]) == ("httpserver", command_line)
            assert resource["process.executable.path"] == str(HTTPSERVER.resolve())
    client_spans = {s.span_id.hex(): s for r, s in received if r["service.name"] == "http-client"}
    assert len(client_spans) == sum(map(len, clients))
    by_traceparent = {}
    for number, lines in enumerate(clients):
        for line in lines:
            exported = client_spans[line.span_id]
            assert (exported.kind, exported.trace_id.hex()) == (exported.SPAN_KIND_CLIENT, line.trace_id)
            if line.traceparent:
                by_traceparent[line.traceparent] = (number, line)

    servers = match_requests(received, truth)
    assert [r for r in truth.requests if correlated(r) and r not in servers] == [], "requests without SERVER span"
    connections = {}  # (client, conn) -> {(server thread, peer port)}
    for request, (_, span) in servers.items():
        attrs = attributes(span)
        assert (span.kind, span.name) == (span.SPAN_KIND_SERVER, request.method)
        for key, value in FROM_ACCEPT.items():
            assert attrs.pop(key) == value, key
        assert "network.peer.port" in attrs
        assert {k: v for k, v in attrs.items() if k not in PER_SPAN} == expected_attributes(request, port)
        assert span.status.code == span.status.STATUS_CODE_UNSET  # no 5xx here: 404 is the client's error
        if request.traceparent:
            number, client = by_traceparent[request.traceparent]
            assert (span.trace_id.hex(), span.parent_span_id.hex()) == (client.trace_id, client.span_id)
            assert span.flags == 0x301, "exported (so sampled), and its parent is remote"
            assert span.trace_state == (client.tracestate or "")
            outer = client_spans[client.span_id]
            assert outer.start_time_unix_nano - CLOCK_SLACK_NS <= span.start_time_unix_nano, "before its client"
            assert span.end_time_unix_nano <= outer.end_time_unix_nano + CLOCK_SLACK_NS, "after its client"
            connections.setdefault((number, client.conn), set()).add(attrs["thread.id"])
        else:
            assert span.parent_span_id == b"" and not span.flags & 0x200, "no traceparent: a trace root"
        if request.target in raw_ports:
            assert attrs["network.peer.port"] == raw_ports[request.target]
    trace_ids = [span.trace_id for _, span in servers.values()]
    assert len(set(trace_ids)) == len(trace_ids)
    assert not {t.hex() for t in trace_ids} & {c.trace_id for lines in clients for c in lines if not c.traceparent}
    assert all(len(c) == 1 for c in connections.values()), "a keep-alive connection is served by one thread"
    threads = [next(iter(c)) for c in connections.values()]
    assert len(set(threads)) == len(connections), "two connections share a thread"

    def owner(call):
        """The request answered first among those read before the call: pipelined ones share their read."""
        return min((r for r in truth.requests if r.tid == call.tid and r.start <= call.start <= r.end),
                   key=lambda r: r.end)

    def context(call):
        request = owner(call)
        return (servers[request][1].trace_id, servers[request][1].span_id) if request in servers else None

    functions = [(r, s) for r, s in received if r.get("process.pid") == truth.pid and s.kind == s.SPAN_KIND_INTERNAL]
    check_tree(match(functions, truth, named(*FUNCTIONS)), truth, context)
    for request, (_, span) in servers.items():
        in_trace = [s for _, s in functions if s.trace_id == span.trace_id]
        assert len(in_trace) == sum(c.fn in FUNCTIONS and owner(c) == request for c in truth.calls_during(request)), \
            request
        assert all(span.start_time_unix_nano <= s.start_time_unix_nano and s.end_time_unix_nano
                   <= span.end_time_unix_nano for s in in_trace), f"{request}: calls outside (one clock: exact)"


@pytest.mark.parametrize("options", [(), ("msg",)], ids=["read", "recvmsg"])
def test_requests_join_the_callers_trace(tracer, receiver, options):
    """Two clients at once, each making keep-alive and fresh-connection requests, a 404, one without traceparent
    and one with tracestate; plus a hand-written HTTP/1.0 request without traceparent whose calls must follow
    the SERVER span's own trace, and two requests pipelined in one write. With `msg` the server accepts without
    the peer's address (getpeername tells it) and reads with recvmsg."""
    total = 2 * CLIENT_REQUESTS + 1 + len(PIPELINED)
    t = tracer(["trace", str(HTTPSERVER), *FUNCTIONS, "--", str(HTTPSERVER), "0", str(total), *options],
               **otlp_env(receiver))
    port = int(t.wait_stdout(r"listening port=(\d+)", timeout=120).group(1))
    started = [start_client(port, receiver) for _ in range(2)]
    status, raw_port = raw_get(port, "/work?n=6&via=raw")
    assert raw_pipelined(port, PIPELINED) == [200, 200]
    clients = [client_lines(c) for c in started]
    assert t.finish() == 0, t.stderr  # httpserver exits after `total` responses
    truth = parse(t.stdout)
    lines = [line for c in clients for line in c]
    assert status == 200 and len(truth.requests) == total and {r.status for r in truth.requests} == {200, 404}
    piped = [r for r in truth.requests if r.target in PIPELINED]
    assert len({r.start for r in piped}) == 1, "the server read both requests at once"
    assert {line.conn for line in lines} == {0, 1, 2, 3} and any(line.tracestate for line in lines)
    assert sum(line.traceparent is None for line in lines) == 2
    functions = sum(c.fn in FUNCTIONS for c in truth.calls)
    assert f"otel-ebpf: {total + functions} spans exported, 0 lost" in t.stderr, t.stderr
    expected = len(lines) + total + functions
    received = receiver.wait_for_spans(expected)
    assert len(received) == expected
    assert {r.get("process.pid") for r, _ in received if r["service.name"] != "http-client"} == {truth.pid}
    check_http(received, truth, clients, port, {"/work?n=6&via=raw": raw_port}, correlated=lambda request: True,
               options=options)


@pytest.mark.parametrize("flags", ["01", "00"])
def test_process_started_with_traceparent_joins_that_trace(tracer, receiver, tmp_path, flags):
    """The environment carrier: a process started by a traced parent belongs to the parent's trace (all its
    threads), and under the default parentbased sampler an unsampled parent means no spans at all. TRACESTATE
    rides along as a parent process would set it; function spans do not carry it (nor remote-parent flags)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    truth_file = tmp_path / "truth.txt"
    t = tracer(["trace", str(NESTED), "handle_request", "fib", "--", str(NESTED), "2", "2"],
               TRACEPARENT=f"00-{trace_id}-{span_id}-{flags}", TRACESTATE="vendor=opaque",
               NESTED_GROUND_TRUTH=str(truth_file), **otlp_env(receiver))
    assert t.finish() == 0, t.stderr
    truth = parse(truth_file.read_text())
    traced = named("handle_request", "fib")
    calls = sum(traced(c) for c in truth.calls)
    expected = calls if flags == "01" else 0
    assert calls > 0 and f"otel-ebpf: {expected} spans exported, 0 lost" in t.stderr
    received = receiver.spans()  # complete: the tracer flushes before it exits
    assert len(received) == expected
    if expected:
        assert {span.trace_id.hex() for _, span in received} == {trace_id}
        matched = match(received, truth, traced)
        check_tree(matched, truth, lambda call: (bytes.fromhex(trace_id), bytes.fromhex(span_id)))


def test_sidecar_correlates_requests_after_the_first_probed_call(tracer, receiver, server):
    """`run` knows no pid: the kernel starts watching a process's sockets at its first probed call. The request
    that call serves was read before, so it cannot have a SERVER span and its calls may start a trace of their
    own; every request read after that call is promised to be correlated. The first request here is the one
    that makes the first probed call."""
    t = tracer(["run"], OTEL_EBPF_PROBES=f"{HTTPSERVER}:{','.join(FUNCTIONS)}", **otlp_env(receiver))
    t.wait_ready(timeout=120)
    proc, out = server(1 + CLIENT_REQUESTS)
    port = int(out.wait_for(r"listening port=(\d+)", alive=lambda: proc.poll() is None).group(1))
    status, raw_port = raw_get(port, "/work?n=2&via=raw")
    clients = [client_lines(start_client(port, receiver))]
    assert proc.wait(30) == 0
    assert t.finish(signal.SIGTERM) == 0, t.stderr  # flushes everything the server's calls and requests made
    truth = parse(out.text())
    first_call = min(c.start for c in truth.calls)
    assert status == 200 and truth.requests[0].query == "n=2&via=raw" and truth.requests[0].start < first_call
    # Other tests' processes running httpserver meanwhile are traced too (system-wide): only ours count.
    received = [(r, s) for r, s in receiver.spans()
                if r["service.name"] == "http-client" or r.get("process.pid") == truth.pid]
    check_http(received, truth, clients, port, {"/work?n=2&via=raw": raw_port},
               correlated=lambda request: request.start > first_call)


def test_outbound_requests_become_client_spans(tracer, receiver, server):
    """curl started under a trace (TRACEPARENT) fetches two URLs from httpserver on one connection, then a third
    with a traceparent header of its own: the first two become CLIENT spans, children of the curl_easy_perform
    call that made them, in the process's trace, checked against the server's own readings; the third is the
    program's own business (it propagates its context): no CLIENT span, and the summary says so."""
    proc, out = server(3)
    port = int(out.wait_for(r"listening port=(\d+)", alive=lambda: proc.poll() is None).group(1))
    trace_id, span_id, own = secrets.token_hex(16), secrets.token_hex(8), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    t = tracer(["trace", LIBCURL, "curl_easy_perform", "--", "curl", "-s", "-o", "/dev/null", "-o", "/dev/null",
                f"{base}/work?n=5&mode=x", f"{base}/missing", "--next", "-s", "-o", "/dev/null", "-H",
                f"traceparent: 00-{own}-{'1' * 16}-01", f"{base}/work?n=2"],
               TRACEPARENT=f"00-{trace_id}-{span_id}-01", **otlp_env(receiver))
    assert t.finish() == 0, t.stderr
    assert proc.wait(30) == 0
    assert "1 outbound requests carried a traceparent" in t.stderr, t.stderr
    truth = parse(out.text())
    assert [(r.target, r.status) for r in truth.requests] == [("/work?n=5&mode=x", 200), ("/missing", 404),
                                                               ("/work?n=2", 200)]
    received = receiver.wait_for_spans(5)  # 3 curl_easy_perform calls, 2 CLIENT spans
    performs = {s.span_id: s for _, s in received if s.name == "curl_easy_perform"}
    clients = [s for _, s in received if s.kind == s.SPAN_KIND_CLIENT]
    assert len(performs) == 3 and len(clients) == 2, [(s.name, s.kind) for _, s in received]
    assert {s.trace_id.hex() for s in performs.values()} == {trace_id}
    for request, client in zip(truth.requests, sorted(clients, key=lambda s: s.start_time_unix_nano)):
        attrs = attributes(client)
        assert client.trace_id.hex() == trace_id and client.parent_span_id in performs, "under its curl call"
        caller = performs[client.parent_span_id]
        assert caller.start_time_unix_nano <= client.start_time_unix_nano <= client.end_time_unix_nano <= (
            caller.end_time_unix_nano), "within its caller (one clock: exact)"
        query = "?n=REDACTED&mode=REDACTED" if request.query else ""
        assert (client.name, attrs["url.full"], attrs["http.response.status_code"]) == (
            "GET", f"{base}{request.path}{query}", request.status)
        assert (attrs["server.address"], attrs["server.port"], attrs["network.peer.port"]) == ("127.0.0.1", port, port)
        assert attrs.get("error.type") == ("404" if request.status == 404 else None)
        # The answer curl read came after the server had read the request (the server's clock reading after its
        # read): the CLIENT span ends at the response, not at the request's write. The other readings bound
        # nothing: a woken server may run before curl's own write returns, and curl before the server's clock.
        assert request.start <= client.end_time_unix_nano + CLOCK_SLACK_NS
