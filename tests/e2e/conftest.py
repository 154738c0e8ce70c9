"""End-to-end helpers: run the real CLI as root against the real example, receive spans on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests.ground_truth import LIBGREET, NESTED, build_examples
from tests.otlp_receiver import OtlpReceiver

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
    """The test's environment without any OTEL_* the developer may have set, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NESTED_"))}
    env.update(OTEL_BSP_SCHEDULE_DELAY="100", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Tracer:
    """otel-ebpf running in a child process; stderr is collected as it arrives."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self._stdout = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "otel_ebpf", *args], env=env, text=True,
                                     stdout=self._stdout, stderr=subprocess.PIPE,
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

    def finish(self, sig: int | None = None, timeout: float = 60) -> int:
        if sig is not None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout)
        self._reader.join(5)
        self._stdout.seek(0)
        self.stdout = self._stdout.read()
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)


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
