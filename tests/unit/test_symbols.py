"""otel_ebpf.symbols against small programs compiled on the spot, checked against binutils' view."""

import ctypes
import dataclasses
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from otel_ebpf import symbols
from otel_ebpf.errors import UserError

LIB_C = """
static int helper(int x) { return x * 2; }
int compute(int x) { return helper(x) + 1; }
int compute_alias(int x) __attribute__((alias("compute")));
int cw(int x) __attribute__((weak, alias("compute")));
int handle_request(int x) { return compute(x); }
int handle_reply(int x) { return compute(x) - 1; }
"""
MAIN_C = "int handle_request(int);\nint main(int argc, char **argv) { (void)argv; return handle_request(argc); }\n"
LIB_CPP = """
namespace ns {
class Foo {
  public:
    int bar(int x);
    int bar(double x);
    int operator()(int x);
};
int Foo::bar(int x) { return x; }
int Foo::bar(double x) { return (int)x; }
int Foo::operator()(int x) { return x + 1; }
template <typename T> T add(T a, T b) { return a + b; }
template int add<int>(int, int);
template long add<long>(long, long);
}
"""
PROG_RS = """
pub mod server {
    pub struct Srv;
    impl Srv {
        #[inline(never)]
        pub fn handle(&self, x: usize) -> usize { std::hint::black_box(x) + 1 }
    }
}
fn main() { println!("{}", server::Srv.handle(std::env::args().count())); }
"""
SOURCES = {"lib.c": LIB_C, "main.c": MAIN_C, "lib.cpp": LIB_CPP}
BUILDS = {
    "nopie": ["gcc", "-O0", "-no-pie", "-fno-pie", "lib.c", "main.c"],
    "pie": ["gcc", "-O0", "-pie", "-fPIE", "lib.c", "main.c"],
    "so": ["gcc", "-O0", "-shared", "-fPIC", "lib.c"],
    "cpp": ["g++", "-O0", "-shared", "-fPIC", "lib.cpp"],
    "obj": ["gcc", "-c", "lib.c"],
}
STRIPPED = {"stripped_so": "so", "stripped_exe": "pie"}
PROBEABLE = ["nopie", "pie", "so", "stripped_so", "cpp"]


@pytest.fixture(scope="module")
def bins(tmp_path_factory) -> dict[str, str]:
    """Every test binary, built once for the module since compiling is slow on small machines."""
    workdir = tmp_path_factory.mktemp("bins")
    for name, text in SOURCES.items():
        (workdir / name).write_text(text)
    for name, command in BUILDS.items():
        subprocess.run([*command, "-o", name], cwd=workdir, check=True, capture_output=True)
    for name, original in STRIPPED.items():
        subprocess.run(["strip", "--strip-all", original, "-o", name], cwd=workdir, check=True)
    return {name: str(workdir / name) for name in [*BUILDS, *STRIPPED]}


def nm_functions(path: str) -> set[tuple[str, int]]:
    """(name, address) of sized text symbols as nm reports them; -D reads .dynsym of stripped files."""
    dynamic = ["-D"] if "stripped" in path else []
    out = subprocess.run(["nm", "-S", "--defined-only", *dynamic, path], check=True, capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    return {(row[3], int(row[0], 16)) for row in rows if len(row) == 4 and row[2] in "TtWw"}


def by_name(binary: str) -> dict[str, symbols.FunctionSymbol]:
    return {fn.name: fn for fn in symbols.list_functions(binary)}


@pytest.mark.parametrize("kind", PROBEABLE)
def test_addresses_match_nm(bins, kind):
    functions = symbols.list_functions(bins[kind])
    nm = nm_functions(bins[kind])
    assert {(fn.name, fn.address) for fn in functions} <= nm
    assert sorted(fn.address for fn in functions) == sorted({address for _, address in nm})
    assert [fn.demangled for fn in functions] == sorted(fn.demangled for fn in functions)


@pytest.mark.parametrize("kind", PROBEABLE)
def test_offsets_hold_the_bytes_of_the_function(bins, kind):
    """The file bytes at `offset` are the bytes the section table places at `address`."""
    data = Path(bins[kind]).read_bytes()
    with open(bins[kind], "rb") as stream:
        sections = [s for s in ELFFile(stream).iter_sections() if s["sh_flags"] & SH_FLAGS.SHF_ALLOC]
        for fn in symbols.list_functions(bins[kind]):
            (section,) = [s for s in sections if s["sh_addr"] <= fn.address < s["sh_addr"] + s["sh_size"]]
            start = fn.address - section["sh_addr"]
            assert data[fn.offset : fn.offset + fn.size] == section.data()[start : start + fn.size]


def test_pie_and_non_pie_offsets_differ(bins):
    nopie, pie = by_name(bins["nopie"])["handle_request"], by_name(bins["pie"])["handle_request"]
    assert nopie.address - nopie.offset == 0x400000  # ld loads non-PIE x86-64 executables at 0x400000
    assert pie.address == pie.offset  # PIE segments are linked with vaddr == file offset
    assert pie.size == nopie.size


def test_glob_and_pattern_order(bins):
    def names(patterns):
        return [fn.name for fn in symbols.resolve(bins["so"], patterns)]

    assert names(["handle_*"]) == ["handle_reply", "handle_request"]
    assert names(["handle_request", "handle_*", "comp*"]) == ["handle_request", "handle_reply", "compute"]
    assert names(["helper"]) == ["helper"]


def test_aliases_collapse_to_one_global_name(bins):
    """Listed once under the global name; named exactly by an alias, the function is shown by that alias (the
    user asked for libc's close, not __close); a glob shows the global name."""
    functions = symbols.list_functions(bins["so"])
    compute = by_name(bins["so"])["compute"]
    assert [fn.name for fn in functions if fn.address == compute.address] == ["compute"]
    assert symbols.resolve(bins["so"], ["cw"]) == [dataclasses.replace(compute, name="cw", demangled="cw")]
    assert symbols.resolve(bins["so"], ["compute_alias", "compute"]) == [
        dataclasses.replace(compute, name="compute_alias", demangled="compute_alias")]
    assert symbols.resolve(bins["so"], ["compute", "compute_alias"]) == [compute]
    assert symbols.resolve(bins["so"], ["c?"]) == [compute]


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("ns::Foo::bar(int)", {"ns::Foo::bar(int)"}),
        ("ns::Foo::bar", {"ns::Foo::bar(int)", "ns::Foo::bar(double)"}),
        ("ns::Foo::operator()", {"ns::Foo::operator()(int)"}),
        ("ns::add<int>", {"int ns::add<int>(int, int)"}),
        ("ns::add*", {"int ns::add<int>(int, int)", "long ns::add<long>(long, long)"}),
        ("_ZN2ns3Foo3barEd", {"ns::Foo::bar(double)"}),
        ("*::bar(double)", {"ns::Foo::bar(double)"}),
    ],
)
def test_cpp_names_match_with_and_without_parameters(bins, pattern, expected):
    assert {fn.demangled for fn in symbols.resolve(bins["cpp"], [pattern])} == expected


def test_missing_symbol_suggests_close_names(bins):
    with pytest.raises(UserError) as err:
        symbols.resolve(bins["so"], ["handle_requets"])
    assert "handle_requets" in err.value.message and bins["so"] in err.value.message
    assert "handle_request" in err.value.hint
    with pytest.raises(UserError) as err:
        symbols.resolve(bins["so"], ["handle_request", "zzzzzzzzzzzz"])
    assert f"otel-ebpf symbols {bins['so']}" in err.value.hint


def test_stripped_library_keeps_exported_functions(bins):
    full, stripped = by_name(bins["so"]), by_name(bins["stripped_so"])
    assert stripped["handle_request"] == full["handle_request"]
    assert "helper" in full and "helper" not in stripped


def test_stripped_executable_is_reported(bins):
    with pytest.raises(UserError, match="stripped") as err:
        symbols.resolve(bins["stripped_exe"], ["main"])
    assert err.value.hint


def file_with(data: bytes):
    def make(directory: Path, bins: dict[str, str]) -> Path:
        path = directory / "bad"
        path.write_bytes(data)
        return path

    return make


NOISE = random.Random(0).randbytes(4096)
BAD_INPUTS = {
    "missing": (lambda directory, bins: directory / "missing", "not found"),
    "directory": (lambda directory, bins: directory, "directory"),
    "object_file": (lambda directory, bins: Path(bins["obj"]), "ET_REL"),
    "text": (file_with(b"#!/bin/sh\necho hello\n"), "not an ELF"),
    "random": (file_with(NOISE), "not an ELF"),
    "elf_magic_then_noise": (file_with(b"\x7fELF\x02\x01\x01" + NOISE), "not an ELF"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_user_error(bins, tmp_path, case):
    make, message = BAD_INPUTS[case]
    path = str(make(tmp_path, bins))
    for call in (symbols.binary_path, symbols.list_functions, lambda p: symbols.resolve(p, ["main"])):
        with pytest.raises(UserError, match=message) as err:
            call(path)
        assert err.value.hint


@pytest.mark.parametrize("keep", [100, 1000, 0.5, -200])
def test_truncated_elf_is_a_user_error(bins, tmp_path, keep):
    data = Path(bins["pie"]).read_bytes()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(UserError, match="not an ELF"):
        symbols.list_functions(str(truncated))


def test_relative_symlink_resolves_to_real_path(bins, tmp_path, monkeypatch):
    (tmp_path / "link.so").symlink_to(bins["so"])
    monkeypatch.chdir(tmp_path)
    assert symbols.binary_path("link.so") == os.path.realpath(bins["so"])
    assert symbols.resolve("link.so", ["handle_request"]) == [by_name(bins["so"])["handle_request"]]


def test_without_cxxfilt_names_stay_raw(bins, tmp_path, monkeypatch):
    copy = tmp_path / "copy.so"  # a new path, so nothing cached in this process applies (and no cache on disk)
    shutil.copy(bins["cpp"], copy)
    monkeypatch.setenv("PATH", str(tmp_path))
    fn = by_name(str(copy))["_ZN2ns3Foo3barEi"]
    assert fn.demangled == fn.name
    assert symbols.resolve(str(copy), ["_ZN2ns3Foo3barE*"]) != []


def test_rebuilt_binary_is_read_again(bins, tmp_path):
    target = tmp_path / "app"
    shutil.copy(bins["so"], target)
    assert "main" not in by_name(str(target))
    shutil.copy(bins["pie"], target)
    assert "main" in by_name(str(target))


@pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc is not installed")
@pytest.mark.parametrize("mangling", ["default", "v0"])
def test_rust_names_are_demangled_without_hashes(tmp_path, mangling):
    (tmp_path / "prog.rs").write_text(PROG_RS)
    flags = ["-C", "symbol-mangling-version=v0"] if mangling == "v0" else []
    subprocess.run(["rustc", "-O", *flags, "prog.rs"], cwd=tmp_path, check=True, capture_output=True)
    (fn,) = symbols.resolve(str(tmp_path / "prog"), ["*Srv*::handle"])
    assert fn.demangled in {"prog::server::Srv::handle", "<prog::server::Srv>::handle"}
    assert fn.name.startswith("_R" if mangling == "v0" else ("_ZN", "_R"))
    assert symbols.resolve(str(tmp_path / "prog"), [fn.demangled]) == [fn]


# --- IFUNCs: the implementation the resolver picks on this machine ---

IFUNC_C = """
__attribute__((noinline, used)) static int __twice_generic(int x) { return 2 * x; }
__attribute__((noinline, used)) static int __twice_fast(int x) { return x << 1; }
static int (*twice_resolver(void))(int) { return __twice_fast; }
int twice(int x) __attribute__((ifunc("twice_resolver")));
int call_twice(int x) { return twice(x) + 1; }
"""
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


@pytest.fixture(scope="module")
def ifunc_libs(tmp_path_factory) -> dict[str, str]:
    """The IFUNC library twice: one copy this process loads, one it never loads, and a stripped one."""
    workdir = tmp_path_factory.mktemp("ifunc")
    (workdir / "ifunc.c").write_text(IFUNC_C)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", "libtwice.so", "ifunc.c"], cwd=workdir, check=True)
    shutil.copy(workdir / "libtwice.so", workdir / "libtwice-loaded.so")
    subprocess.run(["strip", "--strip-all", "-o", "libtwice-stripped.so", "libtwice.so"], cwd=workdir, check=True)
    return {name: str(workdir / f"libtwice{suffix}.so")
            for name, suffix in (("unloaded", ""), ("loaded", "-loaded"), ("stripped", "-stripped"))}


def libc6_dbg_installed() -> None:
    if not any(f.name.startswith("__strlen_") for f in symbols.list_functions(LIBC)):
        pytest.fail("no __strlen_* in libc's symbols: `make setup` should have installed Debian's libc6-dbg")


def assert_is_the_code_running_here(binary: str, function: symbols.FunctionSymbol, name: str) -> None:
    """The bytes at the pick's file offset are the bytes this process runs when it calls name."""
    runtime = ctypes.cast(getattr(ctypes.CDLL(binary), name), ctypes.c_void_p).value
    size = function.size or 16
    assert ctypes.string_at(runtime, size) == Path(binary).read_bytes()[function.offset:function.offset + size]


def test_ifunc_of_a_library_loaded_here_is_its_implementation(ifunc_libs):
    ctypes.CDLL(ifunc_libs["loaded"])
    (pick,) = symbols.resolve(ifunc_libs["loaded"], ["twice"])
    assert (pick.ifunc, pick.name) == ("twice", "__twice_fast")
    assert_is_the_code_running_here(ifunc_libs["loaded"], pick, "twice")


def test_ifunc_of_a_library_not_loaded_here_names_the_implementations(ifunc_libs):
    with pytest.raises(UserError, match=r"twice in .*libtwice\.so is an IFUNC") as err:
        symbols.resolve(ifunc_libs["unloaded"], ["twice"])
    assert err.value.hint == "trace its implementations instead: __twice_fast, __twice_generic"
    # A glob goes on with what it can trace.
    assert [f.name for f in symbols.resolve(ifunc_libs["unloaded"], ["*twice*"])] == [
        "__twice_fast", "__twice_generic", "call_twice", "twice_resolver"]


def test_ifunc_of_a_stripped_library_not_loaded_says_what_to_install(ifunc_libs):
    with pytest.raises(UserError, match="is an IFUNC") as err:
        symbols.resolve(ifunc_libs["stripped"], ["twice"])
    assert "its implementations" in err.value.hint and "DEBUGINFOD_URLS" in err.value.hint


def test_strlen_is_the_implementation_this_machine_runs():
    libc6_dbg_installed()
    (pick,) = symbols.resolve(LIBC, ["strlen"])
    assert pick.ifunc == "strlen" and pick.name.startswith("__strlen_") and pick.size > 0
    assert_is_the_code_running_here(LIBC, pick, "strlen")
    memmove = symbols.resolve(LIBC, ["memmove"])[-1]
    assert memmove.ifunc == "memmove" and memmove.name.startswith("__memmove_")


def test_strlen_of_another_copy_of_libc_names_its_implementations(tmp_path):
    libc6_dbg_installed()
    copy = tmp_path / "libc.so.6"  # same build id, so the same debug file, but not the file loaded here
    shutil.copy(LIBC, copy)
    with pytest.raises(UserError, match="strlen in .* is an IFUNC") as err:
        symbols.resolve(str(copy), ["strlen"])
    shown = err.value.hint.removeprefix("trace its implementations instead: ").removesuffix(", ...").split(", ")
    assert shown and all(name.startswith("__strlen_") for name in shown), err.value.hint
    assert "__strlen_sse2" in shown or err.value.hint.endswith(", ...")


def test_symbols_command_shows_the_pick(tmp_path):
    libc6_dbg_installed()
    done = subprocess.run([sys.executable, "-m", "otel_ebpf", "symbols", LIBC, "strlen"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert re.fullmatch(r"0x[0-9a-f]{12} +\d+  strlen -> __strlen_\w+", line), line


# --- did you mean: only plausibly related names ---

UNRELATED_C = "int strtol(void) { return 1; }\nint setgrent(void) { return 2; }\nint strlen_impl(void) { return 3; }\n"


def test_suggestions_are_only_plausibly_related(tmp_path):
    (tmp_path / "u.c").write_text(UNRELATED_C)
    subprocess.run(["gcc", "-fno-builtin", "-shared", "-fPIC", "-o", "libu.so", "u.c"], cwd=tmp_path, check=True)
    library = str(tmp_path / "libu.so")
    with pytest.raises(UserError) as err:
        symbols.resolve(library, ["strlen"])
    assert err.value.hint == "did you mean: strlen_impl"  # contains what was asked; strtol and setgrent do not
    with pytest.raises(UserError) as err:
        symbols.resolve(library, ["srttol"])
    assert err.value.hint == "did you mean: strtol"  # two letters swapped
    with pytest.raises(UserError) as err:
        symbols.resolve(library, ["getpwent"])
    assert "did you mean" not in err.value.hint


# --- names as the user gave them ---

def test_messages_name_the_binary_as_given(bins, tmp_path):
    """Debian's /usr/bin/redis-server is a link to redis-check-rdb: whoever names redis-server must read it."""
    target = tmp_path / "redis-check-rdb"
    shutil.copy(bins["so"], target)
    link = tmp_path / "redis-server"
    link.symlink_to(target.name)
    table = symbols.load(str(link))
    assert (table.binary, table.path) == (str(link), str(target))
    assert table.describe().startswith(f"symbols of {link} from its own symbol table")
    with pytest.raises(UserError) as err:
        table.resolve(["nope"])
    assert str(link) in str(err.value) and "redis-check-rdb" not in str(err.value)
