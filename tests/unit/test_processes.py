"""Process identities from the kernel's notices (what each process was exec'd as), from /proc otherwise, and the
resources made of them."""

import os

import pytest

from otel_ebpf import __version__, processes
from otel_ebpf.kernel import layout
from otel_ebpf.otlp.encode import process_key
from otel_ebpf.processes import ProcessInfo, ProcessRegistry, cgroup_ids

GONE = 4_000_000_000  # no such pid: nothing is read from /proc for it


def identity(filename=b"/usr/bin/redis-server", argv=(b"redis-server", b"--port", b"6380"), **environ: bytes):
    return layout.Identity(layout.IDENTITY_CAPTURED, filename, argv,
                           {name.encode(): value for name, value in environ.items()}, bytes(16), bytes(8))


def notice(pid=GONE, seq=7, cause=layout.PROCESS_CAUSE_EXEC, ident=None, kind=layout.NOTICE_PROCESS, parent=(0, 0)):
    return layout.ProcessNotice(kind, pid, seq, *parent, cause, ident)


def resource(registry: ProcessRegistry, pid=GONE, seq=7) -> dict:
    return registry.resource_attributes(registry.info(int(process_key(pid, seq))))


def test_an_exec_identity_names_the_process_as_it_was_started():
    """service.name from argv[0] (redis-server), not the symlink's target; the captured arguments."""
    registry = ProcessRegistry(None, {"deployment.environment.name": "t"})
    registry.on_notice(notice(ident=identity()))
    attrs = resource(registry)
    assert attrs["service.name"] == "redis-server"
    assert attrs["process.command_args"] == ["redis-server", "--port", "6380"]
    assert attrs["process.command_line"] == "redis-server --port 6380"
    assert attrs["process.executable.path"] == "/usr/bin/redis-server"  # the process is gone: what execve got
    assert attrs["process.executable.name"] == "redis-server"
    assert attrs["process.pid"] == GONE and attrs["deployment.environment.name"] == "t"
    assert attrs["telemetry.distro.version"] == __version__


@pytest.mark.parametrize("environ, ours, expected", [
    ({"OTEL_SERVICE_NAME": "own"}, "sidecar", "own"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,team=a"}, "sidecar", "from-attrs"),
    ({}, "sidecar", "sidecar"),
    ({}, None, "redis-server"),
])
def test_service_name_precedence(environ, ours, expected):
    registry = ProcessRegistry(ours, {})
    registry.on_notice(notice(ident=identity(**{k: v.encode() for k, v in environ.items()})))
    assert resource(registry)["service.name"] == expected


def test_the_processs_own_resource_attributes_join_and_bad_items_are_skipped():
    registry = ProcessRegistry(None, {"team": "sidecar", "region": "eu"})
    registry.on_notice(notice(ident=identity(OTEL_RESOURCE_ATTRIBUTES=b"team=own,garbage,k8s.pod.uid=u%2C1")))
    attrs = resource(registry)
    assert (attrs["team"], attrs["region"], attrs["k8s.pod.uid"]) == ("own", "eu", "u,1")


def test_its_traceparent_is_its_parent():
    registry = ProcessRegistry(None, {})
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    info = registry.on_notice(notice(ident=identity(TRACEPARENT=tp.encode(), TRACESTATE=b"a=1")))
    assert info.parent.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and info.parent.tracestate == "a=1"


def test_a_fork_is_its_parent_again_under_its_own_pid():
    registry = ProcessRegistry(None, {})
    registry.on_notice(notice(ident=identity(OTEL_SERVICE_NAME=b"nginx")))
    registry.on_notice(notice(pid=GONE + 1, seq=9, cause=layout.PROCESS_CAUSE_FORK, parent=(GONE, 7)))
    attrs = resource(registry, GONE + 1, 9)
    assert (attrs["service.name"], attrs["process.pid"]) == ("nginx", GONE + 1)


def test_arguments_that_are_not_utf8_never_break_a_resource():
    registry = ProcessRegistry(None, {})
    registry.on_notice(notice(ident=identity(filename=b"/srv/\xff", argv=(b"\xfe\xff", b"ok"))))
    attrs = resource(registry)
    assert attrs["process.command_args"] == ["\ufffd\ufffd", "ok"]
    assert attrs["process.executable.path"] == "/srv/\ufffd"


def test_a_process_found_without_its_exec_is_read_from_proc():
    registry = ProcessRegistry(None, {})
    registry.on_notice(notice(pid=os.getpid(), seq=3, cause=layout.PROCESS_CAUSE_FOUND))
    attrs = resource(registry, os.getpid(), 3)
    assert attrs["process.executable.path"] == os.path.realpath("/proc/self/exe")
    assert any("pytest" in arg for arg in attrs["process.command_args"])


def test_reused_pids_are_told_apart_by_process_seq():
    registry = ProcessRegistry(None, {})
    registry.on_notice(notice(seq=1, ident=identity(OTEL_SERVICE_NAME=b"first")))
    registry.on_notice(notice(seq=2, ident=identity(OTEL_SERVICE_NAME=b"second")))
    assert (resource(registry, seq=1)["service.name"], resource(registry, seq=2)["service.name"]) == (
        "first", "second")


def test_an_exited_process_is_forgotten_after_its_grace(monkeypatch):
    """Spans of its last threads can still be drained right after the exit notice; later, nothing is."""
    clock = [1000.0]
    monkeypatch.setattr(processes.time, "monotonic", lambda: clock[0])
    registry = ProcessRegistry(None, {})
    registry.on_notice(notice(ident=identity(OTEL_SERVICE_NAME=b"brief")))
    registry.on_notice(notice(kind=layout.NOTICE_PROCESS_EXIT))
    registry.evict_exited()
    assert resource(registry)["service.name"] == "brief"
    clock[0] += processes.EXITED_GRACE_S + 1
    registry.evict_exited()
    assert resource(registry)["service.name"] != "brief"  # read again: the pid is gone, so nothing of its own


def test_what_the_processes_ran_is_told_for_a_run_that_traced_nothing():
    registry = ProcessRegistry(None, {})
    registry.on_notice(notice(ident=identity(filename=b"/bin/sh", argv=(b"sh",))))
    registry.on_notice(notice(seq=8, ident=identity(filename=b"/bin/sleep", argv=(b"sleep",))))
    assert registry.executables() == ["/bin/sh", "/bin/sleep"]


def test_from_proc_of_a_missing_process_falls_back():
    info = ProcessInfo.from_proc(GONE, "/srv/app")
    assert (info.executable, info.argv, info.started_as) == ("/srv/app", (), "app")


@pytest.mark.parametrize("cgroup, expected", [
    # cgroup v2, systemd driver, containerd
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f3b4c1e_9a2d_4e6f_8b7a_1c2d3e4f5a6b.slice/"
     "cri-containerd-" + "ab" * 32 + ".scope\n", ("ab" * 32, "0f3b4c1e-9a2d-4e6f-8b7a-1c2d3e4f5a6b")),
    # cgroup v1, cgroupfs driver, docker; the last line naming ids wins
    ("12:pids:/kubepods/besteffort/pod0f3b4c1e-9a2d-4e6f-8b7a-1c2d3e4f5a6b/" + "cd" * 32 + "\n"
     "4:memory:/process_api/4e849a13202855438bbf34be91950297\n", ("cd" * 32, "0f3b4c1e-9a2d-4e6f-8b7a-1c2d3e4f5a6b")),
    # a container outside Kubernetes, and no container at all
    ("0::/system.slice/docker-" + "ef" * 32 + ".scope\n", ("ef" * 32, None)),
    ("0::/user.slice/user-0.slice/session-1.scope\n", (None, None)),
])
def test_container_and_pod_ids_come_from_the_cgroup_names(cgroup, expected):
    assert cgroup_ids(cgroup) == expected
