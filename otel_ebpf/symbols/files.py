"""Files as a traced process sees them: the one place that resolves paths across mount namespaces.

A container's /usr/lib/libssl.so.3 is not the host's. The kernel attaches a uprobe to an inode, so the
file must be opened through the process's own root, /proc/PID/root, and its symbolic links followed
inside that root: an absolute link target means the container's /, not ours, so os.path.realpath
(which would leave the container) cannot be used. A bare library name (libssl.so.3) is looked up in
/proc/PID/maps, the copy that process really mapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from otel_ebpf.errors import UserError

_MAX_LINKS = 40  # as the kernel's own limit on symbolic links followed in one lookup (ELOOP)
_DELETED = " (deleted)"


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps that maps a file."""

    start: int
    end: int
    offset: int  # file offset mapped at start
    device: tuple[int, int]  # (major, minor)
    inode: int
    path: str  # as the process sees it; " (deleted)" stripped, see `deleted`
    deleted: bool


def locate(name: str, pid: int | None = None) -> str:
    """The path, valid in this process, of the file that `name` means to process `pid` (to us when None).

    Absolute names go through /proc/PID/root when the process has another root or mount namespace;
    names without a "/" are files the process mapped (libssl.so.3, or its executable's name), else ours
    in the working directory; other relative paths are ours.
    Symbolic links are resolved, so the result names the inode uprobes attach to.
    """
    if pid is None or ("/" in name and not os.path.isabs(name)):
        return os.path.realpath(os.path.expanduser(name))
    _check_process(pid)
    if "/" not in name:
        return _mapped_file(name, pid)
    return _in_root(pid, name)


def mappings(pid: int | str = "self") -> list[Mapping]:
    """The file mappings of a process, in address order."""
    found = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            start, end = (int(part, 16) for part in fields[0].split("-"))
            major, minor = (int(part, 16) for part in fields[3].split(":"))
            path, deleted = fields[5], fields[5].endswith(_DELETED)
            found.append(Mapping(start, end, int(fields[2], 16), (major, minor), int(fields[4]),
                                 path.removesuffix(_DELETED) if deleted else path, deleted))
    return found


def same_file(mapping: Mapping, stat: os.stat_result) -> bool:
    return mapping.inode == stat.st_ino and mapping.device == (os.major(stat.st_dev), os.minor(stat.st_dev))


def _check_process(pid: int) -> None:
    try:
        os.stat(f"/proc/{pid}/root")
    except FileNotFoundError:
        raise UserError(f"no process {pid}", "check the pid: the process may have exited") from None
    except PermissionError:
        raise UserError(f"cannot see the files of process {pid}: permission denied",
                        "run otel-ebpf as root, or grant it CAP_SYS_PTRACE") from None


def _same_view(pid: int) -> bool:
    """Whether the process resolves paths as we do: same root directory and same mount namespace."""
    ours, theirs = os.stat("/"), os.stat(f"/proc/{pid}/root")
    if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino):
        return False
    return os.stat("/proc/self/ns/mnt").st_ino == os.stat(f"/proc/{pid}/ns/mnt").st_ino


def _in_root(pid: int, path: str) -> str:
    if _same_view(pid):
        return os.path.realpath(path)
    root = f"/proc/{pid}/root"
    return root + resolve_inside(root, path)


def resolve_inside(root: str, path: str) -> str:
    """path with every symbolic link resolved as if `root` were /, the way a chrooted process sees it.

    Components that do not exist are kept as they are, so the caller's "not found" names the path.
    """
    pending = [part for part in reversed(path.split("/")) if part]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            del resolved[-1:]
            continue
        try:
            target = os.readlink(os.path.join(root, *resolved, part))
        except OSError:  # not a link, or missing
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise UserError(f"too many symbolic links in {path}", "the links form a loop")
        if target.startswith("/"):
            resolved = []
        pending += [part for part in reversed(target.split("/")) if part]
    return "/" + "/".join(resolved)


def _mapped_file(name: str, pid: int) -> str:
    """The file process pid mapped whose name is `name` (libssl.so.3), or starts with it and a dot (libssl).

    A library deleted or replaced since it was mapped (an upgrade while the process runs) is still the code the
    process runs: /proc/PID/map_files names that very file.
    """
    maps = mappings(pid)
    matching = [m for m in maps if _library_name_matches(os.path.basename(m.path), name)]
    if not matching:
        if os.path.exists(name):
            return os.path.realpath(name)
        libraries = sorted({os.path.basename(m.path) for m in maps if ".so" in os.path.basename(m.path)},
                           key=lambda library: (not library.startswith("lib"), library))
        shown = ", ".join(libraries[:8]) + (", ..." if len(libraries) > 8 else "") or "none"
        raise UserError(f"process {pid} maps no file named {name}",
                        f"it runs {_executable(pid)} and maps {shown}; or give the file's full path")
    by_file = {(m.device, m.inode): m for m in matching}
    if len(by_file) > 1:
        paths = sorted({m.path + (" (deleted)" if m.deleted else "") for m in matching})
        raise UserError(f"process {pid} maps several files named {name}: {', '.join(paths)}",
                        "give the full path of the one to trace")
    mapping = next(iter(by_file.values()))
    if not mapping.deleted:
        path = _in_root(pid, mapping.path)
        try:
            if same_file(mapping, os.stat(path)):
                return path
        except OSError:
            pass
    # Deleted, another file there now, or overlayfs reporting the inode of its lower layer.
    return f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}"


def _executable(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "a program otel-ebpf may not see"


def _library_name_matches(basename: str, name: str) -> bool:
    return basename == name or basename.startswith(name + ".")
