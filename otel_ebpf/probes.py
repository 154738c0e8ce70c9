"""Builds the BPF program from bpf/, has it loaded and attached (see loader.py), and owns the result:
the maps user space reads and the uprobe descriptors that keep the probes attached."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import re
import resource
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

# Capabilities the kernel checks, by bit number in /proc/self/status (linux/capability.h).
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39
CAPABILITY_NAMES = {CAP_DAC_READ_SEARCH: "DAC_READ_SEARCH", CAP_SYS_PTRACE: "SYS_PTRACE", CAP_SYS_ADMIN: "SYS_ADMIN",
                    CAP_SYS_RESOURCE: "SYS_RESOURCE", CAP_PERFMON: "PERFMON", CAP_BPF: "BPF"}
# Kernel releases that changed what tracing needs: CAP_BPF and CAP_PERFMON exist since 5.8 (before, CAP_SYS_ADMIN
# did everything); BPF memory counts against the memory cgroup, not RLIMIT_MEMLOCK, since 5.11; since 6.16 (and in
# stable kernels with the fix for CVE-2025-38466) perf creates uprobes for CAP_SYS_ADMIN only, and BCC then creates
# them by writing to tracefs's uprobe_events instead.
SPLIT_CAPABILITIES = (5, 8)
MEMCG_ACCOUNTING = (5, 11)
UPROBES_NEED_SYS_ADMIN = (6, 16)
# BCC's tracefs: its debugfs mount point when there is one (bcc/__init__.py's TRACEFS).
TRACEFS_PATHS = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")
_log = logging.getLogger("otel_ebpf.probes")


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
        probes.append(Probe(binary, f, shape.entry, shape.returns, goid_offset))
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


def missing_privileges(effective: int, kernel: tuple[int, int], memlock_unlimited: bool, tracefs_readable: bool,
                       tracefs_writable: bool) -> dict[int, str]:
    """The capabilities this kernel will ask for that the effective set lacks, each with what it is for.

    CAP_SYS_ADMIN passes every check CAP_BPF and CAP_PERFMON pass, so it stands in for both.
    """
    def has(capability: int) -> bool:
        return bool(effective >> capability & 1)

    admin, missing = has(CAP_SYS_ADMIN), {}
    if kernel < SPLIT_CAPABILITIES:
        if not admin:
            missing[CAP_SYS_ADMIN] = "to load eBPF programs before Linux 5.8"
    else:
        if not (has(CAP_BPF) or admin):
            missing[CAP_BPF] = "to load eBPF programs"
        if not (has(CAP_PERFMON) or admin):
            missing[CAP_PERFMON] = "to attach them"
        if not admin and kernel >= UPROBES_NEED_SYS_ADMIN and not tracefs_writable:
            missing[CAP_SYS_ADMIN] = "to create uprobes on Linux 6.16+, unless tracefs is writable"
    if kernel < MEMCG_ACCOUNTING and not (memlock_unlimited or has(CAP_SYS_RESOURCE)):
        missing[CAP_SYS_RESOURCE] = "to lift RLIMIT_MEMLOCK for the BPF maps before Linux 5.11"
    if not tracefs_readable:
        missing[CAP_DAC_READ_SEARCH] = "to read tracefs, which only root may"
    return missing


def check_privileges() -> None:
    """Refuse to start without what the kernel will ask for, naming each missing capability and how to grant it.

    Reads the effective set even as root: a container's root lacks whatever cap_drop removed. Without
    CAP_SYS_PTRACE tracing works, so it is only a warning: what it costs is process identity.
    """
    with open("/proc/self/mounts") as mounts:
        mounted = {fields[1] for fields in map(str.split, mounts) if fields[2] == "tracefs"}
    tracefs = next((path for path in TRACEFS_PATHS if path in mounted), None)
    if tracefs is None:
        raise UserError("tracefs is not mounted at /sys/kernel/tracing",
                        "mount -t tracefs nodev /sys/kernel/tracing (make setup does), or in a container "
                        "mount the host's /sys/kernel/tracing")
    with open("/proc/self/status") as status:
        effective = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status.read(), re.MULTILINE)[1], 16)
    kernel = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    missing = missing_privileges(
        effective, kernel, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY,
        os.access(tracefs, os.R_OK | os.X_OK, effective_ids=True),
        os.access(os.path.join(tracefs, "uprobe_events"), os.W_OK, effective_ids=True))
    if missing:
        names = [CAPABILITY_NAMES[capability] for capability in missing]
        reasons = [f"CAP_{name} ({why})" for name, why in zip(names, missing.values())]
        raise UserError(
            "not allowed to trace: missing " + ", ".join(reasons),
            f"grant {'them' if len(names) > 1 else 'it'}: docker run {' '.join('--cap-add ' + n for n in names)}; "
            f"Kubernetes securityContext.capabilities.add: [{', '.join(names)}]; "
            f"setcap {','.join('cap_' + n.lower() for n in names)}+ep on a copy of the Python interpreter that only "
            "otel-ebpf runs; " + ("root alone is not enough when a container's cap_drop or a bounding set removed them"
                                  if os.geteuid() == 0 else "or run as root"))
    if not effective >> CAP_SYS_PTRACE & 1:
        _log.warning("without CAP_SYS_PTRACE, processes of other users or with capabilities otel-ebpf lacks cannot "
                     "be traced with --pid, and their spans lack process.executable.path and HTTP peer addresses "
                     "(grant it: docker run --cap-add SYS_PTRACE; securityContext.capabilities.add: [SYS_PTRACE])")


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
        request = {"source": source, "cflags": cflags, "pid": pid,
                   "probes": [{"binary": p.binary, "name": p.symbol.demangled, "address": p.symbol.address,
                               "entry": p.entry, "returns": p.returns} for p in probes]}
        map_fds, self._attachment_fds = _run_loader(request)
        self._map_fds = map_fds
        self._maps = dict(zip(loader.MAPS, map_fds))
        self._counters = PerCpuArray(self._maps["counters"], len(events.COUNTERS))
        self._latency = PerCpuArray(self._maps["latency"], len(probes) * LATENCY_SLOTS)

    def ring(self) -> events.RingReader:
        return events.RingReader(self._maps["events"], self.ring_buffer_size)

    def register_process(self, pid: int) -> None:
        """A process user space knows (a COMMAND, --pid): its spans carry process_seq 0, and with HTTP tracing
        its sockets are watched from the start (kernel pid: as in the initial PID namespace)."""
        _map_call(_BPF_MAP_UPDATE_ELEM, self._maps["processes"], ctypes.c_uint32(pid), ctypes.c_uint32(0))

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
        message, map_fds, _, _ = socket.recv_fds(ours, 65536, len(loader.MAPS))
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
