"""What the running kernel will ask of otel-ebpf before it can trace: capabilities, tracefs, kernel headers.

Checked at start-up so that a missing privilege is one line naming it and how to grant it, instead of a
failure deep inside BCC or the kernel.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from pathlib import Path

from otel_ebpf.errors import UserError

# Capabilities the kernel checks, by bit number in /proc/self/status (linux/capability.h).
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAPABILITY_NAMES = {CAP_DAC_READ_SEARCH: "DAC_READ_SEARCH", CAP_SYS_PTRACE: "SYS_PTRACE", CAP_SYS_ADMIN: "SYS_ADMIN",
                    CAP_PERFMON: "PERFMON", CAP_BPF: "BPF"}
# Kernel releases that changed what tracing needs: a program can tell which uprobe fired from its attach cookie
# since 5.15 (otel-ebpf's programs need that; by then CAP_BPF and CAP_PERFMON exist, and BPF memory counts against
# the memory cgroup, not RLIMIT_MEMLOCK); multi-uprobe links, which need neither perf nor tracefs, exist since 6.6;
# since 6.16 (and in stable kernels with the fix for CVE-2025-38466) perf creates uprobes for CAP_SYS_ADMIN only,
# so without multi-uprobe links otel-ebpf then creates them by writing to tracefs's uprobe_events instead.
ATTACH_COOKIES = (5, 15)
MULTI_UPROBE_LINKS = (6, 6)
UPROBES_NEED_SYS_ADMIN = (6, 16)
# Where tracefs is looked for: its debugfs mount point when there is one, as BCC does.
TRACEFS_PATHS = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")


def tracefs() -> str | None:
    """Where tracefs is mounted, None when it is not."""
    with open("/proc/self/mounts") as mounts:
        mounted = {fields[1] for fields in map(str.split, mounts) if fields[2] == "tracefs"}
    return next((path for path in TRACEFS_PATHS if path in mounted), None)
_log = logging.getLogger("otel_ebpf.privileges")


def effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"^CapEff:\s*([0-9a-f]+)", status.read(), re.MULTILINE)[1], 16)


def has_capability(capability: int) -> bool:
    return bool(effective_capabilities() >> capability & 1)


def kernel_release() -> tuple[int, int]:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", platform.release()).groups())


def missing_privileges(effective: int, kernel: tuple[int, int], tracefs_readable: bool, mode: str) -> dict[int, str]:
    """The capabilities this kernel will ask for that the effective set lacks, each with what it is for.

    CAP_SYS_ADMIN passes every check CAP_BPF and CAP_PERFMON pass, so it stands in for both. `mode`: how the
    uprobes are attached (kernel.attach): multi-uprobe links (Linux 6.6+) and uprobes written to tracefs need
    nothing more; perf's uprobe PMU needs CAP_SYS_ADMIN since Linux 6.16.
    """
    def has(capability: int) -> bool:
        return bool(effective >> capability & 1)

    admin, missing = has(CAP_SYS_ADMIN), {}
    if not (has(CAP_BPF) or admin):
        missing[CAP_BPF] = "to load eBPF programs"
    if not (has(CAP_PERFMON) or admin):
        missing[CAP_PERFMON] = "to attach them"
    if not admin and mode == "perf" and kernel >= UPROBES_NEED_SYS_ADMIN:
        missing[CAP_SYS_ADMIN] = ("to create uprobes with perf on Linux 6.16+ (OTEL_EBPF_ATTACH=multi or "
                                  "tracefs need it not)")
    if not tracefs_readable:
        missing[CAP_DAC_READ_SEARCH] = "to read tracefs, which only root may"
    return missing


def check_privileges(mode: str) -> None:
    """Refuse to start without what the kernel will ask for, naming each missing capability and how to grant it.

    Reads the effective set even as root: a container's root lacks whatever cap_drop removed. Without
    CAP_SYS_PTRACE tracing works, so it is only a warning: what it costs is process identity.
    """
    kernel = kernel_release()
    if kernel < ATTACH_COOKIES:
        raise UserError(f"Linux {platform.release()} is too old: otel-ebpf needs Linux 5.15 or later",
                        "its BPF programs tell probes apart by their attach cookies (Linux 5.15+)")
    tracefs_path = tracefs()
    if tracefs_path is None:
        raise UserError("tracefs is not mounted at /sys/kernel/tracing",
                        "mount -t tracefs nodev /sys/kernel/tracing (make setup does), or in a container "
                        "mount the host's /sys/kernel/tracing")
    uprobe_events = os.path.join(tracefs_path, "uprobe_events")
    if mode == "tracefs" and not os.access(uprobe_events, os.W_OK, effective_ids=True):
        raise UserError(f"OTEL_EBPF_ATTACH=tracefs needs {uprobe_events} writable, and it is not",
                        "mount tracefs read-write, or leave OTEL_EBPF_ATTACH at auto")
    effective = effective_capabilities()
    missing = missing_privileges(effective, kernel, os.access(tracefs_path, os.R_OK | os.X_OK, effective_ids=True),
                                 mode)
    if missing:
        names = [CAPABILITY_NAMES[capability] for capability in missing]
        reasons = [f"CAP_{name} ({why})" for name, why in zip(names, missing.values())]
        raise UserError(
            "not allowed to trace: missing " + ", ".join(reasons),
            f"grant {'them' if len(names) > 1 else 'it'}: docker run {' '.join('--cap-add ' + n for n in names)}; "
            f"Kubernetes securityContext.capabilities.add: [{', '.join(names)}]; "
            f"setcap {','.join('cap_' + n.lower() for n in names)}+ep on a copy of the Python interpreter that only "
            "otel-ebpf runs; " + ("root alone is not enough when a container's cap_drop or a bounding set removed them"
                                  if os.geteuid() == 0 else "or run as root"))
    if not effective >> CAP_SYS_PTRACE & 1:
        _log.warning("without CAP_SYS_PTRACE, processes of other users or with capabilities otel-ebpf lacks cannot "
                     "be traced with --pid, and their spans lack process.executable.path "
                     "(grant it: docker run --cap-add SYS_PTRACE; securityContext.capabilities.add: [SYS_PTRACE])")


def check_kernel_headers(modules: Path = Path("/lib/modules")) -> None:
    """BCC compiles the program at run time against the running kernel's headers."""
    build = modules / platform.release() / "build"
    if not (build / "include").is_dir():
        raise UserError(
            f"kernel headers not found at {build}",
            "run `make setup` (installs linux-headers-amd64 and links them there) or install the "
            "headers for this kernel",
        )
