"""The ground truth that examples/nested prints about its own calls.

nested reports every call of its traced functions on stdout; the unit tests of
the example and the end-to-end tests compare what a tracer exported with it.
Format, one item per line:

    pid <PID>
    call fn=<name> tid=<tid> seq=<n> parent=<n> start=<ns> end=<ns>
    done calls=<number of call lines>

examples/httpserver prints the same, plus

    listening port=<P>
    request tid=<tid> fd=<fd> method=<M> path=<path> query=<query|-> status=<S> traceparent=<value|->
            start=<ns> end=<ns>                      (one line)

one request line per response, after its write(): start is CLOCK_REALTIME right after the read() that
returned the request's first bytes, end right after the write(). examples/http_client.py prints one line per
request (see parse_client).

examples/goapp (Go) prints the same lines, with Go's function names (fn=main.(*Server).handle) and the
goroutine id in place of tid: goroutines move between threads, so seq and parent count the calls of one
goroutine.

seq numbers the calls of one thread from 1, in entry order; parent is the seq
of the enclosing traced call on the same thread (0 at top level); start and
end are CLOCK_REALTIME ns read inside the function, so a span measured by a
uprobe starts no later than start and ends no earlier than end.
"""

import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
BUILD_DIR = EXAMPLES_DIR / "build"
NESTED = BUILD_DIR / "nested"
LIBGREET = BUILD_DIR / "libgreet.so"
LOOP = BUILD_DIR / "loop"
HTTPSERVER = BUILD_DIR / "httpserver"
HTTP_CLIENT = EXAMPLES_DIR / "http_client.py"
GOAPP = BUILD_DIR / "goapp"
GOAPP_STRIPPED = BUILD_DIR / "goapp-stripped"
GOAPP_GO119 = BUILD_DIR / "goapp-go1.19"  # built with Debian's Go
GOH2 = BUILD_DIR / "goh2"

TRACED_FUNCTIONS = ("handle_request", "parse_request", "greet", "compute", "fib")
GO_TRACED_FUNCTIONS = ("main.(*Server).handle", "main.(*Server).parse", "main.(*Server).fanOut", "main.work",
                       "main.fib", "main.deep")
GO_DEEP_LEVELS = 6  # examples/goapp/main.go deepLevels
HTTP_TRACED_FUNCTIONS = ("handle_request", "parse_query", "compute", "fib", "render")

_PID = re.compile(r"pid (\d+)")
_CALL = re.compile(
    r"call fn=(\S+) tid=(\d+) seq=(\d+) parent=(\d+) start=(\d+) end=(\d+)"
)
_DONE = re.compile(r"done calls=(\d+)")
_LISTENING = re.compile(r"listening port=(\d+)")
_REQUEST = re.compile(
    r"request tid=(\d+) fd=(\d+) method=(\S+) path=(\S+) query=(\S*) status=(\d+) traceparent=(\S+) "
    r"start=(\d+) end=(\d+)"
)
_CLIENT = re.compile(
    r"client conn=(\d+) trace_id=([0-9a-f]{32}) span_id=([0-9a-f]{16}) path=(\S+) status=(\d+) "
    r"traceparent=(\S+) tracestate=(\S+)"
)


@dataclass(frozen=True)
class Call:
    fn: str
    tid: int
    seq: int
    parent: int
    start: int
    end: int


@dataclass(frozen=True)
class Request:
    """One request httpserver answered; query and traceparent are None when the request had none."""

    tid: int
    fd: int
    method: str
    path: str
    query: str | None
    status: int
    traceparent: str | None
    start: int
    end: int

    @property
    def target(self) -> str:
        return self.path if self.query is None else f"{self.path}?{self.query}"


@dataclass(frozen=True)
class ClientRequest:
    """One request of http_client: its CLIENT span's ids and the trace headers it sent (None: not sent)."""

    conn: int
    trace_id: str
    span_id: str
    target: str
    status: int
    traceparent: str | None
    tracestate: str | None


@dataclass
class GroundTruth:
    pid: int
    calls: list[Call]
    done: int
    port: int | None = None
    requests: list[Request] = field(default_factory=list)

    def by_key(self) -> dict[tuple[int, int], Call]:
        """Calls keyed by (tid, seq), which identifies a call in one run."""
        return {(c.tid, c.seq): c for c in self.calls}

    def calls_during(self, request: Request) -> list[Call]:
        """The calls made while serving `request`: on its thread, between reading it and answering it."""
        return [c for c in self.calls if c.tid == request.tid and request.start <= c.start <= request.end]


def parse(text: str) -> GroundTruth:
    """Parses nested's or httpserver's stdout; raises ValueError on a malformed or missing line.

    Lines that start with none of the keywords are skipped, so the output may be
    mixed with another program's (a tracer run in the same terminal).
    """
    pid = done = port = None
    calls = []
    requests = []
    patterns = {"pid": _PID, "call": _CALL, "done": _DONE, "listening": _LISTENING, "request": _REQUEST}
    for number, line in enumerate(text.splitlines(), 1):
        keyword = line.split(" ", 1)[0]
        if keyword not in patterns:
            continue
        match = patterns[keyword].fullmatch(line)
        if not match:
            raise ValueError(f"line {number}: malformed {keyword} line: {line!r}")
        if keyword == "call":
            fn, *numbers = match.groups()
            calls.append(Call(fn, *map(int, numbers)))
        elif keyword == "request":
            tid, fd, method, path, query, status, traceparent, start, end = match.groups()
            requests.append(Request(int(tid), int(fd), method, path, _optional(query), int(status),
                                    _optional(traceparent), int(start), int(end)))
        elif keyword == "listening":
            port = int(match.group(1))
        elif keyword == "pid":
            if pid is not None:
                raise ValueError(f"line {number}: second pid line")
            pid = int(match.group(1))
        else:
            if done is not None:
                raise ValueError(f"line {number}: second done line")
            done = int(match.group(1))
    if pid is None or done is None:
        raise ValueError("no pid line" if pid is None else "no done line: did nested finish?")
    return GroundTruth(pid, calls, done, port, requests)


def _optional(word: str) -> str | None:
    return None if word == "-" else word


def parse_client(text: str) -> list[ClientRequest]:
    """The `client ...` lines of http_client's stdout, in order; other lines are skipped."""
    requests = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("client "):
            continue
        match = _CLIENT.fullmatch(line)
        if not match:
            raise ValueError(f"line {number}: malformed client line: {line!r}")
        conn, trace_id, span_id, target, status, traceparent, tracestate = match.groups()
        requests.append(ClientRequest(int(conn), trace_id, span_id, target, int(status),
                                      _optional(traceparent), _optional(tracestate)))
    return requests


def fib_calls(n: int) -> int:
    """Calls of fib() that fib(n) makes, itself included."""
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def expected_counts(threads: int, requests: int) -> Counter:
    """Calls per function of `nested THREADS REQUESTS`.

    Request ids run from 0 to threads*requests-1 and request id computes
    fib(3 + id % 3).
    """
    counts = Counter()
    for request_id in range(threads * requests):
        counts.update(["handle_request", "parse_request", "greet", "compute"])
        counts["fib"] += fib_calls(3 + request_id % 3)
    return counts


def expected_http_counts(targets: list[str]) -> Counter:
    """Calls per function httpserver makes to answer GET requests for `targets`.

    /work?n=K with 0 <= K <= 20 runs handle_request, parse_query, compute, render and fib(K); a /work with
    another query runs handle_request and parse_query only (400); other paths make no probed call.
    """
    counts = Counter()
    for target in targets:
        path, _, query = target.partition("?")
        if path != "/work":
            continue
        counts.update(["handle_request", "parse_query"])
        match = re.fullmatch(r"n=(\d+)", query)
        if match and int(match.group(1)) <= 20:
            counts.update(["compute", "render"])
            counts["fib"] += fib_calls(int(match.group(1)))
    return counts


def expected_go_counts(requests: int) -> Counter:
    """Calls per function of `goapp work REQUESTS` (or of REQUESTS HTTP requests with ids 0 to REQUESTS-1).

    Request id splits into 2 + id % 2 goroutines; goroutine k runs work(id + k), which computes
    fib(3 + (id + k) % 3) and deep(GO_DEEP_LEVELS).
    """
    counts = Counter()
    for request_id in range(requests):
        counts.update(["main.(*Server).handle", "main.(*Server).parse", "main.(*Server).fanOut"])
        for k in range(2 + request_id % 2):
            counts["main.work"] += 1
            counts["main.fib"] += fib_calls(3 + (request_id + k) % 3)
            counts["main.deep"] += GO_DEEP_LEVELS + 1
    return counts


def build_examples() -> None:
    """Runs `make -C examples`; cheap when everything is up to date."""
    result = subprocess.run(
        ["make", "-C", str(EXAMPLES_DIR)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"make -C examples failed:\n{result.stdout}{result.stderr}")
