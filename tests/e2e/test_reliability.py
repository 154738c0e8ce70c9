"""Reliability of a long-running sidecar (issue "reliability"): target churn, sustained load, shutdown.

Every test probes its own copies of the example binaries (a uprobe belongs to a file's inode): other tests
running at the same time trace examples/build/* system-wide, and neither must see the other's processes;
what the kernel reports here (call stacks, uprobe_events, breakpoints in memory) is then about ours alone.

The figures each test measured (processes, durations, memory) are printed: run with -s to see them.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest
from elftools.elf.elffile import ELFFile

from otel_ebpf.processes import EXITED_GRACE_S
from tests.e2e.conftest import Lines, Tracer, clean_env
from tests.e2e.spancheck import check_tree, frozen, match, shutdown_summary
from tests.ground_truth import (
    BUILD_DIR,
    LIBGREET,
    LOOP,
    NESTED,
    GroundTruth,
    expected_counts,
    parse,
)
from tests.otlp_receiver import OtlpReceiver

LIFECYCLE = BUILD_DIR / "lifecycle"
NESTED_FUNCTIONS = ("handle_request", "parse_request", "compute", "fib")
LIFECYCLE_FUNCTIONS = ("outer", "inner")
CALL_STACKS = "otel_ebpf.call_stacks"
INT3 = 0xCC  # what a uprobe writes over the first byte of the probed instruction (x86)
LOOP_LINE = re.compile(r"loop calls=(\d+) ns_per_call=([0-9.]+)")


# ----- private copies of the examples


@dataclass(frozen=True)
class Binaries:
    nested: Path
    libgreet: Path  # next to nested, which finds it through its rpath $ORIGIN
    loop: Path
    lifecycle: Path

    @property
    def nested_probes(self) -> str:
        return f"{self.nested}:{','.join(NESTED_FUNCTIONS)};{self.libgreet}:greet"

    @property
    def lifecycle_probes(self) -> str:
        return f"{self.lifecycle}:{','.join(LIFECYCLE_FUNCTIONS)}"

    @property
    def directory(self) -> Path:
        return self.nested.parent


def copy_examples(directory: Path) -> Binaries:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [shutil.copy2(source, directory) for source in (NESTED, LIBGREET, LOOP, LIFECYCLE)]
    return Binaries(*(Path(p).resolve() for p in paths))


@pytest.fixture
def binaries(tmp_path) -> Binaries:
    return copy_examples(tmp_path / "bin")


# ----- the sidecar and what it exports


def otlp_env(receiver: OtlpReceiver, metrics_interval_ms: int | None = None,
             protocol: str = "http/protobuf") -> dict[str, str]:
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    if metrics_interval_ms is not None:
        env.update(OTEL_METRICS_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=receiver.http_metrics_endpoint,
                   OTEL_METRIC_EXPORT_INTERVAL=str(metrics_interval_ms))
    return env


def start_sidecar(probes: str, **env: str) -> Tracer:
    """`otel-ebpf run`, system-wide, waited for until it says it is tracing."""
    sidecar = Tracer(["run"], clean_env(OTEL_EBPF_PROBES=probes, **env))
    try:
        sidecar.wait_ready(120)
    except BaseException:
        stop(sidecar)
        raise
    return sidecar


def stop(sidecar: Tracer) -> None:
    if sidecar.proc.poll() is None:
        sidecar.proc.kill()
        sidecar.proc.wait()


def by_pid(received) -> dict[int, list]:
    groups = defaultdict(list)
    for resource, span in received:
        groups[resource["process.pid"]].append((resource, span))
    return groups


def wait_for_pid_spans(receiver: OtlpReceiver, expected: dict[int, int], timeout: float,
                       since_ns: int = 0) -> dict[int, list]:
    """Spans of each pid (those starting at or after since_ns), once every pid has at least its expected
    count; fails with the shortfall otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        groups = by_pid((r, s) for r, s in receiver.spans() if s.start_time_unix_nano >= since_ns)
        short = {pid: (len(groups.get(pid, [])), n) for pid, n in expected.items() if len(groups.get(pid, [])) < n}
        if not short:
            return groups
        assert time.monotonic() < deadline, (
            f"{len(short)} of {len(expected)} processes short of spans after {timeout}s, (received, expected) "
            f"by pid: {dict(list(short.items())[:10])}")
        time.sleep(0.2)


def call_stacks_since(receiver: OtlpReceiver, since_ns: int) -> list[int]:
    """The call_stacks gauge of every metrics export read at or after since_ns, in order."""
    return [point.as_int for _, metric in receiver.metrics() if metric.name == CALL_STACKS
            for point in metric.gauge.data_points if point.time_unix_nano >= since_ns]


def wait_call_stacks(receiver: OtlpReceiver, expected: int, timeout: float = 10) -> list[int]:
    """Waits for an export read from now on in which the kernel keeps `expected` call stacks; returns the
    values seen. The kernel deletes a stack when its thread exits, before waitpid() can return; nothing else
    shrinks the map here (its LRU evicts only when full), so a dead thread's stack that is not deleted then
    keeps the gauge above `expected` for good."""
    since = time.time_ns()
    deadline = time.monotonic() + timeout
    while True:
        seen = call_stacks_since(receiver, since)
        if expected in seen:
            return seen
        assert time.monotonic() < deadline, f"call_stacks never {expected} in {timeout}s; exported values: {seen}"
        time.sleep(0.05)


# ----- example programs


def run_nested(binaries: Binaries, truth_file: Path, threads: int, requests: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(binaries.nested), str(threads), str(requests)],
                            env=clean_env(NESTED_GROUND_TRUTH=str(truth_file), **env))


def parse_unfinished(text: str) -> GroundTruth:
    """The ground truth of a program that never printed its `done` line (killed, crashed)."""
    if not re.search(r"^done ", text, re.MULTILINE):
        text += f"done calls={len(re.findall(r'^call ', text, re.MULTILINE))}\n"
    return parse(text)


class Lifecycle:
    """examples/lifecycle in a child process, stdin a pipe, stdout collected line by line."""

    def __init__(self, binaries: Binaries, mode: str, threads: int):
        self.proc = subprocess.Popen([str(binaries.lifecycle), mode, str(threads)], env=clean_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.out = Lines(self.proc.stdout)

    def send_line(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Closes stdin (the end of file every mode waits for at its end), waits, returns (status, output)."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.proc.wait(timeout), self.out.text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


class PidReuse:
    """Runs programs under a pid chosen by the test, the pid of a process that just ended: the kernel hands out
    ns_last_pid + 1 next (root may set it). On exit, ns_last_pid goes back to where it was, so that the rest of
    the machine's processes do not get recently used pids because of us."""

    def __enter__(self) -> Self:
        self._last = int(NS_LAST_PID.read_text())
        return self

    def __exit__(self, *exc) -> None:
        NS_LAST_PID.write_text(str(max(self._last, int(NS_LAST_PID.read_text()))))

    @staticmethod
    def spawn(pid: int, argv: list[str], env: dict[str, str], attempts: int = 50) -> subprocess.Popen:
        """argv in a process whose pid is `pid` (which must be free: its previous owner reaped); a shell
        execs argv only if it got `pid`, and is tried again if another process was quicker."""
        for _ in range(attempts):
            NS_LAST_PID.write_text(str(pid - 1))
            proc = subprocess.Popen(["/bin/sh", "-c", f'[ "$$" = {pid} ] && exec "$@"; exit 97', "sh", *argv],
                                    env=env)
            if proc.pid == pid:
                return proc
            proc.wait()
        raise AssertionError(f"other processes took pid {pid} {attempts} times in a row")


def function_file_offset(binary: Path, name: str) -> int:
    """Where function `name` starts in the file, from its symbol and the PT_LOAD segment holding it."""
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        [symbol] = [s for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name == name]
        for segment in elf.iter_segments("PT_LOAD"):
            if segment["p_vaddr"] <= symbol["st_value"] < segment["p_vaddr"] + segment["p_filesz"]:
                return symbol["st_value"] - segment["p_vaddr"] + segment["p_offset"]
    raise AssertionError(f"{name} is in no PT_LOAD segment of {binary}")


def live_first_byte(pid: int, binary: Path, file_offset: int, timeout: float = 10) -> int:
    """The first byte of the instruction at `file_offset` of `binary` as process `pid` sees it in memory (once
    the process has mapped it, waiting up to timeout): a registered uprobe shows as an int3 there, in every
    process that maps the file."""
    deadline = time.monotonic() + timeout
    while (byte := _live_first_byte(pid, binary, file_offset)) is None:
        assert time.monotonic() < deadline, f"process {pid} does not map offset {file_offset:#x} of {binary}"
        time.sleep(0.05)
    return byte


def _live_first_byte(pid: int, binary: Path, file_offset: int) -> int | None:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(binary):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            if offset <= file_offset < offset + (end - start):
                with open(f"/proc/{pid}/mem", "rb") as mem:
                    mem.seek(start + file_offset - offset)
                    return mem.read(1)[0]
    return None


def run_loop(binaries: Binaries, calls: int, timeout: float = 120) -> float:
    """ns_per_call of `loop CALLS`, as the program measures it."""
    result = subprocess.run([str(binaries.loop), str(calls)], capture_output=True, text=True, timeout=timeout,
                            env=clean_env(), check=False)
    assert result.returncode == 0, result.stderr
    found = LOOP_LINE.fullmatch(result.stdout.strip())
    assert found and int(found.group(1)) == calls, result.stdout
    return float(found.group(2))


def sidecar_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, KiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def our_uprobe_events(directory: Path) -> list[str]:
    """Lines of the kernel's uprobe_events that name a file of ours (BCC falls back to them when it cannot
    create a uprobe through perf_event_open; they outlive the process that made them unless it removes them)."""
    return [line for line in Path("/sys/kernel/tracing/uprobe_events").read_text().splitlines()
            if str(directory) in line]


# How much longer than the program's own measurement a span may be when more threads are runnable than there
# are CPUs (ours and other tests'): a thread preempted between the uprobe and the function's first
# clock read (or its last one and the return probe) is charged the wait. The start and end bounds stay exact.
# It absorbs that wait while six processes at a time start, run up to four threads each and exit beside the
# sidecar and the receiver (measured, 6 runs of `nested 3 10` at a time: max 3.1 ms in 45600 calls); nothing
# tighter, because the wait grows with the runnable threads, which these tests raise on purpose.
CONTENDED_SLACK_NS = 50_000_000


def match_all(received, truth: GroundTruth) -> dict:
    """spancheck.match for a program all of whose functions are probed, on this contended machine."""
    return match(received, truth, lambda call: True, overhead_slack_ns=CONTENDED_SLACK_NS)


def overhead_ns(matched, truth: GroundTruth) -> list[int]:
    """Per matched call: how much longer its span is than the program's own measurement."""
    calls = truth.by_key()
    return [(s.end_time_unix_nano - s.start_time_unix_nano) - (calls[key].end - calls[key].start)
            for key, (_, s) in matched.items()]


def report(*parts) -> None:
    print("\n[reliability]", *parts)


# =====================================================================================================
# Target churn: one sidecar, hundreds of processes starting and ending under it, some inside probed calls.


CHURN_PROCESSES = 500
CHURN_PARALLEL = 6
CHURN_DEADLINE_S = 120
METRICS_INTERVAL_MS = 200


@dataclass
class ChurnSession:
    sidecar: Tracer
    receiver: OtlpReceiver
    binaries: Binaries
    baseline: int  # call stacks the kernel keeps when none of our processes is alive


@pytest.fixture(scope="class")
def churn(tmp_path_factory):
    binaries = copy_examples(tmp_path_factory.mktemp("churn"))
    with OtlpReceiver() as receiver:
        sidecar = start_sidecar(f"{binaries.nested_probes};{binaries.lifecycle_probes}",
                                **otlp_env(receiver, METRICS_INTERVAL_MS))
        try:
            _, metric = receiver.wait_for_metric(CALL_STACKS, timeout=10)
            baseline = metric.gauge.data_points[0].as_int
            yield ChurnSession(sidecar, receiver, binaries, baseline)
        finally:
            stop(sidecar)


class TestChurn:
    def test_every_call_of_hundreds_of_short_lived_processes_is_a_span(self, churn, tmp_path):
        """500 runs of nested, 6 at a time, all started after the sidecar: every call of every run becomes a
        correct span (ground truth of each run), grouped under that process's own resource; afterwards the
        kernel keeps no call stack for any of them."""
        assert churn.baseline == 0, "nothing has run our copies yet, so no thread can have a call stack"
        started = time.monotonic()
        running: list[tuple[subprocess.Popen, Path, list[str]]] = []
        runs = []

        def reap(entry):
            proc, _, argv = entry
            assert proc.wait(30) == 0, f"{argv} failed"
            runs.append(entry)

        for i in range(CHURN_PROCESSES):
            threads, requests = 1 + i % 3, 1 + (i // 3) % 2
            truth_file = tmp_path / f"run{i}.txt"
            running.append((run_nested(churn.binaries, truth_file, threads, requests), truth_file,
                            [str(churn.binaries.nested), str(threads), str(requests)]))
            if len(running) == CHURN_PARALLEL:
                reap(running.pop(0))
            assert time.monotonic() - started < CHURN_DEADLINE_S, f"only {i} processes started in time"
        for entry in running:
            reap(entry)
        churn_s = time.monotonic() - started

        truths: dict[int, GroundTruth] = {}
        command_lines: dict[int, str] = {}
        for _, truth_file, argv in runs:
            truth = parse(truth_file.read_text())
            assert truth.done == len(truth.calls) > 0
            assert truth.pid not in truths, "a pid came round again within seconds: spans could not be told apart"
            truths[truth.pid], command_lines[truth.pid] = truth, " ".join(argv)
        expected = {pid: len(truth.calls) for pid, truth in truths.items()}
        groups = wait_for_pid_spans(churn.receiver, expected, timeout=60)
        delivered_s = time.monotonic() - started

        worst_overhead = anonymous = 0
        for pid, truth in truths.items():
            assert len(groups[pid]) == expected[pid], f"pid {pid}: {len(groups[pid])} spans for {expected[pid]} calls"
            matched = match_all(groups[pid], truth)
            check_tree(matched, truth)
            worst_overhead = max(worst_overhead, max(overhead_ns(matched, truth)))
            resources = {frozen(r) for r, _ in groups[pid]}
            assert len(resources) == 1, f"pid {pid}: {len(resources)} resources"
            resource = dict(next(iter(resources)))
            assert resource["process.pid"] == pid
            assert resource["process.executable.path"] == str(churn.binaries.nested)
            assert resource["service.name"] == "nested"
            anonymous += resource["process.command_line"] != command_lines[pid]
        seen = wait_call_stacks(churn.receiver, churn.baseline)
        report(f"churn: {len(runs)} processes ({CHURN_PARALLEL} at a time) "
               f"in {churn_s:.1f}s, {sum(expected.values())} spans, all received {delivered_s:.1f}s after the "
               f"first start; longest span minus its call {worst_overhead / 1e6:.2f} ms; call_stacks afterwards {seen}")
        assert anonymous == 0, f"{anonymous} processes exported without their own command line"

    @pytest.mark.parametrize("mode, status", [("block", -signal.SIGKILL), ("abort", -signal.SIGABRT)],
                             ids=["sigkill", "abort"])
    def test_process_ending_inside_probed_calls_leaves_no_stack(self, churn, tmp_path, mode, status):
        """A process whose 4 threads are all inside probed calls when it is killed (SIGKILL) or crashes
        (abort() in one of them): the kernel forgets their 4 stacks, no span is made up for the calls that
        never returned, and a process that gets the same pid and the same tids next is traced correctly
        (a stale entry would make its first calls children of the dead ones)."""
        target = Lifecycle(churn.binaries, mode, 3)
        try:
            target.out.wait_for("ready", timeout=30)
            dead_tids = {int(m) for m in re.findall(r"^inside tid=(\d+)$", "".join(target.out.lines), re.MULTILINE)}
            assert len(dead_tids) == 4
            during = wait_call_stacks(churn.receiver, churn.baseline + 4)  # the gauge does see them
            pid = target.proc.pid
            if mode == "block":
                target.proc.send_signal(signal.SIGKILL)
            else:
                target.send_line()  # main's inner() calls abort()
            code, output = target.finish()
        finally:
            target.kill()
        assert code == status
        after = wait_call_stacks(churn.receiver, churn.baseline)

        truth = parse_unfinished(output)
        assert len(truth.calls) == 8  # outer() and inner() once on each thread before they got stuck
        wait_for_pid_spans(churn.receiver, {pid: 8}, timeout=10)
        # Positive control: a run started after the death goes through the same ring buffer, drain loop and
        # batches behind anything made up for the dead calls, so once its spans are in, such spans would be too.
        since, control_file = time.time_ns(), tmp_path / "control.txt"
        assert run_nested(churn.binaries, control_file, 1, 1).wait(30) == 0
        control = parse(control_file.read_text())
        wait_for_pid_spans(churn.receiver, {control.pid: len(control.calls)}, timeout=10, since_ns=since)
        groups = by_pid(churn.receiver.spans())
        assert len(groups[pid]) == 8, "spans for calls that never returned"
        check_tree(match_all(groups[pid], truth), truth)

        # The same pid and (most likely) the same tids again, in a process of another program.
        reused = False
        for attempt in range(3):
            since = time.time_ns()
            truth_file = tmp_path / f"next{attempt}.txt"
            argv = [str(churn.binaries.nested), "3", "2"]
            with PidReuse() as reuse:  # ns_last_pid restored once it ran: its threads had the next pids
                successor = reuse.spawn(pid, argv, clean_env(NESTED_GROUND_TRUTH=str(truth_file)))
                assert successor.wait(30) == 0
            next_truth = parse(truth_file.read_text())
            groups = wait_for_pid_spans(churn.receiver, {pid: len(next_truth.calls)}, timeout=10, since_ns=since)
            check_tree(match_all(groups[pid], next_truth), next_truth)
            reused = {c.tid for c in next_truth.calls} & dead_tids
            if reused:
                break
        assert reused, f"no thread of the successor got a dead thread's tid {sorted(dead_tids)}"
        report(f"{mode}: call_stacks {during} while 4 threads were inside, {after} after the end; pid {pid} and "
               f"tids {sorted(reused)} reused by nested (attempt {attempt + 1}), its {len(next_truth.calls)} spans "
               f"correct")

    def test_thread_dying_inside_a_probed_call_leaves_no_stack(self, churn):
        """Threads that end with pthread_exit() inside probed calls, in a process that lives on: their stacks
        go with them, and new threads that get their tids are traced correctly."""
        target = Lifecycle(churn.binaries, "thread-exit", 4)
        try:
            target.out.wait_for("exited", timeout=30)
            dead_tids = {int(m) for m in re.findall(r"^inside tid=(\d+)$", "".join(target.out.lines), re.MULTILINE)}
            assert len(dead_tids) == 4
            after_exit = wait_call_stacks(churn.receiver, churn.baseline)  # main made no probed call
            target.send_line()
            target.out.wait_for("done", timeout=30)
            while_alive = wait_call_stacks(churn.receiver, churn.baseline)  # the reusing threads are gone too
            assert target.proc.poll() is None
            code, output = target.finish()
        finally:
            target.kill()
        assert code == 0
        truth = parse(output)
        reused = {int(t) for t, ok in re.findall(r"^reused tid=(\d+) ok=([01])$", output, re.MULTILINE) if ok == "1"}
        assert reused, f"no new thread got a dead thread's tid: {output}"
        assert truth.done == len(truth.calls) >= 4 * 4
        groups = wait_for_pid_spans(churn.receiver, {truth.pid: len(truth.calls)}, timeout=10)
        matched = match_all(groups[truth.pid], truth)
        check_tree(matched, truth)
        report(f"thread-exit: 4 threads died inside inner(); call_stacks {after_exit} after, {while_alive} once "
               f"{len(reused)} new threads had reused their tids ({len(truth.calls)} spans, all correct)")

    def test_a_reused_pid_gets_the_new_process_resource(self, churn, tmp_path):
        """Another program that gets a pid while the sidecar still keeps the identity of its previous owner (for
        EXITED_GRACE_S), and lives ~1 ms: its spans carry its own service.name, executable and command line, not
        the previous owner's; identities are kept per (pid, process_seq), from what the kernel copies at exec."""
        first = Lifecycle(churn.binaries, "block", 1)
        try:
            first.out.wait_for("ready", timeout=30)
            pid = first.proc.pid
            groups = wait_for_pid_spans(churn.receiver, {pid: 4}, timeout=10)
            resource = groups[pid][0][0]
            assert resource["process.command_line"] == f"{churn.binaries.lifecycle} block 1"
        finally:
            first.kill()
        killed = time.monotonic()
        since = time.time_ns()
        truth_file = tmp_path / "truth.txt"
        argv = [str(churn.binaries.nested), "1", "1"]  # one request: a 1 ms sleep and a few short calls
        with PidReuse() as reuse:
            successor = reuse.spawn(pid, argv, clean_env(NESTED_GROUND_TRUTH=str(truth_file),
                                                         OTEL_SERVICE_NAME="successor"))
            assert successor.wait(30) == 0
        truth = parse(truth_file.read_text())
        groups = wait_for_pid_spans(churn.receiver, {pid: len(truth.calls)}, timeout=10, since_ns=since)
        assert time.monotonic() - killed < EXITED_GRACE_S, "the first owner was forgotten before its pid came round"
        check_tree(match_all(groups[pid], truth), truth)
        resources = {frozen(r) for r, _ in groups[pid]}
        assert len(resources) == 1
        resource = dict(next(iter(resources)))
        assert (resource["service.name"], resource["process.executable.path"], resource["process.command_line"]) \
            == ("successor", str(churn.binaries.nested), " ".join(argv))

    def test_hundreds_of_1ms_processes_keep_their_own_identity_and_trace(self, churn, tmp_path):
        """200 runs of `nested 1 1` (about 1 ms of work, then exit), 6 at a time, each started with its own
        OTEL_SERVICE_NAME and TRACEPARENT: every one is exported under its own name and command line, in the
        trace its TRACEPARENT names, its root call a child of that span. The kernel copies what it needs at exec,
        so how long a process lives does not matter."""
        runs, running = {}, []
        for i in range(200):
            trace_id, parent_id = f"{i + 1:032x}", f"{0xABC00 + i:016x}"
            truth_file = tmp_path / f"brief{i}.txt"
            proc = run_nested(churn.binaries, truth_file, 1, 1, OTEL_SERVICE_NAME=f"brief-{i}",
                              TRACEPARENT=f"00-{trace_id}-{parent_id}-01")
            running.append((proc, truth_file, (f"brief-{i}", trace_id, parent_id)))
            if len(running) == CHURN_PARALLEL:
                proc, truth_file, want = running.pop(0)
                assert proc.wait(30) == 0
                runs[truth_file] = want
        for proc, truth_file, want in running:
            assert proc.wait(30) == 0
            runs[truth_file] = want
        truths = [(parse(truth_file.read_text()), want) for truth_file, want in runs.items()]
        groups = wait_for_pid_spans(churn.receiver, {t.pid: len(t.calls) for t, _ in truths}, timeout=60)
        wrong = []
        for truth, (service, trace_id, parent_id) in truths:
            spans = groups[truth.pid]
            context = (bytes.fromhex(trace_id), bytes.fromhex(parent_id))
            check_tree(match_all(spans, truth), truth, root_context=lambda call, context=context: context)
            resource = spans[0][0]
            roots = [span for _, span in spans if span.name == "handle_request"]
            got = (resource["service.name"], resource["process.command_line"], {s.trace_id.hex() for _, s in spans},
                   {s.parent_span_id.hex() for s in roots})
            if got != (service, f"{churn.binaries.nested} 1 1", {trace_id}, {parent_id}):
                wrong.append((truth.pid, service, got))
        assert not wrong, f"{len(wrong)} of {len(truths)} short-lived processes lost their identity: {wrong[:3]}"

    def test_session_ends_with_every_span_accounted_for(self, churn):
        """No call was lost, and no return of a dead thread's call was paired with anything."""
        assert churn.sidecar.finish(signal.SIGINT, timeout=60) == 0, churn.sidecar.stderr
        assert shutdown_summary(churn.sidecar.stderr) == (len(churn.receiver.spans()), 0), churn.sidecar.stderr
        assert "returns without a recorded entry" not in churn.sidecar.stderr
        assert "Traceback" not in churn.sidecar.stderr


# =====================================================================================================
# Load: a tight loop of probed calls through the whole pipeline, for a minute; then a burst that the kernel's
# ring buffer cannot hold.


class CountingReceiver(OtlpReceiver):
    """The OTLP receiver, counting spans by pid instead of keeping them (a soak sends millions); requests with
    a span that `keep(pid, name)` wants are kept whole, as usual."""

    def __init__(self, keep=lambda pid, name: False):
        super().__init__()
        self.counts: Counter = Counter()
        self._keep = keep

    def _receive(self, request, headers, size):
        answer = super()._receive(request, headers, size)
        with self._cond:
            if self.requests and self.requests[-1] is request:
                wanted = False
                for resource_spans in request.resource_spans:
                    pid = next(kv.value.int_value for kv in resource_spans.resource.attributes
                               if kv.key == "process.pid")
                    for scope_spans in resource_spans.scope_spans:
                        self.counts[pid] += len(scope_spans.spans)
                        wanted = wanted or any(self._keep(pid, span.name) for span in scope_spans.spans)
                if not wanted:
                    self.requests.pop()
                self._cond.notify_all()
        return answer


class MemorySampler:
    """(seconds since start, VmRSS KiB, VmHWM KiB) of a process, every `interval_s`, on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.samples: list[tuple[float, int, int]] = []
        self._pid, self._interval_s = pid, interval_s
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self._start, *sidecar_memory_kib(self._pid)))
            except (OSError, KeyError):
                return
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, seconds: float) -> tuple[float, int, int]:
        return min(self.samples, key=lambda sample: abs(sample[0] - seconds))


def wait_until_stable(count, target: int, quiet_s: float, timeout: float) -> None:
    """Until count() reaches target or stops growing for quiet_s (the rest was lost), at most timeout."""
    deadline = time.monotonic() + timeout
    last, last_change = count(), time.monotonic()
    while last < target and time.monotonic() - last_change < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        if (now := count()) != last:
            last, last_change = now, time.monotonic()


SOAK_S = 60
SOAK_LOOP_CALLS = 200_000
WARM_UP_S = 10
RSS_GROWTH_LIMIT_KIB = 8 * 1024


def test_sustained_load_memory_stays_flat_and_every_call_is_accounted_for(binaries):
    """`loop` run back to back for a minute, tick() probed, as fast as the probes let it: the sidecar's
    resident memory after the warm-up stays flat (VmRSS and VmHWM at 10 s vs. at the end), and every call
    arrives as a span or is counted in the summary line. What the pipeline cannot take waits in the kernel's
    ring buffer, so any loss is the ring buffer's, never the sidecar's queue or exporter."""
    with CountingReceiver() as receiver:
        sidecar = start_sidecar(f"{binaries.loop}:tick", **otlp_env(receiver))
        try:
            memory = MemorySampler(sidecar.proc.pid)
            started = time.monotonic()
            calls, runs, ns_per_call = 0, 0, []
            while time.monotonic() - started < SOAK_S:
                ns_per_call.append(run_loop(binaries, SOAK_LOOP_CALLS))
                calls += SOAK_LOOP_CALLS
                runs += 1
            load_s = time.monotonic() - started
            wait_until_stable(lambda: sum(receiver.counts.values()), calls, quiet_s=1.5, timeout=30)
            drained_s = time.monotonic() - started
            memory.stop()
            assert sidecar.finish(signal.SIGINT, timeout=60) == 0, sidecar.stderr
        finally:
            stop(sidecar)
    received = sum(receiver.counts.values())
    exported, lost = shutdown_summary(sidecar.stderr)
    ring_full = re.search(r"(\d+) ring buffer full", sidecar.stderr)
    (t_warm, rss_warm, hwm_warm), (t_end, rss_end, hwm_end) = memory.at(WARM_UP_S), memory.samples[-1]
    report(f"soak: {runs} runs of loop {SOAK_LOOP_CALLS} in {load_s:.0f}s ({calls / load_s:.0f} calls/s, "
           f"ns_per_call {min(ns_per_call):.0f}-{max(ns_per_call):.0f}), {received} spans received "
           f"({received / drained_s:.0f}/s), {lost} lost, all in by {drained_s:.0f}s; sidecar VmRSS "
           f"{rss_warm / 1024:.1f} MiB at {t_warm:.0f}s -> {rss_end / 1024:.1f} MiB at {t_end:.0f}s, VmHWM "
           f"{hwm_warm / 1024:.1f} -> {hwm_end / 1024:.1f} MiB; summary: {sidecar.stderr.splitlines()[-1]}")
    assert len(receiver.counts) == runs, "one process per run"
    assert exported == received and received + lost == calls, sidecar.stderr
    assert lost == (int(ring_full.group(1)) if ring_full else 0), "lost elsewhere than in the ring buffer"
    assert t_end - t_warm >= SOAK_S - WARM_UP_S - 5, "the sampler stopped early"
    assert rss_end - rss_warm <= RSS_GROWTH_LIMIT_KIB, memory.samples
    assert hwm_end - hwm_warm <= RSS_GROWTH_LIMIT_KIB, memory.samples


BURST_CALLS = 100_000


def test_ring_buffer_overflow_is_counted_and_tracing_recovers(binaries, tmp_path):
    """A 64 KiB ring buffer (~900 events) and a tight loop: most calls cannot be recorded. The summary says
    how many (ring buffer full: N), received + lost == calls, and a nested run afterwards is traced
    completely."""
    with CountingReceiver(keep=lambda pid, name: name != "tick") as receiver:
        sidecar = start_sidecar(f"{binaries.loop}:tick;{binaries.nested_probes}", OTEL_EBPF_RING_BUFFER_SIZE="64K",
                                **otlp_env(receiver))
        try:
            loop = subprocess.Popen([str(binaries.loop), str(BURST_CALLS)], stdout=subprocess.PIPE, text=True,
                                    env=clean_env())
            out, _ = loop.communicate(timeout=120)
            assert loop.returncode == 0 and LOOP_LINE.fullmatch(out.strip()), out
            # What the ring buffer held is read within a few polls (50 ms) and exported in 100 ms batches.
            wait_until_stable(lambda: receiver.counts[loop.pid], BURST_CALLS, quiet_s=1, timeout=30)
            arrived = receiver.counts[loop.pid]
            truth_file = tmp_path / "truth.txt"
            run = run_nested(binaries, truth_file, 3, 4)
            assert run.wait(30) == 0
            truth = parse(truth_file.read_text())
            groups = wait_for_pid_spans(receiver, {truth.pid: len(truth.calls)}, timeout=10)
            check_tree(match_all(groups[truth.pid], truth), truth)
            assert sidecar.finish(signal.SIGINT, timeout=60) == 0, sidecar.stderr
        finally:
            stop(sidecar)
    exported, lost = shutdown_summary(sidecar.stderr)
    ring_full = re.search(r"(\d+) ring buffer full", sidecar.stderr)
    assert ring_full, f"no loss to the ring buffer reported: {sidecar.stderr}"
    assert lost == int(ring_full.group(1)) > 0, sidecar.stderr
    assert receiver.counts[loop.pid] == arrived, "loop spans arrived after the nested run"
    assert receiver.counts[loop.pid] + lost == BURST_CALLS
    assert exported == sum(receiver.counts.values()) == arrived + len(truth.calls)
    report(f"overflow: loop {BURST_CALLS} into a 64 KiB ring buffer: {arrived} spans received, {lost} lost "
           f"(summary: {ring_full.group(0)}); nested 3 4 afterwards: all {len(truth.calls)} spans correct")


# =====================================================================================================
# Shutdown: flushing on SIGINT/SIGTERM, nothing left attached, and a sidecar killed outright harms no one.


FLUSH_DEADLINE_S = 10
FLUSH_BATCH = 512


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_flushes_everything_and_leaves_no_probe(binaries, receiver, tmp_path, sig):
    """Spans still queued (a 60 s batch delay) and still in the ring buffer when the signal comes are all
    exported before exit 0, within the deadline; afterwards no uprobe of ours exists: none in uprobe_events,
    no breakpoint in a new process's code, and loop runs at its untraced speed again."""
    fib = function_file_offset(binaries.nested, "fib")
    original = binaries.nested.read_bytes()[fib]
    untraced = min(run_loop(binaries, 2_000_000) for _ in range(3))
    sidecar = start_sidecar(f"{binaries.nested_probes};{binaries.loop}:tick", OTEL_BSP_SCHEDULE_DELAY="60000",
                            OTEL_BSP_MAX_EXPORT_BATCH_SIZE=str(FLUSH_BATCH),
                            OTEL_BSP_EXPORT_TIMEOUT=str(FLUSH_DEADLINE_S * 1000), **otlp_env(receiver))
    try:
        paused = run_nested(binaries, tmp_path / "paused.txt", 1, 1, NESTED_START_DELAY_MS="5000")
        try:
            assert live_first_byte(paused.pid, binaries.nested, fib) == INT3 != original
        finally:
            paused.kill()
            paused.wait()
        traced = run_loop(binaries, 20_000)
        assert traced > 50 * untraced, "the probe on tick() costs nothing? then speed says nothing after"
        truth_file = tmp_path / "truth.txt"
        run = run_nested(binaries, truth_file, 3, 4)
        assert run.wait(30) == 0
        truth = parse(truth_file.read_text())
        expected = 20_000 + len(truth.calls)
        # Full batches go out at once; the last partial one waits in the queue (the 60 s delay), or some of it is
        # still in the ring buffer.
        receiver.wait_for_spans(expected - expected % FLUSH_BATCH, timeout=10)
        before = len(receiver.spans())
        assert before < expected, "nothing left to flush: the test would prove nothing"
        signalled = time.monotonic()
        code = sidecar.finish(sig, timeout=FLUSH_DEADLINE_S + 30)
        exit_s = time.monotonic() - signalled
    finally:
        stop(sidecar)
    assert code == 0, sidecar.stderr
    assert exit_s < FLUSH_DEADLINE_S
    received = receiver.spans()
    assert len(received) == expected
    assert shutdown_summary(sidecar.stderr) == (expected, 0)
    check_tree(match_all(received, truth), truth)

    assert our_uprobe_events(binaries.directory) == []
    after = run_nested(binaries, tmp_path / "after.txt", 1, 1, NESTED_START_DELAY_MS="5000")
    try:
        assert live_first_byte(after.pid, binaries.nested, fib) == original
    finally:
        after.kill()
        after.wait()
    untraced_again = min(run_loop(binaries, 2_000_000, timeout=30) for _ in range(3))
    assert untraced_again <= 3 * untraced + 5, (untraced, traced, untraced_again)
    report(f"{signal.Signals(sig).name}: {expected - before} of {expected} spans were still to be flushed; exit 0 "
           f"after {exit_s:.2f}s; loop ns_per_call untraced {untraced:.2f}, traced {traced:.0f}, after "
           f"{untraced_again:.2f}; first byte of fib {original:#04x}, traced {INT3:#04x}, after {original:#04x}")


KILL_REQUESTS = 6000  # per thread, >1 ms each: the target outlives the sidecar's teardown by seconds


def test_sidecar_killed_mid_trace_does_not_harm_the_target(binaries, receiver, tmp_path):
    """SIGKILL to the sidecar while nested is in the middle of its calls: the kernel removes the probes from
    the running process, which goes on to finish every call (complete ground truth) with its own exit status."""
    fib = function_file_offset(binaries.nested, "fib")
    original = binaries.nested.read_bytes()[fib]
    sidecar = start_sidecar(binaries.nested_probes, **otlp_env(receiver, protocol="grpc"))
    truth_file = tmp_path / "truth.txt"
    target = run_nested(binaries, truth_file, 2, KILL_REQUESTS, NESTED_EXIT_CODE="7")
    try:
        receiver.wait_for_spans(100, timeout=20)
        assert live_first_byte(target.pid, binaries.nested, fib) == INT3
        killed_ns, killed = time.time_ns(), time.monotonic()
        sidecar.proc.send_signal(signal.SIGKILL)
        assert sidecar.proc.wait(30) == -signal.SIGKILL
        reaped_s = time.monotonic() - killed  # the kernel detaches the probes as the process exits
        deadline = time.monotonic() + 10
        while True:
            assert target.poll() is None, f"the target ended {time.monotonic() - killed:.1f}s after the SIGKILL, " \
                                          "before its probes were seen gone: make KILL_REQUESTS larger"
            if live_first_byte(target.pid, binaries.nested, fib) == original:
                break
            assert time.monotonic() < deadline, "the breakpoint stayed in the running target"
            time.sleep(0.05)
        assert target.wait(120) == 7
    finally:
        stop(sidecar)
        if target.poll() is None:
            target.kill()
    truth = parse(truth_file.read_text())
    expected = sum(expected_counts(2, KILL_REQUESTS).values())
    assert truth.done == len(truth.calls) == expected
    after_kill = sum(call.start > killed_ns for call in truth.calls)
    assert after_kill > 0
    assert our_uprobe_events(binaries.directory) == []
    report(f"sidecar SIGKILL: {len(receiver.spans())} spans received before it, reaped {reaped_s:.1f}s after it; "
           f"the target made {after_kill} of its {expected} calls afterwards and exited 7 with complete ground truth")
