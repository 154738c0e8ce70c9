"""Find the functions of an ELF executable or shared library that a uprobe can attach to.

Uprobes are placed by address in a file, while users name functions the way they read them in source
code, and distributions ship binaries without their symbol tables. So a binary is read in steps:

- files: the file the user means, as the traced process sees it (its own root, its own mappings);
- debuginfo: where its symbols are when it is stripped (build id, .gnu_debuglink, MiniDebugInfo,
  debuginfod), merged with the binary's own .dynsym; golang: Go's own table for stripped Go binaries;
- elf: addresses made file offsets through the PT_LOAD segments of the real binary, IFUNCs resolved
  to the implementation this machine runs, C++ and Rust names demangled;
- cache: the parsed table kept across runs, keyed by the build id.

Messages name the binary as the user gave it (Debian's redis-server is a link to redis-check-rdb),
while uprobes attach to the real path.
"""

from __future__ import annotations

import dataclasses
import functools
import lzma
import os
import re
import subprocess
from dataclasses import dataclass
from typing import NamedTuple

from otel_ebpf.errors import UserError
from otel_ebpf.symbols import cache, debuginfo, files, golang
from otel_ebpf.symbols import elf as elfs
from otel_ebpf.symbols.debuginfo import DebugFile, Options
from otel_ebpf.symbols.elf import FunctionSymbol

__all__ = ["FunctionSymbol", "Options", "Source", "SymbolTable", "binary_path", "list_functions", "load", "resolve",
           "resolve_each"]

SYMTAB = "symtab"  # the binary's own .symtab
DYNSYM = "dynsym"  # only .dynsym: the exported functions of a stripped binary whose debug file was not found
GOPCLNTAB = "gopclntab"  # a stripped Go binary's runtime function table
_GLOB = re.compile(r"[*?\[]")
_SHOWN_IMPLEMENTATIONS = 8
_SUGGESTIONS = 5


@dataclass(frozen=True)
class Source:
    """Where the names of a binary's functions came from: shown by `otel-ebpf symbols`, used in hints."""

    kind: str  # SYMTAB, DYNSYM, GOPCLNTAB or a debuginfo kind (BUILD_ID, DEBUGLINK, MINIDEBUGINFO, DEBUGINFOD)
    file: str  # the file the names were read from: the binary itself or its debug file
    build_id: str | None
    origin: str = ""  # debuginfod: the server, or "cache"
    notes: tuple[str, ...] = ()  # why no debug file was found or read

    @property
    def complete(self) -> bool:
        """False when only the exported functions are known."""
        return self.kind != DYNSYM


class _Entry(NamedTuple):
    function: FunctionSymbol
    names: tuple[str, ...]  # every name it answers to: raw, demangled and without parameters, for each alias


class _Parsed(NamedTuple):
    kind: str
    entries: tuple[_Entry, ...]
    ifuncs: tuple[elfs.Ifunc, ...]
    notes: tuple[str, ...]
    names_complete: bool  # False when c++filt was missing: such a table is not stored


@dataclass(frozen=True)
class SymbolTable:
    """The probeable functions of one binary."""

    binary: str  # as the user named it: what messages show
    path: str  # the real file, what uprobes attach to
    source: Source
    segments: tuple[elfs.Segment, ...]
    entries: tuple[_Entry, ...]  # sorted by demangled name, one per address
    ifuncs: tuple[elfs.Ifunc, ...]

    def functions(self) -> list[FunctionSymbol]:
        return [entry.function for entry in self.entries]

    def resolve(self, patterns: list[str]) -> list[FunctionSymbol]:
        """Functions matching any of the glob patterns, in pattern order, each address once.

        A pattern matches the raw name, the demangled name or the demangled name without its
        parameter list, so users can write "ns::Foo::bar", "ns::Foo::bar(int)" or "_ZN2ns3Foo3barEi".
        Aliases count too: "__libc_malloc" finds the function listed as "malloc".
        """
        result: dict[int, FunctionSymbol] = {}
        for _, functions in self.resolve_each(patterns):
            for function in functions:
                result.setdefault(function.address, function)
        return list(result.values())

    def resolve_each(self, patterns: list[str]) -> list[tuple[str, list[FunctionSymbol]]]:
        """Each pattern with its matches (at least one, else UserError); IFUNCs become their implementation.

        An IFUNC that cannot be resolved here is an error when named exactly or when nothing else matches;
        a glob otherwise goes on without it.
        """
        result = []
        for pattern in patterns:
            found = {entry.function.address: _as_named(entry, pattern) for entry in self.entries
                     if any(elfs.matches(name, pattern) for name in entry.names)}
            unresolved = []
            for ifunc in self.ifuncs:
                matched = next((name for name in ifunc.names if elfs.matches(name, pattern)), None)
                if matched is not None:
                    pick = self._pick(ifunc, pattern if pattern in ifunc.names else matched)
                    if pick is None:
                        unresolved.append(ifunc)
                    else:
                        found.setdefault(pick.address, pick)
            exact = [ifunc for ifunc in unresolved if pattern in ifunc.names]
            if exact or (unresolved and not found):
                raise self._ifunc_error((exact or unresolved)[0])
            if not found:
                raise self._no_match(pattern)
            result.append((pattern, sorted(found.values(), key=_order)))
        return result

    def ifunc_picks(self) -> list[FunctionSymbol]:
        """The IFUNCs whose implementation on this machine is known, as that implementation."""
        picks = (self._pick(ifunc, name) for ifunc in self.ifuncs for name in ifunc.exported)
        return sorted((pick for pick in picks if pick is not None), key=_order)

    def describe(self) -> str:
        """One line: whose symbols these are and where they came from."""
        source = self.source
        build = f" (build id {source.build_id})" if source.build_id else ""
        tail = ""
        if source.kind == SYMTAB:
            where = "its own symbol table"
        elif source.kind == DYNSYM:
            where = "its .dynsym only"
            tail = f": {len(self.entries)} exported functions; for all of them, {self.debug_hint()}"
        elif source.kind == GOPCLNTAB:
            where = "its Go function table (.gopclntab)"
        elif source.kind == debuginfo.MINIDEBUGINFO:
            where = "its MiniDebugInfo (.gnu_debugdata) and .dynsym"
        elif source.kind == debuginfo.DEBUGINFOD:
            origin = "debuginfod cache" if source.origin == "cache" else f"debuginfod {source.origin}"
            where = f"{source.file} ({origin})"
        elif source.kind == debuginfo.DEBUGLINK:
            where = f"{source.file} (its .gnu_debuglink, CRC checked)"
        else:
            where = source.file
        return f"symbols of {self.binary} from {where}{build}{tail}"

    def debug_hint(self) -> str:
        """What to install or set so that the local functions of a stripped binary are known too."""
        package = _package_of(self.path)
        what = (f"Debian: {package}-dbgsym or {package}-dbg" if package
                else "the -dbgsym, -dbg or -debuginfo package of the package that ships it")
        build = self.source.build_id
        where = f", which install /usr/lib/debug/.build-id/{build[:2]}/{build[2:]}.debug" if build else ""
        notes = "".join(f"; {note}" for note in self.source.notes)
        return f"install its debug symbols ({what}{where}) or set DEBUGINFOD_URLS to a debuginfod server{notes}"

    def _pick(self, ifunc: elfs.Ifunc, name: str) -> FunctionSymbol | None:
        """The implementation IFUNC `name` runs here, named by its alias that mentions name (memmove's pick
        is __memmove_avx_unaligned, not its alias __memcpy_avx_unaligned); None when not known."""
        if not ifunc.exported:
            return None
        address = elfs.loaded_ifunc_target(self.path, ifunc.exported[0], self.segments)
        offset = elfs.file_offset(self.segments, address) if address is not None else None
        if offset is None:
            return None
        known = next((entry for entry in self.entries if entry.function.address == address), None)
        if known is None:
            return FunctionSymbol(name, name, address, offset, 0, ifunc=name)
        alias = next((alias for alias in known.names if name in alias), None)
        renamed = {"name": alias, "demangled": alias} if alias and alias != known.function.name else {}
        return dataclasses.replace(known.function, ifunc=name, **renamed)

    def _ifunc_error(self, ifunc: elfs.Ifunc) -> UserError:
        name = (ifunc.exported or ifunc.names)[0]
        implementations = self._implementations(ifunc)
        message = (f"{name} in {self.binary} is an IFUNC: the dynamic loader picks its implementation when a program "
                   "starts, and otel-ebpf can only tell which for the very copy of a library that it has loaded itself")
        if not implementations:
            return UserError(message, f"to see its implementations, {self.debug_hint()}")
        shown = ", ".join(implementations[:_SHOWN_IMPLEMENTATIONS])
        more = ", ..." if len(implementations) > _SHOWN_IMPLEMENTATIONS else ""
        return UserError(message, f"trace its implementations instead: {shown}{more}")

    def _implementations(self, ifunc: elfs.Ifunc) -> list[str]:
        """Functions whose names look like implementations of the IFUNC (__strlen_avx2 for strlen): glibc's
        convention; its checking variants (__memcpy_chk_*) and the resolver itself excluded."""
        prefixes = tuple(prefix for name in ifunc.names for prefix in (f"__{name}_", f"{name}_"))
        found = set()
        for entry in self.entries:
            if entry.function.address == ifunc.resolver:
                continue
            for name in entry.names:
                rest = name[len(next((p for p in prefixes if name.startswith(p)), "")):]
                if rest != name and not rest.startswith("chk") and "ifunc" not in rest:
                    found.add(name)
        return sorted(found)

    def _no_match(self, pattern: str) -> UserError:
        names = list(dict.fromkeys([*(name for entry in self.entries for name in entry.names),
                                    *(name for ifunc in self.ifuncs for name in ifunc.names)]))
        close = _related(pattern, names)
        guess = "did you mean: " + ", ".join(close) if close else ""
        if not self.source.complete:
            known = f"only the exported functions of {self.binary} are known: {self.debug_hint()}"
            hint = f"{guess}; {known}" if guess else known
        else:
            hint = guess or f"list the functions with `otel-ebpf symbols {self.binary}`"
        return UserError(f"no function matching {pattern!r} in {self.binary}", hint=hint)


def binary_path(binary: str, pid: int | None = None) -> str:
    """The real path of an ELF executable or shared library (as process pid sees it), or UserError.

    Checking early turns a typo or a wrong file into a clear message instead of a BPF attach failure.
    """
    path = files.locate(os.path.expanduser(binary), pid)
    seen = f" (as process {pid} sees it)" if pid is not None else ""
    if not os.path.exists(path):
        raise UserError(f"binary {binary} not found{seen}", hint="check the path of the executable or library")
    if os.path.isdir(path):
        raise UserError(f"{binary} is a directory, not a binary{seen}",
                        hint="give the path of an executable or shared library file")
    elfs.check_probeable(binary, path)
    return path


def load(binary: str, options: Options | None = None, pid: int | None = None) -> SymbolTable:
    """The symbol table of binary (as process pid sees it); UserError when it has no function at all."""
    options = options or Options()
    path = binary_path(binary, pid)
    with elfs.reading(binary, path) as elf:
        segments = elfs.load_segments(elf)
        build = elfs.build_id(elf)
        own = elfs.has_symtab(elf)
        debug, notes = (None, ()) if own else debuginfo.find(path, elf, options)
    info = os.stat(path)
    identity = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    parsed = _parsed(binary, identity, build, own, debug, _identity(debug.path) if debug else None, segments,
                     options)
    kind = parsed.kind
    source = Source(kind, debug.path if debug and kind == debug.kind else path, build,
                    debug.origin if debug else "", notes + parsed.notes)
    table = SymbolTable(binary, path, source, segments, parsed.entries, parsed.ifuncs)
    if not table.entries and not table.ifuncs:
        raise UserError(f"{binary} is stripped: it has no function symbols and no debug file was found",
                        hint=table.debug_hint())
    return table


def list_functions(binary: str, options: Options | None = None, pid: int | None = None) -> list[FunctionSymbol]:
    """Every function of the binary that can be probed, one per address, sorted by demangled name."""
    return load(binary, options, pid).functions()


def resolve(binary: str, patterns: list[str], options: Options | None = None,
            pid: int | None = None) -> list[FunctionSymbol]:
    """See SymbolTable.resolve."""
    return load(binary, options, pid).resolve(patterns)


def resolve_each(binary: str, patterns: list[str], options: Options | None = None,
                 pid: int | None = None) -> list[tuple[str, list[FunctionSymbol]]]:
    """See SymbolTable.resolve_each."""
    return load(binary, options, pid).resolve_each(patterns)


def _as_named(entry: _Entry, pattern: str) -> FunctionSymbol:
    """A C function named exactly by one of its aliases is shown by that name (libc's close, not __close)."""
    function = entry.function
    if pattern in entry.names and function.name == function.demangled and pattern != function.name:
        return dataclasses.replace(function, name=pattern, demangled=pattern)
    return function


def _order(function: FunctionSymbol) -> tuple:
    return function.demangled, function.name, function.address


def _identity(path: str) -> tuple:
    info = os.stat(path)
    return path, info.st_size, info.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _parsed(binary: str, identity: tuple, build: str | None, own: bool, debug: DebugFile | None,
            debug_identity: tuple | None, segments: tuple[elfs.Segment, ...], options: Options) -> _Parsed:
    """Read once per version of the file and of its debug file; across runs through the on-disk cache,
    keyed by the build id when there is one (the same library in another place or container is the same)."""
    directory = os.path.join(options.cache_base, "symbols") if options.symbol_cache else None
    key = cache.key(build or identity, own, debug and debug.kind, debug_identity)
    stored = _from_json(cache.load(directory, key) or {}) if directory else None
    if stored is not None:
        return stored
    parsed = _parse(binary, identity[0], own, debug, segments)
    if directory and parsed.names_complete:
        cache.store(directory, key, _to_json(parsed))
    return parsed


def _parse(binary: str, path: str, own: bool, debug: DebugFile | None, segments: tuple[elfs.Segment, ...]) -> _Parsed:
    by_address: dict[int, list[elfs.Symbol]] = {}
    ifuncs: dict[int, list[tuple[str, bool]]] = {}
    kind, notes = SYMTAB if own else DYNSYM, []
    if debug is not None:
        try:
            with debuginfo.opened(debug) as debug_elf:
                elfs.read_symbols(debug_elf, segments, by_address, ifuncs)
            kind = debug.kind
        except (*elfs.PARSE_ERRORS, lzma.LZMAError, UserError) as err:
            by_address.clear()
            ifuncs.clear()
            notes.append(f"its debug file {debug.path} could not be read ({err})")
    with elfs.reading(binary, path) as elf:
        elfs.read_symbols(elf, segments, by_address, ifuncs)
        if kind == DYNSYM:
            # .dynsym holds none of a Go program's functions; the runtime's own table has them all.
            for function in golang.pclntab_functions(elf):
                offset = elfs.file_offset(segments, function.entry)
                if offset is not None and function.entry not in by_address:
                    size = function.end - function.entry
                    by_address[function.entry] = [elfs.Symbol(False, len(function.name), function.name, offset, size)]
                    kind = GOPCLNTAB
    demangled = elfs.demangle([alias.name for aliases in by_address.values() for alias in aliases])
    names_complete = demangled is not None
    demangled = demangled or {}
    entries = []
    for address, aliases in by_address.items():
        best = min(aliases)
        readable = demangled.get(best.name, best.name)
        function = FunctionSymbol(best.name, readable, address, best.offset, best.size)
        names = [name for alias in aliases for name in elfs.names_of(alias.name, demangled.get(alias.name, alias.name))]
        entries.append(_Entry(function, tuple(dict.fromkeys(names))))
    entries.sort(key=lambda entry: _order(entry.function))
    return _Parsed(kind, tuple(entries), elfs.collect_ifuncs(ifuncs), tuple(notes), names_complete)


def _to_json(parsed: _Parsed) -> dict:
    return {"kind": parsed.kind, "notes": list(parsed.notes),
            "entries": [[*dataclasses.astuple(entry.function)[:5], list(entry.names)] for entry in parsed.entries],
            "ifuncs": [[ifunc.resolver, list(ifunc.names), ifunc.exported] for ifunc in parsed.ifuncs]}


def _from_json(value: dict) -> _Parsed | None:
    """A stored table, or None when it is not one this version wrote."""
    try:
        entries = tuple(_Entry(FunctionSymbol(name, demangled, address, offset, size), tuple(names))
                        for name, demangled, address, offset, size, names in value["entries"])
        ifuncs = tuple(elfs.Ifunc(resolver, tuple(names), exported) for resolver, names, exported in value["ifuncs"])
        return _Parsed(value["kind"], entries, ifuncs, tuple(value["notes"]), True)
    except (KeyError, TypeError, ValueError):
        return None


def _related(pattern: str, names: list[str]) -> list[str]:
    """Names plausibly meant by a pattern that matched nothing: one or two typing slips away (fbi: fib), or
    containing its longest literal part (int_malloc: _int_malloc). Never merely similar-looking names."""
    literal = max(_GLOB.split(pattern), key=len)
    lowered = literal.lower()
    close: list[tuple[int, str]] = []
    if literal == pattern:
        slips = 1 if len(pattern) <= 5 else 2 if len(pattern) <= 12 else 3
        for name in names:
            if abs(len(name) - len(pattern)) <= slips:
                distance = _edit_distance(name.lower(), lowered, slips)
                if distance <= slips:
                    close.append((distance, name))
    found = [name for _, name in sorted(close)]
    if len(literal) >= 4:
        found += sorted((name for name in names if lowered in name.lower() and name not in found),
                        key=lambda name: (len(name), name))
    return found[:_SUGGESTIONS]


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Insertions, deletions, substitutions and swaps of neighbours; anything over limit reported as limit + 1."""
    previous, current = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        before, previous, current = previous, current, [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if before is not None and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
    return current[-1]


def _package_of(path: str) -> str | None:
    """The Debian package that ships path, to name its debug package; None elsewhere."""
    for candidate in dict.fromkeys([path, path.removeprefix("/usr")]):
        try:
            done = subprocess.run(["dpkg-query", "--search", candidate], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        if done.returncode == 0 and done.stdout:
            return done.stdout.split(":", 1)[0].split(",")[0].strip()
    return None
