"""What an ELF file says about its functions: symbol tables, where code sits in the file, IFUNCs, names.

Uprobes are placed by address, while users name functions the way they read them in source code, so
this module reads .symtab and .dynsym, turns each address into a file offset through the PT_LOAD
segments of the binary that really runs (a separate debug file has the same addresses but not the
code), resolves IFUNCs to the implementation this machine picks, and demangles C++ and Rust names.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from otel_ebpf.errors import UserError
from otel_ebpf.symbols import files


@dataclass(frozen=True)
class FunctionSymbol:
    name: str  # symbol-table name (mangled for C++/Rust)
    demangled: str  # human-readable name; equals name for C, includes parameters for C++
    address: int  # st_value: virtual address as in the ELF, what BCC's attach_uprobe(addr=...) takes
    offset: int  # file offset of the first instruction, from the PT_LOAD segment holding address
    size: int  # st_size; from .gopclntab: up to the next function, alignment padding included
    ifunc: str | None = None  # the IFUNC this implementation was picked for (strlen for __strlen_avx2)


# What pyelftools raises for truncated or corrupt files: its own errors, struct/construct parse
# failures (struct.error, ValueError) and seeks to garbage offsets (OSError EINVAL, OverflowError).
PARSE_ERRORS = (ELFError, struct.error, ValueError, OSError, OverflowError)
_PROBEABLE_TYPES = ("ET_EXEC", "ET_DYN")
_UNDEFINED_SECTIONS = ("SHN_UNDEF", "SHN_ABS", "SHN_COMMON")
# pyelftools names type 10 after the range it opens (STT_LOOS); GNU uses it for IFUNCs.
_IFUNC_TYPES = ("STT_GNU_IFUNC", "STT_LOOS")
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
_NT_GNU_BUILD_ID = "NT_GNU_BUILD_ID"


class Segment(NamedTuple):
    vaddr: int
    filesz: int
    offset: int


class Symbol(NamedTuple):
    """Ordered so that min() picks the name to show: GLOBAL before LOCAL/WEAK, then shortest, then alphabetical."""

    not_global: bool
    length: int
    name: str
    offset: int
    size: int


class Ifunc(NamedTuple):
    """An STT_GNU_IFUNC: its address is a resolver that the dynamic loader calls to pick the implementation."""

    resolver: int
    names: tuple[str, ...]
    exported: tuple[str, ...]  # its names in .dynsym, which dlsym() finds; none when it is only local


@contextlib.contextmanager
def reading(binary: str, path: str) -> Iterator[ELFFile]:
    """Open path as ELF and turn each way that can fail into a UserError naming binary, never a traceback."""
    try:
        stream = open(path, "rb")
    except PermissionError:
        raise UserError(f"cannot read {binary}: permission denied", hint="run otel-ebpf as root") from None
    except OSError as err:
        raise UserError(f"cannot read {binary}: {err.strerror}", hint="check the file and the disk") from None
    with stream:
        try:
            yield ELFFile(stream)
        except PARSE_ERRORS as err:
            raise not_elf(binary, err) from None


def not_elf(binary: str, err: Exception) -> UserError:
    return UserError(
        f"{binary} is not an ELF file or is corrupt ({err})",
        hint="give the path of a compiled Linux executable or shared library, not a script or archive",
    )


def check_probeable(binary: str, path: str) -> None:
    """Parse every header now so that a truncated, corrupt or wrong file fails here, with the user's name."""
    with reading(binary, path) as elf:
        list(elf.iter_segments())
        list(elf.iter_sections())
        if elf["e_type"] not in _PROBEABLE_TYPES:
            raise UserError(
                f"{binary} is an ELF file of type {elf['e_type']}, not an executable or shared library",
                hint="uprobes attach to linked executables and .so files",
            )


def load_segments(elf: ELFFile) -> tuple[Segment, ...]:
    return tuple(Segment(seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
                 for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")


def file_offset(segments: tuple[Segment, ...], address: int) -> int | None:
    for vaddr, filesz, offset in segments:
        if vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    return None


def address_at(segments: tuple[Segment, ...], offset: int) -> int | None:
    """The virtual address of a file offset: the inverse of file_offset."""
    for vaddr, filesz, start in segments:
        if start <= offset < start + filesz:
            return offset - start + vaddr
    return None


def build_id(elf: ELFFile) -> str | None:
    """The NT_GNU_BUILD_ID note as hex: what /usr/lib/debug/.build-id and debuginfod are keyed by."""
    for section in elf.iter_sections():
        if isinstance(section, NoteSection) and section["sh_type"] != "SHT_NOBITS":
            for note in section.iter_notes():
                if note["n_type"] == _NT_GNU_BUILD_ID and note["n_name"] == "GNU":
                    return note["n_desc"]
    return None


def has_symtab(elf: ELFFile) -> bool:
    """Whether the file itself has a .symtab with content (a debug file's NOBITS copies do not count)."""
    section = elf.get_section_by_name(".symtab")
    return isinstance(section, SymbolTableSection) and section["sh_type"] != "SHT_NOBITS"


def read_symbols(elf: ELFFile, segments: tuple[Segment, ...], by_address: dict[int, list[Symbol]],
                 ifuncs: dict[int, list[tuple[str, bool]]]) -> None:
    """Add elf's defined functions to by_address and its IFUNCs to ifuncs (resolver -> (name, in .dynsym)).

    Offsets come from `segments`, those of the binary that runs: elf may be its separate debug file.
    """
    for section in elf.iter_sections():
        if not isinstance(section, SymbolTableSection) or section["sh_type"] == "SHT_NOBITS":
            continue
        dynamic = section["sh_type"] == "SHT_DYNSYM"
        for sym in section.iter_symbols():
            kind, address = sym["st_info"]["type"], sym["st_value"]
            if not sym.name or sym["st_shndx"] in _UNDEFINED_SECTIONS:
                continue
            if kind in _IFUNC_TYPES:
                ifuncs.setdefault(address, []).append((sym.name, dynamic))
                continue
            if kind != "STT_FUNC" or sym["st_size"] == 0 or _COLD_PART.search(sym.name):
                continue
            offset = file_offset(segments, address)
            if offset is not None:
                not_global = sym["st_info"]["bind"] != "STB_GLOBAL"
                by_address.setdefault(address, []).append(
                    Symbol(not_global, len(sym.name), sym.name, offset, sym["st_size"]))


def collect_ifuncs(found: dict[int, list[tuple[str, bool]]]) -> tuple[Ifunc, ...]:
    result = [Ifunc(resolver, tuple(dict.fromkeys(name for name, _ in names)),
                    tuple(sorted({name for name, dynamic in names if dynamic})))
              for resolver, names in found.items()]
    return tuple(sorted(result, key=lambda ifunc: ifunc.names))


def loaded_ifunc_target(path: str, name: str, segments: tuple[Segment, ...]) -> int | None:
    """The address, in path's own terms, of the implementation that IFUNC `name` resolves to on this machine;
    None when that cannot be known for sure.

    Only when this very process has path mapped (same device and inode): then the dynamic loader already ran
    the resolver with this CPU's features, and dlsym() returns its choice. RTLD_NOLOAD makes sure nothing new
    is loaded (no constructors run). A traced process whose environment changes the choice (GLIBC_TUNABLES)
    is not seen.
    """
    try:
        stat = os.stat(path)
        mapped = [m for m in files.mappings() if files.same_file(m, stat)]
        if not mapped:
            return None
        library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        runtime = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
    except (OSError, AttributeError, ValueError):
        return None
    for mapping in mapped:
        if runtime is not None and mapping.start <= runtime < mapping.end:
            return address_at(segments, runtime - mapping.start + mapping.offset)
    return None


def matches(name: str, pattern: str) -> bool:
    """Exact names first: C++ names contain "*" and "[" that fnmatch would read as glob syntax."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def names_of(name: str, demangled: str) -> list[str]:
    """Every name a function answers to: raw, demangled, without parameters, without Go's ABI suffix."""
    return [name, demangled, without_params(demangled), _GO_ABI0_SUFFIX.sub("", name)]


def without_params(demangled: str) -> str:
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


def demangle(names: list[str]) -> dict[str, str] | None:
    """Demangle C++ and Rust names with one c++filt run; None if c++filt is missing or fails.

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
        return None
    lines = done.stdout.splitlines()
    if len(lines) != len(mangled):
        return None
    return {name: _tidy_rust(name, line) for name, line in zip(mangled, lines, strict=True)}


def _tidy_rust(name: str, demangled: str) -> str:
    """Drop Rust's per-build hashes (legacy "::h<hash>", v0 "crate[<hash>]") that users cannot know."""
    if name.startswith("_R"):
        return _RUST_V0_CRATE_ID.sub("", demangled)
    return _RUST_LEGACY_HASH.sub("", demangled)
