"""The bpf() and perf_event_open() system calls otel-ebpf makes itself, through ctypes.

BCC (in the loader child) compiles and loads the programs; everything after that happens here, in the
sidecar, without BCC: reading and writing maps, and attaching uprobes at any time with the links BCC 0.26 and
Debian's libbpf 1.1 have no API for (multi-uprobe links, perf links with a cookie). Layouts are those of
linux/bpf.h and linux/perf_event.h.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

_NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}[platform.machine()]
_libc = ctypes.CDLL(None, use_errno=True)

# enum bpf_cmd
_MAP_LOOKUP_ELEM, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _MAP_GET_NEXT_KEY = 1, 2, 3, 4
_LINK_CREATE = 28
# enum bpf_attach_type
BPF_PERF_EVENT = 41
BPF_TRACE_UPROBE_MULTI = 48
# uprobe_multi link flags
BPF_F_UPROBE_MULTI_RETURN = 1
# map update flags
BPF_ANY, BPF_NOEXIST = 0, 1

_ATTR_SIZE = 128  # union bpf_attr is larger; the kernel accepts any size up to the one it knows, zero-filled
_PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8


class BpfError(OSError):
    """A bpf() or perf_event_open() call failed; errno and the call are in the message."""


def _bpf(command: int, attr: ctypes.Array) -> int:
    result = _libc.syscall(_NR_BPF, command, attr, len(attr))
    if result < 0:
        errno = ctypes.get_errno()
        raise BpfError(errno, f"bpf command {command}: {os.strerror(errno)}")
    return result


def _map_attr(fd: int, key: ctypes.Array | None, value: ctypes.Array | None, flags: int = 0) -> ctypes.Array:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, fd, 0, ctypes.addressof(key) if key is not None else 0,
                     ctypes.addressof(value) if value is not None else 0, flags)
    return attr


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under key, None when there is none."""
    key_buf, value_buf = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    try:
        _bpf(_MAP_LOOKUP_ELEM, _map_attr(fd, key_buf, value_buf))
    except BpfError as err:
        if err.errno == 2:  # ENOENT
            return None
        raise
    return value_buf.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    key_buf, value_buf = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    _bpf(_MAP_UPDATE_ELEM, _map_attr(fd, key_buf, value_buf, flags))


def map_delete(fd: int, key: bytes) -> bool:
    """False when there was nothing to delete."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(_MAP_DELETE_ELEM, _map_attr(fd, key_buf, None))
    except BpfError as err:
        if err.errno == 2:
            return False
        raise
    return True


def count_keys(fd: int, key_size: int) -> int:
    """Entries in a hash map: walks its keys (the kernel has no cheaper way to tell)."""
    key, next_key = ctypes.create_string_buffer(key_size), ctypes.create_string_buffer(key_size)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, fd, 0, 0, ctypes.addressof(next_key))  # key NULL: the first key
    count = 0
    while _libc.syscall(_NR_BPF, _MAP_GET_NEXT_KEY, attr, len(attr)) == 0:
        count += 1
        ctypes.memmove(key, next_key, key_size)
        struct.pack_into("<Q", attr, 8, ctypes.addressof(key))
    return count


def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible (not online) CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


def percpu_lookup(fd: int, key: bytes, value_size: int, cpus: int) -> list[bytes]:
    """A per-CPU map's value for each possible CPU (each rounded up to 8 bytes, as the kernel copies them)."""
    stride = (value_size + 7) & ~7
    raw = map_lookup(fd, key, stride * cpus)
    if raw is None:
        return []
    return [raw[cpu * stride:cpu * stride + value_size] for cpu in range(cpus)]


def link_uprobe_multi(prog_fd: int, path: str, offsets: list[int], cookies: list[int], pid: int = 0,
                      retprobe: bool = False, ref_ctr_offsets: list[int] | None = None) -> int:
    """One link attaching prog at every offset of the file (Linux 6.6+); pid 0: every process. Returns its fd.

    A link with a pid makes the kernel place breakpoints in that process only (and in what it execs).
    ref_ctr_offsets: for USDT probes with a semaphore, its file offset (0: none); the kernel counts it up in
    every process the probe is placed in, and down when it is removed."""
    count = len(offsets)
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    offsets_buf = (ctypes.c_uint64 * count)(*offsets)
    cookies_buf = (ctypes.c_uint64 * count)(*cookies)
    counters_buf = (ctypes.c_uint64 * count)(*ref_ctr_offsets) if ref_ctr_offsets else None
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIII", attr, 0, prog_fd, 0, BPF_TRACE_UPROBE_MULTI, 0)
    struct.pack_into("<QQQQIII", attr, 16, ctypes.addressof(path_buf), ctypes.addressof(offsets_buf),
                     ctypes.addressof(counters_buf) if counters_buf is not None else 0,
                     ctypes.addressof(cookies_buf), count, BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, pid)
    return _bpf(_LINK_CREATE, attr)


def link_perf_event(prog_fd: int, perf_fd: int, cookie: int) -> int:
    """A link running prog for one perf event, with a cookie (Linux 5.15+). Returns its fd."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIIIQ", attr, 0, prog_fd, perf_fd, BPF_PERF_EVENT, 0, cookie)
    return _bpf(_LINK_CREATE, attr)


def _perf_event_open(kind: int, config: int, config1: int, config2: int, pid: int) -> int:
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, kind, _PERF_ATTR_SIZE, config)
    struct.pack_into("<QQ", attr, 56, config1, config2)
    # A process: every CPU it runs on. Every process: one event, on CPU 0, fires wherever the probe is hit.
    cpu = -1 if pid > 0 else 0
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, attr, pid if pid > 0 else -1, cpu, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        errno = ctypes.get_errno()
        raise BpfError(errno, f"perf_event_open: {os.strerror(errno)}")
    return fd


def perf_uprobe(path: str, offset: int, pid: int, retprobe: bool, ref_ctr_offset: int = 0) -> int:
    """A uprobe perf event from the uprobe PMU (no tracefs entry; needs CAP_SYS_ADMIN since Linux 6.16);
    ref_ctr_offset: a USDT semaphore's file offset, in the config bits the PMU's format names."""
    pmu = Path("/sys/bus/event_source/devices/uprobe")
    kind = int((pmu / "type").read_text())
    retprobe_bit = int((pmu / "format" / "retprobe").read_text().strip().partition(":")[2])
    config = (1 << retprobe_bit) if retprobe else 0
    if ref_ctr_offset:
        shift = int((pmu / "format" / "ref_ctr_offset").read_text().strip().partition(":")[2].partition("-")[0])
        config |= ref_ctr_offset << shift
    path_buf = ctypes.create_string_buffer(os.fsencode(path))  # copied by the kernel during the call
    return _perf_event_open(kind, config, ctypes.addressof(path_buf), offset, pid)


def perf_tracepoint(event_id: int, pid: int) -> int:
    """A perf event for a tracefs event (such as a uprobe written to uprobe_events)."""
    return _perf_event_open(PERF_TYPE_TRACEPOINT, event_id, 0, 0, pid)
