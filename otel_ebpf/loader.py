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

MAPS = ("events", "counters", "latency")
FDS_PER_MESSAGE = 250  # the kernel accepts at most 253 descriptors per message (SCM_MAX_FD)


def _check_event_layout(bpf) -> None:
    leaf = bpf["event_layout"].Leaf
    offsets = {name: (getattr(leaf, name).offset, getattr(leaf, name).size) for name, _ in leaf._fields_}
    events.check_layout(offsets, ctypes.sizeof(leaf))


def load(request: dict):
    """Compile and attach as `request` says; returns the BPF object (its fds stay open)."""
    from bcc import BPF

    try:
        bpf = BPF(text=request["source"], cflags=request["cflags"])
    except Exception as exc:
        raise UserError(f"could not compile the BPF program: {exc}",
                        "see the compiler messages above; the kernel headers may not fit this kernel") from None
    _check_event_layout(bpf)
    pid = request["pid"] or -1
    for i, (binary, address, name) in enumerate(request["probes"]):
        where = dict(name=binary.encode(), addr=address, pid=pid)
        try:
            bpf.attach_uprobe(fn_name=f"probe_entry_{i}".encode(), **where)
            bpf.attach_uretprobe(fn_name=f"probe_return_{i}".encode(), **where)
        except Exception as exc:
            raise UserError(f"could not attach to {name} in {binary}: {exc}",
                            "check that the binary (and the process, with --pid) still exist") from None
    return bpf


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        bpf = load(json.load(sys.stdin))
        map_fds = [bpf[name].map_fd for name in MAPS]
        perf_fds = list(bpf.uprobe_fds.values())
        header = {"ok": True, "uprobes": len(perf_fds)}
        socket.send_fds(sock, [json.dumps(header).encode()], map_fds)
        for start in range(0, len(perf_fds), FDS_PER_MESSAGE):
            socket.send_fds(sock, [b"."], perf_fds[start:start + FDS_PER_MESSAGE])
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
