"""The example programs: nested's ground truth must be right before the
end-to-end tests can judge a tracer by it."""

import os
import re
import subprocess
import time
from collections import Counter, defaultdict

import pytest

from tests.ground_truth import BUILD_DIR, LOOP, NESTED, Call, build_examples, expected_counts, parse


@pytest.fixture(scope="session", autouse=True)
def examples_built():
    build_examples()


def run(program, *args, env=None, timeout=60):
    """Runs a program; returns (pid, exit status, stdout, stderr)."""
    proc = subprocess.Popen(
        [str(program), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    out, err = proc.communicate(timeout=timeout)
    return proc.pid, proc.returncode, out, err


def check_call_tree(calls: list[Call]) -> None:
    """Per thread: seqs are 1..N in start order, parents enclose their children."""
    by_key = {(c.tid, c.seq): c for c in calls}
    assert len(by_key) == len(calls), "a (tid, seq) pair appears twice"
    per_thread = defaultdict(list)
    for call in calls:
        per_thread[call.tid].append(call)
    for tid, thread_calls in per_thread.items():
        thread_calls.sort(key=lambda c: c.seq)
        assert [c.seq for c in thread_calls] == list(range(1, len(thread_calls) + 1))
        starts = [c.start for c in thread_calls]
        assert starts == sorted(starts), f"tid {tid}: seq order is not entry order"
        for call in thread_calls:
            assert call.start <= call.end, call
            if call.parent == 0:
                assert call.fn == "handle_request", call
                continue
            parent = by_key.get((tid, call.parent))
            assert parent is not None, f"parent of {call} missing"
            assert parent.seq < call.seq
            assert parent.start <= call.start and call.end <= parent.end, (parent, call)
            allowed = {"fib": {"compute", "fib"}}.get(call.fn, {"handle_request"})
            assert parent.fn in allowed, (parent, call)


@pytest.mark.parametrize(
    "args, threads, requests",
    [((), 3, 4), ((1, 1), 1, 1), ((4, 5), 4, 5), ((2, 0), 2, 0)],
)
def test_nested_ground_truth_is_consistent(args, threads, requests):
    pid, status, out, err = run(NESTED, *args)
    assert status == 0, err

    assert out.splitlines()[0] == f"pid {pid}"
    assert out.splitlines()[-1].startswith("done calls=")
    truth = parse(out)
    assert truth.pid == pid

    expected = expected_counts(threads, requests)
    assert truth.done == len(truth.calls) == sum(expected.values())
    assert Counter(c.fn for c in truth.calls) == expected

    tids = {c.tid for c in truth.calls}
    assert len(tids) == (threads if requests else 0)
    assert pid not in tids, "work must run on the worker threads, not main"
    handled = Counter(c.tid for c in truth.calls if c.fn == "handle_request")
    assert set(handled.values()) <= {requests}

    check_call_tree(truth.calls)


def test_handle_request_lasts_at_least_its_sleep():
    _, _, out, _ = run(NESTED, 2, 3)
    durations = [c.end - c.start for c in parse(out).calls if c.fn == "handle_request"]
    assert len(durations) == 6
    assert min(durations) >= 1_000_000


def test_start_delay_leaves_time_to_attach():
    delay_ms = 400
    launched = time.time_ns()
    proc = subprocess.Popen(
        [str(NESTED), "1", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "NESTED_START_DELAY_MS": str(delay_ms)},
    )
    first_line = proc.stdout.readline()
    assert first_line == f"pid {proc.pid}\n"
    assert proc.poll() is None, "nested should still be waiting after printing its pid"
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    truth = parse(first_line + rest)
    assert min(c.start for c in truth.calls) >= launched + delay_ms * 1_000_000


def test_exit_code_comes_from_env():
    _, status, out, _ = run(NESTED, 1, 1, env={"NESTED_EXIT_CODE": "7"})
    assert status == 7
    assert parse(out).done == sum(expected_counts(1, 1).values())


@pytest.mark.parametrize("args", [("0",), ("x",), ("-1",), ("2", "y"), ("1", "2", "3")])
def test_nested_rejects_bad_arguments(args):
    _, status, out, err = run(NESTED, *args)
    assert status == 2
    assert out == ""
    assert "usage:" in err


def test_loop_reports_calls_and_cost():
    _, status, out, err = run(LOOP, 100000)
    assert status == 0, err
    match = re.fullmatch(r"loop calls=(\d+) ns_per_call=(\d+\.\d+)\n", out)
    assert match, out
    assert int(match.group(1)) == 100000
    assert 0 < float(match.group(2)) < 1000


def test_loop_in_threads_counts_every_call():
    _, status, out, err = run(LOOP, "25000", "4")
    assert status == 0, err
    assert re.fullmatch(r"loop calls=100000 ns_per_call=\d+\.\d+\n", out), out


def test_many_calls_each_of_its_500_functions():
    _, status, out, err = run(BUILD_DIR / "many", "2")
    assert (status, out) == (0, "many calls=1000\n"), err
    names = subprocess.run(["nm", str(BUILD_DIR / "many")], capture_output=True, text=True, check=True).stdout
    assert len(re.findall(r" T many_\d+$", names, re.MULTILINE)) == 500


@pytest.mark.parametrize("args", [(), ("x",), ("-5",), ("1", "0"), ("1", "65"), ("1", "2", "3")])
def test_loop_rejects_bad_arguments(args):
    _, status, out, err = run(LOOP, *args)
    assert status == 2
    assert out == ""
    assert "usage:" in err


def test_parse_reads_every_field():
    truth = parse(
        "pid 42\n"
        "call fn=fib tid=43 seq=2 parent=1 start=100 end=200\n"
        "some tracer chatter\n"
        "call fn=compute tid=43 seq=1 parent=0 start=50 end=300\n"
        "done calls=2\n"
    )
    assert truth.pid == 42
    assert truth.done == 2
    assert truth.calls == [
        Call("fib", 43, 2, 1, 100, 200),
        Call("compute", 43, 1, 0, 50, 300),
    ]
    assert truth.by_key()[(43, 1)].fn == "compute"


@pytest.mark.parametrize(
    "text, error",
    [
        ("call fn=fib tid=1 seq=1 parent=0 start=1 end=2\ndone calls=1\n", "no pid line"),
        ("pid 1\n", "no done line"),
        ("pid 1\npid 2\ndone calls=0\n", "second pid line"),
        ("pid 1\ncall fn=fib tid=1 seq=1\ndone calls=1\n", "line 2: malformed call"),
        ("pid x\ndone calls=0\n", "line 1: malformed pid"),
    ],
)
def test_parse_rejects_broken_output(text, error):
    with pytest.raises(ValueError, match=error):
        parse(text)
