"""End-to-end helpers: run the real CLI as root against the real example, receive spans on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable
from pathlib import Path

import pytest

from tests.ground_truth import LIBGREET, NESTED, build_examples
from tests.otlp_receiver import OtlpReceiver
from tests.waiting import wait_until

READY = "otel-ebpf: tracing"


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        raise pytest.UsageError("the end-to-end tests attach real uprobes: run them as root (make test does)")


@pytest.fixture(scope="session", autouse=True)
def examples():
    build_examples()
    return NESTED, LIBGREET


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any OTEL_* (or TRACEPARENT carrier) the developer may have set, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NESTED_", "TRACEPARENT", "TRACESTATE"))}
    env.update(OTEL_BSP_SCHEDULE_DELAY="100", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Lines:
    """A child's output collected line by line as it arrives, so a test can wait for a readiness line."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        """The first line matching `pattern` (from its start), waiting for it; fails if the output ends first."""
        regex, seen, deadline = re.compile(pattern), 0, time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if found := regex.match(line):
                        return found
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                assert not self._closed, f"output ended without a line matching {pattern!r}"
                assert remaining > 0, f"no line matching {pattern!r} within {timeout}s"
                self._cond.wait(remaining)

    def text(self, timeout: float = 5) -> str:
        """Everything, once the writers have closed the stream."""
        self._thread.join(timeout)
        with self._cond:
            return "".join(self.lines)


class Output:
    """A child's stdout, kept in a file and searched for readiness lines; like Lines, without a pipe: a pipe
    wakes its reader on every line the traced program writes, and on these two cores that wake-up can preempt
    the program in the middle of a traced call, stretching its span by milliseconds."""

    POLL_S = 0.02

    def __init__(self):
        self.file = tempfile.TemporaryFile("w+")

    def text(self) -> str:
        with open(f"/proc/self/fd/{self.file.fileno()}") as f:  # own offset: the writer's is left alone
            return f.read()

    def wait_for(self, pattern: str, timeout: float = 60, alive: Callable[[], bool] = lambda: True) -> re.Match:
        """The first line matching `pattern` (from its start), as soon as it is written; fails if `alive()`
        turns false or the timeout passes first."""
        regex, deadline = re.compile(f"^(?:{pattern})", re.MULTILINE), time.monotonic() + timeout
        while not (found := regex.search(self.text())):
            assert alive(), f"the writer ended without a line matching {pattern!r}"
            assert time.monotonic() < deadline, f"no line matching {pattern!r} within {timeout}s"
            time.sleep(self.POLL_S)
        return found


class Tracer:
    """otel-ebpf running in a child process; stderr is collected as it arrives, stdout (shared with
    `-- COMMAND`) goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self._stdout = Output()
        self.proc = subprocess.Popen([sys.executable, "-m", "otel_ebpf", *args], env=env, text=True,
                                     stdout=self._stdout.file, stderr=subprocess.PIPE,
                                     cwd=Path(__file__).resolve().parents[2])
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.stdout = ""

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if line.startswith(READY):
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        assert self._ready.wait(timeout), "otel-ebpf did not report that it is tracing"
        assert self.proc.poll() is None, f"otel-ebpf exited early: {self.stderr}"

    def wait_stdout(self, pattern: str, timeout: float = 60) -> re.Match:
        """A line of the tracer's or its command's stdout, e.g. a server's "listening port=" line."""
        return self._stdout.wait_for(pattern, timeout, alive=lambda: self.proc.poll() is None)

    def wait_stderr(self, pattern: str, timeout: float = 60) -> None:
        """Until a line of otel-ebpf's log matches `pattern` (from its start)."""
        regex = re.compile(pattern)
        wait_until(lambda: any(regex.match(line) for line in list(self.stderr_lines)) or self.proc.poll() is not None,
                   f"a log line matching {pattern!r}", timeout)
        assert any(regex.match(line) for line in self.stderr_lines), f"otel-ebpf exited first: {self.stderr}"

    def output(self) -> str:
        """The tracer's and its command's stdout so far (e.g. the console exporter's lines)."""
        return self._stdout.text()

    def finish(self, sig: int | None = None, timeout: float = 60) -> int:
        if sig is not None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout)
        self._reader.join(5)
        self.stdout = self._stdout.text()
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)


class Program:
    """An example program in a child process, its stdout (the ground truth) collected as it arrives."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE)
        self.out = Lines(self.proc.stdout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self, sig: int | None = None, timeout: float = 30) -> tuple[int, str]:
        """Exit status and everything it printed."""
        if sig is not None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout), self.out.text()


@pytest.fixture
def program():
    """Starts example programs (argv, **env over clean_env()); kills the ones still running at teardown."""
    started: list[Program] = []

    def start(argv: list[str], **env: str) -> Program:
        p = Program([str(a) for a in argv], clean_env(**env))
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture
def tracer():
    started: list[Tracer] = []

    def start(args: list[str], **env: str) -> Tracer:
        t = Tracer(args, clean_env(**env))
        started.append(t)
        return t

    yield start
    for t in started:
        if t.proc.poll() is None:
            t.proc.send_signal(signal.SIGKILL)
            t.proc.wait()
