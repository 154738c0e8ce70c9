"""Checks received spans against the ground truth the example printed about its own calls."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from tests.ground_truth import Call, GroundTruth

# How far a span may appear to start after (or end before) the function's own clock reading: the
# uprobe fires before the function's first clock read and after its last, so only the
# monotonic->realtime conversion error counts. The tool promises well under 0.1 ms.
CLOCK_SLACK_NS = 50_000
# How much longer than the function's own measurement a span may be: uprobe entry + return cost
# (single-stepped, ~20 us each here) and the calls between the probe and the function's clock reads.
OVERHEAD_SLACK_NS = 2_000_000


def attributes(span) -> dict:
    from tests.otlp_receiver import any_value

    return {kv.key: any_value(kv.value) for kv in span.attributes}


def named(*functions: str) -> Callable[[Call], bool]:
    return lambda call: call.fn in functions


def match(received, truth: GroundTruth, traced: Callable[[Call], bool]) -> dict[tuple[int, int], tuple[dict, object]]:
    """Pair each call of the ground truth that should have been traced with its span (per thread, in start
    order), checking names, pids, tids, timing and the resource; returns {(tid, seq): (resource, span)}."""
    spans_by_tid = defaultdict(list)
    for resource, span in received:
        if resource["process.pid"] == truth.pid:
            spans_by_tid[attributes(span)["thread.id"]].append((resource, span))
    calls_by_tid = defaultdict(list)
    for call in truth.calls:
        if traced(call):
            calls_by_tid[call.tid].append(call)
    assert sorted(spans_by_tid) == sorted(calls_by_tid), "spans and calls come from different threads"

    matched = {}
    for tid, calls in calls_by_tid.items():
        spans = sorted(spans_by_tid[tid], key=lambda rs: rs[1].start_time_unix_nano)
        calls.sort(key=lambda c: c.seq)
        assert [s.name for _, s in spans] == [c.fn for c in calls], f"thread {tid}: calls and spans differ"
        for call, (resource, span) in zip(calls, spans):
            check_span(call, resource, span, truth.pid)
            matched[(tid, call.seq)] = (resource, span)
    return matched


def check_span(call: Call, resource: dict, span, pid: int) -> None:
    attrs = attributes(span)
    assert attrs["thread.id"] == call.tid and attrs["process.pid"] == pid
    assert attrs["code.function.name"] == call.fn
    assert resource["process.pid"] == pid
    assert span.kind == span.SPAN_KIND_INTERNAL
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    assert start <= call.start + CLOCK_SLACK_NS, f"{call}: span starts {start - call.start} ns late"
    assert end >= call.end - CLOCK_SLACK_NS, f"{call}: span ends {call.end - end} ns early"
    assert (end - start) - (call.end - call.start) <= OVERHEAD_SLACK_NS, f"{call}: span too long"


def check_tree(matched, truth: GroundTruth) -> None:
    """Parents are the nearest probed caller on the same thread; a call without one starts its own trace,
    and everything under it shares that trace id."""
    calls = truth.by_key()
    roots = set()
    for (tid, seq), (_, span) in matched.items():
        parent_seq = calls[(tid, seq)].parent
        while parent_seq and (tid, parent_seq) not in matched:
            parent_seq = calls[(tid, parent_seq)].parent
        if parent_seq:
            parent = matched[(tid, parent_seq)][1]
            assert span.parent_span_id == parent.span_id, f"{calls[(tid, seq)]}: wrong parent"
            assert span.trace_id == parent.trace_id
        else:
            assert span.parent_span_id == b""
            roots.add(span.trace_id)
    root_count = sum(1 for (_, span) in matched.values() if not span.parent_span_id)
    assert len(roots) == root_count, "two trace roots share a trace id"
    assert len({span.span_id for _, span in matched.values()}) == len(matched), "span ids repeat"
