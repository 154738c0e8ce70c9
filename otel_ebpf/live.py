"""`--live`: a full-screen view of the run in the terminal, refreshed about once a second.

It shows what the run keeps anyway: per probed function the kernel's latency histogram (log2 buckets, so
percentiles are bucket bounds) and its exact longest call, the errors captures found, what was lost, the
exporter's state; and the slowest calls of the last seconds with their trace ids, picked with numpy from each
array the drain loop reads. rich draws it from its own thread on the terminal's alternate screen, so neither the
drain loop nor the export thread waits for the terminal; otel-ebpf's log lines are shown in the view instead of
being written over it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

REFRESH_S = 1.0
SLOWEST = 8  # recent calls shown
RECENT_S = 30.0  # how long a slow call stays in the list
LOG_LINES = 4
_BARS = "·▁▂▃▄▅▆▇█"  # the first marks an empty bucket


@dataclass(frozen=True)
class SlowCall:
    duration_ns: int
    probe_id: int
    pid: int
    trace_id: str
    seen: float  # time.monotonic() when drained


class SlowCalls:
    """The slowest calls drained in the last RECENT_S seconds; add() is the drain loop's, top() the view's."""

    def __init__(self):
        self._calls: list[SlowCall] = []
        self._lock = threading.Lock()

    def add(self, records: np.ndarray) -> None:
        if not len(records):
            return
        durations = records["end_ns"] - records["start_ns"]
        picked = np.argpartition(durations, -SLOWEST)[-SLOWEST:] if len(records) > SLOWEST else range(len(records))
        now = time.monotonic()
        new = [SlowCall(int(durations[i]), int(records["probe_id"][i]), int(records["pid"][i]),
                        records["trace_id"][i].tobytes().hex(), now) for i in picked]
        with self._lock:
            self._calls = sorted(self._calls + new, key=lambda c: -c.duration_ns)[:SLOWEST * 4]

    def top(self) -> list[SlowCall]:
        horizon = time.monotonic() - RECENT_S
        with self._lock:
            self._calls = [c for c in self._calls if c.seen >= horizon]
            return self._calls[:SLOWEST]


class LogLines(logging.Handler):
    """otel-ebpf's last log lines, for the view, instead of stderr under it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass(frozen=True)
class Sources:
    """What the view reads, as callables the session provides."""

    functions: Callable[[], list[tuple[str, str]]]  # (function, binary) by probe id
    latency: Callable[[int], tuple[list[int], int, int]]  # Program.latency
    errors: Callable[[], dict[int, int]]  # by probe id
    lost: Callable[[], int]
    exported: Callable[[], int]
    export_state: Callable[[], str]
    title: str


def quantile_bound(buckets: list[int], q: float) -> int | None:
    """The upper bound, in ns, of the log2 bucket holding the q-quantile (bucket i: 2^(i-1) < d <= 2^i); the view
    shows it capped at the exact maximum, which is a bound too."""
    total = sum(buckets)
    if not total:
        return None
    running = 0
    for i, count in enumerate(buckets):
        running += count
        if running >= q * total:
            return 1 << i
    return 1 << (len(buckets) - 1)


def duration(ns: int | None) -> str:
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g}{unit}"
    return f"{ns}ns"


def sparkline(buckets: list[int]) -> str:
    """The populated buckets, shortest first, as bar heights."""
    used = [i for i, count in enumerate(buckets) if count]
    if not used:
        return ""
    span = buckets[used[0]:used[-1] + 1]
    peak = max(span)
    return "".join(_BARS[min(8, -(-8 * count // peak))] if count else _BARS[0] for count in span)


class LiveView:
    """The view: start() enters the alternate screen, stop() leaves it (the summary line comes after)."""

    def __init__(self, sources: Sources, slow: SlowCalls, console: Console | None = None):
        self._sources = sources
        self._slow = slow
        self._console = console or Console(stderr=True)
        self._log = LogLines()
        self._root_handlers: list[logging.Handler] = []
        self._previous: dict[int, tuple[int, float]] = {}  # probe id -> (calls, when) at the last frame
        self._live = Live(get_renderable=self.render, console=self._console, screen=True,
                          refresh_per_second=1 / REFRESH_S, transient=True)

    def start(self) -> None:
        root = logging.getLogger()
        self._root_handlers = root.handlers[:]
        root.handlers = [self._log]
        self._live.start()

    def stop(self) -> None:
        self._live.stop()
        logging.getLogger().handlers = self._root_handlers

    def render(self) -> Group:
        now = time.monotonic()
        functions = Table(expand=True, box=None, header_style="bold")
        for column, justify in (("function", "left"), ("binary", "left"), ("calls", "right"), ("calls/s", "right"),
                                ("p50 ≤", "right"), ("p90 ≤", "right"), ("p99 ≤", "right"), ("max", "right"),
                                ("latency (log2 buckets)", "left"), ("errors", "right")):
            functions.add_column(column, justify=justify, no_wrap=True)
        errors = self._sources.errors()
        names = self._sources.functions()
        for probe_id, (name, binary) in enumerate(names):
            buckets, _, longest = self._sources.latency(probe_id)
            calls = sum(buckets)
            before, then = self._previous.get(probe_id, (calls, now))
            rate = (calls - before) / (now - then) if now > then else 0.0
            self._previous[probe_id] = (calls, now)
            functions.add_row(name, os.path.basename(binary), str(calls), f"{rate:,.0f}",
                              *(duration(min(quantile_bound(buckets, q) or 0, longest) if calls else None)
                                for q in (0.5, 0.9, 0.99)),
                              duration(longest if calls else None), sparkline(buckets), str(errors.get(probe_id, 0)))
        slowest = Table(expand=True, box=None, header_style="bold", title="slowest calls of the last "
                        f"{RECENT_S:.0f} s (trace ids for Jaeger's search)", title_justify="left")
        for column in ("duration", "function", "pid", "trace id"):
            slowest.add_column(column, no_wrap=True)
        for call in self._slow.top():
            name = names[call.probe_id][0] if call.probe_id < len(names) else "?"
            slowest.add_row(duration(call.duration_ns), name, str(call.pid), call.trace_id)
        status = Text(f"spans exported {self._sources.exported()}, lost {self._sources.lost()}; export: "
                      f"{self._sources.export_state()}")
        parts = [Text(self._sources.title, style="bold"), functions, Text(""), status, Text(""), slowest]
        if self._log.lines:
            parts += [Text(""), *(Text(line, style="dim") for line in self._log.lines)]
        return Group(*parts)

