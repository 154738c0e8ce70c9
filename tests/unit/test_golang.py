"""otel_ebpf.symbols.golang on the real Go example (with and without .symtab) and on C compiled on the spot,
checked against the Go tool, nm and objdump."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter, defaultdict

import pytest
from elftools.elf.elffile import ELFFile

from otel_ebpf import symbols
from otel_ebpf.errors import UserError
from otel_ebpf.kernel.attach import Kind
from otel_ebpf.kernel.layout import COOKIE_GO_HOOK, GO_HOOK_NEWPROC, GO_HOOK_REQUEST_WRITE, GO_HOOK_ROUND_TRIP
from otel_ebpf.probes import GO_STREAM_HANDLERS, go_hook_sites, go_stream_starts
from otel_ebpf.symbols import golang
from tests.ground_truth import (GO_TRACED_FUNCTIONS, GOAPP, GOAPP_STRIPPED, GOH2, LIBGREET, NESTED, build_examples,
                                expected_go_counts, parse)

GO_BUILDS = [GOAPP, GOAPP_STRIPPED]
SHAPES_C = """
#include <stdlib.h>
__attribute__((noinline)) int leaf(int x) { return x > 100 ? x / 3 : x * 3 + 1; }
__attribute__((noinline)) int tail(int x) { return leaf(x + 1); }
__attribute__((noinline, noreturn)) void die(int x) { exit(x); }
__attribute__((noinline)) int pick(int x)
{
    switch (x) {
    case 0: x += 3; break;
    case 1: x *= 7; break;
    case 2: x ^= 0x55; break;
    case 3: x -= 11; break;
    case 4: x <<= 3; break;
    case 5: x = leaf(x); break;
    case 6: x = leaf(x + 2) * 5; break;
    case 7: x >>= 2; break;
    default: x = 0;
    }
    return leaf(x) + 1;
}
int main(int argc, char **argv) { (void)argv; if (argc > 5) die(argc); return tail(argc) + pick(argc); }
"""
_RET_LINE = re.compile(r"\s*([0-9a-f]+):\s+(?:repz |bnd )?ret\b")
_INSTRUCTION_LINE = re.compile(r"\s*([0-9a-f]+):\s+(.+)")
_JUMP_TARGET = re.compile(r"j\w+\s+([0-9a-f]+) <")


@pytest.fixture(scope="module", autouse=True)
def examples_built():
    build_examples()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    """C functions compiled by gcc -O2 into the shapes under test; CET on, so each starts with ENDBR64."""
    workdir = tmp_path_factory.mktemp("shapes")
    (workdir / "shapes.c").write_text(SHAPES_C)
    subprocess.run(["gcc", "-O2", "-fcf-protection=full", "-o", "shapes", "shapes.c"], cwd=workdir, check=True)
    return str(workdir / "shapes")


def function(binary, name: str) -> symbols.FunctionSymbol:
    (found,) = symbols.resolve(str(binary), [name])
    return found


def objdump(binary, symbol: symbols.FunctionSymbol) -> list[str]:
    """objdump's listing of the symbol's bytes, by address range so it works on stripped binaries too."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={symbol.address:#x}",
                          f"--stop-address={symbol.address + symbol.size:#x}", str(binary)],
                         check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def objdump_returns(binary, symbol: symbols.FunctionSymbol) -> list[int]:
    return [int(m.group(1), 16) for m in map(_RET_LINE.match, objdump(binary, symbol)) if m]


def nm_functions(binary) -> list[tuple[int, str]]:
    """(address, name) of nm's text symbols, sorted by address."""
    out = subprocess.run(["nm", "--defined-only", str(binary)], check=True, capture_output=True, text=True).stdout
    rows = [line.split(maxsplit=2) for line in out.splitlines()]
    return sorted((int(address, 16), name) for address, kind, name in rows if kind in "Tt")


def file_bytes(binary, offset: int, size: int) -> bytes:
    with open(binary, "rb") as stream:
        stream.seek(offset)
        return stream.read(size)


@pytest.mark.parametrize("binary", GO_BUILDS, ids=lambda path: path.name)
def test_go_version_is_what_the_go_tool_reports(binary):
    out = subprocess.run(["go", "version", str(binary)], check=True, capture_output=True, text=True).stdout
    assert golang.go_version(str(binary)) == out.split(": ", 1)[1].strip()
    assert golang.check_register_abi(str(binary)) == golang.go_version(str(binary))


@pytest.mark.parametrize("binary", [NESTED, LIBGREET, __file__], ids=["c_program", "c_library", "not_elf"])
def test_other_files_are_not_go(binary):
    assert golang.go_version(str(binary)) is None
    with pytest.raises(UserError, match="cannot tell which Go release"):
        golang.check_register_abi(str(binary))


def test_the_stripped_build_has_only_the_go_function_table():
    with open(GOAPP_STRIPPED, "rb") as stream:
        sections = {section.name for section in ELFFile(stream).iter_sections()}
    assert ".gopclntab" in sections and ".symtab" not in sections


def test_pclntab_lists_every_function_of_the_symbol_table():
    """Addresses of the whole table (runtime included) against nm; names too for the program's own code,
    where .symtab adds no ABI suffix (runtime.goexit.abi0) or generic shape (type..eq.[5]...)."""
    with open(GOAPP, "rb") as stream:
        table = golang.pclntab_functions(ELFFile(stream))
    text = nm_functions(GOAPP)
    names_at = defaultdict(set)
    for address, name in text:
        names_at[address].add(name)
    etext = {address for address, name in text if name == "runtime.etext"}
    assert len(table) > 1000
    assert {f.entry for f in table} == set(names_at) - etext
    main = [f for f in table if f.name.startswith("main.")]
    assert {f.name for f in main} >= set(GO_TRACED_FUNCTIONS)
    assert all(f.name in names_at[f.entry] for f in main)
    # Each function ends where the next one starts; the last one at runtime.etext, or (go1.26) where its code
    # ends, runtime.etext then following at the next 16-byte boundary.
    assert [f.end for f in table[:-1]] == [f.entry for f in table[1:]]
    (end_of_text,) = etext
    assert 0 <= end_of_text - table[-1].end < 16


def test_stripped_binary_resolves_the_same_go_functions():
    """Same names and addresses from .gopclntab as from .symtab; sizes reach the next function, padding
    included, so they are at least the symbol table's."""
    with_symtab = {f.name: f for f in symbols.list_functions(str(GOAPP)) if f.name.startswith("main.")}
    stripped = {f.name: f for f in symbols.list_functions(str(GOAPP_STRIPPED)) if f.name.startswith("main.")}
    assert stripped.keys() == with_symtab.keys()
    for name, f in stripped.items():
        assert (f.address, f.offset) == (with_symtab[name].address, with_symtab[name].offset), name
        assert f.size >= with_symtab[name].size, name
    assert any(f.size > with_symtab[name].size for name, f in stripped.items()), "no padding was tested"


@pytest.mark.parametrize("binary", GO_BUILDS, ids=lambda path: path.name)
def test_go_patterns_resolve(binary):
    methods = [f.name for f in symbols.resolve(str(binary), ["main.(*Server).*"])]
    assert {"main.(*Server).handle", "main.(*Server).parse", "main.(*Server).fanOut"} <= set(methods)
    assert all(name.startswith("main.(*Server).") for name in methods)
    assert function(binary, "runtime.goexit").name in ("runtime.goexit", "runtime.goexit.abi0")


@pytest.mark.parametrize("name", GO_TRACED_FUNCTIONS)
@pytest.mark.parametrize("binary", GO_BUILDS, ids=lambda path: path.name)
def test_go_return_sites_are_objdumps_rets(binary, name):
    symbol = function(binary, name)
    sites = list(golang.traceable_shape(str(binary), symbol).returns)
    assert sites == objdump_returns(binary, symbol)
    assert len(sites) >= 2  # the normal return, and the one after runtime.deferreturn
    for site in sites:
        assert symbol.address <= site < symbol.address + symbol.size
        assert file_bytes(binary, symbol.offset + site - symbol.address, 1) in (b"\xc3", b"\xc2")


@pytest.mark.parametrize("name", GO_TRACED_FUNCTIONS)
def test_go_entry_site_is_past_the_stack_growth_check(name):
    """Before the entry site: the comparison with the goroutine's stack limit (g in r14) and the jumps to the
    block that calls runtime.morestack, then jumps back to the first instruction. Nothing after it jumps
    back to it or before it."""
    symbol = function(GOAPP, name)
    entry = golang.traceable_shape(str(GOAPP), symbol).entry
    instructions = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION_LINE.match, objdump(GOAPP, symbol))
                    if m]
    prologue = [text for address, text in instructions if address < entry]
    assert any("0x10(%r14)" in text for text in prologue) and prologue[-1].startswith("jbe")
    morestack = int(prologue[-1].split()[1], 16)
    block = [text for address, text in instructions if address >= morestack]
    assert "runtime.morestack" in next(text for text in block if text.startswith("call"))
    assert next(text for text in block if text.startswith("jmp")).startswith(f"jmp    {symbol.address:x} <")
    # Frames over 4 KiB (main.deep) first check that subtracting the frame size does not wrap: a jb too.
    assert any(text.startswith("jb ") for text in prologue) == (name == "main.deep")
    after = [m for address, text in instructions if address >= entry for m in [_JUMP_TARGET.match(text)] if m]
    assert all(int(m.group(1), 16) > entry for m in after if int(m.group(1), 16) != symbol.address)


@pytest.mark.parametrize("binary", GO_BUILDS, ids=lambda path: path.name)
def test_go_function_that_never_returns_is_refused(binary):
    with pytest.raises(UserError, match=r"runtime\.goexit.*no ret instruction: it never returns"):
        golang.traceable_shape(str(binary), function(binary, "runtime.goexit"))


@pytest.mark.parametrize("padded", [False, True], ids=["symbol_size", "up_to_next_function"])
def test_c_function_with_endbr64_and_two_returns(shapes, padded):
    """gcc's nop padding after the last ret is skipped, as Go's int3 padding is in the stripped build."""
    symbol = function(shapes, "leaf")
    if padded:
        symbol = dataclasses.replace(symbol, size=function(shapes, "tail").address - symbol.address)
    assert file_bytes(shapes, symbol.offset, 4) == b"\xf3\x0f\x1e\xfa"
    sites = list(golang.traceable_shape(shapes, symbol).returns)
    assert sites == objdump_returns(shapes, function(shapes, "leaf")) and len(sites) == 2
    assert golang.traceable_shape(shapes, symbol).entry == symbol.address + 4


@pytest.mark.parametrize("name, reason", [
    ("tail", r"cannot trace tail in .*: it leaves through a jump to 0x[0-9a-f]+ at 0x[0-9a-f]+ \(a tail call\)"),
    ("pick", r"cannot trace pick in .*: it jumps through a register or memory"),
    ("die", r"cannot trace die in .*: it has no ret instruction"),
])
def test_c_shapes_that_cannot_be_traced_are_refused(shapes, name, reason):
    with pytest.raises(UserError, match=reason):
        golang.traceable_shape(shapes, function(shapes, name))


def test_tail_call_target_is_the_called_function(shapes):
    symbol = function(shapes, "tail")
    shape = golang.exit_shape(file_bytes(shapes, symbol.offset, symbol.size), symbol.address)
    assert [target for _, target in shape.jumps_out] == [function(shapes, "leaf").address]
    assert shape.returns == ()


def test_unknown_size_is_refused(shapes):
    symbol = dataclasses.replace(function(shapes, "leaf"), size=0)
    with pytest.raises(UserError, match="size is unknown"):
        golang.traceable_shape(shapes, symbol)


@pytest.mark.parametrize("offset, size", [(None, 2), (0, 1 << 40), (1 << 40, 16), (1 << 63, 16)],
                         ids=["one_byte_past_the_end", "huge_size", "offset_past_the_end", "offset_past_2**63"])
def test_code_outside_the_file_is_refused(shapes, offset, size):
    """Offsets and sizes come from the binary's headers, so damaged ones must end in a UserError, not a seek error."""
    end = os.path.getsize(shapes)
    symbol = dataclasses.replace(function(shapes, "leaf"), offset=end - 1 if offset is None else offset, size=size)
    with pytest.raises(UserError, match=r"cannot trace leaf in .*: its code is not all in the file"):
        golang.traceable_shape(shapes, symbol)


@pytest.mark.parametrize("code, field, expected", [
    (b"\xc3" + b"\xcc" * 15, "returns", (0x1000,)),  # Go's int3 padding
    (b"\xc3\x66\x0f\x1f\x44\x00\x00", "returns", (0x1000,)),  # a multi-byte nop
    (b"\xc2\x08\x00\xcc", "returns", (0x1000,)),  # ret imm16
    (b"\xf3\xc3", "returns", (0x1000,)),  # repz ret
    (b"\x48\xff\xcf\x75\xfb\xc3", "reentries", (0x1003,)),  # dec rdi; jne start; ret: a loop to the start
    (b"\x90\x06\xc3", "undecodable", 0x1001),  # 0x06 is no instruction in 64-bit mode
    (b"\x31\xc0\x48\x89\xc7", "falls_through", True),  # xor; mov: runs into the next function
    (b"\x85\xff\x0f\x85\x00\x10\x00\x00\xc3", "jumps_out", ((0x1002, 0x2008),)),  # jne elsewhere: a tail call
])
def test_exit_shape(code, field, expected):
    assert getattr(golang.exit_shape(code, 0x1000), field) == expected


def test_goapp_ground_truth_of_work():
    out = subprocess.run([str(GOAPP), "work", "5"], check=True, capture_output=True, text=True, timeout=60).stdout
    truth = parse(out)
    assert Counter(c.fn for c in truth.calls) == expected_go_counts(5)
    assert truth.done == len(truth.calls)
    check_goroutine_trees(truth.calls)


def test_goapp_ground_truth_of_http():
    proc = subprocess.Popen([str(GOAPP), "serve", "-port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("pid ")
        port = int(proc.stdout.readline().removeprefix("listening port="))
        for request_id in (0, 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/?id={request_id}", timeout=10) as response:
                assert response.read().decode().startswith(f"goapp: request {request_id} -> ")
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/?id=x", timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    truth = parse(f"pid {proc.pid}\n{out}")
    assert Counter(c.fn for c in truth.calls) == expected_go_counts(2)
    check_goroutine_trees(truth.calls)


def check_goroutine_trees(calls):
    """Per goroutine: seqs 1..N, each call inside its parent, and the parent the one the code calls from."""
    callers = {"main.(*Server).parse": {"main.(*Server).handle"}, "main.(*Server).fanOut": {"main.(*Server).handle"},
               "main.fib": {"main.work", "main.fib"}, "main.deep": {"main.work", "main.deep"}}
    by_key = {(c.tid, c.seq): c for c in calls}
    per_goroutine = defaultdict(list)
    for call in calls:
        per_goroutine[call.tid].append(call.seq)
    assert all(sorted(seqs) == list(range(1, len(seqs) + 1)) for seqs in per_goroutine.values())
    for call in calls:
        if call.parent == 0:
            assert call.fn in ("main.(*Server).handle", "main.work"), call
            continue
        parent = by_key[(call.tid, call.parent)]
        assert parent.fn in callers[call.fn], (parent, call)
        assert parent.start <= call.start <= call.end <= parent.end, (parent, call)



# --- globs that keep going ---

@pytest.mark.parametrize("binary", GO_BUILDS, ids=lambda path: path.name)
def test_glob_probes_the_traceable_matches_and_reports_the_others(binary):
    matches = symbols.resolve_each(str(binary), ["runtime.m*", "main.fib"])
    selection = golang.select_traceable(str(binary), matches, shown="goapp")
    matched = {f.address for _, functions in matches for f in functions}
    refused = {r.function.address for r in selection.refused}
    traceable = {f.address for f, _ in selection.traceable}
    assert refused and traceable and refused | traceable == matched and not refused & traceable
    for function, shape in selection.traceable:
        assert golang.traceable_shape(str(binary), function) == shape
    for refusal in selection.refused:
        with pytest.raises(UserError) as err:
            golang.traceable_shape(str(binary), refusal.function, shown="goapp")
        assert str(err.value) == str(refusal.error)
    glob_matches = len(matches[0][1])
    assert selection.warning.startswith(
        f"skipping {len(refused)} of the {glob_matches} functions matching 'runtime.m*' in goapp that cannot be "
        f"traced: ")
    assert selection.warning.endswith("; see `otel-ebpf symbols goapp 'runtime.m*'`")
    reasons = re.findall(r"([a-z][a-z0-9 -]+): (\d+) \(", selection.warning)
    assert sum(int(count) for _, count in reasons) == len(refused)
    assert {why for why, _ in reasons} == {r.why for r in selection.refused}


def test_exact_name_that_cannot_be_traced_stays_an_error():
    matches = symbols.resolve_each(str(GOAPP), ["main.fib", "runtime.goexit"])
    with pytest.raises(UserError, match=r"cannot trace runtime\.goexit(\.abi0)? in goapp: it has no ret instruction"):
        golang.select_traceable(str(GOAPP), matches, shown="goapp")


def test_glob_with_no_traceable_match_is_an_error():
    refused = golang.select_traceable(str(GOAPP), symbols.resolve_each(str(GOAPP), ["runtime.m*"])).refused
    name = next(r.function.demangled for r in refused if not re.search(r"[*?\[]", r.function.demangled))
    only = f"{name[:-1]}[{name[-1]}]"
    with pytest.raises(UserError, match=rf"no function matching {re.escape(repr(only))} in .* can be traced "
                                        r"\(1 matched\)"):
        golang.select_traceable(str(GOAPP), symbols.resolve_each(str(GOAPP), [only]))


def test_symbols_command_marks_what_cannot_be_traced(tmp_path):
    result = subprocess.run([sys.executable, "-m", "otel_ebpf", "symbols", str(GOAPP_STRIPPED), "runtime.m*"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"otel-ebpf: symbols of {GOAPP_STRIPPED} from its Go function table")
    marked = dict(re.findall(r"  (\S+)  \[not traceable: ([^\]]+)\]$", result.stdout, re.MULTILINE))
    selection = golang.select_traceable(str(GOAPP_STRIPPED), symbols.resolve_each(str(GOAPP_STRIPPED), ["runtime.m*"]))
    assert marked == {r.function.demangled: r.why for r in selection.refused}
    assert len(result.stdout.splitlines()) == len(selection.refused) + len(selection.traceable)


@pytest.mark.parametrize("binary", GO_BUILDS, ids=["symtab", "stripped"])
def test_go_hooks_get_their_sites(binary):
    """Where context passes between goroutines (bpf/http.bpf.c go_hook_entry): runtime.newproc1 gets one entry
    site and one per ret, net/http's roundTrip and Request.write their entry only, each inside its function with
    COOKIE_GO_HOOK and its hook id; a C binary has none."""
    sites = go_hook_sites(str(binary))
    for name, hook in (("runtime.newproc1", GO_HOOK_NEWPROC), ("net/http.(*Transport).roundTrip", GO_HOOK_ROUND_TRIP),
                       ("net/http.(*Request).write", GO_HOOK_REQUEST_WRITE)):
        (function,) = symbols.resolve(str(binary), [name])
        mine = [s for s in sites if s.cookie == COOKIE_GO_HOOK | hook]
        kinds = [s.kind for s in mine]
        assert kinds.count(Kind.ENTRY) == 1, name
        assert (Kind.RETURN_SITE in kinds) == (hook == GO_HOOK_NEWPROC), name
        assert all(function.offset <= s.offset < function.offset + function.size for s in mine), name
    assert all(s.cookie & ~0xFF == COOKIE_GO_HOOK for s in sites)
    assert go_hook_sites(str(NESTED)) == []


def test_stream_goroutine_starts_are_the_symbols_addresses():
    """Where Go's HTTP/2 servers start stream goroutines (probes.GO_STREAM_HANDLERS): in goh2, gRPC-Go's handler
    closure and net/http's three runHandler wrappers, at their symbols' addresses (the binaries are not PIE);
    the stripped goapp finds net/http's from .gopclntab; a C binary has none."""
    starts = go_stream_starts(str(GOH2))
    names = {f.name: f.address for pattern in GO_STREAM_HANDLERS for _, found in
             _resolved(GOH2, pattern) for f in found}
    assert sorted(starts) == sorted(a for n, a in names.items() if ".deferwrap" not in n)
    assert {n.rsplit(".", 1)[0] for n, a in names.items() if a in starts} == {
        "google.golang.org/grpc.(*Server).serveStreams.func2", "net/http.(*http2serverConn).scheduleHandler",
        "net/http.(*http2serverConn).handlerDone", "net/http.(*http2serverConn).upgradeRequest"}
    assert len(go_stream_starts(str(GOAPP_STRIPPED))) == 3
    assert go_stream_starts(str(NESTED)) == []


def _resolved(binary, pattern):
    try:
        return symbols.resolve_each(str(binary), [pattern])
    except UserError:
        return []
