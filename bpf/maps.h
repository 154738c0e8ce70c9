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
	__u64 root_parent;       /* span the outermost call is a child of: the HTTP request served, or 0 */
	__u64 goroutine_id;      /* Go: runtime.g.goid of the goroutine, read at its outermost call */
	__u32 process_seq;       /* of the process, read at the outermost call */
	__u32 pad;
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

/* Processes that made probed calls, by kernel tgid, with their process_seq (see struct process_event).
 * Filled by a process's first probed call and by user space for the processes it starts or is given;
 * emptied when they exit. With HTTP tracing, their sockets are the ones watched. */
BPF_HASH(processes, __u32, __u32, 65536);

/* Per-CPU counts indexed by enum counter; user space sums the CPUs. */
BPF_PERCPU_ARRAY(counters, __u64, COUNTER_MAX);

/* Per-CPU latency histograms, sampled or not, so every call is counted. For probe p, slot
 * p * LATENCY_SLOTS + i (i < LATENCY_BUCKETS) counts calls with 2^(i-1) < duration_ns <= 2^i (the last
 * bucket is open-ended) and slot p * LATENCY_SLOTS + LATENCY_BUCKETS sums their durations in ns. */
BPF_PERCPU_ARRAY(latency, __u64, NPROBES * LATENCY_SLOTS);

/* Never read or written at run time: its value type lets user space check the compiled event layout. */
BPF_ARRAY(event_layout, struct event_layouts, 1);

/* An HTTP request in flight, from its read until its response is written. */
struct request_context {
	__u64 trace_id[2];
	__u64 span_id;           /* of the SERVER span */
	__u64 thread;            /* pid_tgid of the thread that read it */
	__u32 sampled;
	__u32 pad;
};

#ifdef HTTP_TRACING
/* A read or write in progress on a thread of a watched process: the syscall's arguments, kept from
 * entry to exit, where the data is there to read. Keyed by pid_tgid. */
struct pending_io {
	__u64 buf;
	__u32 fd;
	__u32 pad;
};
BPF_HASH(pending_reads, __u64, struct pending_io, MAX_THREADS);
BPF_HASH(pending_writes, __u64, struct pending_io, MAX_THREADS);

struct connection_key {
	__u32 tgid;
	__u32 fd;
};

/* Requests in flight per connection. LRU: a connection closed behind our back cannot stay forever. */
BPF_TABLE("lru_hash", struct connection_key, struct request_context, requests, MAX_THREADS);

/* The request each thread is handling, by pid_tgid: probed calls starting there become its children. */
BPF_TABLE("lru_hash", __u64, struct request_context, thread_requests, MAX_THREADS);
#endif

#endif
