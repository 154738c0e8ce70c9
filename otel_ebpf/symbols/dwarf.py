"""Functions' parameters and results as DWARF describes them: what a capture by name reads, with its type, and
what `otel-ebpf symbols` shows.

Only what a capture can read from registers is classified: C integers, bools, enums and pointers (`char *` as a
string), and for Go also strings and interfaces (two registers) and slices (three). Anything else (a struct
passed by value, a float) is kept with its name so that a capture naming it is refused with a reason.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

# What a parameter's type is, for a capture (the capture TYPE it defaults to), or "" when no capture reads it.
INT, UINT, BOOL, STR, PTR = "int", "uint", "bool", "str", "ptr"
_BASE_KINDS = {0x02: BOOL, 0x05: INT, 0x06: "char", 0x07: UINT, 0x08: "uchar", 0x10: "utf"}  # DW_ATE_*
_QUALIFIERS = {"DW_TAG_const_type": "const ", "DW_TAG_volatile_type": "volatile ", "DW_TAG_restrict_type": ""}
_PARSE_ERRORS = (ELFError, struct.error, ValueError, KeyError, OSError, zlib.error, AssertionError, OverflowError)


@dataclass(frozen=True)
class Parameter:
    name: str
    type_name: str  # as the language writes it: "const char *", "int", "string"
    kind: str  # INT, UINT, BOOL, STR, PTR, or "" when a capture cannot read it
    size: int  # bytes of the value: an int's width (the register's low bytes hold it)
    registers: int  # integer registers it takes: 1, or for Go strings and interfaces 2, slices 3; 0 unknown


@dataclass(frozen=True)
class Signature:
    parameters: tuple[Parameter, ...]
    results: tuple[Parameter, ...]  # C: the return type, unnamed; Go: every result, in order

    def describe(self) -> str:
        """`(const char *sql, int limit) -> int`: how `otel-ebpf symbols` shows it."""
        params = ", ".join(f"{p.type_name}{'' if p.type_name.endswith('*') else ' '}{p.name}".strip()
                           for p in self.parameters)
        results = [r.type_name for r in self.results]
        shown = f"({params})"
        if results:
            shown += " -> " + (results[0] if len(results) == 1 else f"({', '.join(results)})")
        return shown


def _name(die) -> str:
    attribute = die.attributes.get("DW_AT_name")
    return attribute.value.decode("utf-8", "replace") if attribute else ""


def _origin(die):
    """A concrete instance's DIE refers to the abstract one for its name and type."""
    for key in ("DW_AT_abstract_origin", "DW_AT_specification"):
        if key in die.attributes:
            return die.get_DIE_from_attribute(key)
    return None


def _attribute_die(die, key: str):
    while die is not None:
        if key in die.attributes:
            return die
        die = _origin(die)
    return None


def _type(die, go: bool) -> tuple[str, str, int, int]:
    """(type name, kind, size, registers) of the type a DIE's DW_AT_type names; void when it has none."""
    owner = _attribute_die(die, "DW_AT_type")
    if owner is None:
        return "void", "", 0, 0
    return _classify(owner.get_DIE_from_attribute("DW_AT_type"), go)


def _classify(die, go: bool, depth: int = 0) -> tuple[str, str, int, int]:
    tag, name, size = die.tag, _name(die), die.attributes.get("DW_AT_byte_size")
    size = size.value if size else 0
    if depth > 16:
        return name or "?", "", size, 0
    if tag in _QUALIFIERS or (tag == "DW_TAG_typedef" and not go):
        inner = _type(die, go)
        shown = _QUALIFIERS[tag] + inner[0] if tag in _QUALIFIERS else name
        return (shown, *inner[1:])
    if tag == "DW_TAG_typedef":  # Go: a named type is its underlying one
        inner = _type(die, go)
        return (name, *inner[1:])
    if tag == "DW_TAG_base_type":
        encoding = die.attributes["DW_AT_encoding"].value if "DW_AT_encoding" in die.attributes else 0
        kind = _BASE_KINDS.get(encoding, "")
        if kind == "char":
            kind = INT
        elif kind in ("uchar", "utf"):
            kind = UINT
        return name, kind, size, 1 if kind else 0
    if tag == "DW_TAG_enumeration_type":
        return f"enum {name}" if not go else name, INT, size or 4, 1
    if tag == "DW_TAG_pointer_type":
        target = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
        inner = _classify(target, go, depth + 1) if target is not None else ("void", "", 0, 0)
        if go:
            return name or f"*{inner[0]}", PTR, 8, 1
        pointee = inner[0]
        is_char = target is not None and _strip(target).tag == "DW_TAG_base_type" and _name(_strip(target)) in (
            "char", "signed char", "unsigned char")
        return f"{pointee}*" if pointee.endswith("*") else f"{pointee} *", STR if is_char else PTR, 8, 1
    if go and tag == "DW_TAG_structure_type" and name == "string":
        return name, STR, 16, 2
    if go and tag == "DW_TAG_structure_type" and name.startswith("[]"):
        return name, "", 24, 3
    if go and tag == "DW_TAG_interface_type" or (go and tag == "DW_TAG_structure_type" and name in ("error",)):
        return name, "", 16, 2
    if tag == "DW_TAG_structure_type":
        return (name if go else f"struct {name}"), "", size, 0
    return name or tag.removeprefix("DW_TAG_"), "", size, 0


def _strip(die):
    """The type under const, volatile and typedefs."""
    for _ in range(16):
        if die.tag not in (*_QUALIFIERS, "DW_TAG_typedef") or "DW_AT_type" not in die.attributes:
            return die
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die


def _parameter(die, go: bool) -> Parameter:
    named = _attribute_die(die, "DW_AT_name")
    type_name, kind, size, registers = _type(die, go)
    return Parameter(_name(named) if named is not None else "", type_name, kind, size, registers)


def _signature(die, go: bool) -> Signature:
    params, results, seen = [], [], set()
    for child in die.iter_children():
        if child.tag != "DW_TAG_formal_parameter":
            continue
        parameter = _parameter(child, go)
        if parameter.name and parameter.name in seen:  # Go 1.26 lists a result twice in functions with a defer
            continue
        seen.add(parameter.name)
        is_result = go and _attribute_die(child, "DW_AT_variable_parameter") is not None and \
            _attribute_die(child, "DW_AT_variable_parameter").attributes["DW_AT_variable_parameter"].value
        (results if is_result else params).append(parameter)
    if not go:
        type_name, kind, size, registers = _type(die, go)
        if type_name != "void":
            results.append(Parameter("", type_name, kind, size, registers))
    return Signature(tuple(params), tuple(results))


_SCOPES = ("DW_TAG_namespace", "DW_TAG_class_type", "DW_TAG_structure_type", "DW_TAG_union_type")


def _functions(scope):
    """Defined functions under a compilation unit, namespaces and classes included; what is inside a function
    (its locals, lexical blocks) is skipped by sibling links, never parsed."""
    for die in scope.iter_children():
        if die.tag == "DW_TAG_subprogram" and "DW_AT_low_pc" in die.attributes:
            yield die
        elif die.tag in _SCOPES:
            yield from _functions(die)


def signatures(path: str, addresses: tuple[int, ...] | None = None) -> dict[int, Signature]:
    """Defined functions' signatures in the DWARF of the file at path, by entry address: all of them, or those of
    the compilation units holding `addresses` when .debug_aranges tells which (a few units of libc's hundreds).
    Empty when the file has no DWARF or it cannot be read: then captures go by position."""
    return _signatures(path, tuple(sorted(set(addresses))) if addresses is not None else None)


@functools.lru_cache(maxsize=16)
def _signatures(path: str, addresses: tuple[int, ...] | None) -> dict[int, Signature]:
    found: dict[int, Signature] = {}
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            if not elf.has_dwarf_info():
                return found
            go = elf.get_section_by_name(".go.buildinfo") is not None
            info = elf.get_dwarf_info()
            for cu in _units(info, addresses):
                for die in _functions(cu.get_top_DIE()):
                    found.setdefault(die.attributes["DW_AT_low_pc"].value, _signature(die, go))
    except _PARSE_ERRORS:
        return {}
    return found


def _units(info, addresses: tuple[int, ...] | None):
    """The compilation units to read: every one, or those holding an address (by .debug_aranges, else by each
    unit's own ranges, which Go writes instead)."""
    if addresses is None:
        yield from info.iter_CUs()
        return
    aranges = info.get_aranges()
    if aranges is not None:
        offsets = {aranges.cu_offset_at_addr(address) for address in addresses}
        if None not in offsets:
            for offset in sorted(offsets):
                yield info.get_CU_at(offset)
            return
    for cu in info.iter_CUs():
        spans = _unit_ranges(info, cu.get_top_DIE())
        if spans is None or any(low <= a < high for low, high in spans for a in addresses):
            yield cu


def _unit_ranges(info, top) -> list[tuple[int, int]] | None:
    """A unit's address ranges; None when it does not say."""
    attrs = top.attributes
    if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
        low, high = attrs["DW_AT_low_pc"].value, attrs["DW_AT_high_pc"]
        return [(low, high.value if high.form == "DW_FORM_addr" else low + high.value)]
    if "DW_AT_ranges" in attrs and info.range_lists() is not None:
        base = attrs["DW_AT_low_pc"].value if "DW_AT_low_pc" in attrs else 0
        entries = info.range_lists().get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=top.cu)
        spans = []
        for entry in entries:
            if hasattr(entry, "begin_offset"):
                offset = 0 if getattr(entry, "is_absolute", False) else base
                spans.append((offset + entry.begin_offset, offset + entry.end_offset))
            elif hasattr(entry, "base_address"):
                base = entry.base_address
        return spans
    return None


def dwarf_size(path: str) -> int:
    """Bytes of .debug_info: how long reading every signature would take (libc's 5.8 MB: about 10 s)."""
    try:
        with open(path, "rb") as stream:
            section = ELFFile(stream).get_section_by_name(".debug_info")
            return section.data_size if section is not None else 0
    except _PARSE_ERRORS:
        return 0
