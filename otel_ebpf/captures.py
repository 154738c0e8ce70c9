"""What a probe spec asks to read of each call, `SYMBOL[(CAPTURE, ...)][->CAPTURE[|err[COND]]]`: parsed here, placed
in the registers of the function's ABI (the kernel's struct capture_plan), and read back into span attributes.

Nothing is read unless a spec names it. Positions are the ABI's integer-register slots (System V: rdi, rsi, rdx,
rcx, r8, r9; Go's register ABI: rax, rbx, rcx, rdi, rsi, r8-r11, a string taking two); with DWARF a capture can
name a parameter instead, and DWARF gives its type and width (a C `int` is the low 32 bits of its register).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.symbols import dwarf, usdt

DEFAULT_STRING = 128  # bytes of a `str` without <N>
SYSTEM_V = (layout.REG_RDI, layout.REG_RSI, layout.REG_RDX, layout.REG_RCX, layout.REG_R8, layout.REG_R9)
GO_ABI = (layout.REG_RAX, layout.REG_RBX, layout.REG_RCX, layout.REG_RDI, layout.REG_RSI, layout.REG_R8,
          layout.REG_R9, layout.REG_R10, layout.REG_R11)
_REGISTER_NAMES = {number: names[0] for number, names in usdt.REGISTERS.items()}
TYPES = ("int", "uint", "bool", "str", "str<N>", "hex<N>", "ptr", "-")
# Attributes listing the keys whose value was cut at its bound, or could not be read (a NULL or bad pointer).
TRUNCATED = "otel_ebpf.capture.truncated"
UNREADABLE = "otel_ebpf.capture.unreadable"
HINT = ("write SYMBOL(CAPTURE, ...)->CAPTURE|errCOND, CAPTURE being [KEY:]TYPE with TYPE one of "
        f"{', '.join(TYPES)}, or a parameter name DWARF knows; COND one of <N <=N >N >=N ==N !=N")

_TYPE = re.compile(r"(int|uint|bool|str|ptr|-)|(str|hex)<(\d+)>")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONDITION = re.compile(r"(<=|>=|==|!=|<|>)\s*(-?(?:0x[0-9a-fA-F]+|\d+))")
# Names of C++ operators hold brackets and arrows that are not capture syntax.
_OPERATOR = re.compile(r"\boperator\s*(<=>|<<=|>>=|<<|>>|<=|>=|->\*?|<|>|\(\)|\[\]|,)")


@dataclass(frozen=True)
class Capture:
    """One value to read: a TYPE at a position, or a parameter DWARF names (type None: DWARF's)."""

    key: str | None  # the attribute key as written; None: arg<position>, `return`, or the parameter's name
    type: str | None  # int, uint, bool, str, hex, ptr or "-" (skip a slot)
    length: int = 0  # str and hex: the most bytes copied
    name: str | None = None  # a parameter name, looked up in DWARF
    text: str = ""


@dataclass(frozen=True)
class Condition:
    """When the result makes the span an error: `op value`, or op None for a Go error result that is not nil."""

    op: str | None
    value: int = 0

    def matches(self, result: int) -> bool:
        return {"<": result < self.value, "<=": result <= self.value, ">": result > self.value,
                ">=": result >= self.value, "==": result == self.value, "!=": result != self.value}[self.op]


@dataclass(frozen=True)
class CaptureSpec:
    arguments: tuple[Capture, ...]
    result: Capture | None
    error: Condition | None
    text: str  # as written, for messages


def _capture(item: str, text: str) -> Capture:
    key, colon, what = item.rpartition(":")
    key, what = key.strip(), what.strip()
    if colon and not key:
        raise UserError(f"capture {item!r} in {text!r} has an empty KEY before ':'", HINT)
    typed = _TYPE.fullmatch(what)
    if typed:
        kind = typed[1] or typed[2]
        if kind == "-" and colon:
            raise UserError(f"capture {item!r} in {text!r}: '-' skips a parameter and takes no KEY", HINT)
        length = int(typed[3]) if typed[3] else DEFAULT_STRING if kind == "str" else 0
        if typed[3] and not 1 <= length <= layout.CAPTURE_STRING_MAX:
            raise UserError(f"capture {item!r} in {text!r}: {kind}<N> takes 1 to {layout.CAPTURE_STRING_MAX} bytes",
                            HINT)
        return Capture(key or None, kind, length, text=item)
    if what in ("hex", "int8", "int16", "int32", "int64") or what.startswith(("str<", "hex<")):
        raise UserError(f"capture {item!r} in {text!r}: unknown type {what!r}", HINT)
    if _NAME.fullmatch(what):
        return Capture(key or None, None, DEFAULT_STRING, name=what, text=item)
    raise UserError(f"capture {item!r} in {text!r}: unknown type {what!r}", HINT)


def _split_items(inner: str) -> list[str]:
    return [item.strip() for item in inner.split(",")] if inner.strip() else []


def split(text: str) -> tuple[str, CaptureSpec | None]:
    """The symbol of a probe spec and what to capture of its calls; (text, None) when it asks for nothing.

    A trailing parenthesised list is a capture list when its items read as captures; otherwise it belongs to the
    symbol (a C++ signature such as `f(char const*)`)."""
    masked = _OPERATOR.sub(lambda m: "_" * len(m[0]), text)
    arrow = masked.find("->")
    head, tail = (text, "") if arrow < 0 else (text[:arrow].rstrip(), text[arrow + 2:].strip())
    if "|err" in masked[:arrow if arrow >= 0 else len(masked)]:
        raise UserError(f"{text!r}: |err needs a return capture before it, e.g. ->int|err<0", HINT)
    symbol, arguments = head, ()
    masked_head = masked[:len(head)]
    if masked_head.endswith(")"):
        opening = masked_head.rfind("(")
        inner = head[opening + 1:-1]
        try:
            arguments = tuple(_capture(item, text) for item in _split_items(inner))
            symbol = head[:opening].rstrip()
        except UserError:
            if arrow >= 0 or _looks_like_captures(inner):
                raise
    if not symbol:
        raise UserError(f"{text!r} names no symbol before its captures", HINT)
    if len(arguments) > layout.MAX_CAPTURES:
        raise UserError(f"{text!r} captures {len(arguments)} arguments; at most {layout.MAX_CAPTURES} can be",
                        "capture fewer")
    if arrow < 0:
        return (symbol, CaptureSpec(arguments, None, None, text)) if arguments else (text, None)
    result_text, bar, condition_text = tail.partition("|")
    if not result_text.strip():
        raise UserError(f"{text!r}: nothing after '->': write the result's capture, e.g. ->int", HINT)
    result = _capture(result_text.strip(), text)
    if result.type == "-":
        raise UserError(f"{text!r}: '->-' captures nothing: leave out the '->'", HINT)
    error = None
    if bar:
        condition_text = condition_text.strip()
        if not condition_text.startswith("err"):
            raise UserError(f"{text!r}: after '|' comes err and a condition, e.g. |err<0", HINT)
        condition_text = condition_text[3:].strip()
        if not condition_text:
            error = Condition(None)
        else:
            matched = _CONDITION.fullmatch(condition_text)
            if not matched:
                raise UserError(f"{text!r}: unknown condition {condition_text!r}", HINT)
            error = Condition(matched[1], int(matched[2], 0))
    return symbol, CaptureSpec(arguments, result, error, text)


def _looks_like_captures(inner: str) -> bool:
    """A list some of whose items are KEY:TYPE is meant as captures, and its errors are worth showing."""
    return any((":" in item and "::" not in item) or item.startswith(("str<", "hex<"))
               for item in _split_items(inner))


# ----- placing captures in registers


@dataclass(frozen=True)
class Placed:
    """A capture as the kernel reads it and user space shows it."""

    key: str
    kind: str  # int, uint, bool, str, hex, ptr
    size: int  # int and uint: bytes of the value (the register's low bytes)
    register: int  # REG_*
    length: int = 0  # str, hex: the most bytes
    length_register: int = -1  # a Go string's length
    memory: bool = False  # the value is the 8 bytes at register + offset (USDT arguments)
    offset: int = 0

    def slot(self) -> bytes:
        if self.kind == "str":
            kind = layout.CAPTURE_GO_STRING if self.length_register >= 0 else layout.CAPTURE_STRING
        elif self.kind == "hex":
            kind = layout.CAPTURE_BYTES
        else:
            kind = layout.CAPTURE_VALUE
        return layout.CAPTURE_SLOT.pack(kind, self.register, max(self.length_register, 0),
                                        layout.SLOT_MEMORY if self.memory else 0, self.length, 0, self.offset, 0)

    def describe(self) -> str:
        shown = f"str<{self.length}>" if self.kind == "str" else f"hex<{self.length}>" if self.kind == "hex" else \
            self.kind if self.kind not in ("int", "uint") or self.size == 8 else f"{self.kind}{self.size * 8}"
        where = f"{self.offset}(%{_REGISTER_NAMES[self.register]})" if self.memory else _REGISTER_NAMES[self.register]
        return f"{self.key} {shown} ({where})"


@dataclass(frozen=True)
class Plan:
    """Where one function's captures are read; `error_register`: a Go error result's first word (nil: no error)."""

    arguments: tuple[Placed, ...]
    result: Placed | None
    error: Condition | None
    error_register: int = -1
    names_span: str = ""  # the key of a captured string that names the span (Python: its function)

    def encode(self) -> bytes:
        """struct capture_plan."""
        empty = layout.CAPTURE_SLOT.pack(layout.CAPTURE_NONE, 0, 0, 0, 0, 0, 0, 0)
        entry = b"".join(p.slot() for p in self.arguments) + empty * (layout.MAX_CAPTURES - len(self.arguments))
        results = [self.result.slot() if self.result else empty]
        results.append(layout.CAPTURE_SLOT.pack(layout.CAPTURE_VALUE, self.error_register, 0, 0, 0, 0, 0, 0)
                       if self.error_register >= 0 else empty)
        return entry + b"".join(results)

    def describe(self) -> str:
        text = f"({', '.join(p.describe() for p in self.arguments)})"
        if self.result:
            text += f" -> {self.result.describe()}"
        if self.error:
            text += " error when " + ("the error result is not nil" if self.error.op is None else
                                      f"{self.result.key} {self.error.op} {self.error.value}")
        return text


def _width(kind: str, parameter: dwarf.Parameter | None) -> int:
    if kind in ("int", "uint") and parameter is not None and parameter.kind in ("int", "uint", "bool") and \
            parameter.size in (1, 2, 4, 8):
        return parameter.size
    return 8


def _typed(capture: Capture, parameter: dwarf.Parameter | None, where: str, function: str) -> tuple[str, int]:
    """The kind and string length of a capture: as written, else from DWARF."""
    if capture.type is not None:
        return capture.type, capture.length
    if parameter is None or not parameter.kind:
        what = f"{parameter.type_name}" if parameter else "unknown"
        raise UserError(f"{function}: {where} {capture.name!r} is a {what}, which no capture type reads",
                        "capture a pointer to it as ptr, or leave it out")
    return parameter.kind, capture.length


def plan(spec: CaptureSpec, function: str, go: bool, signature: dwarf.Signature | None) -> Plan:
    """The registers each capture of spec reads in `function`; UserError for what cannot be read."""
    registers = GO_ABI if go else SYSTEM_V
    abi = "Go's register ABI" if go else "the System V ABI"
    by_name = {}
    if signature is not None:
        at = 0
        for parameter in signature.parameters:
            by_name[parameter.name] = (at, parameter)
            at = at + parameter.registers if parameter.registers >= 0 and at >= 0 else -1
    starts = {at: parameter for at, parameter in by_name.values()}
    placed, position = [], 0
    for index, capture in enumerate(spec.arguments):
        if capture.name is not None:
            if signature is None:
                raise UserError(f"{function}: {capture.text!r} is no type ({', '.join(TYPES)}) and the binary has no "
                                "DWARF to look it up as a parameter", "capture by position (e.g. str, int), or give "
                                "the binary its debug info")
            if capture.name not in by_name:
                known = ", ".join(p.name for p in signature.parameters) or "none"
                what = f"unknown type {capture.name!r}, and {function} has no parameter of that name" if \
                    capture.key else f"{function} has no parameter {capture.name!r}"
                raise UserError(f"{what} (DWARF knows: {known})", HINT)
            at, parameter = by_name[capture.name]
            if at < 0:
                raise UserError(f"{function}: cannot tell which register holds {capture.name!r}: a parameter "
                                "before it is passed in a way captures do not follow", "capture by position")
        else:
            at, parameter = position, starts.get(position)
        kind, length = _typed(capture, parameter, "parameter", function)
        taken = 2 if go and kind == "str" else 1
        if capture.type != "-" and at + taken > len(registers):
            raise UserError(f"{capture.text!r} of {function}: {abi} passes {len(registers)} integer arguments in "
                            f"registers ({', '.join(_REGISTER_NAMES[r] for r in registers)}); this one is not "
                            "among them", "capture one of the first parameters")
        position = at + (1 if capture.type == "-" else taken)
        if capture.type == "-":
            continue
        key = capture.key or capture.name or f"arg{at}"
        placed.append(Placed(key, kind, _width(kind, parameter), registers[at], length,
                             registers[at + 1] if taken == 2 else -1))
    result, error_register = None, -1
    if spec.result is not None:
        first = signature.results[0] if signature and signature.results else None
        if spec.result.name is not None:
            raise UserError(f"{spec.text!r}: a result has no name to look up; give its type, e.g. ->int", HINT)
        kind, length = _typed(spec.result, first, "result", function)
        result = Placed(spec.result.key or "return", kind, _width(kind, first), layout.REG_RAX, length,
                        layout.REG_RBX if go and kind == "str" else -1)
        if spec.error is not None and spec.error.op is None:
            error_register = _go_error_register(function, go, signature)
        elif spec.error is not None and kind not in ("int", "uint", "bool", "ptr"):
            raise UserError(f"{spec.text!r}: |err compares a number, and the result is a {kind}",
                            "capture the result as int, or leave out |err")
    return Plan(tuple(placed), result, spec.error, error_register)


def _go_error_register(function: str, go: bool, signature: dwarf.Signature | None) -> int:
    """Where a Go function's last result, an error, starts: `|err` without a condition means it is not nil."""
    hint = "give a condition, e.g. |err<0"
    if not go:
        raise UserError(f"{function}: |err without a condition is for Go functions whose last result is an error",
                        hint)
    if signature is None or not signature.results or signature.results[-1].type_name != "error":
        raise UserError(f"{function}: |err without a condition needs a last result of type error (DWARF shows "
                        f"{signature.describe() if signature else 'nothing'})", hint)
    before = signature.results[:-1]
    if any(r.registers < 0 for r in before) or sum(r.registers for r in before) + 2 > len(GO_ABI):
        raise UserError(f"{function}: its error result is not passed in registers captures follow", hint)
    return GO_ABI[sum(r.registers for r in before)]


def usdt_plan(spec: CaptureSpec | None, probe: usdt.UsdtProbe) -> Plan | None:
    """Where a USDT probe's arguments are, as its note says: all of them as integers (arg0, ...) without a capture
    list, else those the list names, by position, typed as written."""
    arguments = probe.arguments
    if spec is None:
        captures_of = [Capture(None, "int" if a.signed else "uint") for a in arguments]
    else:
        if spec.result is not None:
            raise UserError(f"{spec.text!r}: a USDT probe has no result to capture", "leave out the '->'")
        if any(c.name is not None for c in spec.arguments):
            raise UserError(f"{spec.text!r}: USDT arguments have no names; capture them by position with a type",
                            "e.g. usdt:P:N(path:str, -, size:int)")
        captures_of = list(spec.arguments)
        if len(captures_of) > len(arguments):
            raise UserError(f"{spec.text!r} captures {len(captures_of)} arguments; usdt:{probe.full_name} has "
                            f"{len(arguments)} ({' '.join(a.text for a in arguments) or 'none'})", "capture fewer")
    placed = []
    for at, (capture, argument) in enumerate(zip(captures_of, arguments)):
        if capture.type == "-":
            continue
        if not argument.supported or argument.constant is not None:
            if spec is None:
                continue
            raise UserError(f"usdt:{probe.full_name}: argument {at} ({argument.text}) is not in a register or "
                            "memory captures read", "skip it with -")
        size = argument.size if capture.type in ("int", "uint") and argument.size in (1, 2, 4, 8) else 8
        placed.append(Placed(capture.key or f"arg{at}", capture.type, size, argument.register,
                             capture.length, memory=argument.memory, offset=argument.offset))
    if len(placed) > layout.MAX_CAPTURES:
        placed = placed[:layout.MAX_CAPTURES]
    return Plan(tuple(placed), None, None) if placed else None


# ----- reading values back


def number(placed: Placed, captured: layout.CapturedValue) -> int:
    """A register's value as its capture reads it: an int sign-extended from its width, a bool as 0 or 1,
    anything else unsigned. What |err conditions compare."""
    value = captured.value
    if placed.kind == "bool":
        return int(bool(value & 0xFF))
    bits = placed.size * 8 if placed.kind in ("int", "uint") else 64
    value &= (1 << bits) - 1
    return value - (1 << bits) if placed.kind == "int" and value >> (bits - 1) else value


def value_of(placed: Placed, captured: layout.CapturedValue):
    """An attribute value as OTLP types it: int, bool or string (hex, pointers, and uints above int64)."""
    if placed.kind in ("str", "hex"):
        return captured.data.hex() if placed.kind == "hex" else captured.data.decode("utf-8", "replace")
    value = number(placed, captured)
    if placed.kind == "bool":
        return bool(value)
    if placed.kind == "ptr":
        return f"0x{value:x}"
    return value if value < 1 << 63 else str(value)


def attributes(placed: tuple[Placed, ...], values: tuple[layout.CapturedValue, ...], into: dict) -> None:
    """Each captured value as an attribute of `into`; what was cut or unreadable is listed by key."""
    for p, captured in zip(placed, values):
        if captured.flags & layout.CAPTURED_FAULT:
            into.setdefault(UNREADABLE, []).append(p.key)
            continue
        into[p.key] = value_of(p, captured)
        if captured.flags & layout.CAPTURED_CUT:
            into.setdefault(TRUNCATED, []).append(p.key)
