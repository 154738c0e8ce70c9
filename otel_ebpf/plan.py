"""From one probe spec (a binary and the SYMBOL specs for it) to the probes to attach: symbols resolved (Go
code checked, IFUNCs named), USDT probes, Python functions, captures. `otel-ebpf trace`/`run` plan their
binaries with it at start-up, and discovery (discovery.py) each binary it finds later."""

from __future__ import annotations

import logging

from otel_ebpf import probes as planning
from otel_ebpf import python_functions, symbols
from otel_ebpf.probes import Probe

_log = logging.getLogger("otel_ebpf")


def plan_binary(binary: str, specs: tuple[str, ...], options: symbols.Options, view: int | None = None,
                shown_as: str = "") -> list[Probe]:
    """The probes for `specs` in `binary` as process `view` sees it (None: as we do); UserError when a spec
    matches nothing. `shown_as`: the name spans and messages give the binary (default: as given)."""
    table = symbols.load(binary, options, view)
    shown_as = shown_as or binary
    wanted = dict(planning.wanted(table, text) for text in specs)
    planned: list[Probe] = []
    markers = {text: capture for text, capture in wanted.items() if text.startswith(planning.USDT_PREFIX)}
    if markers:
        planned += planning.plan_usdt(table, markers)
    python = [text for text in specs if text.startswith(python_functions.PREFIX)]
    if python:
        planned += python_functions.plan(table, python)
    wanted = {text: capture for text, capture in wanted.items()
              if text not in markers and not text.startswith(python_functions.PREFIX)}
    if not wanted:
        return planned
    matches = table.resolve_each(list(wanted))
    for f in {f.address: f for _, found in matches for f in found}.values():
        if f.ifunc:
            _log.warning("%s is an IFUNC: tracing %s, the implementation it runs here", f.ifunc, ifunc_choice(f))
    functions, warning = planning.plan_matches(table.path, matches, shown_as)
    if warning:
        _log.warning("%s", warning)
    return planned + planning.with_captures(functions, matches, wanted, table)


def ifunc_choice(s: symbols.FunctionSymbol) -> str:
    """An IFUNC's pick: by name when the symbols name it (__strlen_avx2), else by address."""
    return s.demangled if s.demangled != s.ifunc else f"the code at {s.address:#x}"
