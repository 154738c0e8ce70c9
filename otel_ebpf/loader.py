"""Compiles, loads and attaches the BPF program in a short-lived child process.

BCC links LLVM: importing it and compiling costs ~150 MB of memory that would otherwise stay with the
sidecar for its whole life. The child does that work, hands the map and uprobe file descriptors to the
parent over a Unix socket (SCM_RIGHTS) and exits; the uprobes stay attached for as long as the parent
holds their descriptors.

Protocol: the parent writes a JSON request on the child's stdin; the child answers on the socket given
as argv[1] with one JSON message carrying the map fds, then the uprobe fds in chunks.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

from otel_ebpf import events
from otel_ebpf.errors import UserError

MAPS = ("events", "counters", "latency", "call_stacks", "processes")  # the maps handed over, in this order
FDS_PER_MESSAGE = 250  # the kernel accepts at most 253 descriptors per message (SCM_MAX_FD)


def _check_event_layouts(bpf) -> None:
    """The compiler's view of every event struct, through the value type of the `event_layout` map."""
    members = dict(bpf["event_layout"].Leaf._fields_)
    for event_type in events.EVENT_TYPES:
        struct = members[event_type.member]
        offsets = {name: (getattr(struct, name).offset, getattr(struct, name).size) for name, _ in struct._fields_}
        events.check_layout(event_type, offsets, ctypes.sizeof(struct))


# enum bpf_probe_attach_type of libbcc
_ENTRY, _RETURN = 0, 1


def _declare_attach_uprobe() -> None:
    """Debian's bcc 0.26 Python binding declares libbcc's bpf_attach_uprobe without its last parameter,
    ref_ctr_offset (iovisor/bcc#5236). The C function then reads whatever is in that register, and the
    kernel increments a "reference counter" at that offset of the binary in every traced process. Declared
    here in full, and called with 0: no counter."""
    from bcc.libbcc import lib

    lib.bpf_attach_uprobe.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_ulonglong, ctypes.c_int, ctypes.c_uint32]


def _attach(bpf, function: str, binary: str, address: int, pid: int, kind: int) -> int:
    """One uprobe (kind _ENTRY) or uretprobe (_RETURN) at a virtual address; returns its perf event fd."""
    from bcc import BPF
    from bcc.libbcc import lib

    program = bpf.load_func(function.encode(), BPF.KPROBE)
    path, offset = BPF._check_path_symbol(binary.encode(), b"", address, pid)  # address -> file offset
    name = bpf._get_uprobe_evname(b"r" if kind == _RETURN else b"p", path, offset, pid)
    fd = lib.bpf_attach_uprobe(program.fd, kind, name, path, offset, pid, 0)
    if fd < 0:
        raise OSError(f"bpf_attach_uprobe failed for {binary} at {address:#x}")
    return fd


def load(request: dict):
    """Compile and attach as `request` says; returns the BPF object and the uprobes' fds."""
    from bcc import BPF

    try:
        bpf = BPF(text=request["source"], cflags=request["cflags"])
    except Exception as exc:
        raise UserError(f"could not compile the BPF program: {exc}",
                        "see the compiler messages above; the kernel headers may not fit this kernel") from None
    _check_event_layouts(bpf)
    _declare_attach_uprobe()
    pid = request["pid"] or -1
    uprobes = []
    for i, probe in enumerate(request["probes"]):
        binary, entry, ret = probe["binary"], f"probe_entry_{i}", f"probe_return_{i}"
        try:
            uprobes.append(_attach(bpf, entry, binary, probe["entry"], pid, _ENTRY))
            if probe["returns"]:
                uprobes += [_attach(bpf, ret, binary, address, pid, _ENTRY) for address in probe["returns"]]
            else:
                uprobes.append(_attach(bpf, ret, binary, probe["address"], pid, _RETURN))
        except Exception as exc:
            raise UserError(f"could not attach to {probe['name']} in {probe['binary']}: {exc}",
                            "check that the binary (and the process, with --pid) still exist") from None
    return bpf, uprobes


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        request = json.load(sys.stdin)
        bpf, uprobes = load(request)
        map_fds = [bpf[name].map_fd for name in MAPS]
        # Tracepoints (thread exit, HTTP) were attached by BCC itself when it loaded the program.
        attachments = uprobes + list(bpf.tracepoint_fds.values())
        header = {"ok": True, "attachments": len(attachments)}
        socket.send_fds(sock, [json.dumps(header).encode()], map_fds)
        for start in range(0, len(attachments), FDS_PER_MESSAGE):
            socket.send_fds(sock, [b"."], attachments[start:start + FDS_PER_MESSAGE])
    except UserError as err:
        sock.send(json.dumps({"ok": False, "message": err.message, "hint": err.hint}).encode())
    except Exception as exc:  # anything else still has to reach the parent as one line
        sock.send(json.dumps({"ok": False, "message": f"loading the BPF program failed: {exc}",
                              "hint": "this is a bug in otel-ebpf; please report it"}).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: BCC's exit handlers would disable the uprobes the parent now holds.
    os._exit(0)


if __name__ == "__main__":
    main()
