/* What crosses the kernel/user boundary. This header is the single definition: user space
 * (otel_ebpf/events.py) mirrors it and checks the mirror against the compiled program at start-up
 * and in tests/unit/test_event_layout.py. Fixed-width fields only, padding spelled out. */
#ifndef OTEL_EBPF_EVENT_H
#define OTEL_EBPF_EVENT_H

/* One finished call of a probed function, emitted by the return probe. */
struct span_event {
	__u64 start_ns;          /* CLOCK_MONOTONIC at function entry */
	__u64 end_ns;            /* CLOCK_MONOTONIC at function return */
	__u64 trace_id[2];       /* 16 random bytes shared by every call nested under the trace root */
	__u64 span_id;           /* 8 random bytes naming this call */
	__u64 parent_span_id;    /* span_id of the enclosing probed call on this thread, 0 for a root */
	__u32 pid;               /* thread group id, as seen in the tracer's PID namespace */
	__u32 tid;               /* thread id, as seen in the tracer's PID namespace */
	__u32 probe_id;          /* index into the probe table user space compiled into the program */
	__u32 depth;             /* nesting depth of this call among probed calls on its thread, 0 = root */
};

/* Slots of the `counters` map: things the kernel side could not do, so user space can report them. */
enum counter {
	COUNTER_EVENTS_LOST = 0,      /* ring buffer full: a finished call could not be emitted */
	COUNTER_DEPTH_EXCEEDED = 1,   /* a call nested deeper than MAX_DEPTH: not recorded */
	COUNTER_UNMATCHED_RETURN = 2, /* a return without its entry (probe attached mid-call, longjmp) */
	COUNTER_MAX = 3,
};

/* Layout of the `latency` map (see maps.h). */
#define LATENCY_BUCKETS 40
#define LATENCY_SLOTS (LATENCY_BUCKETS + 1)

#endif
