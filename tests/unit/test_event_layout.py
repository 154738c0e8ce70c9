"""bpf/event.h is the one definition of what the kernel sends; the Python mirrors must agree with what a C
compiler makes of it (the running program checks the same against the compiled BPF at start-up)."""

import subprocess

import pytest

from otel_ebpf import events
from otel_ebpf.errors import UserError
from otel_ebpf.probes import BPF_DIR

PROGRAM = r"""
#include <linux/types.h>
#include <stddef.h>
#include <stdio.h>
#include "event.h"
#define SHOW(s, f) printf(#s " " #f " %zu %zu\n", offsetof(struct s, f), sizeof(((struct s *)0)->f));
#define SIZE(s, kind) printf(#kind " size %zu %d\n", sizeof(struct s), kind);
int main(void) {
    FIELDS
    printf("counters max %d 0\n", COUNTER_MAX);
    return 0;
}
"""
STRUCTS = {events.SPAN: ("span_event", "EVENT_SPAN"), events.HTTP_REQUEST: ("http_request_event", "EVENT_HTTP_REQUEST"),
           events.HTTP_RESPONSE: ("http_response_event", "EVENT_HTTP_RESPONSE"),
           events.PROCESS_START: ("process_event", "EVENT_PROCESS_START"),
           events.PROCESS_EXIT: ("process_event", "EVENT_PROCESS_EXIT")}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    lines = []
    for event_type, (struct, kind) in STRUCTS.items():
        lines += [f"SHOW({struct}, {name})" for name, _ in event_type.fields] + [f"SIZE({struct}, {kind})"]
    (tmp / "layout.c").write_text(PROGRAM.replace("FIELDS", "\n    ".join(lines)))
    subprocess.run(["gcc", "-I", str(BPF_DIR), "-o", str(tmp / "layout"), str(tmp / "layout.c")], check=True)
    out = subprocess.run([str(tmp / "layout")], capture_output=True, text=True, check=True).stdout
    return {(s, f): (int(a), int(b)) for s, f, a, b in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("event_type", events.EVENT_TYPES, ids=lambda t: t.member)
def test_python_mirror_matches_the_c_header(c_layout, event_type):
    struct, kind_name = STRUCTS[event_type]
    offsets = {name: c_layout[(struct, name)] for name, _ in event_type.fields}
    assert offsets == event_type.offsets()
    size, kind = c_layout[(kind_name, "size")]
    assert (size, kind) == (event_type.struct.size, event_type.kind)
    events.check_layout(event_type, offsets, size)


def test_every_counter_has_a_name(c_layout):
    assert c_layout[("counters", "max")] == (len(events.COUNTERS), 0)


def test_mismatch_is_refused():
    offsets = events.SPAN.offsets()
    offsets["pid"] = (offsets["pid"][0] + 4, 4)
    with pytest.raises(UserError, match="layout mismatch"):
        events.check_layout(events.SPAN, offsets, events.SPAN.struct.size)
