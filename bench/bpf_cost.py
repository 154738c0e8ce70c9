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
from otel_ebpf.kernel.attach import Attacher, choose_mode
from otel_ebpf.kernel.program import Program, Tunables
from otel_ebpf.probes import ProbeTable, plan

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


def _per_call(fds: list[int], calls: int, before: list[tuple[int, int]]) -> float:
    """ns of BPF program time per call, from the programs' counters since `before`."""
    total_ns = total_runs = 0
    for fd, (ns0, runs0) in zip(fds, before):
        ns, runs = _run_time(fd)
        total_ns, total_runs = total_ns + ns - ns0, total_runs + runs - runs0
    assert total_runs == 2 * calls, f"expected {2 * calls} program runs, the kernel counted {total_runs}"
    return total_ns / calls


def _floor(binary: str, address: int, calls: int) -> float:
    from bcc import BPF

    bpf = BPF(text=FLOOR)
    bpf.attach_uprobe(name=binary.encode(), addr=address, fn_name=b"floor_entry")
    bpf.attach_uretprobe(name=binary.encode(), addr=address, fn_name=b"floor_return")
    fds = [bpf.load_func(name, BPF.KPROBE).fd for name in (b"floor_entry", b"floor_return")]
    try:
        before = [_run_time(fd) for fd in fds]
        subprocess.run([binary, str(calls)], stdout=subprocess.DEVNULL, check=True)
        return _per_call(fds, calls, before)
    finally:
        bpf.cleanup()


def _ours(binary: str, table: ProbeTable, calls: int) -> float:
    """otel-ebpf's two programs with default tunables and HTTP tracing, attached system-wide as `run` would."""
    mode = choose_mode("auto")
    program = Program(Tunables(http=True), mode)
    attacher = Attacher(program, mode)
    try:
        for path, probes in table.by_binary().items():
            attacher.attach(path, [site for probe_id, probe in probes for site in probe.sites(probe_id)])
        fds = [program.entry_fd, program.return_fd]
        before = [_run_time(fd) for fd in fds]
        subprocess.run([binary, str(calls)], stdout=subprocess.DEVNULL, check=True)
        return _per_call(fds, calls, before)
    finally:
        attacher.close()
        program.close()


def program_cost(binary: str, symbol: str, calls: int) -> dict:
    """BPF ns per call for the floor and for otel-ebpf."""
    path = symbols.binary_path(binary)
    table = ProbeTable()
    table.add(plan(path, symbols.resolve(path, [symbol])))
    with open(STATS) as f:
        was = f.read().strip()
    with open(STATS, "w") as f:
        f.write("1")
    try:
        floor = _floor(path, table.probes[0].entry, calls)
        ours = _ours(path, table, calls)
    finally:
        with open(STATS, "w") as f:
            f.write(was)
    return {"floor_bpf_ns_per_call": floor, "otel_ebpf_bpf_ns_per_call": ours}
