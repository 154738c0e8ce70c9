"""Checks received spans against the ground truth the example printed about its own calls."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Callable

from tests.ground_truth import Call, GroundTruth, Request

# How far a span may appear to start after (or end before) the function's own clock reading: the
# uprobe fires before the function's first clock read and after its last, so only the
# monotonic->realtime conversion error counts. The tool promises well under 0.1 ms.
CLOCK_SLACK_NS = 50_000
# How much longer than the function's own measurement a span may be: uprobe entry + return cost
# (single-stepped, ~20 us each here) and the calls between the probe and the function's clock reads.
# It absorbs those and the preemption of the thread in between (it writes its call line there) by the sidecar,
# the receiver or another of its threads on the 2 cores: measured with one `nested 3 4` beside the sidecar,
# 12 runs, 3373 calls: p50 3.3 us, p99 77 us, p99.9 2.6 ms, max 4.3 ms (the 2 ms this was before failed one
# run in six). Nothing tighter, because such a preemption lasts as long as the tasks woken on that CPU run,
# whole scheduler slices, which no test here controls; the start and end stay within CLOCK_SLACK_NS.
OVERHEAD_SLACK_NS = 10_000_000
# The same for tests that check which calls become spans rather than their timing: the examples write their call
# line between their last clock reading and the return probe, and on cores shared with other tests a
# descheduling there adds whole scheduler slices (seen: over 2 ms, once in a few thousand calls).
# It absorbs a wait behind several runnable threads (measured, 6 runs of `nested 3 10` at a time on the 2 cores:
# max 3.1 ms, 4 of 45600 calls over 2 ms); nothing tighter, because the wait grows with every thread runnable
# ahead, and how many there are depends on what else the machine runs. Start and end stay within CLOCK_SLACK_NS.
BUSY_OVERHEAD_SLACK_NS = 20_000_000


def attributes(span) -> dict:
    from tests.otlp_receiver import any_value

    return {kv.key: any_value(kv.value) for kv in span.attributes}


def frozen(resource: dict) -> frozenset:
    """A resource as a set member (process.command_args is a list)."""
    return frozenset((k, tuple(v) if isinstance(v, list) else v) for k, v in resource.items())


def named(*functions: str) -> Callable[[Call], bool]:
    return lambda call: call.fn in functions


def match(received, truth: GroundTruth, traced: Callable[[Call], bool], group_by: str = "thread.id",
          overhead_slack_ns: int = OVERHEAD_SLACK_NS) -> dict[tuple[int, int], tuple[dict, object]]:
    """Pair each call of the ground truth that should have been traced with its span (per thread, in start
    order), checking names, pids, tids, timing and the resource; returns {(tid, seq): (resource, span)}.

    `group_by` is the span attribute that holds the ground truth's tid: go.goroutine.id for Go, whose ground
    truth numbers calls per goroutine because goroutines move between threads. `overhead_slack_ns`: how much
    longer than the program's own measurement a span may be."""
    spans_by_tid = defaultdict(list)
    for resource, span in received:
        if resource["process.pid"] == truth.pid:
            spans_by_tid[attributes(span)[group_by]].append((resource, span))
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
            check_span(call, resource, span, truth.pid, group_by, overhead_slack_ns)
            matched[(tid, call.seq)] = (resource, span)
    return matched


def check_span(call: Call, resource: dict, span, pid: int, group_by: str = "thread.id",
               overhead_slack_ns: int = OVERHEAD_SLACK_NS) -> None:
    attrs = attributes(span)
    assert attrs[group_by] == call.tid
    assert isinstance(attrs["thread.id"], int) and attrs["thread.id"] > 0
    assert attrs["code.function.name"] == call.fn
    assert resource["process.pid"] == pid
    assert span.kind == span.SPAN_KIND_INTERNAL
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    assert start <= call.start + CLOCK_SLACK_NS, f"{call}: span starts {start - call.start} ns late"
    assert end >= call.end - CLOCK_SLACK_NS, f"{call}: span ends {call.end - end} ns early"
    assert (end - start) - (call.end - call.start) <= overhead_slack_ns, f"{call}: span too long"


def check_tree(matched, truth: GroundTruth,
               root_context: Callable[[Call], tuple[bytes, bytes] | None] = lambda call: None) -> None:
    """Parents are the nearest probed caller on the same thread. A call without one starts its own trace, or
    joins the (trace id, parent span id) that `root_context` names for it (a SERVER span, a TRACEPARENT);
    everything under it shares that trace id."""
    calls = truth.by_key()
    roots = []
    for (tid, seq), (_, span) in matched.items():
        parent_seq = calls[(tid, seq)].parent
        while parent_seq and (tid, parent_seq) not in matched:
            parent_seq = calls[(tid, parent_seq)].parent
        if parent_seq:
            parent = matched[(tid, parent_seq)][1]
            assert span.parent_span_id == parent.span_id, f"{calls[(tid, seq)]}: wrong parent"
            assert span.trace_id == parent.trace_id
        elif (context := root_context(calls[(tid, seq)])) is not None:
            assert (span.trace_id, span.parent_span_id) == context, f"{calls[(tid, seq)]}: not in its context"
        else:
            assert span.parent_span_id == b""
            roots.append(span.trace_id)
    assert len(set(roots)) == len(roots), "two trace roots share a trace id"
    assert len({span.span_id for _, span in matched.values()}) == len(matched), "span ids repeat"


def match_requests(received, truth: GroundTruth) -> dict[Request, tuple[dict, object]]:
    """Pair each SERVER span of the process with the request it overlaps on its thread with the same target (a
    thread serves one connection, one request at a time, but pipelined requests share their read); returns {request: (resource, span)}. Requests may lack a span.

    The span starts when read() returns and ends when write() returns, and the server reads its clock right
    after each: its readings bound the span from above, within the clock's error. Not from below: a write on
    loopback wakes the client, which may run first (ms apart here); callers bound it from below with the
    client's span and the calls the request made."""
    matched: dict[Request, tuple[dict, object]] = {}
    for resource, span in received:
        if resource.get("process.pid") != truth.pid or span.kind != span.SPAN_KIND_SERVER:
            continue
        start, end, attrs = span.start_time_unix_nano, span.end_time_unix_nano, attributes(span)
        overlapping = [r for r in truth.requests if r.tid == attrs["thread.id"] and start <= r.end and end >= r.start
                       and (r.path, r.query) == (attrs.get("url.path"), attrs.get("url.query"))]
        assert len(overlapping) == 1, f"SERVER span {span.span_id.hex()} on thread {tid} overlaps {overlapping}"
        request = overlapping[0]
        assert request not in matched, f"{request}: two SERVER spans"
        assert start <= request.start + CLOCK_SLACK_NS, f"{request}: span starts {start - request.start} ns late"
        assert end <= request.end + CLOCK_SLACK_NS, f"{request}: span ends {end - request.end} ns late"
        matched[request] = (resource, span)
    return matched


def nearest_calls(received, truth: GroundTruth, candidate: Callable[[Call], bool],
                  group_by: str = "thread.id") -> set[tuple[int, int]]:
    """(tid, seq) of the candidate call nearest in time to each span of the process (same name, same thread).

    For runs where which calls got a span is decided at run time (sampling, a duration threshold): the result
    says which calls to hand to match(), which then checks the pairing strictly. Two spans that pick the same
    call leave match() one call short, so a wrong guess fails rather than passes.

    Spans are paired from the roots down, a child only among the calls under its parent's call: a call held up
    between its last clock reading and its return probe (a preemption) has a span that ends late, nearer to the
    end of its caller's recursive twin than to its own, and would otherwise pick the caller's call."""
    options = defaultdict(list)
    for call in truth.calls:
        if candidate(call):
            parent = traced_parent(truth, call, candidate)
            options[(call.tid, call.fn)].append((call, parent.seq if parent else None))
    ours = {span.span_id: span for resource, span in received if resource["process.pid"] == truth.pid}

    def depth(span) -> int:
        levels = 0
        while span.parent_span_id in ours:
            span, levels = ours[span.parent_span_id], levels + 1
        return levels

    picked: dict[bytes, Call] = {}
    for span in sorted(ours.values(), key=depth):
        tid = attributes(span)[group_by]
        parent = picked.get(span.parent_span_id)
        pool = [c for c, above in options[(tid, span.name)] if parent is None or above == parent.seq]
        assert pool, f"span {span.name} {span.span_id.hex()}: no such call on its thread"
        picked[span.span_id] = min(pool, key=lambda c: abs(span.start_time_unix_nano - c.start) +
                                   abs(span.end_time_unix_nano - c.end))
    return {(call.tid, call.seq) for call in picked.values()}


def traced_parent(truth: GroundTruth, call: Call, traced: Callable[[Call], bool]) -> Call | None:
    """The nearest enclosing call on the same thread that is traced, or None."""
    calls = truth.by_key()
    parent = call.parent
    while parent and not traced(calls[(call.tid, parent)]):
        parent = calls[(call.tid, parent)].parent
    return calls[(call.tid, parent)] if parent else None


Shape = tuple  # (function name, sorted tuple of the children's shapes)


def call_shapes(truth: GroundTruth, traced: Callable[[Call], bool],
                creator: Callable[[Call], Call | None] = lambda call: None) -> Counter:
    """The tree of traced calls under each traced call that has no traced caller, as comparable values: what the
    traces must look like when spans cannot be paired with calls one by one (no goroutine id to group by).
    `creator`: for a call without one on its thread (goroutine), the call of another it belongs under."""
    children, roots = defaultdict(list), []
    for call in truth.calls:
        if traced(call):
            parent = traced_parent(truth, call, traced) or creator(call)
            (children[(parent.tid, parent.seq)] if parent else roots).append(call)

    def shape(call: Call) -> Shape:
        return call.fn, tuple(sorted(shape(child) for child in children[(call.tid, call.seq)]))

    return Counter(shape(call) for call in roots)


def span_shapes(received) -> Counter:
    """call_shapes() for spans, one per trace, checking on the way that each trace has exactly one root, that
    every other span's parent is in its trace, and that a child runs within its parent (one clock: exact)."""
    by_trace = defaultdict(list)
    for _, span in received:
        by_trace[span.trace_id].append(span)
    shapes = Counter()
    for trace_id, spans in by_trace.items():
        by_id = {span.span_id: span for span in spans}
        assert len(by_id) == len(spans), f"trace {trace_id.hex()}: span ids repeat"
        roots = [span for span in spans if not span.parent_span_id]
        assert len(roots) == 1, f"trace {trace_id.hex()}: {len(roots)} roots"
        children = defaultdict(list)
        for span in spans:
            if span.parent_span_id:
                parent = by_id.get(span.parent_span_id)
                assert parent is not None, f"{span.name} {span.span_id.hex()}: its parent is not in its trace"
                assert parent.start_time_unix_nano <= span.start_time_unix_nano, f"{span.name} starts before its parent"
                assert span.end_time_unix_nano <= parent.end_time_unix_nano, f"{span.name} ends after its parent"
                children[span.parent_span_id].append(span)

        def shape(span) -> Shape:
            return span.name, tuple(sorted(shape(child) for child in children[span.span_id]))

        shapes[shape(roots[0])] += 1
    return shapes


# ----- accounting: the shutdown line and the loss counters against what the receiver got

_SUMMARY = re.compile(r"otel-ebpf: (\d+) spans exported, (\d+) lost")


def shutdown_summary(stderr: str) -> tuple[int, int]:
    """(exported, lost) from the one line otel-ebpf prints on exit."""
    found = [m for m in map(_SUMMARY.match, stderr.splitlines()) if m]
    assert len(found) == 1, f"expected one summary line:\n{stderr}"
    return int(found[0].group(1)), int(found[0].group(2))


def final_metrics(receiver) -> tuple[dict[str, object], dict[tuple[str, str], int]]:
    """The last metrics export (cumulative, and made at shutdown, so it holds the final totals): duration
    histogram points by function, and counter values by (metric name, error.type or "")."""
    from otel_ebpf.metrics import DURATION
    from tests.otlp_receiver import any_value

    assert receiver.metric_requests, "no metrics received"
    durations, counters = {}, {}
    for resource_metrics in receiver.metric_requests[-1].resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == DURATION:
                    for point in metric.histogram.data_points:
                        function = {kv.key: any_value(kv.value) for kv in point.attributes}["code.function.name"]
                        durations[function] = point
                elif metric.WhichOneof("data") == "sum":
                    for point in metric.sum.data_points:
                        error = {kv.key: any_value(kv.value) for kv in point.attributes}.get("error.type", "")
                        counters[(metric.name, error)] = point.as_int
    return durations, counters


def check_accounting(stderr: str, receiver, received: int) -> int:
    """The shutdown line and the final loss counters agree with each other and with the `received` spans;
    returns how many spans they say were lost."""
    exported, lost = shutdown_summary(stderr)
    assert exported == received, f"summary says {exported} exported, the receiver got {received}"
    _, counters = final_metrics(receiver)
    assert counters[("otel.sdk.processor.span.processed", "")] == exported
    assert counters[("otel.sdk.exporter.span.exported", "")] == exported
    reasons = (counters[("otel_ebpf.calls.unrecorded", "ring_buffer_full")]
               + counters[("otel.sdk.processor.span.processed", "queue_full")]
               + counters[("otel.sdk.exporter.span.exported", "export_failed")])
    assert lost == reasons, f"summary says {lost} lost, the counters {reasons}: {counters}"
    return lost
