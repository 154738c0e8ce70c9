"""Node-wide discovery: `run` with OTEL_EBPF_PROBES naming the binary by a path pattern traces every process whose
executable matches it: one running before the tracer, ones exec'd later from other copies, one whose file exists
only in its own mount namespace (a container's), one in a pod's cgroup; a file no process runs is detached."""

from __future__ import annotations

import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import clean_env
from tests.e2e.spancheck import check_tree, match, named
from tests.ground_truth import LIBGREET, NESTED, expected_counts, parse
from tests.waiting import wait_until

TRACED = ("handle_request", "fib")
PATTERN = "*/bin/nested"
POD_UID = str(uuid.UUID(int=0x5EED))
CONTAINER_ID = "c0" * 32


def install(root: Path) -> Path:
    """nested and the libgreet.so it finds beside itself ($ORIGIN), as ROOT/bin/nested: a file of its own."""
    (root / "bin").mkdir(parents=True)
    for source in (NESTED, LIBGREET):
        shutil.copy2(source, root / "bin" / source.name)
    return root / "bin" / "nested"


class Started:
    """A nested process that waits at its gate (NESTED_WAIT_FOR) until the test opens it."""

    def __init__(self, argv: list[str], tmp_path: Path, name: str):
        self.truth, self.gate = tmp_path / f"{name}.truth", tmp_path / f"{name}.gate"
        env = clean_env(NESTED_GROUND_TRUTH=str(self.truth), NESTED_WAIT_FOR=str(self.gate))
        self.proc = subprocess.Popen(argv, env=env)
        wait_until(lambda: self.truth.exists() and self.truth.read_text().startswith("pid "), f"{name} to start")
        self.pid = int(self.truth.read_text().split()[1])  # nested's own pid (not a wrapper's)

    def run(self) -> object:
        self.gate.touch()
        assert self.proc.wait(30) == 0
        return parse(self.truth.read_text())


@pytest.fixture
def start(tmp_path):
    """Starts gated nested processes (argv, name); kills those still running at teardown."""
    started: list[Started] = []

    def make(argv: list[str], name: str) -> Started:
        started.append(Started(argv, tmp_path, name))
        return started[-1]

    yield make
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


@pytest.fixture
def pod_cgroup():
    """A cgroup named as the kubelet (cgroupfs driver) and containerd name a container's: kubepods/besteffort/
    pod<uid>/<container id>, in the pids hierarchy; removed afterwards."""
    path = Path("/sys/fs/cgroup/pids/kubepods/besteffort") / f"pod{POD_UID}" / CONTAINER_ID
    path.mkdir(parents=True, exist_ok=True)
    yield path
    for directory in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        try:
            directory.rmdir()
        except OSError:  # another test's, or not empty
            break


def test_processes_matching_a_path_pattern_are_found_attached_and_detached(tracer, receiver, tmp_path, start,
                                                                           pod_cgroup):
    first = install(tmp_path / "app-a")
    early = start([str(first), "1", "2"], "early")  # running before the tracer starts
    t = tracer(["run"], OTEL_EBPF_PROBES=f"{PATTERN}:{','.join(TRACED)}",
               OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.http_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    t.wait_ready()
    assert f"the executables matching {PATTERN} (now {first})" in t.stderr, t.stderr
    truths = [early.run()]

    # Exec'd after start-up, from another copy: another file, attached when it execs.
    second = install(tmp_path / "app-b")
    later = start([str(second), "2", "1"], "later")
    t.wait_stderr(rf"otel-ebpf: found {second} \(pid {later.pid}\)")
    truths.append(later.run())
    t.wait_stderr(rf"otel-ebpf: no process runs {second} any more: its uprobes are detached")

    # A container: its file exists only in its own mount namespace, so it is read through /proc/PID/root; it
    # runs in a pod's cgroup.
    hidden = tmp_path / "container"
    hidden.mkdir()
    script = (f"echo $$ > {pod_cgroup}/cgroup.procs && mount -t tmpfs tmpfs {hidden} && mkdir {hidden}/bin && "
              f"cp {NESTED} {LIBGREET} {hidden}/bin/ && exec {hidden}/bin/nested 1 3")
    boxed = start(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], "boxed")
    assert not (hidden / "bin").exists(), "the file must not be visible outside the container"
    t.wait_stderr(rf"otel-ebpf: found {hidden}/bin/nested \(pid {boxed.pid}\)")
    truths.append(boxed.run())
    t.wait_stderr(rf"otel-ebpf: no process runs {hidden}/bin/nested any more")

    counts = [expected_counts(1, 2), expected_counts(2, 1), expected_counts(1, 3)]
    expected = sum(c[fn] for c in counts for fn in TRACED)
    received = receiver.wait_for_spans(expected, timeout=15)
    assert t.finish(signal.SIGTERM) == 0, t.stderr
    assert len(received) == expected
    for truth in truths:
        check_tree(match(received, truth, named(*TRACED)), truth)
    paths = {r["process.pid"]: r["process.executable.path"] for r, _ in received}
    assert paths == {early.pid: str(first), later.pid: str(second), boxed.pid: f"{hidden}/bin/nested"}
    boxed_resource = next(r for r, _ in received if r["process.pid"] == boxed.pid)
    assert (boxed_resource["k8s.pod.uid"], boxed_resource["container.id"]) == (POD_UID, CONTAINER_ID)
    assert not any("k8s.pod.uid" in r for r, _ in received if r["process.pid"] != boxed.pid)
    assert f"{expected} spans exported, 0 lost" in t.stderr, t.stderr



def test_containers_of_one_image_share_one_attachment(tracer, receiver, tmp_path, start):
    """Two containers started from one image: two overlayfs mounts over the same lower layer, each in a mount
    namespace of its own. Their executables are one file underneath (stat through each overlay gives another
    device): it is attached once, so each call is one span, not two."""
    image = install(tmp_path / "image")
    t = tracer(["run"], OTEL_EBPF_PROBES=f"{PATTERN}:{','.join(TRACED)}",
               OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.http_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    t.wait_ready()
    containers = []
    for name in ("one", "two"):
        upper, work, merged = (tmp_path / f"{name}-{part}" for part in ("upper", "work", "merged"))
        for directory in (upper, work, merged):
            directory.mkdir()
        script = (f"mount -t overlay overlay -o lowerdir={image.parent.parent},upperdir={upper},workdir={work} "
                  f"{merged} && exec {merged}/bin/nested 1 2")
        containers.append(start(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], name))
    t.wait_stderr(rf"otel-ebpf: found {tmp_path}/(one|two)-merged/bin/nested ")
    # Exec notices are handled in order: once a later process is found, the second container's exec was seen.
    marker = start([str(install(tmp_path / "marker")), "1", "1"], "marker")
    t.wait_stderr(rf"otel-ebpf: found {tmp_path}/marker/bin/nested \(pid {marker.pid}\)")
    containers.append(marker)
    truths = [c.run() for c in containers]
    expected = sum(expected_counts(1, n)[fn] for n in (2, 2, 1) for fn in TRACED)
    received = receiver.wait_for_spans(expected, timeout=15)
    assert t.finish(signal.SIGTERM) == 0, t.stderr
    assert len(received) == expected, "each call once"
    for truth in truths:
        check_tree(match(received, truth, named(*TRACED)), truth)
    assert sum("otel-ebpf: found " in line for line in t.stderr_lines) == 2, "the image's file, then the marker's"


def test_a_run_whose_pattern_matched_nothing_says_so(tracer, receiver):
    t = tracer(["run"], OTEL_EBPF_PROBES="*/bin/no-such-server:handle_*",
               OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.http_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    t.wait_ready()
    assert t.finish(signal.SIGTERM) == 0, t.stderr
    assert "0 spans exported, 0 lost; no process ran an executable matching */bin/no-such-server" in t.stderr, \
        t.stderr
