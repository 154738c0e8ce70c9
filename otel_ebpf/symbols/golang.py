"""Go binaries: their release, their function table when stripped, and where to probe a function.

A return probe (uretprobe) replaces the return address on the stack, and the Go runtime copies
goroutine stacks when they grow: the copy then holds the kernel's trampoline address and the program
crashes. So a Go function is probed with entry-style uprobes only: one where each call starts and one
on every ``ret`` instruction, paired per goroutine (r14 holds the current g under the register ABI,
go1.17 and later on amd64). Both come from disassembling the function's bytes, so the result is only
sound when every way out of the function is a ``ret`` it contains and nothing runs its start twice.

Where each call starts: not at the first instruction. Go's prologue compares the stack pointer with
the goroutine's stack limit and, when the stack must grow, calls runtime.morestack and jumps back to
the first instruction, which would count one call twice. The call starts after that check.

Refused shapes, each with a UserError that names the function and the reason:

- a jump to an address outside the function (a tail call: ``jmp other``, also conditional): the
  callee's ``ret`` returns straight to our caller, so no return of ours is ever seen;
- a jump through a register or memory (``jmp *%rax``, switch jump tables, retpolines): its targets
  cannot be checked to stay inside the function;
- no ``ret`` at all: functions that never return, such as runtime.goexit, runtime.gopanic and
  other panic helpers (trace their callers instead);
- a jump back into the part of the function that must run once per call, other than Go's
  stack-growth check (as when a C compiler turns tail recursion into a loop to the start);
- code that runs past its end into the next function, bytes that do not disassemble as x86-64,
  and a function whose size is unknown.

A glob over many functions (runtime.m*) keeps going past the ones refused: select_traceable gives the
planner the rest, and sums the refused ones up in one warning line; a name given exactly stays an error.

Padding after the last instruction (int3 or nop runs, as Go's linker and gas align functions) is not
part of the function, and a leading ENDBR64 is skipped.

Not seen by any probe, whatever the shape: a panic that unwinds through the function and
runtime.Goexit called inside it leave without executing its ``ret``.

The function table of a binary without .symtab comes from .gopclntab, the table the Go runtime
itself uses for stack traces (formats of go1.16 and later; runtime/symtab.go's pcHeader).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import struct
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import capstone
from capstone import x86
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from otel_ebpf.errors import UserError
from otel_ebpf.symbols.elf import FunctionSymbol

# pcHeader.magic per table format (runtime/symtab.go). go1.2 to go1.15 tables are not read: a stripped
# binary that old is refused, and those releases predate the register ABI anyway.
_PCLNTAB_GO116 = 0xFFFFFFFA
_PCLNTAB_GO118 = 0xFFFFFFF0
_PCLNTAB_GO120 = 0xFFFFFFF1
_PCLNTAB_GO12 = 0xFFFFFFFB
_PCLNTAB_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")  # the latter in -buildmode=pie
_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_BUILDINFO_INLINE_STRINGS = 2  # flags bit set by go1.18+: the strings follow the 32-byte header
_DWARF_SECTIONS = (".debug_", ".zdebug_", ".eh_frame", ".gnu_debugaltlink")  # what pyelftools' DWARF reader reads
_GO_MINOR = re.compile(r"go1\.(\d+)")
_REGISTER_ABI_MINOR = 17
_ENDBR64 = b"\xf3\x0f\x1e\xfa"
_PADDING = (x86.X86_INS_INT3, x86.X86_INS_NOP)
# Mnemonics of the instructions the shape rules tell apart, other than jumps (see _decode).
_KINDS = {"ret": x86.X86_INS_RET, "call": x86.X86_INS_CALL, "int3": x86.X86_INS_INT3, "nop": x86.X86_INS_NOP,
          "ud2": x86.X86_INS_UD2, "hlt": x86.X86_INS_HLT}
_NO_FALLTHROUGH = (x86.X86_INS_RET, x86.X86_INS_JMP, x86.X86_INS_CALL, x86.X86_INS_INT3, x86.X86_INS_UD2,
                   x86.X86_INS_HLT)


@dataclass(frozen=True)
class GoFunction:
    name: str  # as Go prints it: main.(*Server).handle
    entry: int  # virtual address of the first instruction
    end: int  # the next function's entry: includes the alignment padding after the last instruction


def go_version(binary: str) -> str | None:
    """The Go release that built binary ("go1.19.8"); None when it is not a Go program.

    "go" alone for a Go program that does not record its release (a stripped one older than go1.13).
    """
    try:
        with open(binary, "rb") as stream:
            elf = ELFFile(stream)
            version = _buildinfo_version(elf) or _symbol_version(elf)
            if version:
                return version
            return "go" if _pclntab_section(elf) is not None else None
    except (ELFError, struct.error, ValueError, IndexError, OSError):
        return None


def check_register_abi(binary: str) -> str:
    """The Go release of binary, or UserError when it predates go1.17: older releases keep the current
    goroutine in thread-local storage, not in r14, so calls cannot be paired per goroutine."""
    version = go_version(binary)
    match = _GO_MINOR.search(version or "")
    if not match:
        raise UserError(f"cannot tell which Go release built {binary}",
                        hint="otel-ebpf traces Go programs built by go1.17 or later")
    if int(match.group(1)) < _REGISTER_ABI_MINOR:
        raise UserError(f"{binary} was built by {version}, older than go1.17",
                        hint="rebuild it with go1.17 or later (register ABI)")
    return version


def goid_offset(binary: str) -> int:
    """Offset of goid in runtime.g, from the binary's DWARF; 0 when it has none (stripped).

    The layout of runtime.g changes between Go releases, so it is read, never assumed.
    """
    try:
        with open(binary, "rb") as stream:
            elf = ELFFile(stream)
            if not elf.has_dwarf_info():
                return 0
            # pyelftools reads each DWARF section whole: a damaged size would be MemoryError or OverflowError.
            if not all(_in_file(elf, s) for s in elf.iter_sections() if s.name.startswith(_DWARF_SECTIONS)):
                return 0
            for cu in elf.get_dwarf_info().iter_CUs():
                for die in cu.get_top_DIE().iter_children():
                    if die.tag == "DW_TAG_structure_type" and _die_name(die) == b"runtime.g":
                        for member in die.iter_children():
                            if _die_name(member) == b"goid":
                                return member.attributes["DW_AT_data_member_location"].value
                        return 0
    # Best effort, so any damage means "unknown". Besides its own errors, pyelftools raises zlib.error for
    # damaged compressed sections, AssertionError for malformed DWARF and OverflowError for a compressed
    # size (ch_size) too large for zlib.
    except (ELFError, struct.error, ValueError, KeyError, OSError, zlib.error, AssertionError, OverflowError):
        pass
    return 0


@functools.lru_cache(maxsize=8)
def itab_types(binary: str) -> dict[int, str]:
    """The dynamic type of each interface table of a non-PIE Go binary, by address (`go:itab.*main.notFound,error`
    is at the address an error of type *main.notFound holds): what a Go error result's first word names. Empty
    for PIE binaries (the address depends on where it is loaded) and without a symbol table."""
    types = {}
    try:
        with open(binary, "rb") as stream:
            elf = ELFFile(stream)
            symtab = elf.get_section_by_name(".symtab")
            if elf.header["e_type"] != "ET_EXEC" or not isinstance(symtab, SymbolTableSection):
                return types
            for symbol in symtab.iter_symbols():
                if symbol.name.startswith(("go:itab.", "go.itab.")):  # "go.itab." before Go 1.20
                    types[symbol["st_value"]] = symbol.name[len("go:itab."):].rpartition(",")[0]
    except (ELFError, struct.error, ValueError, OSError):
        return {}
    return types


def _die_name(die) -> bytes | None:
    name = die.attributes.get("DW_AT_name")
    return name.value if name else None


def pclntab_functions(elf: ELFFile) -> list[GoFunction]:
    """Every function in the binary's .gopclntab, by address; [] when it has none.

    Stripped Go binaries (-ldflags=-s) keep this table because the runtime needs it, so their
    functions can still be found by name.
    """
    section = _pclntab_section(elf)
    if section is None:
        return []
    binary, data = elf.stream.name, _go_table(elf, section)
    if data is None:
        raise UserError(f"{binary}: the Go function table (.gopclntab) is corrupt (its section header is damaged)",
                        hint="the binary may be damaged")
    magic = int.from_bytes(data[:4], "little")
    if magic == _PCLNTAB_GO12:
        raise UserError(f"{binary} was built by a Go release older than go1.16 and has no symbol table",
                        hint="use a build that keeps its symbol table, or rebuild it with go1.17 or later")
    if magic not in (_PCLNTAB_GO116, _PCLNTAB_GO118, _PCLNTAB_GO120) or data[7:8] != b"\x08":
        raise UserError(f"{binary}: unknown Go function table format (magic {magic:#x})",
                        hint="otel-ebpf reads the tables of 64-bit binaries built by go1.16 and later")
    text = elf.get_section_by_name(".text")
    try:
        return _parse_pclntab(data, magic, text["sh_addr"] if text is not None else None)
    except (struct.error, IndexError, ValueError) as err:
        raise UserError(f"{binary}: the Go function table (.gopclntab) is corrupt ({err})",
                        hint="the binary may be damaged") from None


def _parse_pclntab(data: bytes, magic: int, text_address: int | None) -> list[GoFunction]:
    """pcHeader: magic, 2 pad bytes, minLC, ptrSize, then pointer-sized words. go1.18 added textStart
    (word 2) and made function addresses 32-bit offsets from it; go1.16 stores absolute addresses.

    Recent linkers (seen with go1.26) leave textStart 0 for the runtime to fill in: then the .text section's
    address is the base, as Go's own debug/gosym takes it."""
    words = struct.unpack_from("<8Q", data, 8)
    if magic == _PCLNTAB_GO116:
        nfunc, text_start, funcnames, functab = words[0], 0, words[2], words[6]
        field = "<Q"
    else:
        nfunc, funcnames, functab = words[0], words[3], words[7]
        text_start = words[2] or text_address or 0
        field = "<I"
    width = struct.calcsize(field)

    def functab_word(index: int) -> int:
        return struct.unpack_from(field, data, functab + index * width)[0]

    functions = []
    for i in range(nfunc):
        entry, func_offset = functab_word(2 * i), functab_word(2 * i + 1)
        # _func starts with the entry (same width as in functab), then nameOff (int32).
        name_offset = struct.unpack_from("<i", data, functab + func_offset + width)[0]
        start = funcnames + name_offset
        name = data[start:data.index(b"\0", start)].decode()
        functions.append(GoFunction(name, text_start + entry, text_start + functab_word(2 * i + 2)))
    return functions


def _pclntab_section(elf: ELFFile):
    for name in _PCLNTAB_SECTIONS:
        section = elf.get_section_by_name(name)
        if section is not None:
            return section
    return None


def _buildinfo_version(elf: ELFFile) -> str | None:
    """runtime.buildVersion as recorded in .go.buildinfo (go1.13+), the way debug/buildinfo reads it."""
    section = elf.get_section_by_name(".go.buildinfo")
    data = _go_table(elf, section) if section is not None else None
    if data is None or not data.startswith(_BUILDINFO_MAGIC) or len(data) < 32:
        return None
    ptr_size, flags = data[14], data[15]
    if flags & _BUILDINFO_INLINE_STRINGS:
        length, position = _uvarint(data, 32)
        return data[position:position + length].decode(errors="replace")
    if ptr_size != 8:
        return None
    return _read_go_string(elf, struct.unpack_from("<Q", data, 16)[0])


def _symbol_version(elf: ELFFile) -> str | None:
    """runtime.buildVersion from .symtab: releases older than go1.13 have no .go.buildinfo."""
    symtab = elf.get_section_by_name(".symtab")
    # Found by name, so a damaged section type can make it some other kind of section.
    symbols = symtab.get_symbol_by_name("runtime.buildVersion") if isinstance(symtab, SymbolTableSection) else None
    return _read_go_string(elf, symbols[0]["st_value"]) if symbols else None


def _read_go_string(elf: ELFFile, address: int) -> str | None:
    """A Go string header (data pointer, length) at address, and the bytes it points to."""
    header = _read_virtual(elf, address, 16)
    if header is None:
        return None
    pointer, length = struct.unpack("<QQ", header)
    text = _read_virtual(elf, pointer, length)
    return text.decode(errors="replace") if text else None


def _read_virtual(elf: ELFFile, address: int, size: int) -> bytes | None:
    for segment in elf.iter_segments():
        start = segment["p_vaddr"]
        if segment["p_type"] == "PT_LOAD" and start <= address and address + size <= start + segment["p_filesz"]:
            offset = segment["p_offset"] + address - start
            # Address, size and segment all come from the file: damaged, they could ask for more than it holds.
            if offset + size > _file_size(elf.stream):
                return None
            elf.stream.seek(offset)
            return elf.stream.read(size)
    return None


def _go_table(elf: ELFFile, section) -> bytes | None:
    """The bytes of a Go table (.gopclntab, .go.buildinfo); None when its section header is damaged.

    Checked first because Section.data() reads (or, for SHT_NOBITS, allocates) sh_size bytes unchecked:
    MemoryError or OverflowError for a huge size. Go never compresses these tables (the runtime reads them
    in place), so one flagged compressed is damaged too.
    """
    if section.compressed or not _in_file(elf, section):
        return None
    return section.data()


def _in_file(elf: ELFFile, section) -> bool:
    """Whether the section's stored bytes lie within the file."""
    return section["sh_offset"] + section["sh_size"] <= _file_size(elf.stream)


def _file_size(stream) -> int:
    # pyelftools seeks before every read, so moving the position here is harmless.
    return stream.seek(0, os.SEEK_END)


def _uvarint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


@dataclass(frozen=True)
class ExitShape:
    """How control enters and leaves one function's code; what decides whether entry-style probes pair up."""

    entry: int  # first address run exactly once per call: past Go's stack-growth check, else the start
    returns: tuple[int, ...]  # ret instructions
    jumps_out: tuple[tuple[int, int], ...]  # (address, target) of direct jumps leaving the function
    indirect_jumps: tuple[int, ...]  # jumps through a register or memory
    reentries: tuple[int, ...]  # jumps back into [start, entry] other than the stack-growth check's own
    falls_through: bool  # the last instruction is no ret, jump, call or trap: it runs into what follows
    undecodable: int | None  # first address that is not a valid instruction


@dataclass(frozen=True)
class Refusal:
    """Why one function cannot be traced: `why` in a few words, for lists; `error` the whole one-line error."""

    function: FunctionSymbol
    why: str
    error: UserError


@dataclass(frozen=True)
class Selection:
    """What the planner probes for some patterns of one Go binary, and the one line that reports the rest."""

    traceable: tuple[tuple[FunctionSymbol, ExitShape], ...]  # in pattern order, each address once
    refused: tuple[Refusal, ...]  # matches of globs that cannot be traced
    warning: str | None  # None when nothing was refused


def traceable_shape(binary: str, symbol: FunctionSymbol, shown: str | None = None) -> ExitShape:
    """Entry and returns of symbol from one disassembly: `entry` is where each call begins exactly once
    (past Go's stack-growth check), `returns` every ret, where entry-style return probes go. UserError,
    naming the function and the reason, for the shapes the module docstring lists; messages name the
    binary as `shown` (the user's name for it)."""
    result = examine(binary, symbol, shown)
    if isinstance(result, Refusal):
        raise result.error
    return result


def examine(binary: str, symbol: FunctionSymbol, shown: str | None = None) -> ExitShape | Refusal:
    """traceable_shape without raising: the shape, or why the function cannot be traced."""
    if symbol.size <= 0:
        return _refused(symbol, shown or binary, "unknown size", "its size is unknown, so its returns cannot be found",
                        "use a build with a symbol table")
    code = _file_bytes(binary, symbol.offset, symbol.size)
    if code is None:
        return _refused(symbol, shown or binary, "code outside the file", "its code is not all in the file",
                        "its symbol size is wrong, or the binary is damaged")
    shape = exit_shape(code, symbol.address)
    refusal = _refusal(shape)
    return shape if refusal is None else _refused(symbol, shown or binary, *refusal)


def select_traceable(binary: str, matches: list[tuple[str, list[FunctionSymbol]]],
                     shown: str | None = None) -> Selection:
    """The functions to probe for each pattern and its matches (symbols.resolve_each): a glob keeps going
    past the matches that cannot be traced, which the warning reports; a name given exactly that cannot be
    traced, or a glob none of whose matches can, is a UserError."""
    shown = shown or binary
    examined: dict[int, ExitShape | Refusal] = {}
    traceable: dict[int, tuple[FunctionSymbol, ExitShape]] = {}
    refused: dict[int, Refusal] = {}
    globs: list[str] = []
    for pattern, functions in matches:
        for f in functions:
            if f.address not in examined:
                examined[f.address] = examine(binary, f, shown)
        results = [examined[f.address] for f in functions]
        exact = not any(char in pattern for char in "*?[") or any(pattern in (f.name, f.demangled) for f in functions)
        refusals = [result for result in results if isinstance(result, Refusal)]
        if exact and refusals:
            raise refusals[0].error
        if len(refusals) == len(results):
            raise UserError(f"no function matching {pattern!r} in {shown} can be traced ({len(results)} matched): "
                            f"{_breakdown(refusals)}", refusals[0].error.hint)
        for function, result in zip(functions, results, strict=True):
            if isinstance(result, Refusal):
                refused.setdefault(function.address, result)
            else:
                traceable.setdefault(function.address, (function, result))
        if refusals:
            globs.append(pattern)
    warning = None
    if refused:
        total = len({f.address for pattern, functions in matches if pattern in globs for f in functions})
        patterns = ", ".join(repr(pattern) for pattern in globs)
        listing = shlex.quote(globs[0]) if len(globs) == 1 else "PATTERN"
        warning = (f"skipping {len(refused)} of the {total} functions matching {patterns} in {shown} that cannot be "
                   f"traced: {_breakdown(list(refused.values()))}; see `otel-ebpf symbols {shown} {listing}`")
    return Selection(tuple(traceable.values()), tuple(refused.values()), warning)


def untraceable(binary: str, functions: list[FunctionSymbol]) -> dict[int, str]:
    """By address, why each function that cannot be traced cannot, in a few words: for `otel-ebpf symbols`."""
    try:
        check_register_abi(binary)
    except UserError:
        version = go_version(binary) or "an unknown Go release"
        return {f.address: f"built by {version}, before the register ABI of go1.17" for f in functions}
    results = ((f.address, examine(binary, f)) for f in functions)
    return {address: result.why for address, result in results if isinstance(result, Refusal)}


def _breakdown(refusals: list[Refusal], names_each: int = 3) -> str:
    """'no ret: 5 (runtime.mcall, runtime.morestack, ...); tail call: 2 (...)', most frequent reason first."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for refusal in refusals:
        by_reason[refusal.why].append(refusal.function.demangled)
    parts = []
    for why, names in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        shown = ", ".join(sorted(names)[:names_each]) + (", ..." if len(names) > names_each else "")
        parts.append(f"{why}: {len(names)} ({shown})")
    return "; ".join(parts)


def _refused(symbol: FunctionSymbol, shown: str, why: str, reason: str, hint: str) -> Refusal:
    return Refusal(symbol, why, UserError(f"cannot trace {symbol.demangled} in {shown}: {reason}", hint=hint))


def _file_bytes(binary: str, offset: int, size: int) -> bytes | None:
    """size bytes of binary at offset; None when the file does not hold them all.

    Offset and size come from the binary's own headers: checked first, since seeking to a damaged offset
    raises ValueError or OSError instead of reading short.
    """
    with open(binary, "rb") as stream:
        if offset + size > os.fstat(stream.fileno()).st_size:
            return None
        stream.seek(offset)
        code = stream.read(size)
    return code if len(code) == size else None


def _refusal(shape: ExitShape) -> tuple[str, str, str] | None:
    """Why entry-style probes would not pair up on this function (in a few words, then in full), and what to do
    instead; None if they do."""
    callers = "trace its callers instead"
    if shape.undecodable is not None:
        return ("not x86-64 code", f"the bytes at {shape.undecodable:#x} are not x86-64 instructions",
                "its symbol size may be wrong, or it is not code")
    if shape.falls_through:
        return "runs past its end", "its code runs past its end into the next function", "its symbol size may be wrong"
    if shape.jumps_out:
        address, target = shape.jumps_out[0]
        return ("tail call", f"it leaves through a jump to {target:#x} at {address:#x} (a tail call), so its return "
                "is never seen", "trace the function it jumps to, or its callers")
    if shape.indirect_jumps:
        return ("indirect jump", f"it jumps through a register or memory at {shape.indirect_jumps[0]:#x} (a jump "
                "table or a tail call), which may leave it unseen", callers)
    if shape.reentries:
        return ("jumps back to its start",
                f"it jumps back to its start at {shape.reentries[0]:#x}, so one call would count as several", callers)
    if not shape.returns:
        return "no ret", "it has no ret instruction: it never returns (like runtime.goexit or a panic helper)", callers
    return None


def exit_shape(code: bytes, address: int) -> ExitShape:
    """Disassemble one function (its bytes, loaded at address) and classify how it is entered and left."""
    start = address + len(_ENDBR64) if code.startswith(_ENDBR64) else address
    end = address + len(code)
    instructions = _decode(code[start - address:], start)
    decoded_end = instructions[-1].address + instructions[-1].size if instructions else start
    while instructions and instructions[-1].kind in _PADDING:
        instructions.pop()
    entry, check = _stack_check(instructions, start)
    jumps = [(insn.address, insn.target) for insn in instructions if insn.jump and insn.address not in check]
    last = instructions[-1] if instructions else None
    return ExitShape(
        entry=entry,
        returns=tuple(insn.address for insn in instructions if insn.kind == x86.X86_INS_RET),
        jumps_out=tuple((source, target) for source, target in jumps
                        if target is not None and not address <= target < end),
        indirect_jumps=tuple(source for source, target in jumps if target is None),
        reentries=tuple(source for source, target in jumps
                        if target is not None and (address <= target <= entry or target in check)),
        falls_through=last is not None and last.kind not in _NO_FALLTHROUGH,
        undecodable=decoded_end if decoded_end < end else None,
    )


class _Insn(NamedTuple):
    """What the shape rules need of one instruction."""

    address: int
    size: int
    kind: int | None  # capstone's instruction id for the ones the rules tell apart, else None
    jump: bool  # in capstone's jump group
    target: int | None  # a direct jump's target


def _decode(code: bytes, start: int) -> list[_Insn]:
    """The instructions of code loaded at start. Capstone's full detail costs several times a plain decode,
    so only jumps get it (their group and operand); the rest is told apart by mnemonic (its last word, past
    prefixes such as repz or bnd)."""
    instructions = []
    for address, size, mnemonic, _ in _disassembler(False).disasm_lite(code, start):
        word = mnemonic.rsplit(" ", 1)[-1]
        if word.startswith(("j", "loop")):
            offset = address - start
            insn = next(_disassembler(True).disasm(code[offset:offset + size], address))
            instructions.append(_Insn(address, size, insn.id, insn.group(capstone.CS_GRP_JUMP), _jump_target(insn)))
        else:
            instructions.append(_Insn(address, size, _KINDS.get(word), False, None))
    return instructions


@functools.cache
def _disassembler(detail: bool) -> capstone.Cs:
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    disassembler.detail = detail
    return disassembler


def _jump_target(insn) -> int | None:
    """The target of a direct jump; None for one through a register or memory."""
    operand = insn.operands[0] if insn.operands else None
    return operand.imm if operand is not None and operand.type == x86.X86_OP_IMM else None


def _stack_check(instructions: list[_Insn], start: int) -> tuple[int, set[int]]:
    """Where the call really begins, past Go's stack-growth check, and the addresses of that check.

    The prologue is straight-line code ending in conditional jumps (jbe; also jb for huge frames)
    to one block that calls runtime.morestack and jumps back to the start, so a call whose stack had
    to grow runs the start twice but what follows the check once. Returns the start and no
    addresses when the function has no such check (nosplit functions, C code).
    """
    index = {insn.address: position for position, insn in enumerate(instructions)}
    entry, check, block_start = start, set(), None
    for position, insn in enumerate(instructions):
        if insn.jump and insn.kind != x86.X86_INS_JMP:
            block = _morestack_block(instructions, index.get(insn.target), start)
            if block is None or block_start not in (None, insn.target):
                break
            entry, block_start = insn.address + insn.size, insn.target
            check.update(instructions[p].address for p in [*range(position + 1), *block])
        elif insn.jump or insn.kind in _NO_FALLTHROUGH:
            break
    return entry, check


def _morestack_block(instructions: list[_Insn], position: int | None, start: int) -> range | None:
    """Positions of the straight-line block at position when it makes one call, then jumps to start."""
    if position is None:
        return None
    calls = 0
    for end in range(position, len(instructions)):
        insn = instructions[end]
        if insn.kind == x86.X86_INS_JMP:
            return range(position, end + 1) if calls == 1 and insn.target == start else None
        if insn.kind == x86.X86_INS_CALL:
            calls += 1
        elif insn.jump or insn.kind in _NO_FALLTHROUGH:
            return None
    return None
