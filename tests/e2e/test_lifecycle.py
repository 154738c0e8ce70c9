"""Programs as they are really started, forked and stopped: wrappers that exec, shells that fork, a server whose
master forks its workers, processes in other namespaces, and a shutdown that fits a container's grace period."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import clean_env
from tests.e2e.servers import NGINX, NGINX_FUNCTION, Nginx, traced_nginx, wait_for_port
from tests.e2e.spancheck import check_tree, match, named
from tests.ground_truth import NESTED, parse
from tests.waiting import wait_until

IN_NESTED = ("handle_request", "parse_request", "compute", "fib")
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
OWN = ["OTEL_SERVICE_NAME=wrapped", f"TRACEPARENT={TRACEPARENT}"]


def traces_to(receiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.http_endpoint}


def shim(tmp_path: Path) -> Path:
    """A launcher script like pyenv's shims: it sets the variables and execs the real program."""
    script = tmp_path / "nested-shim"
    script.write_text(f"#!/bin/sh\nexport {' '.join(OWN)}\nexec {NESTED} \"$@\"\n")
    script.chmod(0o755)
    return script


WRAPPERS = {
    "env": lambda tmp: ["env", *OWN, str(NESTED), "1", "2"],
    "sh -c exec": lambda tmp: ["sh", "-c", f"{' '.join(OWN)} exec {NESTED} 1 2"],
    "sh -c forks": lambda tmp: ["sh", "-c", f"{' '.join(OWN)} {NESTED} 1 2; true"],
    "nice": lambda tmp: ["env", *OWN, "nice", str(NESTED), "1", "2"],
    "shim": lambda tmp: [str(shim(tmp)), "1", "2"],
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_wrapped_command_is_traced_as_the_program_it_runs(tracer, receiver, tmp_path, wrapper):
    """The wrapper sets OTEL_SERVICE_NAME and TRACEPARENT and execs (or forks) nested: its spans carry nested's
    identity, its command line and that trace, whatever ran first in its pid."""
    truth_file = tmp_path / "truth.txt"
    argv = WRAPPERS[wrapper](tmp_path)
    t = tracer(["trace", str(NESTED), *IN_NESTED, "--", *argv], NESTED_GROUND_TRUTH=str(truth_file),
               **traces_to(receiver))
    assert t.finish() == 0, t.stderr
    truth = parse(truth_file.read_text())
    calls = sum(call.fn in IN_NESTED for call in truth.calls)
    received = receiver.wait_for_spans(calls)
    assert len(received) == calls
    context = (bytes.fromhex(TRACE_ID), bytes.fromhex(PARENT_ID))
    check_tree(match(received, truth, named(*IN_NESTED)), truth, root_context=lambda call: context)
    resources = {(r["service.name"], r["process.pid"], r["process.executable.path"], tuple(r["process.command_args"]))
                 for r, _ in received}
    assert resources == {("wrapped", truth.pid, str(NESTED.resolve()), (str(NESTED), "1", "2"))}
    command_pid = int(re.search(r" in pid (\d+) and its descendants", t.stderr)[1])
    assert (truth.pid != command_pid) == (wrapper == "sh -c forks"), "only the shell that forks runs nested apart"


def test_a_server_whose_master_forks_workers_traces_every_workers_first_request(tracer, receiver, tmp_path):
    """nginx under -- COMMAND: the master forks two workers; each worker's first request has its SERVER span in
    the caller's trace, with the worker's probed call under it."""
    nginx = Nginx(tmp_path / "nginx")
    try:
        t = traced_nginx(tracer, receiver, nginx)
        check_first_request_of_every_worker(nginx, receiver)
    finally:
        nginx.stop()
    assert t.finish(timeout=60) == 0, t.stderr


def test_system_wide_a_server_started_later_is_followed_from_its_exec(tracer, receiver, tmp_path):
    """Tracing every process: nginx starts after the tracer, daemonizes (fork), forks workers; the first request
    of each worker, before any probed call in it, has its SERVER span."""
    nginx = Nginx(tmp_path / "nginx")
    t = tracer(["trace", str(NGINX), NGINX_FUNCTION], **traces_to(receiver))
    t.wait_ready()
    subprocess.run(nginx.argv(foreground=False), check=True, timeout=30)
    try:
        wait_for_port(nginx.port)
        check_first_request_of_every_worker(nginx, receiver)
    finally:
        nginx.stop()
    assert t.finish(signal.SIGINT) == 0, t.stderr


def check_first_request_of_every_worker(nginx: Nginx, receiver) -> None:
    """Requests, each with its own traceparent, until both workers served some (bounded); then every worker's
    first one must be a SERVER span of that worker in that trace, parent of its ngx_http_process_request."""
    sent = 0
    while len({pid for pid, _, _ in nginx.served()}) < 2:
        assert sent < 200, f"one worker served all {sent} requests: {nginx.served()[:3]}"
        assert nginx.get("/", f"00-{sent + 1:032x}-{PARENT_ID}-01") == 200
        sent += 1
    first = {}
    for pid, traceparent, _ in nginx.served():
        first.setdefault(pid, traceparent.split("-")[1])
    spans = receiver.wait_for_spans(2 * sent, timeout=20)
    for pid, trace_id in first.items():
        mine = [(r, s) for r, s in spans if r["process.pid"] == pid and s.trace_id.hex() == trace_id]
        servers = [s for _, s in mine if s.kind == s.SPAN_KIND_SERVER]
        assert len(servers) == 1, f"worker {pid}: no SERVER span for its first request ({len(mine)} spans)"
        assert servers[0].parent_span_id.hex() == PARENT_ID
        functions = [s for _, s in mine if s.name == NGINX_FUNCTION]
        assert [s.parent_span_id for s in functions] == [servers[0].span_id]
        assert {r["service.name"] for r, _ in mine} == {"nginx"}


def test_several_pids_and_the_processes_they_fork(tracer, receiver, tmp_path):
    """--pid of two running nested processes, which fork once the tracer is there: all four are traced, each
    under its own pid."""
    gate = tmp_path / "go"
    runs = [subprocess.Popen([str(NESTED), "1", "1"], env=clean_env(
        NESTED_GROUND_TRUTH=str(tmp_path / f"parent{i}"), NESTED_FORK_TRUTH=str(tmp_path / f"child{i}"),
        NESTED_WAIT_FOR=str(gate))) for i in range(2)]
    try:
        wait_until(lambda: all((tmp_path / f"parent{i}").exists() for i in range(2)), "the pid lines", 10)
        t = tracer(["trace", str(NESTED), "handle_request", "--pid", str(runs[0].pid), "--pid", str(runs[1].pid)],
                   **traces_to(receiver))
        t.wait_ready()
        gate.touch()
        assert [r.wait(30) for r in runs] == [0, 0]
        pids = sorted(parse((tmp_path / f"{who}{i}").read_text()).pid for who in ("parent", "child") for i in range(2))
        received = receiver.wait_for_spans(4)
        assert sorted(r["process.pid"] for r, _ in received) == pids
        assert t.finish(signal.SIGINT) == 0, t.stderr
    finally:
        for r in runs:
            r.kill()


def test_a_pid_that_does_not_map_the_binary_is_refused(tracer):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        t = tracer(["trace", str(NESTED), "fib", "--pid", str(sleeper.pid)])
        assert t.finish() == 2
        assert t.stderr.startswith(f"otel-ebpf: error: pid {sleeper.pid} runs /usr/bin/sleep, which does not map")
        assert len(t.stderr.splitlines()) == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_command_that_never_runs_the_binary_is_told_so(tracer):
    t = tracer(["trace", str(NESTED), "fib", "--", "sh", "-c", "true; /bin/true"])
    assert t.finish() == 0
    last = t.stderr.splitlines()[-1]
    assert "0 spans exported" in last and "no probed function was called" in last
    assert "/usr/bin/dash" in last or "/bin/true" in last or "/usr/bin/true" in last, last


def test_the_export_off_summary_does_not_claim_an_export(tracer):
    t = tracer(["trace", str(NESTED), "fib", "--", str(NESTED), "1", "1"], OTEL_TRACES_EXPORTER="none",
               NESTED_GROUND_TRUTH="/dev/null")
    assert t.finish() == 0
    assert "spans made, none exported (OTEL_TRACES_EXPORTER=none)" in t.stderr.splitlines()[-1]


def test_a_binary_seen_only_in_another_mount_namespace(tracer, receiver, tmp_path):
    """The target runs /app/nested, a path that exists only in its own mount namespace (a bind mount made by
    `unshare -m`): otel-ebpf names it as the process sees it, through /proc/PID/root."""
    app = Path(f"/tmp/oe-app-{os.getpid()}")
    gate, truth_file = tmp_path / "go", tmp_path / "truth.txt"
    script = f"mkdir -p {app} && mount --bind {NESTED.parent} {app} && exec {app}/nested 1 1"
    target = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              env=clean_env(NESTED_GROUND_TRUTH=str(truth_file), NESTED_WAIT_FOR=str(gate)))
    try:
        wait_until(lambda: truth_file.exists() and truth_file.read_text().startswith("pid "), "nested to start", 10)
        assert not (app / "nested").exists(), "the bind mount must not be visible outside its namespace"
        t = tracer(["trace", f"{app}/nested", "handle_request", "--pid", str(target.pid)], **traces_to(receiver))
        t.wait_ready()
        gate.touch()
        assert target.wait(30) == 0
        truth = parse(truth_file.read_text())
        (resource, span), = receiver.wait_for_spans(1)
        assert (resource["process.pid"], span.name) == (truth.pid, "handle_request")
        assert t.finish(signal.SIGINT) == 0, t.stderr
    finally:
        target.kill()
        target.wait()
        if app.exists():
            app.rmdir()


@pytest.mark.parametrize("backend", ["up", "down"])
def test_sigterm_ends_within_the_shutdown_timeout(tracer, receiver, tmp_path, backend):
    """SIGTERM while spans wait: the probes go first, what is left is exported or spooled, and the summary is
    printed, all within OTEL_EBPF_SHUTDOWN_TIMEOUT (3 s here); with the backend down, the spool keeps them."""
    spool = tmp_path / "spool"
    endpoint = receiver.http_endpoint if backend == "up" else "http://127.0.0.1:1/v1/traces"
    t = tracer(["trace", str(NESTED), *IN_NESTED], OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint,
               OTEL_EBPF_SHUTDOWN_TIMEOUT="3000", OTEL_BSP_SCHEDULE_DELAY="60000", OTEL_EBPF_SPOOL_DIR=str(spool),
               OTEL_EXPORTER_OTLP_TIMEOUT="60000")
    t.wait_ready()
    run = subprocess.run([str(NESTED), "2", "3"], env=clean_env(NESTED_GROUND_TRUTH=str(tmp_path / "truth.txt")),
                         timeout=30)
    assert run.returncode == 0
    calls = sum(call.fn in IN_NESTED for call in parse((tmp_path / "truth.txt").read_text()).calls)
    started = time.monotonic()
    assert t.finish(signal.SIGTERM, timeout=30) == 0, t.stderr
    took = time.monotonic() - started
    # 3 s of deadline, plus what exiting takes after it (closing the gRPC and HTTP clients, the interpreter).
    assert took < 4.5, f"shutdown took {took:.1f}s"
    last = t.stderr.splitlines()[-1]
    if backend == "up":
        assert f"{calls} spans exported, 0 lost" in last, t.stderr
        assert len(receiver.spans()) == calls
    else:
        assert f"{calls} spans kept in {spool}" in last, t.stderr


def test_a_burst_of_signals_still_ends_in_one_clean_shutdown(tracer):
    """Supervisors and shells may send SIGTERM and SIGINT several times: the handler must never block on a lock the
    interrupted code holds (a threading.Event did, and the tracer hung)."""
    t = tracer(["trace", str(NESTED), "fib"], OTEL_TRACES_EXPORTER="none")
    t.wait_ready()
    for i in range(50):
        t.proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
    assert t.finish(timeout=30) == 0, t.stderr
    assert t.stderr.splitlines()[-1].startswith("otel-ebpf: 0 spans made")
