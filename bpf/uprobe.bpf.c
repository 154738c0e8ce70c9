/* The entry and return programs shared by every probe. The attach cookie says which probe fired (see
 * COOKIE_* in event.h); the kernel pairs each return with its entry on a per-thread (Go: per-goroutine)
 * stack, makes trace and span ids, and emits one span_record per finished call. Part of otel_ebpf.bpf.c. */

/* The call enclosing the one at `depth`, NULL at the root. */
static __always_inline struct frame *parent_frame(struct call_stack *stack, __u32 depth)
{
	__u32 up = depth - 1; /* wraps for the root, failing the check below */
	asm volatile("" : "+r"(up)); /* keep the compiler from dropping the check the verifier needs */
	if (up >= MAX_DEPTH)
		return NULL;
	return &stack->frames[up];
}

/* One histogram update per call: a single lookup of the probe's per-CPU slots. */
static __always_inline void record_latency(__u32 probe_id, __u64 ns)
{
	struct latency_slots *slots = latency.lookup(&probe_id);
	if (!slots)
		return;
	__u32 bucket = latency_bucket(ns);
	if (bucket < LATENCY_BUCKETS)
		slots->buckets[bucket] += 1;
	slots->sum_ns += ns;
	if (ns > slots->max_ns)
		slots->max_ns = ns;
}

/* Native code nests calls per thread; Go code per goroutine, which migrate between threads: r14 holds the
 * current g under Go's register ABI (amd64, Go >= 1.17). */
static __always_inline struct stack_key stack_key_of(struct pt_regs *ctx, __u64 cookie)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stack_key key = {.goroutine = 0, .tgid = id >> 32, .tid = (__u32)id};
	if (cookie & COOKIE_GO) {
		key.goroutine = ctx->r14;
		key.tid = 0;
	}
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

/* The HTTP request the current thread (Go: goroutine) is handling, if any. */
static __always_inline struct request_context *current_request(struct stack_key *key)
{
#ifdef HTTP_TRACING
	if (key->goroutine)
		return goroutine_requests.lookup(key);
	__u64 id = bpf_get_current_pid_tgid();
	return thread_requests.lookup(&id);
#else
	return NULL;
#endif
}

static __always_inline __u64 next_id(struct call_stack *stack)
{
	stack->ids += 1;
	return mix64(stack->seed + stack->ids) | 1; /* never 0, which means "none" */
}

/* A new stack for a thread or goroutine of a followed process, NULL if the process is not followed. */
static __always_inline struct call_stack *new_stack(struct stack_key *key)
{
	struct process_info *info = watch_current();
	if (!info)
		return NULL;
	if (key->goroutine)
		info->flags |= PROCESS_GO; /* its requests are read, and served, by goroutines */
	__u32 zero = 0;
	struct call_stack *empty = empty_stack.lookup(&zero);
	if (!empty)
		return NULL;
	call_stacks.update(key, empty);
	struct call_stack *stack = call_stacks.lookup(key);
	if (!stack)
		return NULL;
	stack->seed = (__u64)bpf_get_prandom_u32() << 32 | bpf_get_prandom_u32();
	stack->ids = 0;
	stack->process_seq = info->seq;
	stack->parent_flags = info->flags & (PROCESS_HAS_PARENT | PROCESS_PARENT_SAMPLED);
	stack->parent_trace_id[0] = info->trace_id[0];
	stack->parent_trace_id[1] = info->trace_id[1];
	stack->parent_span_id = info->span_id;
	return stack;
}

/* A goroutine's stack outlives neither its process nor its program, but its key (the g's address) can come
 * back in the next program of the same pid: a stack of another process_seq is started afresh. */
static __always_inline int stale_goroutine_stack(struct call_stack *stack, __u64 cookie)
{
	if (!(cookie & COOKIE_GO))
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct process_info *info = current_process(tgid);
	return !info || info->seq != stack->process_seq;
}

/* The outermost call in flight starts a trace: the HTTP request being served (by the thread, or in Go by the
 * goroutine that read it), the process's TRACEPARENT, or a new one. */
static __always_inline void start_trace(struct call_stack *stack, struct stack_key *key)
{
	struct request_context *request = current_request(key);
	if (request) {
		stack->trace_id[0] = request->trace_id[0];
		stack->trace_id[1] = request->trace_id[1];
		stack->root_parent = request->span_id;
		stack->sampled = request->sampled;
		stack->root_flags = 0;
	} else if (stack->parent_flags & PROCESS_HAS_PARENT) {
		stack->trace_id[0] = stack->parent_trace_id[0];
		stack->trace_id[1] = stack->parent_trace_id[1];
		stack->root_parent = stack->parent_span_id;
#ifdef PARENT_BASED
		stack->sampled = !!(stack->parent_flags & PROCESS_PARENT_SAMPLED);
#else
		stack->sampled = sample_root(stack->trace_id[1]);
#endif
		stack->root_flags = SPAN_REMOTE_PARENT;
	} else {
		stack->trace_id[0] = next_id(stack);
		stack->trace_id[1] = next_id(stack);
		stack->root_parent = 0;
		stack->sampled = sample_root(stack->trace_id[1]);
		stack->root_flags = 0;
	}
}

/* A probed call starts: a frame on its thread's (goroutine's) stack. */
static __always_inline void enter(struct pt_regs *ctx, __u64 cookie, __u64 now, __u64 identity)
{
	struct stack_key key = stack_key_of(ctx, cookie);
	struct call_stack *stack = call_stacks.lookup(&key);
	if (stack && stack->depth == 0 && stale_goroutine_stack(stack, cookie))
		stack = NULL;
	if (!stack) {
		stack = new_stack(&key);
		if (!stack)
			return;
	}

	__u32 depth = stack->depth;
	stack->depth = depth + 1;
	if (depth >= MAX_DEPTH) {
		count(COUNTER_DEPTH_EXCEEDED);
		return;
	}
	if (depth == 0) {
		__u32 goid_offset = cookie >> COOKIE_GOID_SHIFT & 0xFFFF;
		stack->goroutine_id = 0;
		if (goid_offset)
			bpf_probe_read_user(&stack->goroutine_id, sizeof(__u64), (void *)(key.goroutine + goid_offset));
		start_trace(stack, &key);
	}
	stack->frames[depth].start_ns = now;
	stack->frames[depth].span_id = next_id(stack);
	stack->frames[depth].probe_id = cookie & COOKIE_PROBE_ID_MASK;
	stack->frames[depth].child_emitted = 0;
	stack->frames[depth].identity = identity;
	if ((cookie & COOKIE_CAPTURE) && stack->sampled)
		capture_entry(ctx, cookie & COOKIE_PROBE_ID_MASK, stack->frames[depth].span_id);
}

/* A probed call returns: its frame comes off the stack and, sampled, becomes a span_record. */
static __always_inline void leave(struct pt_regs *ctx, __u64 cookie, __u64 now, __u64 identity)
{
	__u32 probe_id = cookie & COOKIE_PROBE_ID_MASK;
	struct stack_key key = stack_key_of(ctx, cookie);
	struct call_stack *stack = call_stacks.lookup(&key);
	if (!stack || stack->depth == 0) {
		count(cookie & COOKIE_FILTER ? COUNTER_FILTERED_UNPAIRED : COUNTER_UNMATCHED_RETURN);
		return;
	}
	__u32 depth = stack->depth - 1;
	stack->depth = depth;
	if (depth >= MAX_DEPTH)
		return;
	if ((cookie & COOKIE_FILTER) &&
	    (stack->frames[depth].probe_id != probe_id || stack->frames[depth].identity != identity)) {
		/* Only the innermost call can be this one: the return of a call whose entry was not reported must
		 * not end an outer call of the same probe. */
		stack->depth = depth + 1;
		count(COUNTER_FILTERED_UNPAIRED);
		return;
	}
	if (stack->frames[depth].probe_id != probe_id) {
		count(COUNTER_UNMATCHED_RETURN);
		int found = find_frame(stack, depth, probe_id);
		if (found < 0) {
			stack->depth = depth + 1; /* not ours: our entry was never seen */
			return;
		}
		depth = found;
		stack->depth = depth;
	}
	asm volatile("" : "+r"(depth));
	if (depth >= MAX_DEPTH)
		return;
	struct frame *frame = &stack->frames[depth];

	__u64 duration = now - frame->start_ns;
	record_latency(probe_id, duration);
	if (!stack->sampled || (duration < MIN_DURATION_NS && !frame->child_emitted))
		return;

	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return; /* a process outside the tracer's PID namespace: invisible to it */

	if (cookie & COOKIE_CAPTURE)
		capture_result(ctx, probe_id, frame->span_id, ns.tgid);
	struct span_record *span = spans.ringbuf_reserve(sizeof(struct span_record));
	if (!span) {
		count(COUNTER_SPANS_LOST);
		return;
	}
	span->start_ns = frame->start_ns;
	span->end_ns = now;
	span->trace_id[0] = stack->trace_id[0];
	span->trace_id[1] = stack->trace_id[1];
	span->span_id = frame->span_id;
	struct frame *parent = parent_frame(stack, depth);
	span->parent_span_id = parent ? parent->span_id : stack->root_parent;
	span->flags = parent ? 0 : stack->root_flags;
	if (parent)
		parent->child_emitted = 1;
	span->goroutine_id = stack->goroutine_id;
	span->probe_id = probe_id;
	span->pid = ns.tgid;
	span->tid = ns.pid;
	span->process_seq = stack->process_seq;
	span->depth = depth;
	/* No wake-up per span: the consumer polls on a short timer, and a wake-up costs the traced call more
	 * than the whole ring buffer write. But every SPAN_WAKE_EVERY ids of a stack, one: in a burst the ring
	 * is read long before a poll period could fill it, and idle tracing costs no wake-ups. */
	__u64 wake = BPF_RB_NO_WAKEUP;
	if ((stack->ids & (SPAN_WAKE_EVERY - 1)) == 0) {
		wake = BPF_RB_FORCE_WAKEUP;
		count(COUNTER_WAKEUPS);
	}
	spans.ringbuf_submit(span, wake);
}

/* Whether a call goes on to its entry or return: always, but for filtered probes (COOKIE_FILTER) only the calls
 * their filter keeps, `identity` then the name that pairs an entry with its return. */
static __always_inline int kept(struct pt_regs *ctx, __u64 cookie, int at_entry, __u64 *identity)
{
	*identity = 0;
	if (!(cookie & COOKIE_FILTER))
		return 1;
	*identity = passes_filter(ctx, cookie & COOKIE_PROBE_ID_MASK, at_entry);
	return *identity != 0;
}

int otel_entry(struct pt_regs *ctx)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 cookie = bpf_get_attach_cookie(ctx);
	if (cookie & (COOKIE_PROCESS_START | COOKIE_TLS | COOKIE_GO_HOOK)) {
#ifdef HTTP_TRACING
		if (cookie & COOKIE_TLS) {
			tls_entry(ctx, cookie);
			return 0;
		}
		if (cookie & COOKIE_GO_HOOK) {
			go_hook_entry(ctx, cookie & COOKIE_PROBE_ID_MASK);
			return 0;
		}
#endif
		watch_current(); /* the executable starts: follow the process from here on */
		return 0;
	}
	__u64 identity;
	if (!kept(ctx, cookie, 1, &identity))
		return 0;
	enter(ctx, cookie, now, identity);
	if (cookie & COOKIE_INSTANT)
		leave(ctx, cookie, now, identity);
	return 0;
}

int otel_return(struct pt_regs *ctx)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 cookie = bpf_get_attach_cookie(ctx);
#ifdef HTTP_TRACING
	if (cookie & COOKIE_TLS) {
		tls_return(ctx);
		return 0;
	}
	if (cookie & COOKIE_GO_HOOK) {
		spawn_return(ctx); /* only newproc1 has return probes */
		return 0;
	}
#endif
	__u64 identity;
	if (!kept(ctx, cookie, 0, &identity))
		return 0;
	leave(ctx, cookie, now, identity);
	return 0;
}
