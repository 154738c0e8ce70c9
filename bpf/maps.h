/* The maps of uprobe.bpf.c, each with what it keeps track of. Sizes come from user space as -D flags. */
#ifndef OTEL_EBPF_MAPS_H
#define OTEL_EBPF_MAPS_H

#include "event.h"

/* One probed call in flight on a thread. */
struct frame {
	__u64 start_ns;
	__u64 span_id;
	__u32 probe_id;
	__u32 child_emitted;     /* a descendant's span was emitted, so this one must be too (MIN_DURATION_NS) */
};

/* The probed calls in flight on one thread, innermost last; pairing entry with return happens here. */
struct call_stack {
	__u32 depth;             /* calls entered and not yet returned; may exceed MAX_DEPTH */
	__u32 sampled;           /* the sampler's decision, made at the trace root and inherited */
	__u64 trace_id[2];       /* trace of the outermost call in flight */
	struct frame frames[MAX_DEPTH];
};

/* Whose calls nest on one stack: a thread (goroutine = 0), or a goroutine of a Go process (tid = 0). */
struct stack_key {
	__u64 goroutine;
	__u32 tgid;
	__u32 tid;
};

/* Finished calls, handed to user space (struct span_event records). */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* Call stacks per thread or goroutine (never per process: threads nest independently). LRU, so threads
 * that die inside a probed call cannot leak entries forever. */
BPF_TABLE("lru_hash", struct stack_key, struct call_stack, call_stacks, MAX_THREADS);

/* A zeroed call_stack to initialise new threads from: it is too large for the BPF stack. Never written. */
BPF_PERCPU_ARRAY(empty_stack, struct call_stack, 1);

/* Per-CPU counts indexed by enum counter; user space sums the CPUs. */
BPF_PERCPU_ARRAY(counters, __u64, COUNTER_MAX);

/* Per-CPU latency histograms, sampled or not, so every call is counted. For probe p, slot
 * p * LATENCY_SLOTS + i (i < LATENCY_BUCKETS) counts calls with 2^(i-1) < duration_ns <= 2^i (the last
 * bucket is open-ended) and slot p * LATENCY_SLOTS + LATENCY_BUCKETS sums their durations in ns. */
BPF_PERCPU_ARRAY(latency, __u64, NPROBES * LATENCY_SLOTS);

/* Per-CPU number of events emitted since the last consumer wake-up: waking user space once per
 * WAKEUP_EVERY events instead of once per event keeps the target's per-call cost low. */
BPF_PERCPU_ARRAY(unwoken, __u32, 1);

/* Never read or written at run time: its value type lets user space check the compiled event layout. */
BPF_ARRAY(event_layout, struct span_event, 1);

#endif
