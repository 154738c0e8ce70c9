"""Builds the BPF program from bpf/, attaches one entry and one return uprobe per function, owns BPF()."""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf import events
from otel_ebpf.errors import UserError
from otel_ebpf.symbols import FunctionSymbol

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM = "uprobe.bpf.c"
# Consumer wake-ups per emitted events: one in WAKEUP_EVERY; a short poll timer catches the rest.
WAKEUP_EVERY = 64
# More probes than this means a pattern matched far more than intended (e.g. "*" over libc).
MAX_PROBES = 512

_CAP_PERFMON, _CAP_BPF = 38, 39


@dataclass(frozen=True)
class Probe:
    """One function to trace; its position in the probe list is the probe id the kernel reports."""

    binary: str
    symbol: FunctionSymbol


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


class ProbeSet:
    """The compiled program and its attachments; close() detaches everything."""

    def __init__(self, probes: list[Probe], *, max_depth: int, max_threads: int, ring_buffer_size: int):
        if not probes:
            raise UserError("no functions to trace", "name at least one SYMBOL")
        if len(probes) > MAX_PROBES:
            raise UserError(f"{len(probes)} functions matched; at most {MAX_PROBES} can be traced at once",
                            "use narrower SYMBOL patterns")
        check_privileges()
        check_kernel_headers()
        from bcc import BPF  # imported late: a usage error should not wait for (or need) BCC

        self.probes = probes
        self.ring_buffer_size = ring_buffer_size
        dev, ino = _pid_namespace()
        cflags = [
            f"-I{BPF_DIR}",
            f"-DMAX_DEPTH={max_depth}",
            f"-DMAX_THREADS={max_threads}",
            f"-DRINGBUF_PAGES={ring_buffer_size // os.sysconf('SC_PAGE_SIZE')}",
            f"-DWAKEUP_EVERY={WAKEUP_EVERY}",
            f"-DPIDNS_DEV={dev}ULL",
            f"-DPIDNS_INO={ino}ULL",
        ]
        source = (BPF_DIR / PROGRAM).read_text()
        source += "".join(f"DEFINE_PROBE({i})\n" for i in range(len(probes)))
        try:
            self.bpf = BPF(text=source, cflags=cflags)
        except Exception as exc:
            raise UserError(f"could not compile the BPF program: {exc}",
                            "check the compiler messages above; kernel headers may not fit this kernel") from None
        self._check_event_layout()
        self._attached = False

    def _check_event_layout(self) -> None:
        leaf = self.bpf["event_layout"].Leaf
        offsets = {name: (getattr(leaf, name).offset, getattr(leaf, name).size) for name, _ in leaf._fields_}
        events.check_layout(offsets, ctypes.sizeof(leaf))

    def attach(self, pid: int | None = None) -> None:
        """Entry and return probes on every function; `pid` limits them to one process."""
        for i, probe in enumerate(self.probes):
            where = dict(name=probe.binary.encode(), addr=probe.symbol.address, pid=pid or -1)
            try:
                self.bpf.attach_uprobe(fn_name=f"probe_entry_{i}".encode(), **where)
                self.bpf.attach_uretprobe(fn_name=f"probe_return_{i}".encode(), **where)
            except Exception as exc:
                raise UserError(f"could not attach to {probe.symbol.demangled} in {probe.binary}: {exc}",
                                "check that the process and the binary still exist") from None
        self._attached = True

    def ring(self) -> events.RingReader:
        return events.RingReader(self.bpf["events"].map_fd, self.ring_buffer_size)

    def counters(self) -> dict[str, int]:
        table = self.bpf["counters"]
        return {name: sum(table[ctypes.c_int(i)]) for i, name in enumerate(events.COUNTERS)}

    def close(self) -> None:
        self.bpf.cleanup()
