/* Helpers every program of otel_ebpf.bpf.c uses: counters, ids, and which processes are followed. */
#ifndef OTEL_EBPF_COMMON_BPF_H
#define OTEL_EBPF_COMMON_BPF_H

static __always_inline void count_n(__u32 slot, __u64 n)
{
	__u64 *total = counters.lookup(&slot);
	if (total)
		*total += n;
}

static __always_inline void count(__u32 slot)
{
	count_n(slot, 1);
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

/* 64 random bits, never 0 (which means "none"). */
/* The TraceIdRatioBased rule on the lower 64 bits of a trace id, read big-endian. */
static __always_inline __u32 sample_root(__u64 trace_id_low)
{
#ifdef SAMPLE_ALL
	return 1;
#else
	return __builtin_bswap64(trace_id_low) < SAMPLE_THRESHOLD;
#endif
}

static __always_inline __u64 random_id(void)
{
	__u64 id = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
	return id ? id : 1;
}

/* A process_seq for a new program: random, so no shared counter is contended for; 0 is user space's. */
static __always_inline __u32 new_process_seq(void)
{
	return bpf_get_prandom_u32() | 1;
}

/* The parent context of a process from what its exec identity says. */
static __always_inline void inherit_identity(struct process_info *info, const struct identity *identity)
{
	if (!(identity->flags & IDENTITY_HAS_PARENT))
		return;
	info->flags |= PROCESS_HAS_PARENT;
	if (identity->flags & IDENTITY_PARENT_SAMPLED)
		info->flags |= PROCESS_PARENT_SAMPLED;
	info->trace_id[0] = identity->parent_trace_id[0];
	info->trace_id[1] = identity->parent_trace_id[1];
	info->span_id = identity->parent_span_id;
}

/* Tell user space about the current process: `notice` is the exec identity (or scratch space), whose
 * header fields are filled in here. With_identity 0 sends the head only. */
static __always_inline void send_process_notice(struct process_notice *notice, __u32 kind, __u32 seq, __u32 cause,
						__u32 parent_pid, __u32 parent_seq, int with_identity)
{
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	__u32 size = with_identity ? sizeof(*notice) : offsetof(struct process_notice, identity);
	notice->header.kind = kind;
	notice->header.length = size;
	notice->pid = ns.tgid;
	notice->process_seq = seq;
	notice->parent_pid = parent_pid;
	notice->parent_seq = parent_seq;
	notice->cause = cause;
	notice->pad = 0;
	if (notices.ringbuf_output(notice, size, 0))
		count(COUNTER_NOTICES_LOST);
}

/* The current process's entry in `processes`, if it is followed. A process user space follows by its pid in a
 * child PID namespace is found by that pid the first time, and moved to the kernel's. */
static __always_inline struct process_info *current_process(__u32 tgid)
{
	struct process_info *info = processes.lookup(&tgid);
#ifdef PIDNS_INO
	__u32 zero = 0;
	__u32 *waiting = pending_follows_count.lookup(&zero);
	if (info || !waiting || !*waiting)
		return info;
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return NULL;
	struct process_info *pending = pending_follows.lookup(&ns.tgid);
	if (!pending)
		return NULL;
	processes.update(&tgid, pending);
	pending_follows.delete(&ns.tgid);
	__sync_fetch_and_add(waiting, -1);
	info = processes.lookup(&tgid);
#endif
	return info;
}

/* A forked child is announced in its own context, the first time one of its events is seen, because only
 * there the kernel tells its pid as the tracer sees it. */
static __always_inline void announce_fork(__u32 tgid, struct process_info *info)
{
	if (!(info->flags & PROCESS_ANNOUNCE))
		return;
	info->flags &= ~PROCESS_ANNOUNCE;
	__u32 zero = 0;
	struct process_notice *notice = notice_scratch.lookup(&zero);
	if (notice)
		send_process_notice(notice, NOTICE_PROCESS, info->seq, PROCESS_CAUSE_FORK, info->parent_pid,
				    info->parent_seq, 0);
}

/* The current process if it is followed, announcing it if it must be. Tracing system-wide (no FOLLOW_ONLY),
 * every process that gets here is followed from now on, announced with the identity its exec left, if any.
 * Two threads arriving at once: the first insert wins, the other uses it. */
static __always_inline struct process_info *watch_current(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct process_info *info = current_process(tgid);
	if (info) {
		announce_fork(tgid, info);
		return info->flags & PROCESS_AWAIT_EXEC ? NULL : info;
	}
#ifdef FOLLOW_ONLY
	return NULL;
#else
	struct process_info fresh = {.seq = new_process_seq()};
	struct process_notice *identity = exec_identities.lookup(&tgid);
	if (identity)
		inherit_identity(&fresh, &identity->identity);
	if (processes.insert(&tgid, &fresh) == 0) {
		if (identity) {
			send_process_notice(identity, NOTICE_PROCESS, fresh.seq, PROCESS_CAUSE_FOUND, 0, 0, 1);
		} else {
			__u32 zero = 0;
			struct process_notice *notice = notice_scratch.lookup(&zero);
			if (notice)
				send_process_notice(notice, NOTICE_PROCESS, fresh.seq, PROCESS_CAUSE_FOUND, 0, 0, 0);
		}
	}
	return processes.lookup(&tgid);
#endif
}

#endif
