"""Bad input: one clear line on stderr naming what is wrong, exit status 2, never a traceback."""

import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from otel_ebpf.kernel import privileges
from otel_ebpf.errors import UserError
from otel_ebpf.kernel.privileges import check_kernel_headers
from tests import ground_truth
from tests.ground_truth import LIBGREET, NESTED, build_examples

build_examples()


def otel_ebpf(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env or {})
    return subprocess.run([*prefix, sys.executable, "-m", "otel_ebpf", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(result, *expected: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("otel-ebpf: error: "), result.stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize("args, env, expected", [
    (["trace", "/no/such/binary", "f"], {}, ["/no/such/binary", "not found"]),
    (["trace", "/etc/passwd", "f"], {}, ["/etc/passwd", "not an ELF file"]),
    (["trace", str(NESTED), "fbi"], {}, ["'fbi'", "did you mean: fib"]),
    (["trace", str(NESTED), "fib", "--", "/no/such/command"], {}, ["/no/such/command", "cannot start"]),
    (["trace", str(NESTED), "fib", "--pid", "1", "--", "true"], {}, ["--pid and -- COMMAND"]),
    (["trace", str(NESTED), "fib", "--", "true"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     ["OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"]),
    (["trace", str(NESTED), "fib", "--", "true"], {"OTEL_TRACES_EXPORTER": "zipkin"},
     ["OTEL_TRACES_EXPORTER", "zipkin", "otlp, console, none"]),
    (["trace", str(NESTED), "fib", "--", "true"], {"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, ["OTEL_BSP_MAX_QUEUE_SIZE"]),
    (["run"], {"OTEL_EBPF_PID": "abc", "OTEL_EBPF_PROBES": f"{NESTED}:fib"}, ["OTEL_EBPF_PID", "abc"]),
    (["run"], {"OTEL_EBPF_PROBES": f"{NESTED}"}, ["OTEL_EBPF_PROBES"]),
    (["run"], {}, ["nothing to trace", "OTEL_EBPF_PROBES"]),
    (["run", "--probes", f"{NESTED}:nope"], {"OTEL_EBPF_PROBES": f"{NESTED}:fib"}, ["'nope'"]),
    (["symbols", str(NESTED), "zz*"], {}, ["'zz*'", "otel-ebpf symbols"]),
    (["trace", str(NESTED)], {}, ["SYMBOL"]),
    (["frobnicate"], {}, ["frobnicate"]),
    (["run", "--", "true"], {}, ["only for `otel-ebpf trace`"]),
    (["trace", "*/bin/nested", "fib", "--", "true"], {}, ["*/bin/nested is a path pattern", "otel-ebpf run"]),
    (["run", "--pid", "1"], {"OTEL_EBPF_PROBES": "*/bin/nested:fib"}, ["path pattern", "without --pid"]),
])
def test_bad_input(args, env, expected):
    assert_one_line_error(otel_ebpf(*args, env=env), *expected)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop privileges")
def test_without_privileges():
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")
    assert_one_line_error(otel_ebpf("trace", str(NESTED), "fib", "--", "true", prefix=nobody), "CAP_BPF", "root")


# --- privileges: what each kernel asks for, then the real CLI with capabilities dropped ---

BPF, PERFMON, SYS_ADMIN = (1 << c for c in (privileges.CAP_BPF, privileges.CAP_PERFMON, privileges.CAP_SYS_ADMIN))


@pytest.mark.parametrize("effective, kernel, tracefs_readable, mode, lacking", [
    (BPF | PERFMON, (6, 18), True, "multi", set()),  # multi-uprobe links need nothing more
    (BPF | PERFMON, (6, 18), True, "tracefs", set()),  # uprobes through tracefs's uprobe_events
    (BPF | PERFMON, (6, 18), True, "perf", {"SYS_ADMIN"}),  # perf creates uprobes for SYS_ADMIN only
    (BPF | PERFMON, (6, 15), True, "perf", set()),  # perf still lets CAP_PERFMON create them
    (SYS_ADMIN, (6, 18), True, "perf", set()),  # stands in for CAP_BPF and CAP_PERFMON
    (0, (6, 18), True, "perf", {"BPF", "PERFMON", "SYS_ADMIN"}),
    (0, (6, 18), True, "multi", {"BPF", "PERFMON"}),
    (BPF | PERFMON | SYS_ADMIN, (6, 18), False, "multi", {"DAC_READ_SEARCH"}),  # tracefs is root's
])
def test_what_each_kernel_asks_for(effective, kernel, tracefs_readable, mode, lacking):
    missing = privileges.missing_privileges(effective, kernel, tracefs_readable, mode)
    assert {privileges.CAPABILITY_NAMES[c] for c in missing} == lacking


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop privileges")
KERNEL = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
SIDECAR = COMPOSE["services"]["otel-ebpf"]
# A private mount namespace as docker-compose.yml mounts the sidecar's files: all read-only (read_only: true,
# tracefs and the kernel headers with :ro).
AS_MOUNTED = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
              "for t in $(awk '$3 == \"tracefs\" {print $2}' /proc/self/mounts); do "
              "mount -o remount,bind,ro $t || exit 1; done && for d in / /lib/modules /usr/src; do "
              'mount --bind $d $d && mount -o remount,bind,ro $d || exit 1; done && exec "$@"', "sh")
# Far below the ring buffers: BPF memory counts against the memory cgroup (Linux 5.11+), not this limit.
SMALL_MEMLOCK = ("prlimit", "--memlock=65536:65536")


def only(*capabilities: str) -> tuple[str, ...]:
    """Root with exactly these capabilities, as in a container with cap_drop: [ALL] and cap_add."""
    bounding = ",".join(["-all", *(f"+{capability.lower()}" for capability in capabilities)])
    return ("setpriv", "--inh-caps=-all", f"--bounding-set={bounding}")


def named_missing(result) -> set[str]:
    return set(re.findall(r"CAP_(\w+) \(", result.stderr))


@ROOT_ONLY
@pytest.mark.parametrize("granted, lacking", [
    ((), {"BPF", "PERFMON"}), (("BPF",), {"PERFMON"}), (("PERFMON",), {"BPF"}),
])
def test_root_without_capabilities_is_told_which_and_how_to_grant_them(granted, lacking):
    result = otel_ebpf("trace", str(NESTED), "fib", "--", "true", prefix=only(*granted))
    assert_one_line_error(result, "not allowed to trace", "capabilities.add", "setcap", "cap_drop")
    assert named_missing(result) == lacking
    assert all(f"--cap-add {name}" in result.stderr for name in lacking)


@ROOT_ONLY
@pytest.mark.skipif(KERNEL < privileges.UPROBES_NEED_SYS_ADMIN, reason="before Linux 6.16 CAP_PERFMON may create uprobes")
def test_perf_uprobes_need_sys_admin_whatever_tracefs_allows():
    """Writable tracefs (as root's is here) is no help to perf's uprobe PMU."""
    result = otel_ebpf("trace", str(NESTED), "fib", "--", "true", env={"OTEL_EBPF_ATTACH": "perf"},
                       prefix=only("BPF", "PERFMON"))
    assert_one_line_error(result, "--cap-add SYS_ADMIN")
    assert named_missing(result) == {"SYS_ADMIN"}


@ROOT_ONLY
def test_uprobes_through_a_read_only_tracefs_are_refused_up_front():
    result = otel_ebpf("trace", str(NESTED), "fib", "--", "true", env={"OTEL_EBPF_ATTACH": "tracefs"},
                       prefix=AS_MOUNTED)
    assert_one_line_error(result, "OTEL_EBPF_ATTACH=tracefs", "uprobe_events", "not")


def trace_nested_system_wide(prefix: tuple[str, ...], **env: str) -> tuple[Counter, Counter, str]:
    """`otel-ebpf run` under prefix as a sidecar, then nested once with every capability (a process of another
    container): the calls nested made, the spans exported for them and the tracer's stderr.

    A private copy of nested: uprobes that other tracers put on the shared example through tracefs would refuse
    ours at the same instructions.
    """
    functions = ("fib", "handle_request")
    with tempfile.TemporaryDirectory(prefix="oe", dir="/tmp") as directory:
        workdir = Path(directory)
        for built in (NESTED, LIBGREET):
            shutil.copy(built, workdir)
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NESTED_"))}
        environ.update(OTEL_EBPF_PROBES=f"{workdir / NESTED.name}:{','.join(functions)}",
                       OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="100", **env)
        spans_file, log_file = workdir / "spans", workdir / "stderr"
        with spans_file.open("w") as spans_out, log_file.open("w") as log_out:
            tracer = subprocess.Popen([*prefix, sys.executable, "-m", "otel_ebpf", "run"], env=environ,
                                      stdout=spans_out, stderr=log_out)
        try:
            deadline = time.monotonic() + 120
            while "otel-ebpf: tracing" not in log_file.read_text():
                assert tracer.poll() is None and time.monotonic() < deadline, log_file.read_text()
                time.sleep(0.1)
            run = subprocess.run([str(workdir / NESTED.name), "2", "2"], env={"LD_LIBRARY_PATH": directory},
                                 capture_output=True, text=True, timeout=60, check=True)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
        log = log_file.read_text()
        assert tracer.returncode == 0, log
        truth = ground_truth.parse(run.stdout)
        spans = Counter(re.findall(rf" (\w+)  \S+ pid={truth.pid} ", spans_file.read_text()))
    return Counter(call.fn for call in truth.calls if call.fn in functions), spans, log


UPROBE_EVENTS = Path("/sys/kernel/tracing/uprobe_events")


def ours_in_tracefs() -> list[str]:
    """The uprobes otel-ebpf processes made through tracefs that are still there."""
    return [line for line in UPROBE_EVENTS.read_text().splitlines() if ":otel_ebpf_" in line]


@pytest.fixture
def uprobe_events():
    """Nothing of otel-ebpf's may be left in uprobe_events after a run: while there, such uprobes refuse other
    tracers' uprobes on the same instructions."""
    assert ours_in_tracefs() == [], "an earlier run left uprobes behind"
    yield
    assert ours_in_tracefs() == []


@ROOT_ONLY
def test_sidecar_traces_with_exactly_the_capabilities_of_docker_compose():
    """No other capability, every file read-only, a 64 KiB memlock limit: every call becomes a span."""
    assert SIDECAR["cap_drop"] == ["ALL"] and SIDECAR["read_only"] is True
    calls, spans, log = trace_nested_system_wide((*AS_MOUNTED, *SMALL_MEMLOCK, *only(*SIDECAR["cap_add"])))
    assert sum(calls.values()) > 0 and spans == calls
    assert "CAP_SYS_PTRACE" not in log


@ROOT_ONLY
def test_with_multi_uprobe_links_bpf_and_perfmon_are_enough(uprobe_events):
    """Linux 6.6+: read-only tracefs, no CAP_SYS_ADMIN, and every call still becomes a span."""
    calls, spans, log = trace_nested_system_wide((*AS_MOUNTED, *SMALL_MEMLOCK, *only("BPF", "PERFMON")))
    assert sum(calls.values()) > 0 and spans == calls
    assert log.count("without CAP_SYS_PTRACE") == 1


@ROOT_ONLY
def test_without_sys_admin_a_writable_tracefs_is_enough_and_nothing_is_left_in_it(uprobe_events):
    calls, spans, log = trace_nested_system_wide((*SMALL_MEMLOCK, *only("BPF", "PERFMON")), OTEL_EBPF_ATTACH="tracefs")
    assert sum(calls.values()) > 0 and spans == calls


@ROOT_ONLY
def test_uprobes_a_killed_tracer_left_in_tracefs_are_removed_by_the_next(uprobe_events):
    """Nothing runs after SIGKILL: the next otel-ebpf removes what a dead one left."""
    tracefs_route = {"OTEL_EBPF_ATTACH": "tracefs", "OTEL_TRACES_EXPORTER": "none"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | tracefs_route
    with tempfile.TemporaryFile("w+") as log:
        killed = subprocess.Popen([sys.executable, "-m", "otel_ebpf", "trace", str(NESTED), "fib"], env=env,
                                  stderr=log)
        deadline = time.monotonic() + 120
        while not ours_in_tracefs() or "otel-ebpf: tracing" not in open(f"/proc/self/fd/{log.fileno()}").read():
            assert killed.poll() is None and time.monotonic() < deadline, "the tracer did not start"
            time.sleep(0.05)
        killed.kill()
        killed.wait()
    left = ours_in_tracefs()
    assert left and all(f"otel_ebpf_{killed.pid}/" in line for line in left)
    result = otel_ebpf("trace", str(NESTED), "fib", "--", "true", env=tracefs_route)
    assert result.returncode == 0, result.stderr


def test_missing_kernel_headers_says_what_to_install(tmp_path):
    with pytest.raises(UserError) as err:
        check_kernel_headers(tmp_path)
    assert "kernel headers not found" in str(err.value) and "linux-headers" in str(err.value)


def test_file_name_with_a_newline_still_gives_one_line(tmp_path):
    binary = tmp_path / "ne\nsted"
    shutil.copy(NESTED, binary)
    assert_one_line_error(otel_ebpf("symbols", str(binary), "nope"), "'nope'", "ne\\nsted")


def test_reader_that_stops_early_gets_no_traceback():
    """`otel-ebpf symbols libc.so.6 | head -1`: the reader closes the pipe while we still print."""
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    result = subprocess.run([sys.executable, "-m", "otel_ebpf", "symbols", "/usr/lib/x86_64-linux-gnu/libc.so.6"],
                            stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=60)
    reader.stdin.close()
    reader.wait(10)
    assert result.returncode == 141 and result.stderr.startswith("otel-ebpf: symbols of ")
    assert len(result.stderr.splitlines()) == 1


def test_symbols_lists_functions_with_address_and_size():
    result = otel_ebpf("symbols", str(NESTED), "handle_*")
    assert result.returncode == 0, result.stderr
    address, size, name, parameters = result.stdout.strip().split(maxsplit=3)
    assert name == "handle_request" and int(address, 16) > 0 and int(size) > 0
    assert parameters == "(int id) -> long int"  # from its DWARF
