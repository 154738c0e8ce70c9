"""Compiles and loads the BPF program in a short-lived child process.

BCC links LLVM: importing it and compiling costs ~150 MB of memory that would otherwise stay with the sidecar
for its whole life. The child does that work once per run, whatever the number of probed functions (the
program does not depend on them), hands the map, program and tracepoint descriptors to the parent over a Unix
socket (SCM_RIGHTS) and exits. Uprobes are attached later, by the parent, at any time (attach.py).

Protocol: the parent writes a JSON request (source, cflags, multi, maps) on the child's stdin; the child answers on
the socket given as argv[1] with one JSON message carrying the map and program fds, then the tracepoint fds.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.kernel.bpf import BPF_TRACE_UPROBE_MULTI

MAPS = ("spans", "notices", "counters", "latency", "call_stacks", "processes", "capture_plans",
        "name_filters")  # handed over in this order
PIDNS_MAPS = ("pending_follows", "pending_follows_count")  # and these, built for a child PID namespace
HTTP_MAPS = ("go_stream_starts",)  # and these, built with HTTP tracing
PROGRAMS = ("otel_entry", "otel_return")
FDS_PER_MESSAGE = 250  # the kernel accepts at most 253 descriptors per message (SCM_MAX_FD)


def load(request: dict):
    """Compile, load the uprobe programs (for multi-uprobe links when request["multi"]) and attach the
    tracepoints; returns the BPF object and the programs' fds."""
    from bcc import BPF

    try:
        bpf = BPF(text=request["source"], cflags=request["cflags"])
    except Exception as exc:
        raise UserError(f"could not compile the BPF program: {exc}",
                        "see the compiler messages above; the kernel headers may not fit this kernel") from None
    layout.check_layouts(layout.compiled_layouts(bpf["event_layout"].Leaf))
    attach_type = BPF_TRACE_UPROBE_MULTI if request["multi"] else -1
    return bpf, [bpf.load_func(name.encode(), BPF.KPROBE, attach_type=attach_type).fd for name in PROGRAMS]


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        request = json.load(sys.stdin)
        bpf, programs = load(request)
        tracepoints = list(bpf.tracepoint_fds.values())  # attached by BCC itself when it loaded them
        header = {"ok": True, "tracepoints": len(tracepoints)}
        maps = [bpf[name].map_fd for name in request["maps"]]
        socket.send_fds(sock, [json.dumps(header).encode()], maps + programs)
        for start in range(0, len(tracepoints), FDS_PER_MESSAGE):
            socket.send_fds(sock, [b"."], tracepoints[start:start + FDS_PER_MESSAGE])
    except UserError as err:
        sock.send(json.dumps({"ok": False, "message": err.message, "hint": err.hint}).encode())
    except Exception as exc:  # anything else still has to reach the parent as one line
        sock.send(json.dumps({"ok": False, "message": f"loading the BPF program failed: {exc}",
                              "hint": "this is a bug in otel-ebpf; please report it"}).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: BCC's exit handlers would detach the tracepoints the parent now holds.
    os._exit(0)


if __name__ == "__main__":
    main()
