"""py: specs: the patterns the kernel compares, and the refusal of a Python without USDT probes."""

import os
import subprocess

import pytest

from otel_ebpf import python_functions
from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.symbols import load


@pytest.mark.parametrize("text, kind, body", [
    ("handle", layout.PATTERN_EXACT, b"handle"), ("handle_*", layout.PATTERN_PREFIX, b"handle_"),
    ("*/app.py", layout.PATTERN_SUFFIX, b"/app.py"), ("*", layout.PATTERN_ANY, b""),
])
def test_patterns_the_kernel_compares(text, kind, body):
    raw = python_functions.pattern(text, "function", f"py:{text}")
    assert layout.NAME_PATTERN.unpack(raw) == (kind, len(body), body.ljust(layout.NAME_PATTERN_MAX, b"\0"))


@pytest.mark.parametrize("text", ["a*b", "*mid*", "h?ndle", "[ab]c", "x" * 65])
def test_more_than_the_kernel_compares_is_refused(text):
    with pytest.raises(UserError, match="pattern"):
        python_functions.pattern(text, "function", f"py:{text}")


def test_the_filter_names_debian_python311s_registers():
    table = load("/usr/bin/python3.11")
    [probe] = python_functions.plan(table, ["py:handle_*", "py:*/app.py:main"])
    assert [p.full_name for p in probe.usdt] == [python_functions.ENTRY]
    assert [p.full_name for p in probe.usdt_done] == [python_functions.RETURN]
    assert all(p.semaphore_offset for p in probe.usdt + probe.usdt_done)
    head = probe.name_filter[:8]
    assert head == bytes([layout.REG_RBP, layout.REG_R12, layout.REG_RBP, layout.REG_R12]) + (2).to_bytes(4, "little")
    assert len(probe.name_filter) == layout.NAME_FILTER.struct.size
    assert [p.key for p in probe.captures.arguments] == ["code.file.path", "code.function.name", "code.line.number"]


def test_a_python_without_probes_is_refused():
    real = os.path.realpath(subprocess.run(["python3", "-c", "import sys; print(sys.executable)"],
                                           capture_output=True, text=True, check=True).stdout.strip())
    with pytest.raises(UserError, match="built without them") as info:
        python_functions.plan(load(real), ["py:main"])
    assert "/usr/bin/python3.11" in info.value.hint
