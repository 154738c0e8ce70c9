/* Entry and return programs for probed functions. The kernel pairs each return with its entry on a
 * per-thread stack, makes trace and span ids, and emits one span_event per finished call.
 *
 * Tunables (-D): NPROBES, MAX_DEPTH, MAX_THREADS, RINGBUF_PAGES, PIDNS_DEV and PIDNS_INO (see visible_ids),
 * SAMPLE_ALL or SAMPLE_THRESHOLD (a root is sampled when the lower 64 bits of its trace id, read big-endian,
 * are below it: the OpenTelemetry TraceIdRatioBased rule), PARENT_BASED, MIN_DURATION_NS, and HTTP_TRACING
 * to add http.bpf.c (appended by user space) and make probed calls children of the request served.
 * User space appends one DEFINE_PROBE(n) line per probed function. */
#include <uapi/linux/ptrace.h>
#include "maps.h"

static __always_inline void count(__u32 slot)
{
	__u64 *n = counters.lookup(&slot);
	if (n)
		*n += 1;
}

static __always_inline __u64 random_id(void)
{
	__u64 id = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
	return id ? id : 1;
}

/* The pid and tid as the tracer sees them. A tracer in a child PID namespace (a container sharing the
 * target's namespace) is built with PIDNS_DEV/PIDNS_INO and translates; in the initial namespace the kernel's
 * ids are already right and the helper's cost is saved. Non-zero: the task is outside that namespace. */
static __always_inline int visible_ids(struct bpf_pidns_info *ns)
{
#ifdef PIDNS_INO
	return bpf_get_ns_current_pid_tgid(PIDNS_DEV, PIDNS_INO, ns, sizeof(*ns));
#else
	__u64 id = bpf_get_current_pid_tgid();
	ns->tgid = id >> 32;
	ns->pid = (__u32)id;
	return 0;
#endif
}

/* The call enclosing the one at `depth`, NULL at the root. */
static __always_inline struct frame *parent_frame(struct call_stack *stack, __u32 depth)
{
	__u32 up = depth - 1; /* wraps for the root, failing the check below */
	asm volatile("" : "+r"(up)); /* keep the compiler from dropping the check the verifier needs */
	if (up >= MAX_DEPTH)
		return NULL;
	return &stack->frames[up];
}

/* Index of the histogram bucket for a duration: 2^(i-1) < ns <= 2^i. */
static __always_inline __u32 latency_bucket(__u64 ns)
{
	if (ns <= 1)
		return 0;
	__u64 v = ns - 1;
	__u32 log2 = 0, shift;
	shift = (v > 0xFFFFFFFF) << 5; v >>= shift; log2 |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; log2 |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; log2 |= shift;
	shift = (v > 0xF) << 2; v >>= shift; log2 |= shift;
	shift = (v > 0x3) << 1; v >>= shift; log2 |= shift;
	log2 |= (v >> 1);
	return log2 + 1 < LATENCY_BUCKETS ? log2 + 1 : LATENCY_BUCKETS - 1;
}

static __always_inline void record_latency(__u32 probe_id, __u64 ns)
{
	__u32 slot = probe_id * LATENCY_SLOTS + latency_bucket(ns);
	__u64 *n = latency.lookup(&slot);
	if (n)
		*n += 1;
	slot = probe_id * LATENCY_SLOTS + LATENCY_BUCKETS;
	n = latency.lookup(&slot);
	if (n)
		*n += ns;
}

static __always_inline __u32 sample_root(__u64 trace_id_low)
{
#ifdef SAMPLE_ALL
	return 1;
#else
	return __builtin_bswap64(trace_id_low) < SAMPLE_THRESHOLD;
#endif
}

/* Native code nests calls per thread. */
static __always_inline struct stack_key thread_key(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stack_key key = {.goroutine = 0, .tgid = id >> 32, .tid = (__u32)id};
	return key;
}

/* Go code nests calls per goroutine, which migrate between threads; r14 holds the current g under
 * Go's register ABI (amd64, Go >= 1.17). */
static __always_inline struct stack_key goroutine_key(struct pt_regs *ctx)
{
	struct stack_key key = {.goroutine = ctx->r14, .tgid = bpf_get_current_pid_tgid() >> 32, .tid = 0};
	return key;
}

/* Where the innermost frame for probe_id sits at or below `depth`, or -1. Frames above it belong to
 * calls that never returned through their probe (longjmp, a recovered Go panic). */
static __always_inline int find_frame(struct call_stack *stack, __u32 depth, __u32 probe_id)
{
	for (int i = 0; i < MAX_DEPTH; i++) {
		__u32 d = depth - i; /* wraps below zero, failing the check */
		if (d >= MAX_DEPTH)
			break;
		if (stack->frames[d].probe_id == probe_id)
			return d;
	}
	return -1;
}

/* The HTTP request the current thread is handling, if any. */
static __always_inline struct request_context *current_request(void)
{
#ifdef HTTP_TRACING
	__u64 id = bpf_get_current_pid_tgid();
	return thread_requests.lookup(&id);
#else
	return NULL;
#endif
}

static __always_inline void emit_process_event(__u32 kind, __u32 process_seq)
{
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	struct process_event *event = events.ringbuf_reserve(sizeof(struct process_event));
	if (!event) {
		count(COUNTER_NOTICES_LOST);
		return;
	}
	event->kind = kind;
	event->pid = ns.tgid;
	event->process_seq = process_seq;
	event->pad = 0;
	events.ringbuf_submit(event, 0); /* wake user space: a short-lived process must be looked at now */
}

/* The process_seq of the current process, announcing the process to user space on its first call. */
static __always_inline __u32 process_seq(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 *known = processes.lookup(&tgid);
	if (known)
		return *known;
	__u32 seq = bpf_get_prandom_u32() | 1; /* random: no shared counter to contend for; 0 is user space's */
	processes.update(&tgid, &seq);
	emit_process_event(EVENT_PROCESS_START, seq);
	return seq;
}

/* goid_offset: where runtime.g keeps goid in this binary (from its DWARF), 0 when unknown or native. */
static __always_inline int on_entry(__u32 probe_id, struct stack_key key, __u32 goid_offset)
{
	__u64 now = bpf_ktime_get_ns();

	struct call_stack *stack = call_stacks.lookup(&key);
	if (!stack) {
		__u32 zero = 0;
		struct call_stack *empty = empty_stack.lookup(&zero);
		if (!empty)
			return 0;
		call_stacks.update(&key, empty);
		stack = call_stacks.lookup(&key);
		if (!stack)
			return 0;
	}

	__u32 depth = stack->depth;
	stack->depth = depth + 1;
	if (depth >= MAX_DEPTH) {
		count(COUNTER_DEPTH_EXCEEDED);
		return 0;
	}
	if (depth == 0) {
		/* Goroutines are not tied to the thread that read a request: Go calls are not linked to one. */
		struct request_context *request = key.goroutine ? NULL : current_request();
		if (request) {
			stack->trace_id[0] = request->trace_id[0];
			stack->trace_id[1] = request->trace_id[1];
			stack->root_parent = request->span_id;
			stack->sampled = request->sampled;
		} else {
			stack->trace_id[0] = random_id();
			stack->trace_id[1] = random_id();
			stack->root_parent = 0;
			stack->sampled = sample_root(stack->trace_id[1]);
		}
		stack->process_seq = process_seq();
		stack->goroutine_id = 0;
		if (goid_offset)
			bpf_probe_read_user(&stack->goroutine_id, sizeof(__u64), (void *)(key.goroutine + goid_offset));
	}
	stack->frames[depth].start_ns = now;
	stack->frames[depth].span_id = random_id();
	stack->frames[depth].probe_id = probe_id;
	stack->frames[depth].child_emitted = 0;
	return 0;
}

static __always_inline int on_return(__u32 probe_id, struct stack_key key)
{
	__u64 now = bpf_ktime_get_ns();

	struct call_stack *stack = call_stacks.lookup(&key);
	if (!stack || stack->depth == 0) {
		count(COUNTER_UNMATCHED_RETURN);
		return 0;
	}
	__u32 depth = stack->depth - 1;
	stack->depth = depth;
	if (depth >= MAX_DEPTH)
		return 0;
	if (stack->frames[depth].probe_id != probe_id) {
		count(COUNTER_UNMATCHED_RETURN);
		int found = find_frame(stack, depth, probe_id);
		if (found < 0) {
			stack->depth = depth + 1; /* not ours: our entry was never seen */
			return 0;
		}
		depth = found;
		stack->depth = depth;
	}
	asm volatile("" : "+r"(depth));
	if (depth >= MAX_DEPTH)
		return 0;
	struct frame *frame = &stack->frames[depth];

	__u64 duration = now - frame->start_ns;
	record_latency(probe_id, duration);
	if (!stack->sampled || (duration < MIN_DURATION_NS && !frame->child_emitted))
		return 0;

	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return 0; /* a process outside the tracer's PID namespace: invisible to it */

	struct span_event *event = events.ringbuf_reserve(sizeof(struct span_event));
	if (!event) {
		count(COUNTER_EVENTS_LOST);
		return 0;
	}
	event->kind = EVENT_SPAN;
	event->start_ns = frame->start_ns;
	event->end_ns = now;
	event->trace_id[0] = stack->trace_id[0];
	event->trace_id[1] = stack->trace_id[1];
	event->span_id = frame->span_id;
	struct frame *parent = parent_frame(stack, depth);
	event->parent_span_id = parent ? parent->span_id : stack->root_parent;
	if (parent)
		parent->child_emitted = 1;
	event->pid = ns.tgid;
	event->tid = ns.pid;
	event->probe_id = probe_id;
	event->depth = depth;
	event->process_seq = stack->process_seq;
	event->goroutine_id = stack->goroutine_id;
	/* No wake-up: the consumer polls on a short timer. A wake-up per event (or per batch, counted per CPU)
	 * costs the traced call more than the whole ring buffer write. */
	events.ringbuf_submit(event, BPF_RB_NO_WAKEUP);
	return 0;
}

/* Native functions: entry uprobe and uretprobe. */
#define DEFINE_PROBE(n) \
	int probe_entry_##n(struct pt_regs *ctx) { return on_entry(n, thread_key(), 0); } \
	int probe_return_##n(struct pt_regs *ctx) { return on_return(n, thread_key()); }

/* Go functions: entry uprobe, and a plain uprobe on each return instruction (a uretprobe would corrupt
 * goroutine stacks when they move). */
#define DEFINE_GO_PROBE(n, goid_offset) \
	int probe_entry_##n(struct pt_regs *ctx) { return on_entry(n, goroutine_key(ctx), goid_offset); } \
	int probe_return_##n(struct pt_regs *ctx) { return on_return(n, goroutine_key(ctx)); }

/* A thread that exits inside probed calls never returns from them: forget its stack (and, with HTTP
 * tracing, its request and pending syscalls) now rather than when the LRU gets round to it; tell user
 * space when a traced process ends. Goroutine
 * stacks of an exiting Go process are left to the LRU: they cannot be enumerated here. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stack_key key = {.goroutine = 0, .tgid = id >> 32, .tid = (__u32)id};
	call_stacks.delete(&key);
#ifdef HTTP_TRACING
	thread_requests.delete(&id);
	pending_reads.delete(&id);
	pending_writes.delete(&id);
#endif
	__u32 *seq = key.tgid == key.tid ? processes.lookup(&key.tgid) : NULL;
	if (seq) {
		emit_process_event(EVENT_PROCESS_EXIT, *seq);
		processes.delete(&key.tgid);
	}
	return 0;
}
