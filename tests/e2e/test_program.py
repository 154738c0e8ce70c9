"""Every combination of compile-time tunables builds, loads and behaves: the BPF program is C with
#ifdefs, and a variant nobody runs is a variant that does not compile."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from otel_ebpf import symbols
from otel_ebpf.kernel.attach import Attacher, choose_mode
from otel_ebpf.kernel.program import Program, Tunables
from otel_ebpf.probes import ProbeTable, plan
from tests.e2e.conftest import clean_env
from tests.ground_truth import NESTED, parse

FUNCTIONS = ["handle_request", "fib"]


@contextlib.contextmanager
def loaded(tunables: Tunables, pid: int | None = None):
    """The program with FUNCTIONS of nested attached (in pid, or every process); yields it and the probe table."""
    path = symbols.binary_path(str(NESTED))
    table = ProbeTable()
    table.add(plan(path, symbols.resolve(path, FUNCTIONS)))
    mode = choose_mode("auto")
    program = Program(tunables, mode)
    attacher = Attacher(program, mode)
    try:
        for binary, probes in table.by_binary().items():
            attacher.attach(binary, [site for probe_id, probe in probes for site in probe.sites(probe_id)], pid)
        yield program, table
    finally:
        attacher.close()
        program.close()


def events_of_one_run(tunables: Tunables):
    """Span records the kernel emits for `nested 1 2` under these tunables."""
    with loaded(tunables) as (program, _):
        spans, notices = program.rings()
        subprocess.run([str(NESTED), "1", "2"], stdout=subprocess.DEVNULL, check=True)
        records = spans.spans(1 << 20)
        spans.close()
        notices.close()
    return records


# nested 1 2: requests 0 and 1 compute fib(3) and fib(4): 5 + 9 fib calls, 2 handle_request.
ALL = 16


@pytest.mark.parametrize("tunables, expected", [
    (Tunables(), ALL),
    (Tunables(http=True), ALL),
    (Tunables(sample_threshold=0, parent_based=False), 0),
    (Tunables(sample_threshold=0, parent_based=True, http=True), 0),
    (Tunables(sample_threshold=(1 << 64) - 1), ALL),
    (Tunables(max_depth=2), 2 + 2),  # handle_request and the outermost fib of each request
], ids=["plain", "http", "always_off", "parentbased_always_off_http", "ratio_1", "max_depth_2"])
def test_variant_loads_and_emits(tunables, expected):
    assert len(events_of_one_run(tunables)) == expected


def test_min_duration_keeps_long_calls_and_their_ancestors():
    """handle_request sleeps 1 ms; fib calls take microseconds and have no exported descendant."""
    spans = events_of_one_run(Tunables(min_duration_ns=500_000))
    assert len(spans) == 2 and set(spans["depth"].tolist()) == {0}


def test_in_a_child_pid_namespace_pids_are_the_ones_seen_there(tmp_path):
    """A sidecar in a container sees the target's pid as its namespace numbers it (the kernel translates,
    see visible_ids in bpf/uprobe.bpf.c): `unshare` puts tracer and command in a new PID namespace."""
    truth_file = tmp_path / "truth.txt"
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "otel_ebpf", "trace", str(NESTED),
         "handle_request", "--", str(NESTED), "1", "2"],
        env={**clean_env(NESTED_GROUND_TRUTH=str(truth_file)), "OTEL_TRACES_EXPORTER": "console"},
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    truth = parse(truth_file.read_text())
    assert truth.pid < 100, "nested ran in the new namespace, where pids start again"
    lines = [line for line in result.stdout.splitlines() if " handle_request " in line]
    tids = {c.tid for c in truth.calls if c.fn == "handle_request"}
    assert len(lines) == 2
    assert all(f"pid={truth.pid} " in line and any(f"tid={tid} " in line for tid in tids) for line in lines)


def test_the_target_s_code_and_data_are_untouched_except_the_breakpoints(tmp_path):
    """A uprobe writes one breakpoint byte per probed instruction, nothing else (no uprobe reference counter
    either: the links are made with none)."""
    binary = symbols.binary_path(str(NESTED))
    target = subprocess.Popen([binary, "1", "1"], stdout=subprocess.DEVNULL,
                              env={"NESTED_START_DELAY_MS": "60000"})
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(target.wait)
        cleanup.callback(target.kill)
        probes = cleanup.enter_context(loaded(Tunables(), target.pid))[1].probes
        with open(binary, "rb") as f:
            image = f.read()
        changed = []
        with open(f"/proc/{target.pid}/maps") as maps, open(f"/proc/{target.pid}/mem", "rb") as mem:
            for line in maps:
                addresses, perms, offset, _, _, *path = line.split()
                # The code and the ELF header page; data is the program's and the loader's to change (RELRO).
                if path != [binary] or not ("x" in perms or int(offset, 16) == 0):
                    continue
                start, end = (int(a, 16) for a in addresses.split("-"))
                mem.seek(start)
                live, base = mem.read(end - start), int(offset, 16)
                changed += [base + i for i, (a, b) in enumerate(zip(live, image[base:base + len(live)])) if a != b]
        assert sorted(changed) == sorted(p.symbol.offset for p in probes), "bytes other than the probed entries changed"
