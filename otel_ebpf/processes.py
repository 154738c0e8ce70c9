"""Who each traced process is: the identity its spans' resource describes.

The kernel announces every process it follows (kernel/layout.py ProcessNotice): when it exec'd, with what it
was exec'd as (file name, arguments, and the few variables that say who it is), copied in the kernel before
the process could end; when it forked, from whom; when it was first seen at a probed call. Only what the
kernel could not see (a process older than the tracer, its container) is read from /proc.

Identities are kept by (pid, process_seq): pids are reused, and the kernel gives each new program its own
process_seq. The registry lives in the drain thread; what it hands out (Resource) is immutable, so the export
thread never reads its tables.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import socket
import time
from dataclasses import dataclass, field

from otel_ebpf import __version__
from otel_ebpf.tracecontext import SpanContext, parse_traceparent
from otel_ebpf.config import parse_key_values
from otel_ebpf.kernel import layout
from otel_ebpf.otlp.encode import SCOPE_NAME, Resource, process_key, resource

# What a process's own environment may say about its identity and the trace it belongs to.
PROCESS_ENVIRON = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "TRACEPARENT", "TRACESTATE")
# A container runtime names the cgroup of a container after its 64-hex-digit id, and the kubelet the cgroup of a
# pod after its uid: pod<uid> (cgroupfs driver) or ...-pod<uid with '_' for '-'>.slice (systemd driver).
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# Identities kept at most (the oldest go first), and how long one stays after its process exited: spans of its
# last threads can be drained after the exit notice.
MAX_PROCESSES = 4096
EXITED_GRACE_S = 5.0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _text(raw: bytes) -> str:
    """OTLP strings must be UTF-8; arguments and paths need not be."""
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class ProcessInfo:
    """One traced program's identity."""

    pid: int
    executable: str  # process.executable.path: /proc/PID/exe's target, else the path execve was given
    argv: tuple[str, ...]
    environ: dict[str, str] = field(default_factory=dict)  # the PROCESS_ENVIRON entries it has
    container_id: str | None = None
    pod_uid: str | None = None  # k8s.pod.uid

    @classmethod
    def from_proc(cls, pid: int, fallback_executable: str = "") -> ProcessInfo:
        """Best effort: a process may have exited (or be a zombie) when we look; `fallback_executable` then
        stands in."""
        argv = tuple(_text(a) for a in _read(f"/proc/{pid}/cmdline").split(b"\0")[:-1])
        environ = {}
        for entry in _read(f"/proc/{pid}/environ").split(b"\0"):
            name, _, value = _text(entry).partition("=")
            if name in PROCESS_ENVIRON and value:
                environ[name] = value
        return cls(pid, _executable(pid) or fallback_executable, argv, environ, *_cgroup_ids(pid))

    @classmethod
    def from_identity(cls, pid: int, identity: layout.Identity) -> ProcessInfo:
        """What the kernel copied at exec; /proc only for what it cannot copy (while the process lives)."""
        environ = {}
        for name, value in identity.environ.items():
            name_text = _text(name)
            if name_text in PROCESS_ENVIRON and value:
                environ[name_text] = _text(value)
        filename = _text(identity.filename)
        return cls(pid, _executable(pid) or filename, tuple(_text(a) for a in identity.argv), environ,
                   *_cgroup_ids(pid))

    @functools.cached_property
    def parent(self) -> SpanContext | None:
        """The span this process was started under: the environment carrier (TRACEPARENT, TRACESTATE)."""
        return parse_traceparent(self.environ.get("TRACEPARENT"), self.environ.get("TRACESTATE"))

    @property
    def started_as(self) -> str:
        """The name it was started as (argv[0]'s basename, e.g. redis-server), not its symlink's target; the
        executable's when argv[0] is a title the program wrote over its arguments ("nginx: worker process")."""
        first = self.argv[0] if self.argv else ""
        return os.path.basename(first) if first and not any(c.isspace() for c in first) else (
            os.path.basename(self.executable))


def _executable(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _cgroup_ids(pid: int) -> tuple[str | None, str | None]:
    """container.id and k8s.pod.uid, from the names of the process's cgroups: what a node agent knows of the
    container and pod it runs in (the Collector's k8sattributes processor adds the rest, by these)."""
    return cgroup_ids(_text(_read(f"/proc/{pid}/cgroup")))


def cgroup_ids(cgroup: str) -> tuple[str | None, str | None]:
    containers, pods = _CONTAINER_ID.findall(cgroup), _POD_UID.findall(cgroup)
    return (containers[-1] if containers else None), (pods[-1].replace("_", "-") if pods else None)


class ProcessRegistry:
    """Identities by process key, from the kernel's process notices, else from /proc; and their resources."""

    def __init__(self, service_name: str | None, resource_attributes: dict[str, str]):
        self._service_name = service_name
        self._resource_attributes = dict(resource_attributes)
        self._host = socket.gethostname()
        self._known: collections.OrderedDict[int, ProcessInfo] = collections.OrderedDict()
        self._resources: dict[int, Resource] = {}
        self._exited: collections.deque[tuple[float, int]] = collections.deque()
        self._ran: dict[str, None] = {}  # executables of the processes announced, in order

    def on_notice(self, notice: layout.ProcessNotice) -> ProcessInfo | None:
        """A process started, forked, exec'd or was found (its identity, returned), or exited (None)."""
        key = int(process_key(notice.pid, notice.process_seq))
        if notice.kind == layout.NOTICE_PROCESS_EXIT:
            self._exited.append((time.monotonic(), key))
            return None
        if notice.cause == layout.PROCESS_CAUSE_FORK:
            parent = self._known.get(int(process_key(notice.parent_pid, notice.parent_seq)))
            info = (dataclasses.replace(parent, pid=notice.pid) if parent else ProcessInfo.from_proc(notice.pid))
        elif notice.identity is not None and notice.identity.flags & layout.IDENTITY_CAPTURED:
            info = ProcessInfo.from_identity(notice.pid, notice.identity)
        else:
            info = ProcessInfo.from_proc(notice.pid)
        self.remember(info, notice.process_seq)
        if info.executable:
            self._ran[info.executable] = None
        return info

    def executables(self) -> list[str]:
        """What the announced processes ran, for a run that traced nothing."""
        return list(self._ran)

    def remember(self, info: ProcessInfo, process_seq: int = 0) -> None:
        """process_seq 0: a process user space followed itself (a COMMAND, --pid)."""
        key = int(process_key(info.pid, process_seq))
        self._known[key] = info
        self._known.move_to_end(key)
        self._resources.pop(key, None)
        while len(self._known) > MAX_PROCESSES:
            oldest, _ = self._known.popitem(last=False)
            self._resources.pop(oldest, None)

    def info(self, key: int, fallback_executable: str = "") -> ProcessInfo:
        """The identity of a process seen in spans, read from /proc the first time if no notice told it."""
        info = self._known.get(key)
        if info is None:
            info = ProcessInfo.from_proc(key & 0xFFFFFFFF, fallback_executable)
            self.remember(info, key >> 32)
        return info

    def resource(self, key: int, fallback_executable: str = "") -> Resource:
        cached = self._resources.get(key)
        if cached is None:
            attrs = self.resource_attributes(self.info(key, fallback_executable))
            cached = self._resources[key] = Resource(resource(attrs), str(attrs["service.name"]))
        return cached

    def resource_attributes(self, info: ProcessInfo) -> dict:
        """The process's own OTEL_SERVICE_NAME wins, then its OTEL_RESOURCE_ATTRIBUTES, then ours, then the name
        it was started as."""
        own = parse_key_values(info.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""), strict=False)
        attrs: dict = {**self._resource_attributes, **own}
        if info.container_id:
            attrs["container.id"] = info.container_id
        if info.pod_uid:
            attrs["k8s.pod.uid"] = info.pod_uid
        attrs.update({
            "service.name": info.environ.get("OTEL_SERVICE_NAME") or own.get("service.name") or self._service_name
            or self._resource_attributes.get("service.name") or info.started_as or "unknown_service",
            "process.pid": info.pid,
            "process.executable.name": os.path.basename(info.executable),
            "process.executable.path": info.executable,
            "process.command_args": list(info.argv),
            "process.command_line": " ".join(info.argv) or info.executable,
            "host.name": self._host,
            "telemetry.distro.name": SCOPE_NAME,
            "telemetry.distro.version": __version__,
        })
        return attrs

    def evict_exited(self) -> None:
        """Forget processes that exited more than EXITED_GRACE_S ago."""
        horizon = time.monotonic() - EXITED_GRACE_S
        while self._exited and self._exited[0][0] < horizon:
            _, key = self._exited.popleft()
            self._known.pop(key, None)
            self._resources.pop(key, None)
