"""Builds the BPF program from bpf/, has it loaded and attached (see loader.py), and owns the result:
the maps user space reads and the uprobe descriptors that keep the probes attached."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf import events, loader
from otel_ebpf.errors import UserError
from otel_ebpf.symbols import FunctionSymbol

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM = "uprobe.bpf.c"
# Consumer wake-ups per emitted events: one in WAKEUP_EVERY; a short poll timer catches the rest.
WAKEUP_EVERY = 64
# More probes than this means a pattern matched far more than intended (e.g. "*" over libc).
MAX_PROBES = 512
LATENCY_BUCKETS = 40  # bpf/event.h
LATENCY_SLOTS = LATENCY_BUCKETS + 1

_CAP_PERFMON, _CAP_BPF = 38, 39


@dataclass(frozen=True)
class Probe:
    """One function to trace; its position in the probe list is the probe id the kernel reports."""

    binary: str
    symbol: FunctionSymbol


@dataclass(frozen=True)
class Tunables:
    """What is compiled into the program as -D flags."""

    max_depth: int = 32
    max_threads: int = 16384
    ring_buffer_size: int = 8 << 20
    sample_threshold: int | None = None  # None: sample every trace root
    min_duration_ns: int = 0


def check_privileges() -> None:
    """uprobes and BPF maps need root, or CAP_BPF and CAP_PERFMON (kernel >= 5.8)."""
    if os.geteuid() == 0:
        return
    caps = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    missing = [name for bit, name in ((_CAP_BPF, "CAP_BPF"), (_CAP_PERFMON, "CAP_PERFMON")) if not caps >> bit & 1]
    if missing:
        raise UserError(
            f"not allowed to load eBPF programs: missing {', '.join(missing)}",
            "run as root (sudo) or grant the capabilities, e.g. setcap cap_bpf,cap_perfmon+ep",
        )


def check_kernel_headers(modules: Path = Path("/lib/modules")) -> None:
    """BCC compiles the program at run time against the running kernel's headers."""
    build = modules / platform.release() / "build"
    if not (build / "include").is_dir():
        raise UserError(
            f"kernel headers not found at {build}",
            "run `make setup` (installs linux-headers-amd64 and links them there) or install the "
            "headers for this kernel",
        )


def _pid_namespace() -> tuple[int, int]:
    """Device and inode of our PID namespace: the kernel reports pids as this process sees them."""
    st = os.stat("/proc/self/ns/pid")
    return st.st_dev, st.st_ino


def build_program(n_probes: int, tunables: Tunables) -> tuple[str, list[str]]:
    """Source text and compiler flags: the program, one DEFINE_PROBE per function, the tunables."""
    dev, ino = _pid_namespace()
    cflags = [
        f"-I{BPF_DIR}",
        f"-DNPROBES={n_probes}",
        f"-DMAX_DEPTH={tunables.max_depth}",
        f"-DMAX_THREADS={tunables.max_threads}",
        f"-DRINGBUF_PAGES={tunables.ring_buffer_size // os.sysconf('SC_PAGE_SIZE')}",
        f"-DWAKEUP_EVERY={WAKEUP_EVERY}",
        f"-DPIDNS_DEV={dev}ULL",
        f"-DPIDNS_INO={ino}ULL",
        f"-DMIN_DURATION_NS={tunables.min_duration_ns}ULL",
        "-DSAMPLE_ALL" if tunables.sample_threshold is None else f"-DSAMPLE_THRESHOLD={tunables.sample_threshold}ULL",
    ]
    source = (BPF_DIR / PROGRAM).read_text() + "".join(f"DEFINE_PROBE({i})\n" for i in range(n_probes))
    return source, cflags


class _MapAttr(ctypes.Structure):
    """union bpf_attr as BPF_MAP_LOOKUP_ELEM reads it."""

    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_BPF_MAP_LOOKUP_ELEM = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _possible_cpus() -> int:
    """Per-CPU maps hold one value per possible (not online) CPU."""
    with open("/sys/devices/system/cpu/possible") as f:
        return max(int(part.split("-")[-1]) for part in f.read().strip().split(",")) + 1


class PerCpuArray:
    """A BPF_PERCPU_ARRAY of u64 read with the bpf() syscall: no BCC needed in this process."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self._cpus = _possible_cpus()

    def sums(self) -> list[int]:
        """Every slot, summed over the CPUs."""
        key, values = ctypes.c_uint32(), (ctypes.c_uint64 * self._cpus)()
        attr = _MapAttr(map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(values))
        result = []
        for i in range(self.size):
            key.value = i
            if _libc.syscall(_NR_BPF, _BPF_MAP_LOOKUP_ELEM, ctypes.byref(attr), ctypes.sizeof(attr)):
                raise OSError(ctypes.get_errno(), f"bpf map lookup: {os.strerror(ctypes.get_errno())}")
            result.append(sum(values))
        return result


class ProbeSet:
    """The loaded program and its attachments; close() detaches everything."""

    def __init__(self, probes: list[Probe], tunables: Tunables, pid: int | None = None):
        if not probes:
            raise UserError("no functions to trace", "name at least one SYMBOL")
        if len(probes) > MAX_PROBES:
            raise UserError(f"{len(probes)} functions matched; at most {MAX_PROBES} can be traced at once",
                            "use narrower SYMBOL patterns")
        check_privileges()
        check_kernel_headers()
        self.probes = probes
        self.ring_buffer_size = tunables.ring_buffer_size
        source, cflags = build_program(len(probes), tunables)
        request = {"source": source, "cflags": cflags, "pid": pid,
                   "probes": [(p.binary, p.symbol.address, p.symbol.demangled) for p in probes]}
        map_fds, self._uprobe_fds = _run_loader(request)
        self._map_fds = map_fds
        self._events_fd, counters_fd, latency_fd = map_fds
        self._counters = PerCpuArray(counters_fd, len(events.COUNTERS))
        self._latency = PerCpuArray(latency_fd, len(probes) * LATENCY_SLOTS)

    def ring(self) -> events.RingReader:
        return events.RingReader(self._events_fd, self.ring_buffer_size)

    def counters(self) -> dict[str, int]:
        return dict(zip(events.COUNTERS, self._counters.sums()))

    def latencies(self) -> list[tuple[list[int], int]]:
        """Per probe: cumulative bucket counts and the sum of durations in ns."""
        slots = self._latency.sums()
        return [(slots[i:i + LATENCY_BUCKETS], slots[i + LATENCY_BUCKETS])
                for i in range(0, len(slots), LATENCY_SLOTS)]

    def close(self) -> None:
        """Closing the uprobe descriptors detaches the probes; the kernel frees the rest."""
        for fd in self._uprobe_fds + self._map_fds:
            os.close(fd)
        self._uprobe_fds = self._map_fds = []


def _run_loader(request: dict) -> tuple[list[int], list[int]]:
    """Run loader.py in a child; returns (map fds, uprobe fds) or raises its UserError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        child = subprocess.Popen([sys.executable, "-m", "otel_ebpf.loader", str(theirs.fileno())],
                                 stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        theirs.close()
        child.stdin.write(json.dumps(request).encode())
        child.stdin.close()
        message, map_fds, _, _ = socket.recv_fds(ours, 65536, len(loader.MAPS))
        answer = json.loads(message) if message else {"ok": False, "message": "the BPF loader died",
                                                      "hint": "see the messages above"}
        uprobe_fds: list[int] = []
        while answer["ok"] and len(uprobe_fds) < answer["uprobes"]:
            _, fds, _, _ = socket.recv_fds(ours, 16, loader.FDS_PER_MESSAGE)
            uprobe_fds += fds
        child.wait()
    if not answer["ok"]:
        raise UserError(answer["message"], answer["hint"])
    return map_fds, uprobe_fds
