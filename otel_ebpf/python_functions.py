"""Python functions as spans: `py:NAME` or `py:FILE:NAME` on a CPython built with USDT probes (Debian's
/usr/bin/python3.11). Its python:function__entry and function__return probes fire for every Python call with
the code object's file name, function name and first line; the kernel keeps only the calls whose names match
(filter.bpf.c), and each becomes a span named after its function, with code.file.path and code.line.number,
nested with the native probes of its thread.

The probes give no module or qualified name, so patterns match the bare function name and the file path:
a name, `prefix*`, `*suffix` or `*` (the kernel compares bytes, no full globs).
"""

from __future__ import annotations

from otel_ebpf import captures
from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.probes import Probe
from otel_ebpf.symbols import FunctionSymbol, SymbolTable, usdt

PREFIX = "py:"
ENTRY, RETURN = "python:function__entry", "python:function__return"
_HINT = "write py:NAME or py:FILE:NAME, each a name, prefix*, *suffix or *; e.g. py:handle_* or py:*/app.py:main"


def pattern(text: str, what: str, spec: str) -> bytes:
    """struct name_pattern for one pattern."""
    body = text.strip("*")
    if text == "*" or not text:
        kind = layout.PATTERN_ANY
    elif "*" in body or any(c in text for c in "?[") or (text.startswith("*") and text.endswith("*")):
        raise UserError(f"{spec!r}: the {what} pattern {text!r} is more than a name, prefix*, *suffix or *", _HINT)
    elif text.endswith("*"):
        kind = layout.PATTERN_PREFIX
    elif text.startswith("*"):
        kind = layout.PATTERN_SUFFIX
    else:
        kind = layout.PATTERN_EXACT
    raw = body.encode()
    if len(raw) > layout.NAME_PATTERN_MAX:
        raise UserError(f"{spec!r}: the {what} pattern is longer than {layout.NAME_PATTERN_MAX} bytes", _HINT)
    return layout.NAME_PATTERN.pack(kind, len(raw) if kind != layout.PATTERN_ANY else 0, raw)


def _register(probe: usdt.UsdtProbe, index: int, binary: str) -> int:
    if len(probe.arguments) < 3 or probe.arguments[index].memory or probe.arguments[index].register < 0:
        raise UserError(f"{binary}'s usdt:{probe.full_name} passes its arguments as {' '.join(a.text for a in probe.arguments)}"
                        ", not in registers as py: expects", "trace it with usdt: specs instead")
    return probe.arguments[index].register


def plan(table: SymbolTable, specs: list[str]) -> list[Probe]:
    """One probe for every py: spec of a binary: the function__entry/function__return pair, filtered by the
    specs' (file, name) rules."""
    found = usdt.probes(table.path)
    entries = [p for p in found if p.full_name == ENTRY]
    returns = [p for p in found if p.full_name == RETURN]
    if not entries or not returns:
        raise UserError(f"{table.binary} has no {ENTRY} and {RETURN} USDT probes: this Python was built without "
                        "them (configure --with-dtrace), so py: cannot trace its functions",
                        "run the program with a Python that has them, such as Debian's /usr/bin/python3.11")
    if len(specs) > layout.NAME_RULES:
        raise UserError(f"{len(specs)} py: specs for {table.binary}; at most {layout.NAME_RULES}",
                        "use prefix* or *suffix patterns that cover several")
    rules = b""
    for spec in specs:
        file, _, name = spec[len(PREFIX):].rpartition(":")
        if not name:
            raise UserError(f"{spec!r} names no function", _HINT)
        rules += pattern(file or "*", "file", spec) + pattern(name, "function", spec)
    entry, done = entries[0], returns[0]
    if any(len({tuple(a.text for a in p.arguments) for p in sites}) > 1 for sites in (entries, returns)):
        raise UserError(f"{table.binary} passes the arguments of its function probes differently at different places",
                        "trace them with usdt: specs instead")
    name_filter = struct_filter(_register(entry, 0, table.binary), _register(entry, 1, table.binary),
                                _register(done, 0, table.binary), _register(done, 1, table.binary), len(specs), rules)
    arguments = (captures.Placed("code.file.path", "str", 8, _register(entry, 0, table.binary), 256),
                 captures.Placed("code.function.name", "str", 8, _register(entry, 1, table.binary), 128),
                 captures.Placed("code.line.number", "int", 4, _register(entry, 2, table.binary)))
    shown = ", ".join(specs)
    symbol = FunctionSymbol(shown, shown, entry.address, entry.offset, 0)
    return [Probe(table.path, symbol, entry.address, shown_as=table.binary,
                  captures=captures.Plan(arguments, None, None, names_span="code.function.name"),
                  usdt=tuple(entries), usdt_done=tuple(returns), name_filter=name_filter)]


def struct_filter(entry_file: int, entry_name: int, return_file: int, return_name: int, rules: int,
                  patterns: bytes) -> bytes:
    """struct name_filter."""
    size = layout.NAME_FILTER.struct.size
    head = bytes([entry_file, entry_name, return_file, return_name]) + rules.to_bytes(4, "little")
    return (head + patterns).ljust(size, b"\0")
