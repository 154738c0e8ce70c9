"""otel-ebpf attached with real uprobes to the real example, spans received by a real OTLP receiver."""

import os
import signal
import subprocess

import pytest

from tests.e2e.conftest import clean_env
from tests.e2e.spancheck import check_tree, frozen, match, named
from tests.ground_truth import LIBGREET, NESTED, expected_counts, parse

IN_NESTED = ("handle_request", "parse_request", "compute", "fib")


def endpoint_env(receiver, protocol: str) -> dict[str, str]:
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}


def run_nested(tmp_path, name: str, threads: int, requests: int, **env: str) -> subprocess.Popen:
    truth = tmp_path / f"{name}.txt"
    return subprocess.Popen([str(NESTED), str(threads), str(requests)],
                            env=clean_env(NESTED_GROUND_TRUTH=str(truth), **env))


def ground_truth(tmp_path, name: str):
    return parse((tmp_path / f"{name}.txt").read_text())


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_command_every_call_becomes_a_correct_span(tracer, receiver, tmp_path, protocol):
    truth_file = tmp_path / "truth.txt"
    t = tracer(["trace", str(NESTED), *IN_NESTED, "--", str(NESTED), "3", "4"],
               NESTED_GROUND_TRUTH=str(truth_file), NESTED_EXIT_CODE="3", **endpoint_env(receiver, protocol))
    assert t.finish() == 3, t.stderr  # the command's own exit status
    truth = parse(truth_file.read_text())
    counts = expected_counts(3, 4)
    expected = sum(counts[f] for f in IN_NESTED)
    received = receiver.wait_for_spans(expected)
    assert len(received) == expected
    matched = match(received, truth, named(*IN_NESTED))
    check_tree(matched, truth)
    resource = received[0][0]
    assert resource["service.name"] == "nested"
    assert resource["process.executable.path"] == str(NESTED.resolve())
    assert resource["process.command_line"] == f"{NESTED} 3 4"
    assert f"{expected} spans exported, 0 lost" in t.stderr
    assert "Traceback" not in t.stderr


def test_sidecar_traces_every_process_and_shared_libraries(tracer, receiver, tmp_path):
    """`run` with OTEL_EBPF_PROBES over an executable and a shared library, system-wide; SIGTERM flushes."""
    probes = f"{NESTED}:handle_request,fib;{LIBGREET}:greet"
    t = tracer(["run"], OTEL_EBPF_PROBES=probes, OTEL_SERVICE_NAME="checkout",
               OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=e2e", **endpoint_env(receiver, "http/protobuf"))
    t.wait_ready()
    first, second = run_nested(tmp_path, "a", 2, 3), run_nested(tmp_path, "b", 1, 5)
    assert first.wait(30) == 0 and second.wait(30) == 0
    truths = [ground_truth(tmp_path, "a"), ground_truth(tmp_path, "b")]
    traced = named("handle_request", "fib", "greet")
    expected = sum(traced(c) for truth in truths for c in truth.calls)
    received = receiver.wait_for_spans(expected, timeout=10)
    assert t.finish(signal.SIGTERM) == 0, t.stderr
    assert len(receiver.spans()) == expected
    for truth in truths:
        matched = match(received, truth, traced)
        check_tree(matched, truth)
        resources = {frozen(r) for r, _ in matched.values()}
        assert len(resources) == 1, "one resource per process"
        resource = dict(next(iter(resources)))
        assert resource["service.name"] == "checkout" and resource["deployment.environment.name"] == "e2e"
        greet_parents = {s.parent_span_id for (tid, seq), (_, s) in matched.items() if s.name == "greet"}
        handle_ids = {s.span_id for _, s in matched.values() if s.name == "handle_request"}
        assert greet_parents and greet_parents <= handle_ids, "greet() in the library is a child of handle_request"


def test_pid_traces_that_process_only(tracer, receiver, tmp_path):
    # Long enough for the tracer to be ready on a loaded 2-core machine (it took up to 6 s under load).
    target = run_nested(tmp_path, "target", 2, 2, NESTED_START_DELAY_MS="12000")
    t = tracer(["trace", str(NESTED), "fib", "--pid", str(target.pid)], **endpoint_env(receiver, "grpc"))
    t.wait_ready()
    bystander = run_nested(tmp_path, "bystander", 1, 2)
    assert bystander.wait(30) == 0 and target.wait(30) == 0
    truth = ground_truth(tmp_path, "target")
    expected = sum(c.fn == "fib" for c in truth.calls)
    received = receiver.wait_for_spans(expected, timeout=10)
    assert t.finish(signal.SIGINT) == 0, t.stderr
    assert {r["process.pid"] for r, _ in receiver.spans()} == {target.pid}
    check_tree(match(received, truth, named("fib")), truth)


def test_console_without_any_endpoint(tracer, tmp_path):
    truth_file = tmp_path / "truth.txt"
    t = tracer(["trace", str(NESTED), "handle_*", "compute", "--", str(NESTED), "2", "2"],
               NESTED_GROUND_TRUTH=str(truth_file))
    assert t.finish() == 0, t.stderr
    truth = parse(truth_file.read_text())
    lines = t.stdout.splitlines()
    assert len(lines) == 8
    for call in truth.calls:
        if call.fn in ("handle_request", "compute"):
            assert sum(f" {call.fn}  nested pid={truth.pid} tid={call.tid} " in line for line in lines) == 2


def test_unreachable_backend_is_not_fatal(tracer, tmp_path):
    t = tracer(["trace", str(NESTED), *IN_NESTED, "--", str(NESTED), "2", "2"],
               NESTED_GROUND_TRUTH=os.devnull, NESTED_EXIT_CODE="5", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
               OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_TIMEOUT="300",
               OTEL_BSP_EXPORT_TIMEOUT="1500")
    assert t.finish() == 5, t.stderr
    assert "Traceback" not in t.stderr
    assert len(t.stderr_lines) <= 4, t.stderr
    total = sum(expected_counts(2, 2)[f] for f in IN_NESTED)
    assert f"0 spans exported, {total} lost" in t.stderr


def test_calls_deeper_than_max_depth_are_counted_not_exported(tracer, receiver, tmp_path):
    truth_file = tmp_path / "truth.txt"
    t = tracer(["trace", str(NESTED), *IN_NESTED, "--", str(NESTED), "1", "3"],
               NESTED_GROUND_TRUTH=str(truth_file), OTEL_EBPF_MAX_DEPTH="3", **endpoint_env(receiver, "http/protobuf"))
    assert t.finish() == 0, t.stderr
    truth = parse(truth_file.read_text())
    calls = truth.by_key()

    def depth(call):
        d = 0
        while call.parent:
            call = calls[(call.tid, call.parent)]
            d += call.fn in IN_NESTED
        return d

    def shallow(call):
        return call.fn in IN_NESTED and depth(call) < 3

    probed = sum(c.fn in IN_NESTED for c in truth.calls)
    expected = sum(shallow(c) for c in truth.calls)
    received = receiver.wait_for_spans(expected)
    assert len(received) == expected < probed
    assert f"{probed - expected} calls nested deeper than OTEL_EBPF_MAX_DEPTH" in t.stderr
    check_tree(match(received, truth, shallow), truth)
