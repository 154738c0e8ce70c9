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

from otel_ebpf import events, golang, loader
from otel_ebpf.config import Settings
from otel_ebpf.errors import UserError
from otel_ebpf.symbols import FunctionSymbol

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM = "uprobe.bpf.c"
HTTP_PROGRAM = "http.bpf.c"
# The initial PID namespace's inode number (PROC_PID_INIT_INO): there, kernel pids need no translation.
INIT_PID_NAMESPACE = 0xEFFFFFFC
# More probes than this means a pattern matched far more than intended (e.g. "*" over libc).
MAX_PROBES = 512
LATENCY_BUCKETS = 40  # bpf/event.h
LATENCY_SLOTS = LATENCY_BUCKETS + 1
_STACK_KEY_SIZE = 16  # struct stack_key in bpf/maps.h

_CAP_PERFMON, _CAP_BPF = 38, 39


@dataclass(frozen=True)
class Probe:
    """One function to trace and where its uprobes go; its position in the probe list is the probe id
    the kernel reports.

    Native code: an entry uprobe at the function's address and a uretprobe. Go code (`returns` given):
    an entry uprobe past the stack-growth check and a plain uprobe on every return instruction, paired
    per goroutine (see golang.py for why, and for the function shapes that are refused).
    """

    binary: str
    symbol: FunctionSymbol
    entry: int
    returns: tuple[int, ...] = ()
    goid_offset: int = 0  # Go: where runtime.g keeps the goroutine id, 0 when unknown

    @property
    def is_go(self) -> bool:
        return bool(self.returns)


def plan(binary: str, functions: list[FunctionSymbol]) -> list[Probe]:
    """The probes for functions of one binary."""
    if golang.go_version(binary) is None:
        return [Probe(binary, f, f.address) for f in functions]
    golang.check_register_abi(binary)
    goid_offset = golang.goid_offset(binary)
    probes = []
    for f in functions:
        shape = golang.traceable_shape(binary, f)
        probes.append(Probe(binary, f, shape.entry, tuple(shape.returns), goid_offset))
    return probes


@dataclass(frozen=True)
class Tunables:
    """What is compiled into the program as -D flags."""

    max_depth: int = 32
    max_threads: int = 16384
    ring_buffer_size: int = 8 << 20
    sample_threshold: int | None = None  # None: sample every trace root
    parent_based: bool = True
    min_duration_ns: int = 0
    http: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Tunables:
        sampler = settings.sampler
        return cls(max_depth=settings.max_depth, max_threads=settings.max_threads,
                   ring_buffer_size=settings.ring_buffer_size,
                   sample_threshold=None if sampler.sample_all else sampler.bound,
                   parent_based=sampler.parent_based, min_duration_ns=settings.min_duration_ns,
                   http=settings.http)


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


def build_program(probes: list[Probe], tunables: Tunables) -> tuple[str, list[str]]:
    """Source text and compiler flags: the program, one DEFINE_PROBE per function, the tunables."""
    n_probes = len(probes)
    dev, ino = _pid_namespace()
    cflags = [
        f"-I{BPF_DIR}",
        f"-DNPROBES={n_probes}",
        f"-DMAX_DEPTH={tunables.max_depth}",
        f"-DMAX_THREADS={tunables.max_threads}",
        f"-DRINGBUF_PAGES={tunables.ring_buffer_size // os.sysconf('SC_PAGE_SIZE')}",

        f"-DMIN_DURATION_NS={tunables.min_duration_ns}ULL",
        "-DSAMPLE_ALL" if tunables.sample_threshold is None else f"-DSAMPLE_THRESHOLD={tunables.sample_threshold}ULL",
    ]
    cflags += [] if ino == INIT_PID_NAMESPACE else [f"-DPIDNS_DEV={dev}ULL", f"-DPIDNS_INO={ino}ULL"]
    cflags += ["-DPARENT_BASED"] if tunables.parent_based else []
    cflags += ["-DHTTP_TRACING"] if tunables.http else []
    source = (BPF_DIR / PROGRAM).read_text() + "".join(
        f"DEFINE_GO_PROBE({i}, {p.goid_offset})\n" if p.is_go else f"DEFINE_PROBE({i})\n"
        for i, p in enumerate(probes))
    if tunables.http:
        source += (BPF_DIR / HTTP_PROGRAM).read_text()
    return source, cflags


class _MapAttr(ctypes.Structure):
    """union bpf_attr as BPF_MAP_LOOKUP_ELEM reads it."""

    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_GET_NEXT_KEY = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)


def _map_call(command: int, fd: int, key: ctypes.Array | ctypes._SimpleCData, value) -> None:
    """One bpf() map command; the caller keeps key and value alive."""
    attr = _MapAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    if _libc.syscall(_NR_BPF, command, ctypes.byref(attr), ctypes.sizeof(attr)):
        errno = ctypes.get_errno()
        raise OSError(errno, f"bpf map command {command}: {os.strerror(errno)}")


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
        result = []
        for i in range(self.size):
            key.value = i
            _map_call(_BPF_MAP_LOOKUP_ELEM, self.fd, key, values)
            result.append(sum(values))
        return result


def count_keys(fd: int, key_size: int) -> int:
    """Entries in a hash map: walks its keys (the kernel has no cheaper way to tell)."""
    key, next_key = (ctypes.c_uint8 * key_size)(), (ctypes.c_uint8 * key_size)()
    attr = _MapAttr(map_fd=fd, key=0, value=ctypes.addressof(next_key))  # key NULL: the first key
    count = 0
    while _libc.syscall(_NR_BPF, _BPF_MAP_GET_NEXT_KEY, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        count += 1
        ctypes.memmove(key, next_key, key_size)
        attr.key = ctypes.addressof(key)
    return count


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
        source, cflags = build_program(probes, tunables)
        maps = list(loader.MAPS) + (["http_processes"] if tunables.http else [])
        request = {"source": source, "cflags": cflags, "pid": pid, "maps": maps,
                   "probes": [{"binary": p.binary, "name": p.symbol.demangled, "address": p.symbol.address,
                               "entry": p.entry, "returns": p.returns} for p in probes]}
        map_fds, self._attachment_fds = _run_loader(request)
        self._map_fds = map_fds
        self._maps = dict(zip(maps, map_fds))
        self._counters = PerCpuArray(self._maps["counters"], len(events.COUNTERS))
        self._latency = PerCpuArray(self._maps["latency"], len(probes) * LATENCY_SLOTS)

    def ring(self) -> events.RingReader:
        return events.RingReader(self._maps["events"], self.ring_buffer_size)

    def watch_http(self, pid: int) -> None:
        """Watch this process's sockets for HTTP requests from now on (kernel pid, as in the root namespace)."""
        if "http_processes" in self._maps:
            _map_call(_BPF_MAP_UPDATE_ELEM, self._maps["http_processes"], ctypes.c_uint32(pid), ctypes.c_uint8(1))

    def counters(self) -> dict[str, int]:
        return dict(zip(events.COUNTERS, self._counters.sums()))

    def latencies(self) -> list[tuple[list[int], int]]:
        """Per probe: cumulative bucket counts and the sum of durations in ns."""
        slots = self._latency.sums()
        return [(slots[i:i + LATENCY_BUCKETS], slots[i + LATENCY_BUCKETS])
                for i in range(0, len(slots), LATENCY_SLOTS)]

    def call_stacks(self) -> int:
        """Threads and goroutines the kernel keeps a call stack for: should follow the live ones."""
        return count_keys(self._maps["call_stacks"], _STACK_KEY_SIZE)

    def close(self) -> None:
        """Closing the uprobe and tracepoint descriptors detaches the programs; the kernel frees the rest."""
        for fd in self._attachment_fds + self._map_fds:
            os.close(fd)
        self._attachment_fds = self._map_fds = []


def _run_loader(request: dict) -> tuple[list[int], list[int]]:
    """Run loader.py in a child; returns (map fds, attachment fds) or raises its UserError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        child = subprocess.Popen([sys.executable, "-m", "otel_ebpf.loader", str(theirs.fileno())],
                                 stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        theirs.close()
        child.stdin.write(json.dumps(request).encode())
        child.stdin.close()
        message, map_fds, _, _ = socket.recv_fds(ours, 65536, len(request["maps"]))
        answer = json.loads(message) if message else {"ok": False, "message": "the BPF loader died",
                                                      "hint": "see the messages above"}
        attachment_fds: list[int] = []
        while answer["ok"] and len(attachment_fds) < answer["attachments"]:
            _, fds, _, _ = socket.recv_fds(ours, 16, loader.FDS_PER_MESSAGE)
            attachment_fds += fds
        child.wait()
    if not answer["ok"]:
        raise UserError(answer["message"], answer["hint"])
    return map_fds, attachment_fds
