"""Volume control and accounting, end to end: the in-kernel sampler and minimum duration decide which calls
become spans, the latency histograms still count every call, a tight loop loses nothing by default, and the
shutdown line and the loss counters account for exactly what the receiver got."""

import re

import pytest

from otel_ebpf.metrics import NBUCKETS
from tests.e2e.spancheck import (
    BUSY_OVERHEAD_SLACK_NS, OVERHEAD_SLACK_NS, check_accounting, check_tree, final_metrics, match, nearest_calls,
    traced_parent,
)
from tests.ground_truth import LOOP, NESTED, parse

IN_NESTED = ("handle_request", "parse_request", "compute", "fib")
LOOP_CALLS = 100_000
# How far the kernel's measurement of a call may fall short of the program's own: none but the drift between
# CLOCK_REALTIME (the program's) and CLOCK_MONOTONIC (the kernel's), at most 500 ppm while NTP slews.
DRIFT = 0.0005


def volume_env(receiver, **extra: str) -> dict[str, str]:
    """Spans and metrics to the receiver, metrics exported often (and once more at shutdown)."""
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.http_endpoint, "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.http_metrics_endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "200", **extra}


def trace_nested(tracer, tmp_path, threads: int, requests: int, **env: str):
    """otel-ebpf tracing IN_NESTED of `nested THREADS REQUESTS` to its end; returns the tracer and the ground truth."""
    truth_file = tmp_path / "truth.txt"
    t = tracer(["trace", str(NESTED), *IN_NESTED, "--", str(NESTED), str(threads), str(requests)],
               NESTED_GROUND_TRUTH=str(truth_file), **env)
    assert t.finish() == 0, t.stderr
    return t, parse(truth_file.read_text())


def own_durations(truth, fn: str) -> list[int]:
    return [c.end - c.start for c in truth.calls if c.fn == fn]


def check_histogram(point, own: list[int]) -> None:
    """One function's final latency histogram against the program's own durations of its calls: the kernel
    counts every call and measures each no shorter than the program did and only a little longer: on average
    at most OVERHEAD_SLACK_NS, at worst BUSY_OVERHEAD_SLACK_NS."""
    n = len(own)
    assert point.count == n == sum(point.bucket_counts), f"{point.count} calls in the histogram, {n} made"
    assert list(point.explicit_bounds) == [2**i / 1e9 for i in range(NBUCKETS - 1)]
    total = point.sum * 1e9
    assert sum(own) * (1 - DRIFT) - n <= total <= sum(own) + n * OVERHEAD_SLACK_NS, (total, sum(own))
    cumulative = 0
    for i, bucket in enumerate(point.bucket_counts[:-1]):  # the last bucket is open-ended
        cumulative += bucket
        bound_ns = 2**i
        at_most = sum(d * (1 - DRIFT) <= bound_ns for d in own)
        at_least = sum(d + BUSY_OVERHEAD_SLACK_NS <= bound_ns for d in own)
        assert at_least <= cumulative <= at_most, f"{cumulative} calls of at most {bound_ns:.0f} ns"


def check_every_call_counted(receiver, truth) -> None:
    durations, _ = final_metrics(receiver)
    assert sorted(durations) == sorted(IN_NESTED)
    for fn in IN_NESTED:
        check_histogram(durations[fn], own_durations(truth, fn))


@pytest.mark.parametrize("sampler", ["always_off", "parentbased_always_off"])
def test_sampler_off_exports_no_span_but_metrics_count_every_call(tracer, receiver, tmp_path, sampler):
    """Sampling decides spans only: the histograms are kept in the kernel for every call, so latency stays
    measured at any sampling rate, and nothing is reported lost that was never meant to be exported."""
    t, truth = trace_nested(tracer, tmp_path, 3, 4, OTEL_TRACES_SAMPLER=sampler, **volume_env(receiver))
    assert receiver.spans() == []
    check_every_call_counted(receiver, truth)
    assert check_accounting(t.stderr, receiver, 0) == 0


@pytest.mark.parametrize("sampler", ["traceidratio", "parentbased_traceidratio"])
def test_ratio_keeps_or_drops_whole_traces(tracer, receiver, tmp_path, sampler):
    """The root call decides for everything nested under it, so a kept trace is complete and a dropped one
    leaves no orphan; the decision is the TraceIdRatioBased rule on the trace id, so any OpenTelemetry
    component downstream keeping the same ratio keeps the same traces."""
    t, truth = trace_nested(tracer, tmp_path, 2, 50, OTEL_TRACES_SAMPLER=sampler, OTEL_TRACES_SAMPLER_ARG="0.5",
                            **volume_env(receiver))
    received = receiver.spans()
    roots = [c for c in truth.calls if c.fn == "handle_request"]
    assert len(roots) == 100 and all(c.parent == 0 for c in roots)
    kept_roots = nearest_calls([(r, s) for r, s in received if not s.parent_span_id], truth,
                               lambda c: c.fn == "handle_request")
    calls = truth.by_key()

    def kept(call) -> bool:
        while call.parent:
            call = calls[(call.tid, call.parent)]
        return (call.tid, call.seq) in kept_roots

    check_tree(match(received, truth, lambda c: c.fn in IN_NESTED and kept(c),
                     overhead_slack_ns=BUSY_OVERHEAD_SLACK_NS), truth)
    assert all(int.from_bytes(s.trace_id[8:], "big") < 1 << 63 for _, s in received), "kept against the ratio"
    assert 25 <= len(kept_roots) <= 75, f"{len(kept_roots)} of 100 traces kept at ratio 0.5"  # 5 sigma
    check_every_call_counted(receiver, truth)
    assert check_accounting(t.stderr, receiver, len(received)) == 0


MIN_DURATION_NS = 500_000
# Calls whose own duration is this close to the threshold may go either way: the kernel measures a call from
# its probes, a little before and after the program's own clock readings.
# It absorbs that probe overhead; nothing tighter, since a kept call can fall short of the threshold by all of it
# (measured with the example alone: p99 55 us, but max 240 us in 15200 calls, beyond even this band).
THRESHOLD_BAND_NS = 100_000


def test_min_duration_exports_long_calls_and_their_callers(tracer, receiver, tmp_path):
    """OTEL_EBPF_MIN_DURATION keeps the calls that take long, and every probed caller above one of them so the
    kept span is not an orphan; the short rest is dropped in the kernel, yet still counted in the histograms."""
    t, truth = trace_nested(tracer, tmp_path, 3, 4, OTEL_EBPF_MIN_DURATION="500us", **volume_env(receiver))
    received = receiver.spans()
    probed = [c for c in truth.calls if c.fn in IN_NESTED]
    exported = nearest_calls(received, truth, lambda c: c.fn in IN_NESTED)
    matched = match(received, truth, lambda c: (c.tid, c.seq) in exported, overhead_slack_ns=BUSY_OVERHEAD_SLACK_NS)
    check_tree(matched, truth)

    def is_exported(call) -> bool:
        return (call.tid, call.seq) in exported

    callers = {(p.tid, p.seq) for c in probed if is_exported(c) and (p := traced_parent(truth, c, is_exported))}
    for call in probed:
        own = call.end - call.start
        if own >= MIN_DURATION_NS + THRESHOLD_BAND_NS:
            assert is_exported(call), f"{call} took {own} ns, above the threshold, and was dropped"
        if is_exported(call):
            parent = traced_parent(truth, call, lambda c: c.fn in IN_NESTED)
            assert parent is None or is_exported(parent), f"{call} was exported without its caller {parent}"
            if (call.tid, call.seq) not in callers:
                # The kernel keeps a call by the time it measured, entry probe to return probe, which also holds
                # what runs after the program's last clock reading (its call line's write, a preemption there).
                span = matched[(call.tid, call.seq)][1]
                measured = span.end_time_unix_nano - span.start_time_unix_nano
                assert measured >= MIN_DURATION_NS - THRESHOLD_BAND_NS, \
                    f"{call} took {own} ns, {measured} ns between its probes, and was exported"
    assert all(is_exported(c) for c in probed if c.fn == "handle_request")  # each sleeps 1 ms
    assert len(exported) < len(probed) / 2, "the short calls were not dropped"
    check_every_call_counted(receiver, truth)
    assert check_accounting(t.stderr, receiver, len(received)) == 0


@pytest.mark.parametrize("ring_buffer", [None, "4K"], ids=["default", "ring_buffer_4K"])
def test_tight_loop_every_call_exported_or_accounted_for(tracer, receiver, ring_buffer):
    """100000 back-to-back calls: with the default settings the ring buffer and back-pressure must carry every
    one to the receiver. With a ring buffer far too small, calls are lost in the kernel; then the summary line and
    the counters must say exactly how many, so exported + lost is still every call."""
    env = volume_env(receiver, OTEL_BSP_SCHEDULE_DELAY="5000")  # the default; clean_env() shortens it
    if ring_buffer:
        env["OTEL_EBPF_RING_BUFFER_SIZE"] = ring_buffer
    t = tracer(["trace", str(LOOP), "tick", "--", str(LOOP), str(LOOP_CALLS)], **env)
    assert t.finish(timeout=300) == 0, t.stderr
    assert re.search(rf"^loop calls={LOOP_CALLS} ", t.stdout, re.M), t.stdout  # the program's own count
    received = receiver.spans()
    assert all(s.name == "tick" for _, s in received)
    durations, counters = final_metrics(receiver)
    assert durations["tick"].count == LOOP_CALLS, "the histogram misses calls"
    lost = check_accounting(t.stderr, receiver, len(received))
    assert len(received) + lost == LOOP_CALLS, f"{len(received)} received + {lost} lost != {LOOP_CALLS} calls"
    if ring_buffer:
        assert lost > 0 and counters[("otel_ebpf.calls.unrecorded", "ring_buffer_full")] == lost
    else:
        assert (len(received), lost) == (LOOP_CALLS, 0), f"{len(received)} received, {lost} lost"
