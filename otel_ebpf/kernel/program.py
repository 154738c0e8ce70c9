"""The BPF program: built from bpf/ with the run's tunables, loaded by a short-lived child (loader.py), and
owned here: the maps user space reads and writes, the two uprobe programs attach.py links to probes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf.config import Settings
from otel_ebpf.errors import UserError
from otel_ebpf.kernel import bpf, layout, loader, privileges
from otel_ebpf.kernel.ring import Ring

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
UNIT = "otel_ebpf.bpf.c"
# The initial PID namespace's inode number (PROC_PID_INIT_INO): there, kernel pids need no translation.
INIT_PID_NAMESPACE = 0xEFFFFFFC
# Files of bpf/ that the unit includes and that use maps: BCC rewrites map calls only in the text it is given,
# so these are pasted in (with #line markers, so that compiler messages name the real file and line).
_PASTED_INCLUDE = re.compile(r'^#include "([\w.]+\.bpf\.[ch])"\s*$')


@dataclass(frozen=True)
class Tunables:
    """What is compiled into the program as -D flags."""

    max_depth: int = 32
    max_threads: int = 16384
    max_processes: int = 65536
    max_identities: int = 4096
    ring_buffer_size: int = 8 << 20
    sample_threshold: int | None = None  # None: sample every trace root
    parent_based: bool = True
    min_duration_ns: int = 0
    http: bool = False
    follow_only: bool = False  # trace registered processes and their descendants only
    discover_execs: bool = False  # announce every exec (probes on binary path patterns: discovery.py)
    wake_every: int = 4096  # spans per call stack between two wake-ups of user space

    @classmethod
    def from_settings(cls, settings: Settings, follow_only: bool) -> Tunables:
        sampler = settings.sampler
        return cls(max_depth=settings.max_depth, max_threads=settings.max_threads,
                   ring_buffer_size=settings.ring_buffer_size,
                   sample_threshold=None if sampler.sample_all else sampler.bound,
                   parent_based=sampler.parent_based, min_duration_ns=settings.min_duration_ns,
                   http=settings.http, follow_only=follow_only,
                   discover_execs=any(spec.is_pattern for spec in settings.probes))

    @property
    def notice_ring_size(self) -> int:
        """Notices are rare next to spans: a quarter of the span ring, at least 256 KiB."""
        return max(self.ring_buffer_size // 4, 256 << 10)


def source() -> str:
    """The unit's text with the files that use maps pasted in."""
    return _expand(BPF_DIR / UNIT)


def _expand(path: Path) -> str:
    out = [f'#line 1 "{path}"\n']
    for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        included = _PASTED_INCLUDE.match(line)
        if included:
            out += [_expand(path.parent / included[1]), f'#line {number + 1} "{path}"\n']
        else:
            out.append(line)
    return "".join(out)


def _pid_namespace() -> tuple[int, int]:
    """Device and inode of our PID namespace: the kernel reports pids as this process sees them."""
    st = os.stat("/proc/self/ns/pid")
    return st.st_dev, st.st_ino


def cflags(tunables: Tunables) -> list[str]:
    page = os.sysconf("SC_PAGE_SIZE")
    dev, ino = _pid_namespace()
    flags = [
        f"-I{BPF_DIR}",
        f"-DMAX_DEPTH={tunables.max_depth}",
        f"-DMAX_THREADS={tunables.max_threads}",
        f"-DMAX_PROCESSES={tunables.max_processes}",
        f"-DMAX_IDENTITIES={tunables.max_identities}",
        f"-DSPAN_RING_PAGES={tunables.ring_buffer_size // page}",
        f"-DNOTICE_RING_PAGES={tunables.notice_ring_size // page}",
        f"-DSPAN_WAKE_EVERY={tunables.wake_every}",
        f"-DMIN_DURATION_NS={tunables.min_duration_ns}ULL",
        "-DSAMPLE_ALL" if tunables.sample_threshold is None else f"-DSAMPLE_THRESHOLD={tunables.sample_threshold}ULL",
    ]
    flags += [] if ino == INIT_PID_NAMESPACE else [f"-DPIDNS_DEV={dev}ULL", f"-DPIDNS_INO={ino}ULL"]
    flags += ["-DPARENT_BASED"] if tunables.parent_based else []
    flags += ["-DHTTP_TRACING"] if tunables.http else []
    flags += ["-DFOLLOW_ONLY"] if tunables.follow_only else []
    flags += ["-DDISCOVER_EXECS"] if tunables.discover_execs else []
    return flags


class Program:
    """The loaded program; close() unloads it (and with it every uprobe still linked to it)."""

    def __init__(self, tunables: Tunables, attach_mode: str):
        """attach_mode: how its uprobes will be attached (kernel.attach.choose_mode)."""
        privileges.check_privileges(attach_mode)
        privileges.check_kernel_headers()
        self.tunables = tunables
        multi_links = attach_mode == "multi"
        flags = cflags(tunables)
        maps = (loader.MAPS + (loader.PIDNS_MAPS if any(f.startswith("-DPIDNS_INO") for f in flags) else ())
                + (tuple(layout.COUNTED_MAPS) + loader.HTTP_MAPS if tunables.http else ()))
        fds, self._tracepoint_fds = _run_loader({"source": source(), "cflags": flags, "multi": multi_links,
                                                "maps": maps})
        self.maps = dict(zip(maps, fds))
        self.entry_fd, self.return_fd = fds[len(maps):]
        self._cpus = bpf.possible_cpus()

    def rings(self) -> tuple[Ring, Ring]:
        """The span ring and the notice ring."""
        return (Ring.from_map(self.maps["spans"], self.tunables.ring_buffer_size),
                Ring.from_map(self.maps["notices"], self.tunables.notice_ring_size))

    def follow(self, pid: int, parent_trace_id: bytes = b"", parent_span_id: bytes = b"", sampled: bool = False,
               await_exec: bool = False) -> None:
        """Trace a process user space knows (a --pid, or a COMMAND held before its exec: `await_exec`) and its
        descendants: its spans carry process_seq 0 until it execs, and with HTTP tracing its sockets are watched
        from now on. The parent ids: its TRACEPARENT, when it has one. (Kernel pid: as in the initial PID
        namespace.)"""
        flags = (layout.PROCESS_HAS_PARENT | (layout.PROCESS_PARENT_SAMPLED if sampled else 0)
                 if parent_trace_id else 0) | (layout.PROCESS_AWAIT_EXEC if await_exec else 0)
        value = layout.PROCESS_INFO.pack(0, flags, 0, 0, parent_trace_id or bytes(16), parent_span_id or bytes(8))
        if "pending_follows" not in self.maps:
            bpf.map_update(self.maps["processes"], struct.pack("<I", pid), value)
            return
        # In a child PID namespace, pid is this namespace's: the kernel moves it to its own at the process's next
        # event (current_process in bpf/common.bpf.h).
        bpf.map_update(self.maps["pending_follows"], struct.pack("<I", pid), value)
        count = int.from_bytes(bpf.map_lookup(self.maps["pending_follows_count"], bytes(4), 4), "little")
        bpf.map_update(self.maps["pending_follows_count"], bytes(4), struct.pack("<I", count + 1))

    def mark_stream_starts(self, addresses: list[int]) -> None:
        """Where Go's HTTP/2 servers start stream goroutines (probes.go_stream_starts): those serve a stream."""
        for address in addresses:
            bpf.map_update(self.maps["go_stream_starts"], struct.pack("<Q", address), struct.pack("<I", 1))

    def set_capture_plan(self, probe_id: int, plan: bytes) -> None:
        """What a probe reads of its calls (struct capture_plan): written before its uprobes are attached."""
        bpf.map_update(self.maps["capture_plans"], struct.pack("<I", probe_id), plan)

    def set_name_filter(self, probe_id: int, name_filter: bytes) -> None:
        """Which calls a COOKIE_FILTER probe traces (struct name_filter): written before it is attached."""
        bpf.map_update(self.maps["name_filters"], struct.pack("<I", probe_id), name_filter)

    def followed_count(self) -> int:
        """Processes the kernel follows right now."""
        return bpf.count_keys(self.maps["processes"], 4)

    def counters(self) -> dict[str, int]:
        totals = []
        for slot in range(len(layout.COUNTERS)):
            values = bpf.percpu_lookup(self.maps["counters"], struct.pack("<I", slot), 8, self._cpus)
            totals.append(sum(int.from_bytes(v, "little") for v in values))
        return dict(zip(layout.COUNTERS, totals))

    def latency(self, probe_id: int) -> tuple[list[int], int, int]:
        """A probe's histogram summed over the CPUs: bucket counts, sum of durations and longest call, in ns."""
        buckets, total, longest = [0] * layout.LATENCY_BUCKETS, 0, 0
        for raw in bpf.percpu_lookup(self.maps["latency"], struct.pack("<I", probe_id), layout.LATENCY_SLOTS.size,
                                     self._cpus):
            slots = layout.LATENCY_SLOTS.unpack(raw)
            buckets = [a + b for a, b in zip(buckets, slots)]
            total += slots[layout.LATENCY_BUCKETS]
            longest = max(longest, slots[layout.LATENCY_BUCKETS + 1])
        return buckets, total, longest

    def evicted(self, counters: dict[str, int]) -> dict[str, int]:
        """Entries of the counted LRU maps (layout.COUNTED_MAPS) pushed out to make room, from `counters`: what
        went in, less what was taken out and what is still there. Empty without HTTP tracing."""
        return {name: max(0, counters[f"{name}_added"] - counters[f"{name}_removed"]
                          - bpf.count_keys(self.maps[name], key_size))
                for name, (key_size, _) in layout.COUNTED_MAPS.items() if name in self.maps}

    def call_stacks(self) -> int:
        """Threads and goroutines the kernel keeps a call stack for: should follow the live ones."""
        return bpf.count_keys(self.maps["call_stacks"], layout.STACK_KEY_SIZE)

    def close(self) -> None:
        """Closing the tracepoint descriptors detaches them; the kernel frees the rest with the last fd.

        Each tracepoint's close waits for an RCU grace period (about 75 ms here): closed one after the other, 16
        of them took 1.2 s of a container's grace period. Closed at once, they share the waits."""
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self._tracepoint_fds))) as pool:
            list(pool.map(os.close, self._tracepoint_fds))
        for fd in list(self.maps.values()) + [self.entry_fd, self.return_fd]:
            os.close(fd)
        self._tracepoint_fds, self.maps = [], {}
        self.entry_fd = self.return_fd = -1


def _run_loader(request: dict) -> tuple[list[int], list[int]]:
    """Run loader.py in a child; returns (map and program fds, tracepoint fds) or raises its UserError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        child = subprocess.Popen([sys.executable, "-m", "otel_ebpf.kernel.loader", str(theirs.fileno())],
                                 stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        theirs.close()
        child.stdin.write(json.dumps(request).encode())
        child.stdin.close()
        message, fds, _, _ = socket.recv_fds(ours, 65536, len(request["maps"]) + len(loader.PROGRAMS))
        answer = json.loads(message) if message else {"ok": False, "message": "the BPF loader died",
                                                      "hint": "see the messages above"}
        tracepoints: list[int] = []
        while answer["ok"] and len(tracepoints) < answer["tracepoints"]:
            _, more, _, _ = socket.recv_fds(ours, 16, loader.FDS_PER_MESSAGE)
            tracepoints += more
        child.wait()
    if not answer["ok"]:
        raise UserError(answer["message"], answer["hint"])
    return fds, tracepoints
