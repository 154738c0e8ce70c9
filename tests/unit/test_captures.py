"""Probe specs with captures: the grammar, where each capture is read (System V, Go's register ABI, DWARF
names), what the kernel is told, and how values read back."""

import pytest

from otel_ebpf import captures
from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.symbols import dwarf
from tests.ground_truth import BUILD_DIR, GOAPP

CAPTURES = BUILD_DIR / "captures"


def test_the_issue_examples_parse():
    symbol, spec = captures.split("handle_query(db.query.text:str, -, limit:int)->rows:int|err<0")
    assert symbol == "handle_query"
    assert [(c.key, c.type, c.length) for c in spec.arguments] == [("db.query.text", "str", 128), (None, "-", 0),
                                                                   ("limit", "int", 0)]
    assert (spec.result.key, spec.result.type) == ("rows", "int")
    assert spec.error == captures.Condition("<", 0)
    assert captures.split("open_file(path:str)->fd:int|err==-1")[1].error == captures.Condition("==", -1)
    assert captures.split("parse(hex<16>)")[1].arguments[0] == captures.Capture(None, "hex", 16, text="hex<16>")
    named = captures.split("handle_query(sql, limit)")[1].arguments
    assert [(c.name, c.type) for c in named] == [("sql", None), ("limit", None)]


@pytest.mark.parametrize("text", ["ns::f(char const*)", "Foo::bar()", "operator->()", "f", "std::vector<int>::at"])
def test_plain_symbols_and_cxx_signatures_ask_for_nothing(text):
    assert captures.split(text) == (text, None)


def test_a_go_error_needs_no_condition_and_hex_a_length():
    assert captures.split("main.lookup(int, str)->int|err")[1].error == captures.Condition(None)
    with pytest.raises(UserError, match="unknown type 'hex'"):
        captures.split("f(x:hex)")


def c_signature(*params: tuple[str, str, int]) -> dwarf.Signature:
    return dwarf.Signature(tuple(dwarf.Parameter(name, kind, kind, size, 1) for name, kind, size in params),
                           (dwarf.Parameter("", "int", "int", 4, 1),))


def test_system_v_positions_and_dwarf_widths():
    _, spec = captures.split("f(str, -, int, ptr)->int|err<0")
    plan = captures.plan(spec, "f", go=False, signature=c_signature(("a", "str", 8), ("b", "int", 4),
                                                                       ("c", "int", 4), ("d", "ptr", 8)))
    assert [(p.key, p.kind, p.size, p.register) for p in plan.arguments] == [
        ("arg0", "str", 8, layout.REG_RDI), ("arg2", "int", 4, layout.REG_RDX), ("arg3", "ptr", 8, layout.REG_RCX)]
    assert (plan.result.key, plan.result.size, plan.result.register) == ("return", 4, layout.REG_RAX)
    assert plan.error_register == -1
    without_dwarf = captures.plan(spec, "f", go=False, signature=None)
    assert [p.size for p in without_dwarf.arguments if p.kind == "int"] == [8]


def test_go_strings_take_two_registers():
    _, spec = captures.split("main.f(id:int, name:str, int)->str")
    plan = captures.plan(spec, "main.f", go=True, signature=None)
    assert [(p.key, p.register, p.length_register) for p in plan.arguments] == [
        ("id", layout.REG_RAX, -1), ("name", layout.REG_RBX, layout.REG_RCX), ("arg3", layout.REG_RDI, -1)]
    assert (plan.result.register, plan.result.length_register) == (layout.REG_RAX, layout.REG_RBX)


def test_go_error_result_register_from_dwarf():
    signatures = dwarf.signatures(str(GOAPP))
    from otel_ebpf.symbols import load
    lookup = load(str(GOAPP)).resolve(["main.lookup"])[0]
    signature = signatures[lookup.address]
    assert signature.describe() == "(int id, string name) -> (int, error)"
    plan = captures.plan(captures.split("main.lookup(id, name)->int|err")[1], "main.lookup", True, signature)
    assert plan.error_register == layout.REG_RBX  # after the int in rax
    assert [(p.key, p.kind) for p in plan.arguments] == [("id", "int"), ("name", "str")]


@pytest.mark.parametrize("spec, message", [
    ("f(int, int, int, int, int, int, int)", "passes 6 integer arguments in registers"),
    ("f(nosuch)", "has no DWARF"),
    ("f->int|err", "for Go functions"),
    ("f->str|err<0", "compares a number"),
])
def test_what_cannot_be_read_is_refused(spec, message):
    with pytest.raises(UserError, match=message):
        captures.plan(captures.split(spec)[1], "f", go=False, signature=None)


def test_the_kernel_plan_layout():
    _, spec = captures.split("main.f(name:str<64>)->n:int|err")
    signature = dwarf.Signature((dwarf.Parameter("name", "string", "str", 16, 2),),
                                (dwarf.Parameter("", "int", "int", 8, 1), dwarf.Parameter("", "error", "", 16, 2)))
    encoded = captures.plan(spec, "main.f", True, signature).encode()
    assert len(encoded) == layout.CAPTURE_PLAN.struct.size
    slots = [layout.CAPTURE_SLOT.unpack_from(encoded, i * layout.CAPTURE_SLOT.size)
             for i in range(layout.MAX_CAPTURES + layout.CAPTURE_RESULTS)]
    assert slots[0] == (layout.CAPTURE_GO_STRING, layout.REG_RAX, layout.REG_RBX, 0, 64, 0, 0, 0)
    assert all(slot[0] == layout.CAPTURE_NONE for slot in slots[1:layout.MAX_CAPTURES])
    assert slots[layout.MAX_CAPTURES] == (layout.CAPTURE_VALUE, layout.REG_RAX, 0, 0, 0, 0, 0, 0)
    assert slots[layout.MAX_CAPTURES + 1] == (layout.CAPTURE_VALUE, layout.REG_RBX, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("kind, size, register, value", [
    ("int", 4, 0x00000000FFFFFFFF, -1), ("int", 8, 0xFFFFFFFFFFFFFFFE, -2), ("int", 4, 0xDEAD00000007, 7),
    ("uint", 8, 2 ** 64 - 1, str(2 ** 64 - 1)), ("uint", 8, 2 ** 63 - 1, 2 ** 63 - 1), ("bool", 1, 0x100, False),
    ("bool", 1, 0x101, True), ("ptr", 8, 0x7FFF1234, "0x7fff1234"),
])
def test_values_read_back_as_otlp_types(kind, size, register, value):
    placed = captures.Placed("k", kind, size, layout.REG_RDI)
    assert captures.value_of(placed, layout.CapturedValue(register, b"", 0)) == value


def test_cut_and_unreadable_strings_are_listed():
    placed = (captures.Placed("a", "str", 8, layout.REG_RDI, 4), captures.Placed("b", "str", 8, layout.REG_RSI, 4),
              captures.Placed("c", "hex", 8, layout.REG_RDX, 2))
    values = (layout.CapturedValue(0, b"abcd", layout.CAPTURED_CUT), layout.CapturedValue(0, b"", layout.CAPTURED_FAULT),
              layout.CapturedValue(0, b"\xde\xad", 0))
    into = {}
    captures.attributes(placed, values, into)
    assert into == {"a": "abcd", captures.TRUNCATED: ["a"], captures.UNREADABLE: ["b"], "c": "dead"}


def test_dwarf_signatures_of_the_c_example():
    from otel_ebpf.symbols import load
    table = load(str(CAPTURES))
    signatures = dwarf.signatures(str(CAPTURES))
    shown = {f.demangled: signatures[f.address].describe() for f in table.resolve(["find_rows", "open_record"])}
    assert shown == {"find_rows": "(const char *query, int limit, _Bool exact, long unsigned int flags, "
                                  "const unsigned char *token) -> int",
                     "open_record": "(const char *path) -> int"}


@pytest.mark.parametrize("kind, size, register, number", [
    ("int", 4, 0x00000000FFFFFFFF, -1), ("uint", 8, 2 ** 64 - 1, 2 ** 64 - 1), ("bool", 1, 0x102, 1),
    ("ptr", 8, 0xFFFF800000000000, 0xFFFF800000000000),
])
def test_conditions_compare_the_register_as_its_capture_reads_it(kind, size, register, number):
    placed = captures.Placed("k", kind, size, layout.REG_RAX)
    assert captures.number(placed, layout.CapturedValue(register, b"", 0)) == number
    assert captures.Condition(">=", number).matches(captures.number(placed, layout.CapturedValue(register, b"", 0)))
