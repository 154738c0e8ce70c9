/* The maps of the probe programs, each with what it keeps track of. Sizes come from user space as -D flags
 * (MAX_DEPTH, MAX_THREADS, SPAN_RING_PAGES, NOTICE_RING_PAGES); the HTTP maps are in http_maps.h. */
#ifndef OTEL_EBPF_MAPS_H
#define OTEL_EBPF_MAPS_H

#include "event.h"

/* One probed call in flight on a thread. */
struct frame {
	__u64 start_ns;
	__u64 span_id;
	__u64 identity;          /* COOKIE_FILTER probes: the name string's address, which its return must show too */
	__u32 probe_id;
	__u32 child_emitted;     /* a descendant's span was emitted, so this one must be too (MIN_DURATION_NS) */
};

/* The probed calls in flight on one thread or goroutine, innermost last; pairing entry with return happens
 * here. What the process says about its trace is copied in when the stack is made: a thread's stack does not
 * outlive its program (exec and thread exit delete it), so it never goes stale. */
struct call_stack {
	__u32 depth;             /* calls entered and not yet returned; may exceed MAX_DEPTH */
	__u32 sampled;           /* the sampler's decision, made at the trace root and inherited */
	__u64 trace_id[2];       /* trace of the outermost call in flight */
	__u64 root_parent;       /* span the outermost call is a child of: request, TRACEPARENT span, or 0 */
	__u64 goroutine_id;      /* Go: runtime.g.goid of the goroutine, read at its outermost call */
	__u64 seed;              /* random at creation: ids are mix64(seed + ++ids), no helper call per call */
	__u64 ids;               /* ids made so far */
	__u64 parent_trace_id[2]; /* the process's TRACEPARENT, when parent_flags has PROCESS_HAS_PARENT */
	__u64 parent_span_id;
	__u32 parent_flags;      /* PROCESS_HAS_PARENT, PROCESS_PARENT_SAMPLED */
	__u32 process_seq;       /* of the process */
	__u32 root_flags;        /* SPAN_* flags of the outermost call in flight */
	__u32 pad;
	struct frame frames[MAX_DEPTH];
};

/* Whose calls nest on one stack: a thread (goroutine = 0), or a goroutine of a Go process (tid = 0). */
struct stack_key {
	__u64 goroutine;
	__u32 tgid;
	__u32 tid;
};

/* A followed process: its number and the trace it was started in. */
struct process_info {
	__u32 seq;               /* process_seq, see struct process_notice */
	__u32 flags;             /* PROCESS_* */
	__u32 parent_pid;        /* PROCESS_ANNOUNCE after a fork: the visible pid and seq it was forked from */
	__u32 parent_seq;
	__u64 trace_id[2];       /* its TRACEPARENT, when PROCESS_HAS_PARENT */
	__u64 span_id;
};

/* process_info.flags */
#define PROCESS_HAS_PARENT 1      /* TRACEPARENT was valid: root calls are children of span_id */
#define PROCESS_PARENT_SAMPLED 2  /* ... and its sampled flag was set */
#define PROCESS_ANNOUNCE 4        /* forked: not yet announced to user space (done in its own context) */
#define PROCESS_AWAIT_EXEC 8      /* a COMMAND held before its exec: what runs until then is the tracer's own code */
#define PROCESS_GO 16             /* a Go program (a probed Go function ran): its reads are made by goroutines */

/* An HTTP request in flight on a connection, from the read that began it until the connection's next request
 * or its close (http_maps.h); the copy a thread serving it holds says whether that thread wrote a response. */
struct request_context {
	__u64 trace_id[2];
	__u64 span_id;           /* of the SERVER span */
	__u64 thread;            /* pid_tgid of the thread that read it */
	__u32 sampled;
	__u32 fd;
	__u32 reads;             /* reads of the request so far: later ones are sent while it has no response */
	__u32 writes;            /* response writes so far (the thread's copy: 1 once that thread wrote) */
	__u64 goroutine;         /* Go: the g that read it, which serves it (goroutine_requests) */
};

/* Finished calls, handed to user space (struct span_record). User space polls; the producer wakes it only
 * once every SPAN_WAKE_EVERY ids of a call stack, in bursts. */
BPF_RINGBUF_OUTPUT(spans, SPAN_RING_PAGES);

/* Everything else user space must know (struct notice_header and what follows), woken at once: rare. */
BPF_RINGBUF_OUTPUT(notices, NOTICE_RING_PAGES);

/* Call stacks per thread or goroutine (never per process: threads nest independently). LRU, so threads
 * that die inside a probed call cannot leak entries forever. */
BPF_TABLE("lru_hash", struct stack_key, struct call_stack, call_stacks, MAX_THREADS);

/* A zeroed call_stack to initialise new threads from: it is too large for the BPF stack. Never written. */
BPF_PERCPU_ARRAY(empty_stack, struct call_stack, 1);

/* Followed processes, by kernel tgid. Filled by user space (a COMMAND, --pid), by a fork of a followed
 * process, by the entry point of a probed executable and, system-wide, by a first probed call; emptied when
 * they exit. With HTTP tracing their sockets are the ones watched. */
BPF_HASH(processes, __u32, struct process_info, MAX_PROCESSES);

#ifdef PIDNS_INO
/* Processes user space follows (a COMMAND, --pid), by their pid in the tracer's PID namespace, until an event
 * of theirs in their own context tells the kernel's pid for it (only there can it be translated); then moved
 * to `processes`. `pending_follows_count` says whether any wait, so that other processes pay nothing. */
BPF_HASH(pending_follows, __u32, struct process_info, 1024);
BPF_ARRAY(pending_follows_count, __u32, 1);
#endif

/* What each process was exec'd as, by kernel tgid: kept from execve's entry (where its arguments are still
 * readable) for the process's announcement, however short its life. LRU: most processes are never
 * traced. Written only for followed processes unless tracing system-wide. */
BPF_TABLE("lru_hash", __u32, struct process_notice, exec_identities, MAX_IDENTITIES);

/* Room to build a process notice in: too large for the BPF stack. */
BPF_PERCPU_ARRAY(notice_scratch, struct process_notice, 1);

/* Per-CPU counts indexed by enum counter; user space sums the CPUs. */
BPF_PERCPU_ARRAY(counters, __u64, COUNTER_MAX);

/* Per-CPU latency histograms by probe id (struct latency_slots), sampled or not, so every call is counted. */
BPF_PERCPU_ARRAY(latency, struct latency_slots, MAX_PROBES);

/* What each probe reads of its calls, by probe id (struct capture_plan), written by user space before it
 * attaches: looked up only by probes whose cookie has COOKIE_CAPTURE. */
BPF_ARRAY(capture_plans, struct capture_plan, MAX_PROBES);

/* Room to build a capture notice in: too large for the BPF stack. */
BPF_PERCPU_ARRAY(capture_scratch, struct capture_notice, 1);

/* Which calls of a filtered probe (COOKIE_FILTER: Python functions) are traced, by probe id (struct name_filter),
 * written by user space before it attaches. */
BPF_HASH(name_filters, __u32, struct name_filter, 64);

/* The two strings a filter compares, read from the traced process: too large for the BPF stack together. */
struct filter_strings {
	char name[FILTER_NAME_MAX];
	char file[FILTER_FILE_MAX];
};
BPF_PERCPU_ARRAY(filter_scratch, struct filter_strings, 1);

/* Never read or written at run time: its value type lets user space check the compiled event layout. */
BPF_ARRAY(event_layout, struct event_layouts, 1);

#endif
