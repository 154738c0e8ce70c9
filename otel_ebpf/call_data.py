"""Captured arguments and results joined to their calls' spans.

The kernel sends what a probe read as capture notices (one at a call's entry, one at its return just before its
span), keyed by the call's span id; notices are drained before the spans they explain (session.py). Spans of
probes without captures pass through as arrays untouched; the few of probes with captures become spans of their
own, with attributes, encoded one by one like SERVER spans: their attributes differ from call to call.
"""

from __future__ import annotations

import collections

import numpy as np

from otel_ebpf import captures
from otel_ebpf.kernel import layout
from otel_ebpf.symbols import golang
from otel_ebpf.otlp.encode import SPAN_KIND_INTERNAL, ServerSpan, SpanChunk

# Calls whose captured values wait for their span: those of calls in flight, and of calls whose span never comes
# (dropped by the sampler after the fact, or shorter than OTEL_EBPF_MIN_DURATION); the oldest go first.
MAX_WAITING = 65536


class CallData:
    """Captured values by span, and the spans they belong to."""

    def __init__(self, probes):
        """probes: the run's ProbeTable; only those with captures matter here."""
        self._table = probes
        self._plans: dict[int, captures.Plan] = {}
        self._info = {}
        self._ids = np.array([], np.uint32)
        # Go error results: the type each interface table address stands for, in the probe's binary.
        self._error_types: dict[int, dict] = {}
        self._waiting: collections.OrderedDict[tuple[int, bytes], dict] = collections.OrderedDict()
        self.errors: collections.Counter[int] = collections.Counter()  # spans with error.type, by probe id
        for probe_id in range(len(probes)):
            self.add(probe_id)

    def add(self, probe_id: int) -> None:
        """A probe of the table, added at start-up or discovered since."""
        probe = self._table.probes[probe_id]
        if not probe.captures:
            return
        self._plans[probe_id] = probe.captures
        self._info[probe_id] = self._table.info(probe_id)
        self._ids = np.array(sorted(self._plans), np.uint32)
        if probe.captures.error_register >= 0:
            self._error_types[probe_id] = golang.itab_types(probe.binary)

    def __bool__(self) -> bool:
        return bool(self._plans)

    def notices(self, notices: list) -> None:
        for notice in notices:
            if not isinstance(notice, layout.CaptureNotice) or notice.probe_id not in self._plans:
                continue
            plan = self._plans[notice.probe_id]
            values = self._waiting.setdefault((notice.pid, notice.span_id), {})
            if notice.at == layout.CAPTURE_AT_ENTRY:
                captures.attributes(plan.arguments, notice.values, values)
            else:
                self._result(plan, notice.values, values, self._error_types.get(notice.probe_id, {}))
            while len(self._waiting) > MAX_WAITING:
                self._waiting.popitem(last=False)

    @staticmethod
    def _result(plan: captures.Plan, values: tuple, into: dict, error_types: dict[int, str]) -> None:
        if plan.result is not None and values:
            captures.attributes((plan.result,), values[:1], into)
        error = plan.error
        if error is None:
            return
        if error.op is None:  # a Go error result: its first word is nil or not
            if len(values) > 1 and values[1].value:
                into["error.type"] = error_types.get(values[1].value, "error")
            return
        if values and not values[0].flags & layout.CAPTURED_FAULT and \
                error.matches(captures.number(plan.result, values[0])):
            into["error.type"] = str(into[plan.result.key])

    def split(self, chunk: SpanChunk) -> tuple[SpanChunk, list[ServerSpan]]:
        """The spans of probes without captures, still as records, and those with captures, with their values."""
        if not len(self._ids) or not len(chunk):
            return chunk, []
        records = chunk.records
        with_values = np.isin(records["probe_id"], self._ids)
        if not with_values.any():
            return chunk, []
        spans = [self._span(record, chunk.resources) for record in records[with_values]]
        return SpanChunk(records[~with_values], chunk.resources), spans

    def _span(self, record, resources) -> ServerSpan:
        pid, probe_id = int(record["pid"]), int(record["probe_id"])
        span_id = int(record["span_id"]).to_bytes(8, "little")
        info = self._info[probe_id]
        attrs = {**info.attributes, **self._waiting.pop((pid, span_id), {})}
        if "error.type" in attrs:
            self.errors[probe_id] += 1
        if record["goroutine_id"]:
            attrs["go.goroutine.id"] = int(record["goroutine_id"])
        parent = int(record["parent_span_id"])
        key = int(record["process_seq"]) << 32 | pid
        named_by = self._plans[probe_id].names_span
        name = str(attrs.get(named_by, info.function)) if named_by else info.function
        return ServerSpan(key, resources[key], int(record["tid"]), record["trace_id"].tobytes(), span_id,
                          parent.to_bytes(8, "little") if parent else None, "", int(record["start_ns"]),
                          int(record["end_ns"]), name, attrs, SPAN_KIND_INTERNAL,
                          remote_parent=bool(record["flags"] & layout.SPAN_REMOTE_PARENT), depth=int(record["depth"]))
