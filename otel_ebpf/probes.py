"""Where the uprobes of each function go, and the table that names what each probe id is.

A probe id is a number user space gives each function it traces; the kernel learns it from the uprobe's
attach cookie and reports it in every span (kernel/layout.py COOKIE_*). Native code gets an entry uprobe and a
uretprobe; Go code an entry uprobe past the stack-growth check and a plain uprobe on every return instruction,
paired per goroutine (see symbols/golang.py for why, and for the function shapes that are refused).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from otel_ebpf import captures as capturing
from otel_ebpf.errors import UserError
from otel_ebpf.kernel.attach import Kind, Site
from otel_ebpf import symbols
from otel_ebpf.kernel.layout import (COOKIE_CAPTURE, COOKIE_FILTER, COOKIE_GO, COOKIE_GO_HOOK, COOKIE_GOID_SHIFT,
                                     COOKIE_INSTANT, COOKIE_PROCESS_START, GO_HOOK_NEWPROC, GO_HOOK_REQUEST_WRITE,
                                     GO_HOOK_ROUND_TRIP, MAX_PROBES)
from otel_ebpf.otlp.encode import ProbeInfo
from otel_ebpf.symbols import FunctionSymbol, SymbolTable, dwarf, golang, usdt

# Where context passes from one goroutine to another (bpf/http.bpf.c): the function, its hook, and whether its
# returns are probed too.
GO_HOOKS = (("runtime.newproc1", GO_HOOK_NEWPROC, True),
            ("net/http.(*Transport).roundTrip", GO_HOOK_ROUND_TRIP, False),
            ("net/http.(*Request).write", GO_HOOK_REQUEST_WRITE, False))


@dataclass(frozen=True)
class Probe:
    """One function (or USDT probe) to trace and where its uprobes go (virtual addresses, as in the ELF file)."""

    binary: str  # the real path: uprobes attach to the file (its inode)
    symbol: FunctionSymbol
    entry: int
    returns: tuple[int, ...] = ()  # Go: its return instructions
    goid_offset: int = 0  # Go: where runtime.g keeps the goroutine id, 0 when unknown
    shown_as: str = ""  # the binary as the user named it, for spans and messages
    captures: capturing.Plan | None = None  # what its calls' spans carry of their arguments and result
    go: bool = False
    # USDT: the sites of the probe (a zero-length span each time one fires), or of a pair's start and done.
    usdt: tuple[usdt.UsdtProbe, ...] = ()
    usdt_done: tuple[usdt.UsdtProbe, ...] = ()
    name_filter: bytes | None = None  # struct name_filter: only the calls whose names match are traced

    @property
    def is_go(self) -> bool:
        return self.go

    def _offset(self, address: int) -> int:
        """File offset of an address inside the function."""
        return self.symbol.offset + address - self.symbol.address

    def sites(self, probe_id: int) -> list[Site]:
        cookie = probe_id | (COOKIE_GO | self.goid_offset << COOKIE_GOID_SHIFT if self.is_go else 0) | (
            COOKIE_CAPTURE if self.captures else 0) | (COOKIE_FILTER if self.name_filter else 0)
        if self.usdt:
            if not self.usdt_done:
                return [Site(p.offset, Kind.ENTRY, cookie | COOKIE_INSTANT, p.semaphore_offset) for p in self.usdt]
            return ([Site(p.offset, Kind.ENTRY, cookie, p.semaphore_offset) for p in self.usdt] +
                    [Site(p.offset, Kind.RETURN_SITE, cookie, p.semaphore_offset) for p in self.usdt_done])
        entry = Site(self._offset(self.entry), Kind.ENTRY, cookie)
        if self.is_go:
            return [entry, *(Site(self._offset(ret), Kind.RETURN_SITE, cookie) for ret in self.returns)]
        return [entry, Site(self.symbol.offset, Kind.RETURN, cookie)]

    @property
    def info(self) -> ProbeInfo:
        return ProbeInfo(self.symbol.demangled, self.shown_as or self.binary)


def plan(binary: str, functions: list[FunctionSymbol], shown_as: str = "") -> list[Probe]:
    """The probes for functions of one binary, each named exactly: one that cannot be traced is a UserError."""
    return plan_matches(binary, [(f.name, [f]) for f in functions], shown_as)[0]


def plan_matches(binary: str, matches: list[tuple[str, list[FunctionSymbol]]], shown_as: str = ""
                 ) -> tuple[list[Probe], str | None]:
    """The probes for what each pattern matched (SymbolTable.resolve_each), and a warning line about the
    matches of globs that cannot be traced (Go code only), which are skipped."""
    if golang.go_version(binary) is None:
        functions = {f.address: f for _, found in matches for f in found}
        return [Probe(binary, f, f.address, shown_as=shown_as) for f in functions.values()], None
    golang.check_register_abi(binary)
    goid_offset = golang.goid_offset(binary)
    selection = golang.select_traceable(binary, matches, shown_as or binary)
    return ([Probe(binary, f, shape.entry, shape.returns, goid_offset, shown_as, go=True)
             for f, shape in selection.traceable],
            selection.warning)


def wanted(table: SymbolTable, text: str) -> tuple[str, capturing.CaptureSpec | None]:
    """A probe spec's symbol and captures (captures.split); a spec that names a function exactly as written (a C++
    signature such as `f(int)`) is that function, without captures."""
    symbol, spec = capturing.split(text)
    if spec is not None and not spec.result and any(text in entry.names for entry in table.entries):
        return text, None
    return symbol, spec


def with_captures(probes: list[Probe], matches: list[tuple[str, list[FunctionSymbol]]],
                  specs: dict[str, capturing.CaptureSpec | None], table: SymbolTable) -> list[Probe]:
    """The probes with the capture plans their patterns ask for (the first pattern matching a function decides);
    DWARF is read only when some pattern captures."""
    by_address = {}
    for pattern, found in matches:
        for function in found:
            by_address.setdefault(function.address, specs.get(pattern))
    if not any(by_address.values()):
        return probes
    signatures = dwarf.signatures(table.source.file, tuple(a for a, spec in by_address.items() if spec))
    return [dataclasses.replace(probe, captures=capturing.plan(spec, probe.symbol.demangled, probe.is_go,
                                                               signatures.get(probe.symbol.address)))
            if (spec := by_address.get(probe.symbol.address)) else probe for probe in probes]


USDT_PREFIX = "usdt:"
# The ends of a pair's names: `X__start` with `X__done` (or _end), traced as one span from one to the other.
_PAIR_ENDS = (("start", "done"), ("start", "end"), ("entry", "return"))


def plan_usdt(table: SymbolTable, wanted: dict[str, capturing.CaptureSpec | None]) -> list[Probe]:
    """The probes for `usdt:PROVIDER:NAME` specs: a zero-length span each time the probe fires, or for a pair
    named together (`..._start` and `..._done`), one span from start to done."""
    found = usdt.probes(table.path)
    if not found:
        raise UserError(f"{table.binary} has no USDT probes (no .note.stapsdt section)",
                        f"`otel-ebpf symbols {table.binary}` lists what it has")
    by_name: dict[str, list[usdt.UsdtProbe]] = {}
    for probe in found:
        by_name.setdefault(probe.full_name, []).append(probe)
    names = {}
    for text, spec in wanted.items():
        name = text[len(USDT_PREFIX):]
        if name not in by_name:
            shown = ", ".join(sorted(by_name)[:8])
            raise UserError(f"{table.binary} has no USDT probe {name!r}",
                            f"it has {len(by_name)}: {shown}{' ...' if len(by_name) > 8 else ''}")
        names[name] = spec
    pairs = {}  # start name -> (done name, the pair's own name)
    for name in names:
        for start, end in _PAIR_ENDS:
            if name.endswith(start) and name[:-len(start)] + end in names:
                pairs[name] = (name[:-len(start)] + end, name[:-len(start)].rstrip("_"))
                break
    ends = {done for done, _ in pairs.values()}
    probes = []
    for name, spec in names.items():
        if name in ends:
            continue
        done, shown = pairs.get(name, (None, name))
        # The sites of one probe (a marker inlined in several places) can hold its arguments in other registers:
        # one capture plan serves the sites that agree.
        layouts: dict[tuple[str, ...], list[usdt.UsdtProbe]] = {}
        for site in by_name[name]:
            layouts.setdefault(tuple(a.text for a in site.arguments), []).append(site)
        if done is not None and len(layouts) > 1:
            raise UserError(f"usdt:{name} is at {len(by_name[name])} places that pass its arguments differently; a "
                            "pair needs one layout", f"trace usdt:{name} alone: each place gets its own span")
        symbol = FunctionSymbol(USDT_PREFIX + shown, shown, by_name[name][0].address, by_name[name][0].offset, 0)
        for sites in layouts.values():
            probes.append(Probe(table.path, symbol, sites[0].address, shown_as=table.binary,
                                captures=capturing.usdt_plan(spec, sites[0]), usdt=tuple(sites),
                                usdt_done=tuple(by_name[done]) if done else ()))
    return probes


def go_hook_sites(binary: str) -> list[Site]:
    """Uprobes on the functions of GO_HOOKS a Go binary has (COOKIE_GO_HOOK); none for other binaries."""
    sites = []
    for function, hook, returns in GO_HOOKS:
        try:
            probes, _ = plan_matches(binary, symbols.resolve_each(binary, [function]))
        except UserError:
            continue  # not in this program (no HTTP client), or not traceable
        sites += [Site(site.offset, site.kind, COOKIE_GO_HOOK | hook) for probe in probes for site in probe.sites(0)
                  if returns or site.kind == Kind.ENTRY]
    return sites


# The functions Go's HTTP/2 servers start each stream's goroutine with (bpf/http.bpf.c start_stream): gRPC-Go's
# handler closure inside (*Server).serveStreams; the wrappers Go (1.22 on) makes of net/http's and x/net/http2's
# `go sc.runHandler(...)` statements.
GO_STREAM_HANDLERS = tuple(["google.golang.org/grpc.(*Server).serveStreams.func*.*"] + [
    f"{server}.{caller}.gowrap*" for server in ("net/http.(*http2serverConn)", "golang.org/x/net/http2.(*serverConn)")
    for caller in ("scheduleHandler", "handlerDone", "upgradeRequest")])


def go_stream_starts(binary: str) -> list[int]:
    """Entry addresses of a Go executable's GO_STREAM_HANDLERS, as they are at run time: none for a
    position-independent one (its load address is the process's) or a binary without them."""
    with open(binary, "rb") as f:
        if ELFFile(f).header["e_type"] != "ET_EXEC" or golang.go_version(binary) is None:
            return []
    addresses = []
    for pattern in GO_STREAM_HANDLERS:
        try:
            (_, found), = symbols.resolve_each(binary, [pattern])
        except UserError:
            continue
        addresses += [f.address for f in found if ".deferwrap" not in f.name]
    return addresses


_DF_1_PIE = 0x08000000  # DT_FLAGS_1: a position-independent executable, not a library


def is_executable(binary: str) -> bool:
    """A program rather than a shared library: ET_EXEC, or ET_DYN marked as PIE (a library may have an entry
    point and an interpreter too: libc.so.6 runs as a program)."""
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        if elf.header["e_type"] == "ET_EXEC":
            return True
        dynamic = elf.get_section_by_name(".dynamic")
        if dynamic is None or not hasattr(dynamic, "iter_tags"):
            return False
        return any(tag.entry.d_tag == "DT_FLAGS_1" and tag.entry.d_val & _DF_1_PIE for tag in dynamic.iter_tags())


def start_site(binary: str) -> Site | None:
    """A uprobe on the executable's entry point: the first instruction of the program once the dynamic loader is
    done, where tracing system-wide starts following a process that runs it. None for a file without one."""
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        entry = elf.header["e_entry"]
        for segment in elf.iter_segments():
            if segment["p_type"] == "PT_LOAD" and segment["p_vaddr"] <= entry < segment["p_vaddr"] + segment["p_filesz"]:
                if entry:
                    return Site(entry - segment["p_vaddr"] + segment["p_offset"], Kind.ENTRY, COOKIE_PROCESS_START)
    return None


class ProbeTable:
    """Every probe of the run by id (its position here); ids are never reused, so spans drained late still name
    the right function."""

    def __init__(self):
        self.probes: list[Probe] = []

    def add(self, probes: list[Probe]) -> list[int]:
        """Ids for new probes; a run can trace at most MAX_PROBES functions (the kernel keeps a latency histogram
        for each, per CPU)."""
        if len(self.probes) + len(probes) > MAX_PROBES:
            raise UserError(f"{len(self.probes) + len(probes)} functions to trace; at most {MAX_PROBES} can be "
                            "traced at once", "use narrower SYMBOL patterns")
        first = len(self.probes)
        self.probes += probes
        return list(range(first, first + len(probes)))

    def __len__(self) -> int:
        return len(self.probes)

    def info(self, probe_id: int) -> ProbeInfo:
        return self.probes[probe_id].info

    def binary(self, probe_id: int) -> str:
        return self.probes[probe_id].binary

    def by_binary(self) -> dict[str, list[tuple[int, Probe]]]:
        grouped: dict[str, list[tuple[int, Probe]]] = {}
        for probe_id, probe in enumerate(self.probes):
            grouped.setdefault(probe.binary, []).append((probe_id, probe))
        return grouped
