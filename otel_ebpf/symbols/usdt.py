"""USDT probes: the `.note.stapsdt` notes that <sys/sdt.h> leaves in a binary (SystemTap's format, which
bpftrace, bcc and OBI read too): where each probe is, its semaphore, and where its arguments are at the probe.

An argument spec is `[-]SIZE@OPERAND`, SIZE in bytes (negative: signed), OPERAND a register (`%edi`), a
constant (`$5`) or memory at a register plus an offset (`-16(%rbp)`). Anything else (an index register, a
%rip-relative symbol) is kept as written and refused when a capture asks for it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from otel_ebpf.kernel import layout
from otel_ebpf.symbols import elf as elfs

NT_STAPSDT = 3
REGISTERS = {
    layout.REG_RAX: ("rax", "eax", "ax", "al"), layout.REG_RBX: ("rbx", "ebx", "bx", "bl"),
    layout.REG_RCX: ("rcx", "ecx", "cx", "cl"), layout.REG_RDX: ("rdx", "edx", "dx", "dl"),
    layout.REG_RSI: ("rsi", "esi", "si", "sil"), layout.REG_RDI: ("rdi", "edi", "di", "dil"),
    layout.REG_RBP: ("rbp", "ebp", "bp", "bpl"), layout.REG_RSP: ("rsp", "esp", "sp", "spl"),
    **{getattr(layout, f"REG_R{n}"): (f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b") for n in range(8, 16)},
}
REGISTER_OF = {name: number for number, names in REGISTERS.items() for name in names}
_ARGUMENT = re.compile(r"(-?)(\d+)@(?:%(\w+)|\$(-?\d+)|(-?\d*)\(%(\w+)\))")


@dataclass(frozen=True)
class Argument:
    text: str  # as the note writes it
    size: int  # bytes
    signed: bool
    register: int = -1  # REG_*, -1: a constant or unsupported
    constant: int | None = None
    memory: bool = False  # the value is at register + offset
    offset: int = 0

    @property
    def supported(self) -> bool:
        return self.register >= 0 or self.constant is not None


@dataclass(frozen=True)
class UsdtProbe:
    provider: str
    name: str
    address: int  # virtual address of the probe's nop, as in the ELF file
    offset: int  # its file offset: where the uprobe goes
    semaphore: int  # the semaphore's virtual address, 0: none
    semaphore_offset: int  # its file offset: the uprobe's ref_ctr_offset
    arguments: tuple[Argument, ...]

    @property
    def full_name(self) -> str:
        return f"{self.provider}:{self.name}"

    def describe(self) -> str:
        semaphore = f"  semaphore {self.semaphore:#x}" if self.semaphore else ""
        return f"{self.address:#014x}  usdt:{self.full_name}  ({' '.join(a.text for a in self.arguments)}){semaphore}"


def parse_argument(text: str) -> Argument:
    matched = _ARGUMENT.fullmatch(text)
    if not matched:
        size = re.match(r"-?(\d+)@", text)
        return Argument(text, int(size[1]) if size else 8, text.startswith("-"))
    sign, size, register, constant, offset, base = matched.groups()
    signed, size = bool(sign), int(size)
    if constant is not None:
        return Argument(text, size, signed, constant=int(constant))
    if register is not None:
        return Argument(text, size, signed, REGISTER_OF.get(register, -1))
    return Argument(text, size, signed, REGISTER_OF.get(base, -1), memory=True, offset=int(offset or 0))


def probes(path: str) -> list[UsdtProbe]:
    """Every USDT probe of the ELF file at path, in the notes' order; empty when it has none."""
    found = []
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            section = elf.get_section_by_name(".note.stapsdt")
            if section is None:
                return found
            segments = elfs.load_segments(elf)
            base_section = elf.get_section_by_name(".stapsdt.base")
            for note in section.iter_notes():
                # pyelftools names type 3 after the GNU note that shares the number.
                if note["n_name"] != "stapsdt" or note["n_type"] not in (NT_STAPSDT, "NT_GNU_BUILD_ID"):
                    continue
                desc = note["n_desc"]
                raw = desc if isinstance(desc, bytes) else bytes.fromhex(desc) if isinstance(desc, str) else b""
                if len(raw) < 24:
                    continue
                pc, base, semaphore = struct.unpack_from("<QQQ", raw)
                provider, name, args = (raw[24:].split(b"\0") + [b"", b""])[:3]
                if base_section is not None and base:  # the binary was prelinked since: move with it
                    pc += base_section["sh_addr"] - base
                    if semaphore:
                        semaphore += base_section["sh_addr"] - base
                offset = elfs.file_offset(segments, pc)
                semaphore_offset = _data_offset(elf, semaphore) if semaphore else 0
                if offset is None:
                    continue
                found.append(UsdtProbe(provider.decode(errors="replace"), name.decode(errors="replace"), pc, offset,
                                       semaphore, semaphore_offset or 0,
                                       tuple(parse_argument(a) for a in args.decode(errors="replace").split())))
    except (ELFError, struct.error, ValueError, OSError):
        return []
    return found


def _data_offset(elf: ELFFile, address: int) -> int | None:
    """File offset of a data address (a semaphore lives in .probes, in a writable segment)."""
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD" and segment["p_vaddr"] <= address < segment["p_vaddr"] + segment["p_filesz"]:
            return address - segment["p_vaddr"] + segment["p_offset"]
    return None
