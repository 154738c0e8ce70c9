"""Find the functions of an ELF executable or shared library that a uprobe can attach to.

Uprobes are placed by address, while users name functions the way they read them in source
code, so this module reads the symbol tables (.symtab and .dynsym, and the Go runtime's own
function table in stripped Go binaries), demangles C++ and Rust names and maps glob patterns
onto addresses and file offsets.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from . import golang
from .errors import UserError


@dataclass(frozen=True)
class FunctionSymbol:
    name: str  # symbol-table name (mangled for C++/Rust)
    demangled: str  # human-readable name; equals name for C, includes parameters for C++
    address: int  # st_value: virtual address as in the ELF, what BCC's attach_uprobe(addr=...) takes
    offset: int  # file offset of the first instruction, from the PT_LOAD segment holding address
    size: int  # st_size; from .gopclntab: up to the next function, alignment padding included


# What pyelftools raises for truncated or corrupt files: its own errors, struct/construct parse
# failures (struct.error, ValueError) and seeks to garbage offsets (OSError EINVAL, OverflowError).
_PARSE_ERRORS = (ELFError, struct.error, ValueError, OSError, OverflowError)
_PROBEABLE_TYPES = ("ET_EXEC", "ET_DYN")
_UNDEFINED_SECTIONS = ("SHN_UNDEF", "SHN_ABS", "SHN_COMMON")
_MANGLED = re.compile(r"_[ZR][A-Za-z0-9_.$]+")
# GCC's "foo.cold" parts are jumped into from foo, never called: no entry point to probe.
_COLD_PART = re.compile(r"\.cold(\.\d+)?$")
# Go's assembly functions are "runtime.goexit.abi0" in .symtab, "runtime.goexit" in stack traces and .gopclntab.
_GO_ABI0_SUFFIX = re.compile(r"\.abi0$")
_RUST_LEGACY_HASH = re.compile(r"::h[0-9a-f]{16}$")
_RUST_V0_CRATE_ID = re.compile(r"\[[0-9a-f]{1,16}\]")
_CLONE_SUFFIX = re.compile(r"( \[clone [^\]]*\])+$")
_TRAILING_QUALIFIERS = re.compile(r"(\s+(const|volatile|noexcept)|\s*&&?)+$")
_IDENTIFIER_CHAR = re.compile(r"[A-Za-z0-9_]")
_OPEN = "<([{"
_CLOSE = ">)]}"


def binary_path(binary: str) -> str:
    """Return the absolute real path of an ELF executable or shared library, or raise UserError.

    Checking early turns a typo or a wrong file into a clear message instead of a BPF attach failure.
    """
    path = os.path.realpath(os.path.expanduser(binary))
    if not os.path.exists(path):
        raise UserError(f"binary {binary} not found", hint="check the path of the executable or library")
    if os.path.isdir(path):
        raise UserError(
            f"{binary} is a directory, not a binary", hint="give the path of an executable or shared library file"
        )
    with _reading(binary, path) as elf:
        # Parse every header now so a truncated or corrupt file fails here, with the user's path.
        list(elf.iter_segments())
        list(elf.iter_sections())
        if elf["e_type"] not in _PROBEABLE_TYPES:
            raise UserError(
                f"{binary} is an ELF file of type {elf['e_type']}, not an executable or shared library",
                hint="uprobes attach to linked executables and .so files",
            )
    return path


def list_functions(binary: str) -> list[FunctionSymbol]:
    """Every function of the binary that can be probed, one per address, sorted by demangled name."""
    return [entry.function for entry in _entries(binary)]


def resolve(binary: str, patterns: list[str]) -> list[FunctionSymbol]:
    """Functions matching any of the glob patterns, in pattern order, each address once.

    A pattern matches the raw name, the demangled name or the demangled name without its
    parameter list, so users can write "ns::Foo::bar", "ns::Foo::bar(int)" or "_ZN2ns3Foo3barEi".
    Aliases count too: "__libc_malloc" finds the function listed as "malloc".
    """
    entries = _entries(binary)
    result: dict[int, FunctionSymbol] = {}
    for pattern in patterns:
        matches = [entry.function for entry in entries if any(_matches(name, pattern) for name in entry.names)]
        if not matches:
            raise _no_match(binary, pattern, entries)
        for function in matches:
            result.setdefault(function.address, function)
    return list(result.values())


class _Entry(NamedTuple):
    function: FunctionSymbol
    names: tuple[str, ...]  # every name it answers to: raw, demangled and without parameters, for each alias


def _entries(binary: str) -> tuple[_Entry, ...]:
    path = binary_path(binary)
    stat = os.stat(path)
    entries = _load_entries(path, stat.st_mtime_ns, stat.st_size)
    if not entries:
        raise UserError(
            f"{binary} is stripped: it has no function symbols",
            hint="use a build that keeps its symbol table (not run through `strip` or linked with -s)",
        )
    return entries


def _without_params(demangled: str) -> str:
    """The qualified function name without return type, parameters and qualifiers.

    c++filt prints "int ns::add<int>(int, int) const" for templates, but users think of it as
    "ns::add<int>". Parentheses are matched from the end so "operator()" and function-pointer
    parameters stay intact.
    """
    text = _TRAILING_QUALIFIERS.sub("", _CLONE_SUFFIX.sub("", demangled))
    if not text.endswith(")"):
        return demangled
    depth = 0
    for index in range(len(text) - 1, -1, -1):
        if text[index] == ")":
            depth += 1
        elif text[index] == "(":
            depth -= 1
            if depth == 0:
                return _strip_return_type(text[:index])
    return demangled


def _strip_return_type(head: str) -> str:
    """Drop a leading return type: everything up to the last space outside brackets.

    Scanning stops at a top-level "operator" because operator names ("operator<", "operator new",
    "operator unsigned long") contain brackets and spaces that are not nesting.
    """
    depth = 0
    start = 0
    for index, char in enumerate(head):
        if depth == 0 and _is_operator_keyword(head, index):
            break
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(depth - 1, 0)
        elif char == " " and depth == 0:
            start = index + 1
    return head[start:]


def _is_operator_keyword(text: str, index: int) -> bool:
    if not text.startswith("operator", index):
        return False
    before = text[index - 1] if index else ""
    after = text[index + 8 : index + 9]
    return not _IDENTIFIER_CHAR.match(before) and not _IDENTIFIER_CHAR.match(after)


def _matches(name: str, pattern: str) -> bool:
    """Exact names first: C++ names contain "*" and "[" that fnmatch would read as glob syntax."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _no_match(binary: str, pattern: str, entries: tuple[_Entry, ...]) -> UserError:
    candidates = list(dict.fromkeys(name for entry in entries for name in entry.names))
    close = difflib.get_close_matches(pattern, candidates, n=5)
    if close:
        hint = "did you mean: " + ", ".join(close)
    else:
        hint = f"list the functions with `otel-ebpf symbols {binary}`"
    return UserError(f"no function matching {pattern!r} in {binary}", hint=hint)


@contextlib.contextmanager
def _reading(binary: str, path: str) -> Iterator[ELFFile]:
    """Open the file as ELF and turn each way that can fail into a UserError, never a traceback."""
    try:
        stream = open(path, "rb")
    except PermissionError:
        raise UserError(f"cannot read {binary}: permission denied", hint="run otel-ebpf as root") from None
    except OSError as err:
        raise UserError(f"cannot read {binary}: {err.strerror}", hint="check the file and the disk") from None
    with stream:
        try:
            yield ELFFile(stream)
        except _PARSE_ERRORS as err:
            raise _not_elf(binary, err) from None


def _not_elf(binary: str, err: Exception) -> UserError:
    return UserError(
        f"{binary} is not an ELF file or is corrupt ({err})",
        hint="give the path of a compiled Linux executable or shared library, not a script or archive",
    )


@functools.lru_cache(maxsize=32)
def _load_entries(path: str, mtime_ns: int, size: int) -> tuple[_Entry, ...]:
    """Read and demangle the function symbols once per file version; the key includes
    mtime and size so a rebuilt binary is read again."""
    with _reading(path, path) as elf:
        by_address = _read_function_symbols(elf)
    demangled = _demangle([alias.name for aliases in by_address.values() for alias in aliases])
    entries = []
    for address, aliases in by_address.items():
        best = min(aliases)
        function = FunctionSymbol(
            name=best.name,
            demangled=demangled.get(best.name, best.name),
            address=address,
            offset=best.offset,
            size=best.size,
        )
        names = []
        for alias in aliases:
            readable = demangled.get(alias.name, alias.name)
            names += [alias.name, readable, _without_params(readable), _GO_ABI0_SUFFIX.sub("", alias.name)]
        entries.append(_Entry(function, tuple(dict.fromkeys(names))))
    entries.sort(key=lambda entry: (entry.function.demangled, entry.function.name, entry.function.address))
    return tuple(entries)


class _Symbol(NamedTuple):
    """Ordered so that min() picks the name to show: GLOBAL before LOCAL/WEAK, then shortest, then alphabetical."""

    not_global: bool
    length: int
    name: str
    offset: int
    size: int


def _read_function_symbols(elf: ELFFile) -> dict[int, list[_Symbol]]:
    """Defined functions from .symtab and .dynsym, grouped by address; from .gopclntab too when there is
    no .symtab, for the names of a stripped Go binary (.dynsym holds none of them)."""
    segments = [
        (seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD"
    ]
    by_address: dict[int, list[_Symbol]] = {}
    for section in elf.iter_sections():
        if not isinstance(section, SymbolTableSection):
            continue
        for sym in section.iter_symbols():
            size, address = sym["st_size"], sym["st_value"]
            if sym["st_info"]["type"] != "STT_FUNC" or size == 0 or not sym.name:
                continue
            if sym["st_shndx"] in _UNDEFINED_SECTIONS or _COLD_PART.search(sym.name):
                continue
            offset = _file_offset(segments, address)
            if offset is not None:
                not_global = sym["st_info"]["bind"] != "STB_GLOBAL"
                by_address.setdefault(address, []).append(_Symbol(not_global, len(sym.name), sym.name, offset, size))
    if elf.get_section_by_name(".symtab") is None:
        for function in golang.pclntab_functions(elf):
            offset = _file_offset(segments, function.entry)
            if offset is not None and function.entry not in by_address:
                size = function.end - function.entry
                by_address[function.entry] = [_Symbol(False, len(function.name), function.name, offset, size)]
    return by_address


def _file_offset(segments: list[tuple[int, int, int]], address: int) -> int | None:
    for vaddr, filesz, offset in segments:
        if vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    """Demangle C++ and Rust names with one c++filt run; raw names if c++filt is missing or fails.

    binutils' c++filt understands Itanium C++ and both Rust schemes, so no extra dependency is needed.
    """
    mangled = sorted({name for name in names if _MANGLED.fullmatch(name)})
    if not mangled:
        return {}
    try:
        done = subprocess.run(
            ["c++filt", "--no-strip-underscore"],
            input="\n".join(mangled) + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = done.stdout.splitlines()
    if len(lines) != len(mangled):
        return {}
    return {name: _tidy_rust(name, line) for name, line in zip(mangled, lines)}


def _tidy_rust(name: str, demangled: str) -> str:
    """Drop Rust's per-build hashes (legacy "::h<hash>", v0 "crate[<hash>]") that users cannot know."""
    if name.startswith("_R"):
        return _RUST_V0_CRATE_ID.sub("", demangled)
    return _RUST_LEGACY_HASH.sub("", demangled)
