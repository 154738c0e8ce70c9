"""otel_ebpf.symbols.debuginfo: the symbols of stripped binaries from their separate debug files, found the way gdb
and elfutils find them, on binaries built, split and stripped here, on Debian's libc with libc6-dbg, and from a real
debuginfod server (Debian's) on the loopback interface of a network namespace of its own."""

import concurrent.futures
import ctypes
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from otel_ebpf import symbols
from otel_ebpf.errors import UserError
from otel_ebpf.symbols import debuginfo
from tests.unit.debug_builds import (LOCAL_FUNCTIONS, build_app, build_id, place_by_build_id, require,
                                     require_root, with_debuglink, with_mini_debuginfo)
from tests.waiting import wait_until

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
REPO = Path(__file__).resolve().parents[2]
_CLONE_NEWNET = 0x40000000


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_app(tmp_path_factory.mktemp("build"))


@pytest.fixture
def empty_root(tmp_path) -> str:
    """A debug root with nothing in it: the machine's /usr/lib/debug must not decide these tests."""
    (tmp_path / "no-debug").mkdir()
    return str(tmp_path / "no-debug")


def functions(binary, options=None) -> set[tuple[str, int, int, int]]:
    return {(f.name, f.address, f.offset, f.size) for f in symbols.list_functions(str(binary), options)}


def test_stripped_binary_alone_has_no_functions(build, empty_root):
    with pytest.raises(UserError, match="is stripped") as err:
        symbols.load(str(build.stripped), symbols.Options(debug_root=empty_root))
    assert "DEBUGINFOD_URLS" in err.value.hint and "-dbgsym" in err.value.hint
    assert f"/.build-id/{build.build_id[:2]}/{build.build_id[2:]}.debug" in err.value.hint


def test_debug_file_found_by_build_id(build, tmp_path):
    root = tmp_path / "debug"
    debug = place_by_build_id(build.debug, root, build.build_id)
    table = symbols.load(str(build.stripped), symbols.Options(debug_root=str(root)))
    assert (table.source.kind, table.source.file, table.source.build_id) == (debuginfo.BUILD_ID, str(debug),
                                                                             build.build_id)
    assert functions(build.stripped, symbols.Options(debug_root=str(root))) == functions(build.original)
    assert {*LOCAL_FUNCTIONS, "exported_work", "main"} <= {f.name for f in table.functions()}
    assert table.describe() == f"symbols of {build.stripped} from {debug} (build id {build.build_id})"


def test_offsets_are_those_of_the_real_binary(build, tmp_path):
    """The debug file has the addresses but not the code: each offset must hold the function's bytes in the
    stripped binary that runs."""
    root = tmp_path / "debug"
    place_by_build_id(build.debug, root, build.build_id)
    original, stripped = build.original.read_bytes(), build.stripped.read_bytes()
    by_name = {f.name: f for f in symbols.list_functions(str(build.original))}
    for f in symbols.list_functions(str(build.stripped), symbols.Options(debug_root=str(root))):
        assert stripped[f.offset:f.offset + f.size] == original[by_name[f.name].offset:][:f.size], f.name


def test_debug_file_of_another_build_is_not_taken(build, tmp_path, empty_root):
    other = build_app(tmp_path / "other", flags=("-DOTHER=1", "-O2"))
    root = tmp_path / "debug"
    place_by_build_id(other.debug, root, build.build_id)  # right place, wrong contents
    with pytest.raises(UserError, match="is stripped"):
        symbols.load(str(build.stripped), symbols.Options(debug_root=str(root)))


@pytest.mark.parametrize("where", ["next to it", ".debug/", "debug root"])
def test_debug_file_found_through_debuglink(build, tmp_path, empty_root, where):
    binary = with_debuglink(build, tmp_path / "bin")
    if where == "next to it":
        target = tmp_path / "bin" / "app.debug"
        root = empty_root
    elif where == ".debug/":
        target = tmp_path / "bin" / ".debug" / "app.debug"
        root = empty_root
    else:
        root = str(tmp_path / "debug-root")
        target = Path(root + str(tmp_path / "bin")) / "app.debug"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(build.debug, target)
    options = symbols.Options(debug_root=root)
    table = symbols.load(str(binary), options)
    assert (table.source.kind, table.source.file) == (debuginfo.DEBUGLINK, str(target))
    assert functions(binary, options) == functions(build.original)
    assert "CRC checked" in table.describe()


def test_debuglink_with_a_wrong_crc_is_refused(build, tmp_path, empty_root):
    """A debug file rebuilt since the link was made has other addresses: the CRC tells."""
    binary = with_debuglink(build, tmp_path / "bin")
    stale = tmp_path / "bin" / "app.debug"
    shutil.copy(build.debug, stale)
    with open(stale, "ab") as out:
        out.write(b"\0")
    with pytest.raises(UserError, match="is stripped"):
        symbols.load(str(binary), symbols.Options(debug_root=empty_root))


def test_mini_debuginfo(build, tmp_path, empty_root):
    """Fedora's way: the local functions in .gnu_debugdata, the exported ones in .dynsym; together all of them."""
    binary = with_mini_debuginfo(build, tmp_path / "mini")
    options = symbols.Options(debug_root=empty_root)
    table = symbols.load(str(binary), options)
    assert (table.source.kind, table.source.file) == (debuginfo.MINIDEBUGINFO, str(binary))
    assert {(name, address) for name, address, _, _ in functions(binary, options)} == {
        (name, address) for name, address, _, _ in functions(build.original)}
    assert set(LOCAL_FUNCTIONS) <= {f.name for f in table.functions()}
    assert "MiniDebugInfo (.gnu_debugdata)" in table.describe()


def test_damaged_mini_debuginfo_falls_back_to_dynsym(build, tmp_path, empty_root):
    binary = with_mini_debuginfo(build, tmp_path / "mini")
    data = bytearray(binary.read_bytes())
    start = data.index(b"\xfd7zXZ\x00")  # the xz stream's magic
    data[start + 40:start + 80] = b"\xff" * 40
    binary.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is stripped") as err:
        symbols.load(str(binary), symbols.Options(debug_root=empty_root))
    assert "could not be read" in err.value.hint


def libc6_dbg() -> str:
    """libc's build id, once its debug file is known to be installed."""
    build = build_id(Path(LIBC))
    if not debuginfo.via_build_id(build, "/usr/lib/debug"):
        pytest.fail("Debian's libc6-dbg is not installed for this libc: `make setup` should have installed it")
    return build


def test_libc_local_functions_with_libc6_dbg(empty_root):
    libc6_dbg()
    table = symbols.load(LIBC)
    alone = symbols.load(LIBC, symbols.Options(debug_root=empty_root))
    assert table.source.kind == debuginfo.BUILD_ID and alone.source.kind == symbols.DYNSYM
    (malloc,) = table.resolve(["_int_malloc"])
    assert malloc.name == "_int_malloc" and malloc.size > 1000
    assert len(table.functions()) > 1.5 * len(alone.functions())
    exported = {(f.name, f.address) for f in alone.functions()}
    assert exported <= {(name, entry.function.address) for entry in table.entries for name in entry.names}


def test_libc_without_its_debug_file_says_what_to_install(empty_root):
    alone = symbols.load(LIBC, symbols.Options(debug_root=empty_root))
    with pytest.raises(UserError) as err:
        alone.resolve(["_int_malloc"])
    assert "only the exported functions" in err.value.hint and "did you mean" not in err.value.hint
    assert "libc6-dbg" in err.value.hint and "DEBUGINFOD_URLS" in err.value.hint
    assert alone.describe().startswith(f"symbols of {LIBC} from its .dynsym only (build id ")


def test_symbols_command_says_where_symbols_came_from(build, tmp_path):
    build = libc6_dbg()
    environ = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "otel_ebpf", "symbols", LIBC, "_int_malloc"], env=environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"otel-ebpf: symbols of {LIBC} from /usr/lib/debug/.build-id/{build[:2]}/"
                           f"{build[2:]}.debug (build id {build})\n")
    assert done.stdout.split(maxsplit=2)[2] == "_int_malloc  (mstate av, size_t bytes) -> void *\n"  # DWARF of libc6-dbg


# --- debuginfod ---

class Debuginfod:
    """Debian's debuginfod serving a directory, alone in a network namespace: it listens on every interface, and
    there the only one is loopback. Calls that reach it run on a thread that entered that namespace."""

    def __init__(self, served: Path, database: Path):
        require("debuginfod", "unshare", "ip")
        require_root()
        self.process = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec debuginfod -F -p 8002 -d "$0" "$1"',
             str(database), str(served)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = "http://127.0.0.1:8002"
        wait_until(lambda: os.stat(f"/proc/{self.process.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino,
                   "debuginfod's network namespace", timeout_s=10)
        self._namespace = os.open(f"/proc/{self.process.pid}/ns/net", os.O_RDONLY)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, initializer=self._enter)

    def _enter(self) -> None:
        if ctypes.CDLL(None, use_errno=True).setns(self._namespace, _CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns into debuginfod's network namespace")

    def call(self, function, *args):
        return self._thread.submit(function, *args).result(timeout=120)

    def serves(self, build_id: str) -> bool:
        """Whether the server answers for build_id yet: it indexes its directory after it starts."""
        def ask() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/buildid/{build_id}/debuginfo", timeout=5):
                    return True
            except (urllib.error.URLError, ConnectionError):
                return False
        assert self.process.poll() is None, self.process.stderr.read().decode()
        return self.call(ask)

    def close(self) -> None:
        self._thread.shutdown()
        os.close(self._namespace)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory, build):
    directory = tmp_path_factory.mktemp("served")
    shutil.copy(build.debug, directory / "app.debug")
    server = Debuginfod(directory, tmp_path_factory.mktemp("db") / "debuginfod.sqlite")
    try:
        wait_until(lambda: server.serves(build.build_id), "debuginfod to index the debug file", timeout_s=120)
        yield server
    finally:
        server.close()


def test_debuginfod_fetches_and_caches(served, build, tmp_path, empty_root):
    cache = tmp_path / "cache"
    options = symbols.Options(debug_root=empty_root, debuginfod_urls=("http://127.0.0.1:1", served.url),
                              debuginfod_cache_path=str(cache))
    table = served.call(symbols.load, str(build.stripped), options)
    kept = cache / build.build_id / "debuginfo"
    assert (table.source.kind, table.source.file, table.source.origin) == (debuginfo.DEBUGINFOD, str(kept), served.url)
    assert kept.read_bytes() == build.debug.read_bytes()
    assert functions(build.stripped, options) == functions(build.original)
    # The next run needs no server: the cached file is found first.
    offline = replace(options, debuginfod_urls=("http://127.0.0.1:1",))
    again = served.call(symbols.load, str(build.stripped), offline)
    assert (again.source.file, again.source.origin) == (str(kept), "cache")
    assert "debuginfod cache" in again.describe()


def test_debuginfod_without_the_file_says_so(served, tmp_path, empty_root):
    unknown = build_app(tmp_path / "unknown", flags=("-DUNKNOWN=1",))
    options = symbols.Options(debug_root=empty_root, debuginfod_urls=("http://127.0.0.1:1", served.url),
                              debuginfod_cache_path=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="is stripped") as err:
        served.call(symbols.load, str(unknown.stripped), options)
    assert "debuginfod http://127.0.0.1:1: [Errno 111] Connection refused" in err.value.hint
    assert f"debuginfod {served.url}: no debug info for this build id" in err.value.hint
    assert not (tmp_path / "cache" / unknown.build_id / "debuginfo").exists()


def test_debuginfod_cache_default_works_on_a_read_only_root(served, build, tmp_path):
    """The real CLI, DEBUGINFOD_URLS from the environment, with XDG_CACHE_HOME read-only (a bind mount in a mount
    namespace of its own): downloads go to a private temp directory, the symbol cache is silently skipped."""
    require("nsenter", "unshare", "mount")
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temp.mkdir()
    environ = {**os.environ, "XDG_CACHE_HOME": str(home), "TMPDIR": str(temp), "DEBUGINFOD_URLS": served.url,
               "PYTHONPATH": str(REPO)}
    environ.pop("DEBUGINFOD_CACHE_PATH", None)
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift && exec "$@"'
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{served.process.pid}/ns/net", "unshare", "--mount", "sh", "-c", script, str(home),
         "-", sys.executable, "-m", "otel_ebpf", "symbols", str(build.stripped), "local_*"],
        env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    private = temp / f"otel-ebpf-{os.geteuid()}"
    kept = private / "debuginfod" / build.build_id / "debuginfo"
    assert done.stderr == f"otel-ebpf: symbols of {build.stripped} from {kept} (debuginfod {served.url})" \
                          f" (build id {build.build_id})\n"
    assert [line.split()[2] for line in done.stdout.splitlines()] == sorted(LOCAL_FUNCTIONS)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and list(home.iterdir()) == []


def test_private_temp_directory_made_by_someone_else_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"otel-ebpf-{os.geteuid()}"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)
    unwritable = tmp_path / "a-file"
    unwritable.write_text("")
    options = symbols.Options(cache_home=str(unwritable))  # its otel-ebpf/debuginfod cannot be made
    assert debuginfo.debuginfod_cache(options) is None
    os.chmod(planted, 0o700)
    assert debuginfo.debuginfod_cache(options) == str(planted / "debuginfod")
