"""USDT notes: argument specs, the probes of examples/markers and python3.11, and how specs become probes."""

import pytest

from otel_ebpf import probes as planning
from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.symbols import load, usdt
from tests.ground_truth import BUILD_DIR

MARKERS = BUILD_DIR / "markers"


@pytest.mark.parametrize("text, expected", [
    ("-4@%ebx", usdt.Argument("-4@%ebx", 4, True, layout.REG_RBX)),
    ("8@%r12", usdt.Argument("8@%r12", 8, False, layout.REG_R12)),
    ("-4@112(%rsp)", usdt.Argument("-4@112(%rsp)", 4, True, layout.REG_RSP, memory=True, offset=112)),
    ("8@-16(%rbp)", usdt.Argument("8@-16(%rbp)", 8, False, layout.REG_RBP, memory=True, offset=-16)),
    ("4@$5", usdt.Argument("4@$5", 4, False, constant=5)),
    ("8@sym(%rip)", usdt.Argument("8@sym(%rip)", 8, False)),
])
def test_argument_specs(text, expected):
    assert usdt.parse_argument(text) == expected


def test_the_markers_example_and_its_semaphores():
    found = {p.full_name: p for p in usdt.probes(str(MARKERS))}
    assert set(found) == {"app:request__start", "app:request__done", "app:cache__miss"}
    assert all(p.semaphore and p.semaphore_offset for p in found.values())
    assert [a.size for a in found["app:cache__miss"].arguments] == [8, 4]


@pytest.mark.parametrize("order", [("usdt:app:request__start", "usdt:app:request__done"),
                                   ("usdt:app:request__done", "usdt:app:request__start")])
def test_a_pair_is_one_probe_whichever_is_named_first(order):
    [probe] = planning.plan_usdt(load(str(MARKERS)), dict.fromkeys(order))
    assert probe.symbol.demangled == "app:request"
    kinds = [(site.kind.value, site.ref_ctr_offset != 0) for site in probe.sites(7)]
    assert kinds == [("entry", True), ("return_site", True)]
    assert probe.captures.arguments[0].key == "arg0" and probe.captures.arguments[0].kind == "int"


def test_a_single_probe_is_an_instant_and_unknown_ones_are_refused():
    [probe] = planning.plan_usdt(load(str(MARKERS)), {"usdt:app:cache__miss": None})
    [site] = probe.sites(3)
    assert site.cookie & layout.COOKIE_INSTANT and site.kind.value == "entry"
    with pytest.raises(UserError, match="has no USDT probe 'app:nope'"):
        planning.plan_usdt(load(str(MARKERS)), {"usdt:app:nope": None})
