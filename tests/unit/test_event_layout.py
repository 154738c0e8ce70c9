"""bpf/event.h is the one definition of what the kernel sends; the Python mirrors (otel_ebpf/kernel/layout.py)
must agree with what a C compiler makes of it, field by field and constant by constant, by name. The running
program checks the structs against the compiled BPF at start-up too. gcc -Wpadded -Werror over event.h and
maps.h guards the rule that every padding byte is spelled out; bits.h's pure helpers are compiled for the host
and checked against their Python counterparts."""

import subprocess

import pytest

from otel_ebpf import tracecontext
from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.kernel.program import BPF_DIR
from otel_ebpf.metrics import BOUNDS_S

# BCC's map macros, reduced to declarations of the key and value types, so that maps.h compiles for the host.
BCC_STUBS = r"""
#include <linux/types.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#ifndef __always_inline
#define __always_inline inline
#endif
#define MAX_DEPTH 32
#define BPF_RINGBUF_OUTPUT(name, pages) static int name##_unused
#define BPF_TABLE(kind, key, value, name, size) static key name##_key; static value name##_value
#define BPF_HASH(name, key, value, size) static key name##_key; static value name##_value
#define BPF_ARRAY(name, value, size) static value name##_value
#define BPF_PERCPU_ARRAY(name, value, size) static value name##_value
"""
PROGRAM = BCC_STUBS + r"""
#include "maps.h"
#include "http_maps.h"
#include "bits.h"
#define SHOW(s, f) printf("field " #s " " #f " %zu %zu\n", offsetof(struct s, f), sizeof(((struct s *)0)->f));
#define SIZE(s) printf("size " #s " %zu 0\n", sizeof(struct s));
#define CONSTANT(c) printf("constant " #c " %llu 0\n", (unsigned long long)(c));
int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "bucket")) {
        printf("%u\n", latency_bucket(strtoull(argv[2], 0, 10)));
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "traceparent")) {
        __u8 trace[16], span[8];
        __u32 sampled = 0;
        if (!parse_traceparent((const __u8 *)argv[2], strlen(argv[2]), trace, span, &sampled))
            return printf("invalid\n"), 0;
        for (int i = 0; i < 16; i++) printf("%02x", trace[i]);
        printf(" ");
        for (int i = 0; i < 8; i++) printf("%02x", span[i]);
        printf(" %u\n", sampled);
        return 0;
    }
    LINES
    return 0;
}
"""


@pytest.fixture(scope="module")
def layout_program(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    lines = []
    structs = [("span_record", layout.span_offsets())] + [(f"{t.member}_notice", t.offsets())
                                                          for t in layout.NOTICE_TYPES]
    structs.append(("capture_plan", layout.CAPTURE_PLAN.offsets()))
    structs.append(("name_filter", layout.NAME_FILTER.offsets()))
    for struct_name, fields in structs:
        lines += [f"SHOW({struct_name}, {name})" for name in fields] + [f"SIZE({struct_name})"]
    lines += [f"SIZE({name})" for name in ("stack_key", "process_info", "latency_slots", "capture_slot",
                                           "captured_value", "name_pattern")]
    lines += [f"CONSTANT({name})" for name in layout.CONSTANTS] + [f"CONSTANT({name})" for name in layout.COUNTER_ENUM]
    lines.append("CONSTANT(COUNTER_MAX)")
    (tmp / "layout.c").write_text(PROGRAM.replace("LINES", "\n    ".join(lines)).replace(
        "#include <stdio.h>", "#include <stdio.h>\n#include <stdlib.h>"))
    subprocess.run(["gcc", "-Wpadded", "-Werror", "-Wno-unused-variable", "-I", str(BPF_DIR), "-o",
                    str(tmp / "layout"), str(tmp / "layout.c")], check=True)
    return tmp / "layout"


@pytest.fixture(scope="module")
def c_layout(layout_program):
    out = subprocess.run([str(layout_program)], capture_output=True, text=True, check=True).stdout
    return {(kind, *names): (int(a), int(b)) for kind, *names, a, b in (line.split() for line in out.splitlines())}


def test_span_record_mirror(c_layout):
    assert {name: c_layout[("field", "span_record", name)] for name in layout.span_offsets()} == layout.span_offsets()
    assert c_layout[("size", "span_record")][0] == layout.SPAN_DTYPE.itemsize
    assert layout.SPAN_RECORD_DTYPE.itemsize == layout.RING_HEADER_SIZE + layout.SPAN_DTYPE.itemsize


@pytest.mark.parametrize("notice", layout.NOTICE_TYPES, ids=lambda t: t.member)
def test_notice_mirrors(c_layout, notice):
    struct_name = f"{notice.member}_notice"  # struct event_layouts names each member after its struct
    assert {name: c_layout[("field", struct_name, name)] for name in notice.offsets()} == notice.offsets()
    assert c_layout[("size", struct_name)][0] == notice.struct.size


def test_every_constant_has_the_value_of_its_c_name(c_layout):
    for name, value in layout.CONSTANTS.items():
        assert c_layout[("constant", name)][0] == value, name


def test_counter_slots_by_name(c_layout):
    """Reordering enum counter must not silently swap loss reasons."""
    assert [c_layout[("constant", name)][0] for name in layout.COUNTER_ENUM] == list(range(len(layout.COUNTERS)))
    assert c_layout[("constant", "COUNTER_MAX")][0] == len(layout.COUNTERS)


def test_map_values_user_space_reads_and_writes(c_layout):
    assert c_layout[("size", "stack_key")][0] == layout.STACK_KEY_SIZE
    assert c_layout[("size", "process_info")][0] == layout.PROCESS_INFO.size
    assert c_layout[("size", "latency_slots")][0] == layout.LATENCY_SLOTS.size
    plan = layout.CAPTURE_PLAN
    assert {name: c_layout[("field", "capture_plan", name)] for name in plan.offsets()} == plan.offsets()
    assert c_layout[("size", "capture_plan")][0] == plan.struct.size
    assert c_layout[("size", "capture_slot")][0] == layout.CAPTURE_SLOT.size
    assert c_layout[("size", "captured_value")][0] == layout.CAPTURED_VALUE.size
    name_filter = layout.NAME_FILTER
    assert {name: c_layout[("field", "name_filter", name)] for name in name_filter.offsets()} == name_filter.offsets()
    assert c_layout[("size", "name_filter")][0] == name_filter.struct.size
    assert c_layout[("size", "name_pattern")][0] == layout.NAME_PATTERN.size


def test_a_mismatch_is_refused():
    compiled = {"span": (layout.span_offsets(), layout.SPAN_DTYPE.itemsize)}
    compiled["span"][0]["pid"] = (compiled["span"][0]["pid"][0] + 4, 4)
    with pytest.raises(UserError, match="layout mismatch for span"):
        layout.check_layouts(compiled)


@pytest.mark.parametrize("ns", [0, 1, 2, 3, 4, 5, 1000, 1023, 1024, 1025, 10**9, 2**38, 2**39 + 1, 2**63])
def test_latency_bucket_matches_the_exported_bounds(layout_program, ns):
    """The kernel's bucket i holds 2^(i-1) < ns <= 2^i; the metric's explicit bounds must say the same."""
    bucket = int(subprocess.run([str(layout_program), "bucket", str(ns)], capture_output=True, text=True,
                                check=True).stdout)
    bounds_ns = [round(b * 1e9) for b in BOUNDS_S]
    expected = next((i for i, bound in enumerate(bounds_ns) if ns <= bound), len(bounds_ns))
    assert bucket == expected


@pytest.mark.parametrize("value", [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 must end after the flags
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
])
def test_the_kernels_traceparent_parser_agrees_with_user_spaces(layout_program, value):
    """TRACEPARENT is parsed in the kernel at exec (bits.h) and in user space for /proc and HTTP headers."""
    out = subprocess.run([str(layout_program), "traceparent", value], capture_output=True, text=True,
                         check=True).stdout.split()
    parsed = tracecontext.parse_traceparent(value)
    if parsed is None:
        assert out == ["invalid"]
    else:
        assert out == [parsed.trace_id.hex(), parsed.span_id.hex(), str(int(parsed.sampled))]
