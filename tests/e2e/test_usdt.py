"""USDT probes and Python functions: real uprobes on examples/markers (<sys/sdt.h>, a semaphore-guarded probe),
examples/pyprobes (CPython's probe ABI, both probes firing) and Debian's /usr/bin/python3.11, checked against
what the programs print about themselves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import clean_env
from tests.e2e.spancheck import attributes
from tests.ground_truth import BUILD_DIR

MARKERS = BUILD_DIR / "markers"
PYPROBES = BUILD_DIR / "pyprobes"
PYTHON311 = "/usr/bin/python3.11"
# The kernel's and the program's CLOCK_MONOTONIC readings, converted to Unix time by the tracer: how far apart
# they may seem (see spancheck.CLOCK_SLACK_NS).
CLOCK_SLACK_NS = 50_000


def otlp(receiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}


def events(text: str, kind: str) -> list[dict[str, str]]:
    return [dict(field.split("=", 1) for field in line.split()[1:])
            for line in text.splitlines() if line.startswith(kind + " ")]


def monotonic_offset() -> int:
    """Unix minus monotonic time on this machine: turns the programs' CLOCK_MONOTONIC readings into span time."""
    return time.time_ns() - time.monotonic_ns()


@pytest.mark.parametrize("mode", ["auto", "perf", "tracefs"])
def test_usdt_probes_a_pair_and_a_semaphore_guarded_one(tracer, receiver, mode):
    """request__start/request__done as one span per request from start to done, with the start's arguments;
    cache__miss as a zero-length span under it, its key only built because the kernel set the semaphore (in
    each attach mode: a multi-uprobe link's ref_ctr_offsets, a perf event's config, a tracefs definition);
    both under the probed handle(), around the probed lookup()."""
    t = tracer(["trace", str(MARKERS), "handle", "lookup", "usdt:app:request__start(id:int, path:str)",
                "usdt:app:request__done", "usdt:app:cache__miss(key:str, id:int)", "--", str(MARKERS), "6"],
               OTEL_EBPF_ATTACH=mode, **otlp(receiver))
    assert t.finish() == 0, t.stderr
    starts, dones, misses = (events(t.stdout, kind) for kind in ("start", "done", "miss"))
    assert len(starts) == len(dones) == 6 and [m["id"] for m in misses] == ["1", "3", "5"]
    assert "skipped" not in t.stdout, "the semaphore was 0 while traced"
    received = receiver.wait_for_spans(6 * 3 + 3)
    assert len(received) == 21, t.stderr
    spans = {}
    for _, span in sorted(received, key=lambda item: item[1].start_time_unix_nano):
        spans.setdefault(span.name, []).append(span)
    requests, handles, lookups = spans["app:request"], spans["handle"], spans["lookup"]
    offset = monotonic_offset()
    for request, handle, lookup, start, done in zip(requests, handles, lookups, starts, dones):
        assert {k: v for k, v in attributes(request).items() if not k.startswith(("code.", "thread."))} == {
            "id": int(start["id"]), "path": start["path"]}
        assert request.parent_span_id == handle.span_id and lookup.parent_span_id == request.span_id
        # Each line is printed between the program's reading and its probe.
        assert -CLOCK_SLACK_NS <= request.start_time_unix_nano - offset - int(start["ns"]) < 2_000_000
        assert -CLOCK_SLACK_NS <= request.end_time_unix_nano - offset - int(done["ns"]) < 2_000_000
    by_id = {int(attributes(r)["id"]): r for r in requests}
    for miss, event in zip(spans["app:cache__miss"], misses):
        assert miss.start_time_unix_nano == miss.end_time_unix_nano
        assert miss.parent_span_id == by_id[int(event["id"])].span_id
        assert attributes(miss)["key"] == event["key"] and attributes(miss)["id"] == int(event["id"])


def test_a_semaphore_is_set_in_a_running_process_and_only_while_traced(tracer, receiver, tmp_path):
    """Untraced, markers skips building the key; traced with --pid, the kernel raises the semaphore in the
    process already running (the uprobe's ref_ctr_offset) and the probe fires."""
    alone = subprocess.run([str(MARKERS), "4"], capture_output=True, text=True, timeout=30)
    assert [e["id"] for e in events(alone.stdout, "skipped")] == ["1", "3"] and "miss " not in alone.stdout
    gate = tmp_path / "gate"
    target = subprocess.Popen([str(MARKERS), "4"], stdout=subprocess.PIPE, text=True,
                              env=clean_env(MARKERS_WAIT_FOR=str(gate)))
    try:
        t = tracer(["trace", str(MARKERS), "usdt:app:cache__miss(key:str)", "--pid", str(target.pid)],
                   **otlp(receiver))
        t.wait_ready()
        gate.touch()
        out, _ = target.communicate(timeout=30)
        received = receiver.wait_for_spans(2)
        t.finish(2)
    finally:
        if target.poll() is None:
            target.kill()
    assert [e["key"] for e in events(out, "miss")] == ["item:1:v7", "item:3:v21"]
    assert sorted(attributes(span)["key"] for _, span in received) == ["item:1:v7", "item:3:v21"]


def test_python_functions_nest_with_names_files_and_lines(tracer, receiver):
    """py:FILE:NAME over CPython's probe ABI: the kernel keeps app.py's functions and drops util.py's 50 ticks;
    spans named after the function, nested as called (recursion included), each return paired with its own
    entry: a return whose entry was never reported ends nothing and is counted."""
    t = tracer(["trace", str(PYPROBES), "py:app.py:*", "--", str(PYPROBES)], **otlp(receiver))
    assert t.finish() == 0, t.stderr
    calls = [c for c in events(t.stdout, "call") if c["file"] == "app.py"]
    assert len(calls) == 10
    received = receiver.wait_for_spans(len(calls))
    assert len(received) == len(calls), t.stderr
    assert "3 Python calls returned without their entry reported" in t.stderr
    spans = sorted((span for _, span in received), key=lambda s: s.start_time_unix_nano)
    ordered = sorted(calls, key=lambda c: int(c["start"]))
    ids = {}
    offset = monotonic_offset()
    for span, call in zip(spans, ordered):
        attrs = attributes(span)
        assert (span.name, attrs["code.function.name"], attrs["code.file.path"], attrs["code.line.number"]) == (
            call["name"], call["name"], "app.py", int(call["line"]))
        assert span.start_time_unix_nano - offset <= int(call["start"]) + CLOCK_SLACK_NS
        assert span.end_time_unix_nano - offset >= int(call["end"]) - CLOCK_SLACK_NS
        ids[span.span_id] = (span, int(call["depth"]))
    for span, depth in ids.values():
        parent_depth = ids[span.parent_span_id][1] if span.parent_span_id else -1
        assert parent_depth == depth - 1, span.name
    assert [s.name for s in spans].count("fact") == 3


def test_debian_python311_filters_in_the_kernel_and_says_what_it_cannot_see(tracer, receiver, tmp_path):
    """On the real python3.11: of a program's 7 handle_* calls among 200 others, exactly those 7 pass the
    kernel's filter; python3.11 reports their returns but not their entries (gh-98894), so each is either a
    span or counted as such, never anything else."""
    app = tmp_path / "app.py"
    app.write_text("def other(i):\n    return i + 1\n\ndef handle_one(i):\n    return other(i) * 2\n\n"
                   "total = sum(other(i) for i in range(193))\n"
                   "total += sum(handle_one(i) for i in range(7))\nprint('calls', 7)\n")
    t = tracer(["trace", PYTHON311, "py:*/app.py:handle_*", "--", PYTHON311, str(app)], **otlp(receiver))
    assert t.finish() == 0, t.stderr
    unpaired = re.search(r"(\d+) Python calls returned without their entry reported", t.stderr)
    exported = int(re.search(r"(\d+) spans exported", t.stderr)[1])
    assert exported + (int(unpaired[1]) if unpaired else 0) == 7, t.stderr
    assert all(span.name == "handle_one" for _, span in receiver.spans())


def test_a_python_without_probes_is_one_line_and_exit_2():
    """The pyenv python3 first on PATH was built without --with-dtrace."""
    executable = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"], capture_output=True,
                                text=True, check=True).stdout.strip()
    real = os.path.realpath(executable)
    assert real != os.path.realpath(PYTHON311), "this machine's python3 is Debian's: the test needs pyenv's"
    result = subprocess.run([sys.executable, "-m", "otel_ebpf", "trace", real, "py:main", "--", "true"],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "has no python:function__entry and python:function__return USDT probes" in result.stderr
    assert "/usr/bin/python3.11" in result.stderr
