"""otel_ebpf.symbols.files: a binary or library as a process in another mount namespace or root sees it, against
real processes started in one (unshare -m with a bind mount over our file, and a chroot whose symbolic links
point inside it)."""

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_ebpf import symbols
from otel_ebpf.errors import UserError
from otel_ebpf.symbols import files
from tests.unit.debug_builds import require, require_root, run

LIB_C = "int {name}(int x) {{ return x + {value}; }}\n"
# Maps the library, says so, and waits for its stdin to close: a process that stays while the test looks at it.
HOLDER = "import ctypes, sys; ctypes.CDLL(sys.argv[1]); print('ready', flush=True); sys.stdin.read()"


def build_library(path: Path, function: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_suffix(".c")
    source.write_text(LIB_C.format(name=function, value=len(function)))
    run("gcc", "-shared", "-fPIC", "-o", path, source)
    return path


class Holder:
    """A process started by `command` that maps a library, until closed."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], deadline - time.monotonic())
            if ready:
                line = self.process.stdout.readline()
                assert line == "ready\n", f"{line!r} {self.process.stderr.read()}"
                return
        self.close()
        raise AssertionError("the process did not map its library within 30 s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def namespaced(tmp_path):
    """Our /…/view/lib/libtarget.so defines ours(); the process, in its own mount namespace, sees a bind mount
    there, whose libtarget.so defines theirs()."""
    require("unshare", "mount", "gcc")
    require_root()
    view = tmp_path / "view"
    ours = build_library(view / "lib" / "libtarget.so", "ours")
    theirs = build_library(tmp_path / "container" / "lib" / "libtarget.so", "theirs")
    holder = Holder(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     'mount --bind "$0" "$1" && exec "$2" -c "$3" "$4"', str(tmp_path / "container"), str(view),
                     sys.executable, HOLDER, str(ours)])
    try:
        yield ours, theirs, holder.pid
    finally:
        holder.close()


def test_absolute_path_as_the_process_sees_it(namespaced):
    ours, theirs, pid = namespaced
    path = files.locate(str(ours), pid)
    assert path == f"/proc/{pid}/root{ours}"
    assert os.stat(path).st_ino == os.stat(theirs).st_ino != os.stat(ours).st_ino
    assert [f.name for f in symbols.list_functions(str(ours), pid=pid)] == ["theirs"]
    assert [f.name for f in symbols.list_functions(str(ours))] == ["ours"]


def test_library_name_from_the_process_mappings(namespaced):
    ours, theirs, pid = namespaced
    for name in ("libtarget.so", "libtarget"):
        assert os.stat(files.locate(name, pid)).st_ino == os.stat(theirs).st_ino
    table = symbols.load("libtarget.so", pid=pid)
    assert table.binary == "libtarget.so" and [f.name for f in table.functions()] == ["theirs"]
    with pytest.raises(UserError, match=f"process {pid} maps no file named libnothere.so") as err:
        files.locate("libnothere.so", pid)
    assert "libtarget.so" in err.value.hint


def test_chroot_resolves_links_inside_its_root(tmp_path):
    """An absolute link inside the root means the root's /, not ours: os.path.realpath would leave the root."""
    require("unshare", "mount", "gcc")
    require_root()
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    for name in ("bin", "lib", "lib64"):
        if os.path.islink(f"/{name}"):
            (root / name).symlink_to(os.readlink(f"/{name}"))
    target = build_library(root / "app" / "lib" / "libtarget.so", "inside")
    (root / "app" / "lib" / "libalias.so").symlink_to("/app/lib/libtarget.so")
    (root / "app" / "current").symlink_to("lib")
    holder = Holder(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     'mount --bind /usr "$0/usr" && exec chroot "$0" /usr/bin/python3 -c "$1" "$2"', str(root),
                     HOLDER, "/app/current/libalias.so"])
    try:
        path = files.locate("/app/current/../current/libalias.so", holder.pid)
        assert path == f"/proc/{holder.pid}/root/app/lib/libtarget.so"
        assert os.stat(path).st_ino == os.stat(target).st_ino
        assert os.stat(files.locate("libtarget.so", holder.pid)).st_ino == os.stat(target).st_ino
        assert [f.name for f in symbols.list_functions("/app/lib/libalias.so", pid=holder.pid)] == ["inside"]
        with pytest.raises(UserError, match=r"binary /app/lib/missing.so not found \(as process \d+ sees it\)"):
            symbols.binary_path("/app/lib/missing.so", holder.pid)
    finally:
        holder.close()


def test_same_view_keeps_plain_paths(tmp_path):
    library = build_library(tmp_path / "libplain.so", "plain")
    holder = Holder([sys.executable, "-c", HOLDER, str(library)])
    try:
        assert files.locate(str(library), holder.pid) == str(library)
        assert files.locate("libplain.so", holder.pid) == str(library)
    finally:
        holder.close()


def test_link_loop_and_missing_process(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(UserError, match="too many symbolic links"):
        files.resolve_inside(str(tmp_path), "/a")
    with pytest.raises(UserError, match="no process 999999999"):
        files.locate("/bin/sh", 999999999)


def test_replaced_library_is_found_through_its_mapping(tmp_path):
    """A library replaced on disk after the process mapped it (an upgrade): the mapping still names the file that
    the process runs."""
    require("gcc")
    library = build_library(tmp_path / "libold.so", "old")
    holder = Holder([sys.executable, "-c", HOLDER, str(library)])
    try:
        mapped = os.stat(library).st_ino
        library.unlink()
        build_library(library, "new")
        path = files.locate("libold.so", holder.pid)
        assert path.startswith(f"/proc/{holder.pid}/map_files/") and os.stat(path).st_ino == mapped
        assert [f.name for f in symbols.list_functions("libold.so", pid=holder.pid)] == ["old"]
    finally:
        holder.close()
