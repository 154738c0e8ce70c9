"""`--live` in a real terminal: otel-ebpf runs on a pseudo-terminal whose output a terminal emulator (pyte)
draws, and the test reads the screen as a user would, against the example's own call counts and clock
readings and the spans a real receiver got."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections import defaultdict
from pathlib import Path

import pyte

from tests.e2e.conftest import clean_env
from tests.e2e.spancheck import OVERHEAD_SLACK_NS, attributes
from tests.ground_truth import NESTED, expected_counts, parse
from tests.waiting import wait_until

COLUMNS, LINES = 180, 50
TRACED = ("handle_request", "compute", "fib")
ROOT = Path(__file__).resolve().parents[2]


class Terminal:
    """A command on a pseudo-terminal of COLUMNS x LINES, its output drawn by pyte as it arrives."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        self.screen = pyte.Screen(COLUMNS, LINES)
        self._stream = pyte.ByteStream(self.screen)
        self._lock = threading.Lock()
        self.frames: list[str] = []  # the screen after each read: what the user saw at some moment
        self.raw = b""
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     env={**env, "TERM": "xterm-256color"}, start_new_session=True)
        os.close(slave)
        self._master = master
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            with self._lock:
                self.raw += data
                self._stream.feed(data)
                self.frames.append("\n".join(self.screen.display))

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.screen.display)

    def wait_for(self, condition, what: str, timeout_s: float = 60) -> str:
        try:
            wait_until(lambda: condition(self.text()) or self.proc.poll() is not None, what, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen:\n{self.text()}") from None
        text = self.text()
        assert condition(text), f"{what}: otel-ebpf exited first:\n{self.raw.decode(errors='replace')[-3000:]}"
        return text

    def finish(self, timeout_s: float = 60) -> int:
        status = self.proc.wait(timeout_s)
        self._reader.join(5)
        return status


def rows(screen: str) -> dict[str, list[str]]:
    """The function table's rows by function name: the columns after it."""
    table = {}
    for line in screen.splitlines():
        words = line.split()
        if words and words[0] in TRACED and len(words) >= 8:
            table[words[0]] = words[1:]
    return table


def ns(text: str) -> float | None:
    """A duration as the view writes it (`12.3µs`, `-` for none) in nanoseconds."""
    if text == "-":
        return None
    value, unit = re.fullmatch(r"([\d.]+)(ns|µs|ms|s)", text).groups()
    return float(value) * {"ns": 1, "µs": 1e3, "ms": 1e6, "s": 1e9}[unit]


def columns(row: list[str]) -> dict[str, object]:
    """binary, calls, calls/s, p50, p90, p99, max, the histogram (absent without calls), errors."""
    binary, calls, _rate, p50, p90, p99, longest = row[:7]
    return {"binary": binary, "calls": int(calls), "p50": ns(p50), "p90": ns(p90), "p99": ns(p99),
            "max": ns(longest), "errors": int(row[-1])}


def quantile(values: list[int], q: float) -> int:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, -(-int(q * len(values) * 1000) // 1000) - 1))]


def test_live_view_shows_each_functions_calls_latency_and_slowest_traces(receiver, tmp_path):
    terminal = Terminal([sys.executable, "-m", "otel_ebpf", "run", "--live"], clean_env(
        OTEL_EBPF_PROBES=f"{NESTED}:{','.join(TRACED)}", OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.http_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf"))
    try:
        terminal.wait_for(lambda s: set(rows(s)) == set(TRACED), "the view's function table")
        truth_file = tmp_path / "truth.txt"
        nested = subprocess.run([str(NESTED), "2", "5"], env=clean_env(NESTED_GROUND_TRUTH=str(truth_file)))
        assert nested.returncode == 0
        truth, counts = parse(truth_file.read_text()), expected_counts(2, 5)
        expected = sum(counts[fn] for fn in TRACED)
        received = receiver.wait_for_spans(expected, timeout=15)
        screen = terminal.wait_for(
            lambda s: {fn: columns(row)["calls"] for fn, row in rows(s).items()} == {fn: counts[fn] for fn in TRACED}
            and f"spans exported {expected}, lost 0" in s, "every call counted in the view")
    finally:
        terminal.proc.send_signal(signal.SIGINT)
    assert terminal.finish() == 0
    durations = defaultdict(list)
    for call in truth.calls:
        durations[call.fn].append(call.end - call.start)
    for fn, row in rows(screen).items():
        shown = columns(row)
        assert shown["binary"] == NESTED.name and shown["errors"] == 0
        for q in ("p50", "p90", "p99"):  # a log2 bucket's upper bound: at least the calls' own quantile
            assert quantile(durations[fn], {"p50": 0.5, "p90": 0.9, "p99": 0.99}[q]) <= shown[q], (fn, q, row)
        assert shown["p50"] <= shown["p90"] <= shown["p99"]
        longest = max(durations[fn])  # exact in the kernel: the probes' time, a little over the program's own
        assert longest * 0.999 <= shown["max"] <= longest + OVERHEAD_SLACK_NS, (fn, row)
    assert "export: up" in screen
    # The slowest calls list names real traces: its first is the longest span the receiver got.
    slowest = re.search(r"^\s*([\d.]+(?:ns|µs|ms|s))\s+(\w+)\s+(\d+)\s+([0-9a-f]{32})\s*$", screen, re.MULTILINE)
    assert slowest, screen
    longest_span = max((s for _, s in received), key=lambda s: s.end_time_unix_nano - s.start_time_unix_nano)
    assert (slowest[2], slowest[4]) == (longest_span.name, longest_span.trace_id.hex()), screen
    assert int(slowest[3]) == truth.pid and attributes(longest_span)["code.function.name"] == slowest[2]
    summary = terminal.raw.decode(errors="replace")
    assert f"{expected} spans exported, 0 lost" in summary


def test_a_traced_commands_output_goes_to_a_file_not_over_the_view(tmp_path):
    """nested writes its ground truth on stdout; under --live that goes to the file the view names, and the
    screen never shows a line of it; the exit status is the command's."""
    gate = tmp_path / "gate"
    terminal = Terminal([sys.executable, "-m", "otel_ebpf", "trace", str(NESTED), *TRACED, "--live", "--",
                         str(NESTED), "2", "4"], clean_env(NESTED_EXIT_CODE="3", NESTED_WAIT_FOR=str(gate)))
    terminal.wait_for(lambda s: set(rows(s)) == set(TRACED), "the view's function table")
    gate.touch()  # nested calls its functions, writing a line per call, only now
    assert terminal.finish() == 3
    output = terminal.raw.decode(errors="replace")
    found = re.search(r"otel-ebpf: the command's output is in (/\S+?\.log)\r?$", output, re.MULTILINE)
    assert found, output
    truth = parse(Path(found[1]).read_text())
    assert len(truth.calls) == sum(expected_counts(2, 4).values())
    assert not any("call fn=" in frame for frame in terminal.frames), "the command wrote over the view"
    Path(found[1]).unlink()
