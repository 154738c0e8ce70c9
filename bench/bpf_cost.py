"""Kernel CPU time of the BPF programs per traced call, from the kernel's own accounting (bpf_stats).

Wall-clock cost per call mixes the uprobe trap (the same for every tracer), the programs' work, and any CPU
the sidecar takes from the target on a small machine. The kernel's run_time_ns per program isolates the
second: otel-ebpf's entry and return programs against a floor pair doing what the bpftrace floor does
(remember the entry time per thread, forget it at return), both compiled here by BCC from the very sources
and flags otel-ebpf uses.
"""

from __future__ import annotations

import subprocess

from otel_ebpf import symbols
from otel_ebpf.probes import Tunables, build_program, plan

STATS = "/proc/sys/kernel/bpf_stats_enabled"
FLOOR = r"""
BPF_HASH(starts, u32, u64, 16384);
int floor_entry(struct pt_regs *ctx) { u32 tid = bpf_get_current_pid_tgid(); u64 now = bpf_ktime_get_ns();
                                       starts.update(&tid, &now); return 0; }
int floor_return(struct pt_regs *ctx) { u32 tid = bpf_get_current_pid_tgid(); starts.delete(&tid); return 0; }
"""


def _run_time(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) the kernel counted for a program."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


def _measure(bpf, binary: str, address: int, entry: str, ret: str, calls: int) -> float:
    """ns of BPF program time per call (entry + return)."""
    from bcc import BPF

    bpf.attach_uprobe(name=binary.encode(), addr=address, fn_name=entry.encode())
    bpf.attach_uretprobe(name=binary.encode(), addr=address, fn_name=ret.encode())
    try:
        subprocess.run([binary, str(calls)], stdout=subprocess.DEVNULL, check=True)
    finally:
        bpf.detach_uprobe(name=binary.encode(), addr=address)
        bpf.detach_uretprobe(name=binary.encode(), addr=address)
    total_ns = total_runs = 0
    for name in (entry, ret):
        ns, runs = _run_time(bpf.load_func(name.encode(), BPF.KPROBE).fd)
        total_ns, total_runs = total_ns + ns, total_runs + runs
    assert total_runs == 2 * calls, f"expected {2 * calls} program runs, the kernel counted {total_runs}"
    return total_ns / calls


def program_cost(binary: str, symbol: str, calls: int) -> dict:
    """BPF ns per call for the floor and for otel-ebpf with its default tunables."""
    from bcc import BPF

    path = symbols.binary_path(binary)
    probes = plan(path, symbols.resolve(path, [symbol]))
    source, cflags = build_program(probes, Tunables(http=True))
    with open(STATS) as f:
        was = f.read().strip()
    with open(STATS, "w") as f:
        f.write("1")
    try:
        floor = _measure(BPF(text=FLOOR), path, probes[0].entry, "floor_entry", "floor_return", calls)
        ours = _measure(BPF(text=source, cflags=cflags), path, probes[0].entry, "probe_entry_0", "probe_return_0", calls)
    finally:
        with open(STATS, "w") as f:
            f.write(was)
    return {"floor_bpf_ns_per_call": floor, "otel_ebpf_bpf_ns_per_call": ours}
