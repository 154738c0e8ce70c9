"""bpf/event.h is the one definition of what the kernel sends; the Python mirror must agree with what a C
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
#define SHOW(f) printf(#f " %zu %zu\n", offsetof(struct span_event, f), sizeof(((struct span_event *)0)->f));
int main(void) {
    FIELDS
    printf("size %zu\n", sizeof(struct span_event));
    printf("counters %d\n", COUNTER_MAX);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    fields = " ".join(f"SHOW({name})" for name, _ in events.EVENT_FIELDS)
    (tmp / "layout.c").write_text(PROGRAM.replace("FIELDS", fields))
    subprocess.run(["gcc", "-I", str(BPF_DIR), "-o", str(tmp / "layout"), str(tmp / "layout.c")], check=True)
    lines = subprocess.run([str(tmp / "layout")], capture_output=True, text=True, check=True).stdout.split("\n")
    return {name: tuple(int(v) for v in values) for name, *values in (line.split() for line in lines if line)}


def test_python_mirror_matches_the_c_header(c_layout):
    offsets = {name: c_layout[name] for name, _ in events.EVENT_FIELDS}
    assert offsets == events.field_offsets()
    assert c_layout["size"] == (events.EVENT.size,)
    events.check_layout(offsets, events.EVENT.size)


def test_every_counter_has_a_name(c_layout):
    assert c_layout["counters"] == (len(events.COUNTERS),)


def test_mismatch_is_refused():
    offsets = events.field_offsets()
    offsets["pid"] = (offsets["pid"][0] + 4, 4)
    with pytest.raises(UserError, match="layout mismatch"):
        events.check_layout(offsets, events.EVENT.size)
