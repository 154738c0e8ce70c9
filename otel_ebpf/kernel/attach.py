"""Attaching uprobes to the loaded program at any time, and detaching them.

Every probe runs one of two programs (otel_entry, otel_return); its attach cookie says which probe it is.
So attaching needs no compilation: a new process, a library mapped later or a binary found on the node is
one system call away. Three ways, chosen once per run (Attacher.mode):

- multi: one multi-uprobe link per file, program and process (Linux 6.6+): every offset in one call, and
  nothing to clean up but the link's descriptor. Needs CAP_BPF and CAP_PERFMON only.
- perf: one uprobe perf event per probe from the uprobe PMU, each linked with its cookie (Linux 5.15+); since
  Linux 6.16 (and with the fix for CVE-2025-38466) the kernel creates them for CAP_SYS_ADMIN only.
- tracefs: one perf event per probe too, for a uprobe written to tracefs's uprobe_events, for kernels where
  perf refuses and tracefs is writable. Those entries outlive their creator, so each is named after the
  otel-ebpf process that made it, removed by it on every way out it survives, and removed by the next
  otel-ebpf when its creator is gone (after a SIGKILL).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from enum import Enum

from otel_ebpf.errors import UserError
from otel_ebpf.kernel import bpf, privileges
from otel_ebpf.kernel.program import Program

_log = logging.getLogger("otel_ebpf.attach")

# The tracefs group of the uprobes one otel-ebpf process creates: its pid says whether it is still alive.
TRACEFS_GROUP = "otel_ebpf_{pid}"
_TRACEFS_ENTRY = re.compile(r"^[pr]:otel_ebpf_(\d+)/(\S+) ", re.MULTILINE)


class Kind(Enum):
    """What runs at a site: the entry program, the return program on a uretprobe (native code), or the return
    program on a plain uprobe placed on a return instruction (Go code, see symbols/golang.py)."""

    ENTRY = "entry"
    RETURN = "return"
    RETURN_SITE = "return_site"


@dataclass(frozen=True)
class Site:
    """One uprobe: a file offset in a binary, its kind and its cookie."""

    offset: int
    kind: Kind
    cookie: int
    ref_ctr_offset: int = 0  # USDT: the file offset of its semaphore, which the kernel counts up while attached


@dataclass
class Attachment:
    """What one attach() made: close() (or Attacher.detach) removes every uprobe of it."""

    path: str
    pid: int | None
    sites: int
    fds: list[int] = field(default_factory=list)
    tracefs_events: list[str] = field(default_factory=list)


def choose_mode(requested: str) -> str:
    """auto: multi-uprobe links where the kernel has them, else perf events, else tracefs's uprobe_events."""
    if requested != "auto":
        return requested
    kernel = privileges.kernel_release()
    if kernel >= privileges.MULTI_UPROBE_LINKS:
        return "multi"
    if kernel < privileges.UPROBES_NEED_SYS_ADMIN or privileges.has_capability(privileges.CAP_SYS_ADMIN):
        return "perf"
    return "tracefs"


class Attacher:
    """Attaches sites to the program's two programs; keeps track of what it attached."""

    def __init__(self, program: Program, mode: str):
        self.mode = mode
        self._program = program
        self._attachments: list[Attachment] = []
        self._tracefs = privileges.tracefs()
        self._counter = 0
        if mode == "tracefs":
            remove_stale_tracefs_entries(self._tracefs)

    @property
    def attachments(self) -> list[Attachment]:
        return list(self._attachments)

    def attach(self, path: str, sites: list[Site], pid: int | None = None) -> Attachment:
        """Uprobes at every site of the file, in process `pid` (and what it execs) or in every process.

        Raises UserError naming the file when the kernel refuses; nothing of this call stays attached then."""
        attachment = Attachment(path, pid, len(sites))
        try:
            if self.mode == "multi":
                self._attach_multi(attachment, sites)
            else:
                for site in sites:
                    self._attach_one(attachment, site)
        except bpf.BpfError as err:
            self._close(attachment)
            where = f" in pid {pid}" if pid else ""
            raise UserError(f"could not attach uprobes to {path}{where}: {err.strerror}",
                            "check that the binary (and the process) still exist") from None
        self._attachments.append(attachment)
        return attachment

    def _attach_multi(self, attachment: Attachment, sites: list[Site]) -> None:
        groups = {Kind.ENTRY: (self._program.entry_fd, False), Kind.RETURN_SITE: (self._program.return_fd, False),
                  Kind.RETURN: (self._program.return_fd, True)}
        for kind, (prog_fd, retprobe) in groups.items():
            chosen = [site for site in sites if site.kind is kind]
            if chosen:
                counters = [s.ref_ctr_offset for s in chosen]
                attachment.fds.append(bpf.link_uprobe_multi(
                    prog_fd, attachment.path, [s.offset for s in chosen], [s.cookie for s in chosen],
                    attachment.pid or 0, retprobe, counters if any(counters) else None))

    def _attach_one(self, attachment: Attachment, site: Site) -> None:
        prog_fd = self._program.entry_fd if site.kind is Kind.ENTRY else self._program.return_fd
        retprobe = site.kind is Kind.RETURN
        pid = attachment.pid or -1
        if self.mode == "perf":
            perf_fd = bpf.perf_uprobe(attachment.path, site.offset, pid, retprobe, site.ref_ctr_offset)
        else:
            perf_fd = bpf.perf_tracepoint(self._tracefs_event(attachment, site, retprobe), pid)
        attachment.fds.append(perf_fd)
        attachment.fds.append(bpf.link_perf_event(prog_fd, perf_fd, site.cookie))

    def _tracefs_event(self, attachment: Attachment, site: Site, retprobe: bool) -> int:
        """Writes one uprobe to uprobe_events and returns its event id."""
        self._counter += 1
        group, event = TRACEFS_GROUP.format(pid=os.getpid()), f"{'r' if retprobe else 'p'}{self._counter}"
        counter = f"({site.ref_ctr_offset:#x})" if site.ref_ctr_offset else ""
        definition = f"{'r' if retprobe else 'p'}:{group}/{event} {attachment.path}:{site.offset:#x}{counter}\n"
        try:
            _append(self._tracefs, definition)
        except OSError as err:
            raise bpf.BpfError(err.errno, f"writing {definition.strip()!r} to uprobe_events: {err.strerror}")
        attachment.tracefs_events.append(f"{group}/{event}")
        with open(os.path.join(self._tracefs, "events", group, event, "id")) as f:
            return int(f.read())

    def detach(self, attachment: Attachment) -> None:
        if attachment in self._attachments:
            self._attachments.remove(attachment)
        self._close(attachment)

    def close(self) -> float:
        """Detach everything; returns the seconds it took."""
        start = time.monotonic()
        for attachment in self._attachments:
            self._close(attachment)
        self._attachments = []
        return time.monotonic() - start

    def _close(self, attachment: Attachment) -> None:
        """The perf events must be closed before their tracefs entries go: the kernel refuses (EBUSY) to remove
        an event that is still open."""
        for fd in attachment.fds:
            os.close(fd)
        attachment.fds = []
        if attachment.tracefs_events:
            _remove_tracefs_events(self._tracefs, attachment.tracefs_events)
            attachment.tracefs_events = []


def _append(tracefs: str, line: str) -> None:
    """One write to uprobe_events. Not open(..., "a"): Python seeks to the end of a file opened to append, and
    tracefs refuses the seek (EINVAL); "w" would truncate, which deletes every uprobe there."""
    fd = os.open(os.path.join(tracefs, "uprobe_events"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _remove_tracefs_events(tracefs: str, events: list[str]) -> None:
    try:
        for event in events:
            _append(tracefs, f"-:{event}\n")
    except OSError as err:
        _log.warning("could not remove %d uprobes from %s/uprobe_events: %s", len(events), tracefs, err.strerror)


def remove_stale_tracefs_entries(tracefs: str | None) -> int:
    """Uprobes that earlier otel-ebpf processes left in uprobe_events when they were killed (nothing runs after
    a SIGKILL); they would refuse other tracers' uprobes at the same places. Returns how many were removed."""
    if tracefs is None:
        return 0
    try:
        with open(os.path.join(tracefs, "uprobe_events")) as f:
            text = f.read()
    except OSError:
        return 0
    stale = [f"otel_ebpf_{pid}/{event}" for pid, event in _TRACEFS_ENTRY.findall(text) if not _alive_tracer(int(pid))]
    if stale:
        _remove_tracefs_events(tracefs, stale)
    return len(stale)


def _alive_tracer(pid: int) -> bool:
    """Whether pid is an otel-ebpf process (pids are reused: a live pid of another program does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command_line = f.read()
    except OSError:
        return False
    return b"otel_ebpf" in command_line or b"otel-ebpf" in command_line
