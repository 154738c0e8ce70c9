/* Entry and return programs for probed functions. The kernel pairs each return with its entry on a
 * per-thread stack, makes trace and span ids, and emits one span_event per finished call.
 *
 * Tunables (-D): MAX_DEPTH, MAX_THREADS, RINGBUF_PAGES, WAKEUP_EVERY, PIDNS_DEV, PIDNS_INO.
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

/* Wake the consumer only every WAKEUP_EVERY events; it also polls on a short timer for the rest. */
static __always_inline __u64 wakeup_flag(void)
{
	__u32 zero = 0;
	__u32 *n = unwoken.lookup(&zero);
	if (!n)
		return 0;
	if (++*n < WAKEUP_EVERY)
		return BPF_RB_NO_WAKEUP;
	*n = 0;
	return BPF_RB_FORCE_WAKEUP;
}

/* span_id of the call enclosing the one at `depth`, 0 at the root. */
static __always_inline __u64 parent_span_id(struct call_stack *stack, __u32 depth)
{
	__u32 up = depth - 1; /* wraps for the root, failing the check below */
	asm volatile("" : "+r"(up)); /* keep the compiler from dropping the check the verifier needs */
	if (up >= MAX_DEPTH)
		return 0;
	return stack->frames[up].span_id;
}

static __always_inline int on_entry(__u32 probe_id)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	struct call_stack *stack = call_stacks.lookup(&tid);
	if (!stack) {
		__u32 zero = 0;
		struct call_stack *empty = empty_stack.lookup(&zero);
		if (!empty)
			return 0;
		call_stacks.update(&tid, empty);
		stack = call_stacks.lookup(&tid);
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
		stack->trace_id[0] = random_id();
		stack->trace_id[1] = random_id();
	}
	stack->frames[depth].start_ns = now;
	stack->frames[depth].span_id = random_id();
	stack->frames[depth].probe_id = probe_id;
	return 0;
}

static __always_inline int on_return(__u32 probe_id)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	struct call_stack *stack = call_stacks.lookup(&tid);
	if (!stack || stack->depth == 0) {
		count(COUNTER_UNMATCHED_RETURN);
		return 0;
	}
	__u32 depth = stack->depth - 1;
	stack->depth = depth;
	if (depth >= MAX_DEPTH)
		return 0;
	struct frame *frame = &stack->frames[depth];
	if (frame->probe_id != probe_id) {
		/* The entry was skipped (longjmp, attach mid-call): drop the whole stack, not just one frame,
		 * so later calls on this thread start clean. */
		stack->depth = 0;
		count(COUNTER_UNMATCHED_RETURN);
		return 0;
	}

	struct bpf_pidns_info ns = {};
	if (bpf_get_ns_current_pid_tgid(PIDNS_DEV, PIDNS_INO, &ns, sizeof(ns)))
		return 0; /* a process outside the tracer's PID namespace: invisible to it */

	struct span_event *event = events.ringbuf_reserve(sizeof(struct span_event));
	if (!event) {
		count(COUNTER_EVENTS_LOST);
		return 0;
	}
	event->start_ns = frame->start_ns;
	event->end_ns = now;
	event->trace_id[0] = stack->trace_id[0];
	event->trace_id[1] = stack->trace_id[1];
	event->span_id = frame->span_id;
	event->parent_span_id = parent_span_id(stack, depth);
	event->pid = ns.tgid;
	event->tid = ns.pid;
	event->probe_id = probe_id;
	event->depth = depth;
	events.ringbuf_submit(event, wakeup_flag());
	return 0;
}

#define DEFINE_PROBE(n) \
	int probe_entry_##n(struct pt_regs *ctx) { return on_entry(n); } \
	int probe_return_##n(struct pt_regs *ctx) { return on_return(n); }
