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

MAPS = ("events", "counters", "latency", "call_stacks")  # always handed over; the request may ask for more
FDS_PER_MESSAGE = 250  # the kernel accepts at most 253 descriptors per message (SCM_MAX_FD)


def _check_event_layouts(bpf) -> None:
    """The compiler's view of every event struct, through the value type of the `event_layout` map."""
    members = dict(bpf["event_layout"].Leaf._fields_)
    for event_type in events.EVENT_TYPES:
        struct = members[event_type.member]
        offsets = {name: (getattr(struct, name).offset, getattr(struct, name).size) for name, _ in struct._fields_}
        events.check_layout(event_type, offsets, ctypes.sizeof(struct))


def load(request: dict):
    """Compile and attach as `request` says; returns the BPF object (its fds stay open)."""
    from bcc import BPF

    try:
        bpf = BPF(text=request["source"], cflags=request["cflags"])
    except Exception as exc:
        raise UserError(f"could not compile the BPF program: {exc}",
                        "see the compiler messages above; the kernel headers may not fit this kernel") from None
    _check_event_layouts(bpf)
    pid = request["pid"] or -1
    for i, probe in enumerate(request["probes"]):
        binary, entry, ret = probe["binary"].encode(), f"probe_entry_{i}".encode(), f"probe_return_{i}".encode()
        try:
            bpf.attach_uprobe(name=binary, addr=probe["entry"], fn_name=entry, pid=pid)
            if probe["returns"]:
                for address in probe["returns"]:
                    bpf.attach_uprobe(name=binary, addr=address, fn_name=ret, pid=pid)
            else:
                bpf.attach_uretprobe(name=binary, addr=probe["address"], fn_name=ret, pid=pid)
        except Exception as exc:
            raise UserError(f"could not attach to {probe['name']} in {probe['binary']}: {exc}",
                            "check that the binary (and the process, with --pid) still exist") from None
    return bpf


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        request = json.load(sys.stdin)
        bpf = load(request)
        map_fds = [bpf[name].map_fd for name in request["maps"]]
        # Tracepoints (thread exit, HTTP) were attached by BCC itself when it loaded the program.
        attachments = list(bpf.uprobe_fds.values()) + list(bpf.tracepoint_fds.values())
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
