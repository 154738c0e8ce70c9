"""Node-wide discovery: probes on every process whose executable matches a path pattern.

An OTEL_EBPF_PROBES entry whose binary is a glob (`*/bin/server:handle_*`) names no file: it is matched against
the executable of each process, as the process sees it (its path in its own mount namespace, such as a
container's), both for the processes running when tracing starts (/proc) and for each one that execs later
(the kernel announces every exec then: NOTICE_EXEC). A matching file is planned (plan.plan_binary) as its
process sees it, through /proc/PID/root, and its uprobes attached once for every process that runs it; one
file is one attachment however many containers run it (FileKey: an image layer's file). When no
process runs a file any more its uprobes are detached, and found again if one starts it again.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from otel_ebpf import symbols
from otel_ebpf.config import ProbeSpec
from otel_ebpf.plan import plan_binary
from otel_ebpf.probes import Probe

_log = logging.getLogger("otel_ebpf")
# A file as every container that runs it sees it: inode, size and modification time. Not the device: through
# overlayfs each container's mount is a device of its own (in stat and in the memory map alike) while the inode,
# size and times are the image layer's file's, which the kernel's uprobes resolve to. Two containers of one
# image must share one attachment, or every call would be traced twice.
FileKey = tuple[int, int, int]


def _running(pid: int) -> tuple[str, FileKey] | None:
    """What a process runs: its executable as it names it, and the file's key."""
    try:
        executable = os.readlink(f"/proc/{pid}/exe")
        stat = os.stat(f"/proc/{pid}/exe")
    except OSError:  # gone already, or a kernel thread
        return None
    return executable, (stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass
class _Found:
    """A matching file: the probes planned for it (kept, so that a restarted program reuses its probe ids),
    its attachment while some process runs it, and those processes."""

    shown_as: str
    probes: list[tuple[int, Probe]]
    attachment: object | None = None
    pids: set[int] = field(default_factory=set)


class Discovery:
    """Matches processes against the pattern specs; `attach(path, probes)` and `detach(attachment)` are the
    session's (it owns the attacher and the probe table), `register(probes)` gives new probes their ids."""

    def __init__(self, specs: list[ProbeSpec], options: symbols.Options,
                 register: Callable[[list[Probe]], list[int]],
                 attach: Callable[[str, list[tuple[int, Probe]]], object], detach: Callable[[object], None]):
        self.specs = specs
        self._options = options
        self._register, self._attach, self._detach = register, attach, detach
        self._files: dict[FileKey, _Found] = {}
        self._refused: set[FileKey] = set()  # matched, but nothing to trace in it (said once)
        self._pid_files: dict[int, FileKey] = {}

    @property
    def attached(self) -> list[str]:
        """The files traced now, as their processes name them."""
        return sorted(found.shown_as for found in self._files.values() if found.attachment is not None)

    def scan(self) -> None:
        """The processes already running."""
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                self.on_exec(int(entry))

    def on_exec(self, pid: int) -> None:
        """A process that exec'd (or was found running): its executable, if a pattern matches it."""
        previous = self._pid_files.pop(pid, None)
        key = self._follow(pid)
        if previous is not None and previous != key:
            self._left(pid, previous)

    def _follow(self, pid: int) -> FileKey | None:
        """The file the process runs, attached if a pattern matches it; its key if the process is now counted
        among that file's."""
        running = _running(pid)
        if running is None:
            return None
        executable, key = running
        wanted = tuple(dict.fromkeys(symbol for spec in self.specs if fnmatch.fnmatchcase(executable, spec.binary)
                                     for symbol in spec.symbols))
        if not wanted or key in self._refused:
            return None
        found = self._files.get(key)
        if found is None:
            try:
                probes = plan_binary(executable, wanted, self._options, view=pid, shown_as=executable)
                found = _Found(executable, list(zip(self._register(probes), probes)))
            except Exception as exc:  # one file that cannot be traced must not stop the node's agent
                if _running(pid) != running:  # it exited while we read it: the next process will do
                    _log.debug("pid %d ended while %s was read: %s", pid, executable, exc)
                    return None
                self._refused.add(key)
                _log.warning("%s (pid %d) matches %s but cannot be traced: %s", executable, pid,
                             " ".join(spec.binary for spec in self.specs), exc)
                return None
            self._files[key] = found
        if found.attachment is None:
            try:
                found.attachment = self._attach(symbols.binary_path(executable, pid), found.probes)
            except Exception as exc:  # it exited while we looked, or the kernel refused
                _log.debug("could not attach to %s of pid %d: %s", executable, pid, exc)
                return None
            _log.warning("found %s (pid %d): its %d functions are traced in every process running it",
                         executable, pid, len(found.probes))
        found.pids.add(pid)
        self._pid_files[pid] = key
        return key

    def sweep(self) -> None:
        """Forget processes that exited or exec'd something else; detach files no process runs any more."""
        for pid, key in list(self._pid_files.items()):
            running = _running(pid)
            if running is None or running[1] != key:
                del self._pid_files[pid]
                self._left(pid, key)

    def _left(self, pid: int, key: FileKey) -> None:
        found = self._files.get(key)
        if found is None:
            return
        found.pids.discard(pid)
        if not found.pids and found.attachment is not None:
            self._detach(found.attachment)
            found.attachment = None
            _log.warning("no process runs %s any more: its uprobes are detached", found.shown_as)
