/* Process lifecycle from syscall and scheduler tracepoints: which processes are followed, what each was
 * exec'd as, when they end. Nothing here walks kernel structures (the headers BCC compiles against need not
 * be the running kernel's): only what execve was passed and what the tracepoints record. Part of
 * otel_ebpf.bpf.c. */

#define CLONE_THREAD_FLAG 0x00010000 /* linux/sched.h CLONE_THREAD: a thread, not a process */

/* The first 8 bytes of the variables an identity keeps, little-endian ("OTEL_SER"vice_name...). User space
 * checks the whole names; here a cheap first cut. */
#define ENV_OTEL_SER 0x5245535f4c45544fULL
#define ENV_OTEL_RES 0x5345525f4c45544fULL
#define ENV_TRACEPAR 0x5241504543415254ULL
#define ENV_TRACESTA 0x4154534543415254ULL
#define TRACEPARENT_PREFIX 12 /* "TRACEPARENT=" */

/* The arguments of an execve in progress, by pid_tgid: copied at its entry, when they are still readable,
 * and kept as the process's identity when the exec succeeds (sched_process_exec). */
BPF_TABLE("lru_hash", __u64, struct process_notice, exec_pending, 1024);

/* Loop state lives in the map value, not in registers: the verifier then sees the same state whichever way
 * an iteration went, and checks each iteration once instead of once per path that led to it. */
#define STORED(field) (*(volatile __u16 *)&(field))

static __always_inline void copy_arguments(struct identity *identity, const char *const *argv)
{
	STORED(identity->argv_length) = 0;
	for (int i = 0; i < IDENTITY_MAX_ARGS; i++) {
		const char *arg = NULL;
		if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) || !arg)
			break;
		__u32 offset = STORED(identity->argv_length);
		if (offset >= IDENTITY_ARGV / 2) { /* an argument starts in the first half: the longest fits after */
			identity->flags |= IDENTITY_ARGV_CUT;
			break;
		}
		offset &= IDENTITY_ARGV / 2 - 1;
		long n = bpf_probe_read_user_str(&identity->data[IDENTITY_FILENAME + offset], IDENTITY_ARGV / 2, arg);
		if (n <= 0)
			break;
		if (n == IDENTITY_ARGV / 2) {
			identity->flags |= IDENTITY_ARGV_CUT;
			break;
		}
		STORED(identity->argv_length) = offset + n;
	}
}

/* TRACEPARENT, parsed here so that root calls can join the trace without user space. */
static __always_inline void parse_parent(struct identity *identity)
{
	__u32 at = identity->traceparent_at;
	if (!at)
		return;
	at = (at - 1) & (IDENTITY_ENV - IDENTITY_ENV_VALUE - 1);
	__u8 *text = &identity->data[IDENTITY_FILENAME + IDENTITY_ARGV + at];
	if (*(__u32 *)&text[8] != 0x3d544e45 /* "ENT=" after "TRACEPAR" */)
		return;
	__u32 sampled = 0, length = 0;
	for (int i = TRACEPARENT_PREFIX; i < TRACEPARENT_PREFIX + 56 && text[i]; i++)
		length++;
	if (parse_traceparent(&text[TRACEPARENT_PREFIX], length, (__u8 *)identity->parent_trace_id,
			      (__u8 *)&identity->parent_span_id, &sampled)) {
		identity->flags |= IDENTITY_HAS_PARENT;
		if (sampled)
			identity->flags |= IDENTITY_PARENT_SAMPLED;
	}
}

static __always_inline void copy_environment(struct identity *identity, const char *const *envp)
{
	STORED(identity->env_length) = 0;
	STORED(identity->traceparent_at) = 0;
	int i;
	for (i = 0; i < IDENTITY_MAX_ENV; i++) {
		const char *entry = NULL;
		if (bpf_probe_read_user(&entry, sizeof(entry), &envp[i]) || !entry)
			break;
		__u64 head = 0;
		if (bpf_probe_read_user(&head, sizeof(head), entry))
			continue;
		if (head != ENV_OTEL_SER && head != ENV_OTEL_RES && head != ENV_TRACEPAR && head != ENV_TRACESTA)
			continue;
		__u32 offset = STORED(identity->env_length);
		if (offset >= IDENTITY_ENV - IDENTITY_ENV_VALUE) { /* an entry starts in the first half */
			identity->flags |= IDENTITY_ENV_CUT;
			break;
		}
		offset &= IDENTITY_ENV - IDENTITY_ENV_VALUE - 1;
		long n = bpf_probe_read_user_str(&identity->data[IDENTITY_FILENAME + IDENTITY_ARGV + offset],
						 IDENTITY_ENV_VALUE, entry);
		if (n <= 0)
			continue;
		if (n == IDENTITY_ENV_VALUE) { /* cut: half a value would be a wrong one */
			identity->flags |= IDENTITY_ENV_CUT;
			continue;
		}
		if (head == ENV_TRACEPAR)
			STORED(identity->traceparent_at) = offset + 1;
		STORED(identity->env_length) = offset + n;
	}
	if (i == IDENTITY_MAX_ENV)
		identity->flags |= IDENTITY_ENV_CUT;
	parse_parent(identity);
}

static __always_inline void capture_exec(const char *filename, const char *const *argv, const char *const *envp)
{
	__u64 id = bpf_get_current_pid_tgid();
#ifdef FOLLOW_ONLY
	__u32 tgid = id >> 32;
	if (!current_process(tgid))
		return;
#endif
	__u32 zero = 0;
	struct process_notice *notice = notice_scratch.lookup(&zero);
	if (!notice)
		return;
	struct identity *identity = &notice->identity;
	identity->flags = IDENTITY_CAPTURED;
	identity->pad = 0;
	identity->parent_trace_id[0] = identity->parent_trace_id[1] = identity->parent_span_id = 0;
	long n = bpf_probe_read_user_str(identity->data, IDENTITY_FILENAME, filename);
	identity->filename_length = n > 0 ? n - 1 : 0;
	copy_arguments(identity, argv);
	copy_environment(identity, envp);
	exec_pending.update(&id, notice);
}

#ifdef DISCOVER_EXECS
/* Node-wide discovery: user space hears of every exec, to match the program against its path patterns. */
static __always_inline void announce_exec(void)
{
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	struct exec_notice notice = {.header = {.kind = NOTICE_EXEC, .length = sizeof(notice)}, .pid = ns.tgid};
	if (notices.ringbuf_output(&notice, sizeof(notice), 0))
		count(COUNTER_NOTICES_LOST);
}
#endif

/* The exec succeeded: the process is a new program. Its thread is now the group leader (old_pid was its
 * thread id before) and its other threads are gone, so their call stacks go too. */
static __always_inline void on_exec(__u32 old_pid)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	__u64 before = (__u64)tgid << 32 | old_pid;
	struct stack_key key = {.goroutine = 0, .tgid = tgid, .tid = old_pid};
	call_stacks.delete(&key);
	key.tid = tgid;
	call_stacks.delete(&key);
#ifdef HTTP_TRACING
	forget_thread(before);
#endif
#ifdef DISCOVER_EXECS
	announce_exec();
#endif
	struct process_notice *pending = exec_pending.lookup(&before);
	if (!pending)
		return;
	exec_identities.update(&tgid, pending);
	exec_pending.delete(&before);
	struct process_info *info = processes.lookup(&tgid);
	struct process_notice *identity = exec_identities.lookup(&tgid);
	if (!info || !identity)
		return;
#ifndef FOLLOW_ONLY
	/* System-wide, a process is followed for running a probed program: this one may be none. If it is, its
	 * entry point or first probed call follows it again. */
	if (!(info->flags & PROCESS_ANNOUNCE))
		send_process_notice(identity, NOTICE_PROCESS_EXIT, info->seq, 0, 0, 0, 0);
	processes.delete(&tgid);
	return;
#endif
	struct process_info fresh = {.seq = new_process_seq()};
	inherit_identity(&fresh, &identity->identity);
	processes.update(&tgid, &fresh);
	send_process_notice(identity, NOTICE_PROCESS, fresh.seq, PROCESS_CAUSE_EXEC, 0, 0, 1);
	return;
}

/* A failed exec leaves the process as it was. */
static __always_inline void exec_failed(long ret)
{
	if (ret >= 0)
		return;
	__u64 id = bpf_get_current_pid_tgid();
	exec_pending.delete(&id);
}

/* A followed process forks: the child is followed too, from its first instruction, with its parent's
 * identity and trace; it is announced at its first event (announce_fork). */
static __always_inline void on_new_task(__u32 child_pid, __u64 clone_flags)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (clone_flags & CLONE_THREAD_FLAG) {
#ifdef HTTP_TRACING
		inherit_request(tgid, child_pid);
#endif
		return;
	}
	struct process_info *parent = current_process(tgid);
	if (!parent)
		return;
	/* The parent first, here in its own context, if it was never announced (a daemon's forked master that only
	 * forks workers): so that every child names a parent user space knows. */
	announce_fork(tgid, parent);
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	struct process_info child = *parent;
	child.seq = new_process_seq();
	child.flags = (parent->flags & ~PROCESS_ANNOUNCE) | PROCESS_ANNOUNCE;
	child.parent_pid = ns.tgid;
	child.parent_seq = parent->seq;
	processes.update(&child_pid, &child);
	struct process_notice *identity = exec_identities.lookup(&tgid);
	if (identity)
		exec_identities.update(&child_pid, identity);
}

/* A thread that exits inside probed calls never returns from them: forget its stack (and, with HTTP
 * tracing, its request and pending syscalls) now rather than when the LRU gets round to it; tell user
 * space when a followed process ends. Goroutine stacks of an exiting Go process are left to the LRU (they
 * cannot be enumerated here) and to stale_goroutine_stack. */
static __always_inline void on_task_exit(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stack_key key = {.goroutine = 0, .tgid = id >> 32, .tid = (__u32)id};
	call_stacks.delete(&key);
	exec_pending.delete(&id);
#ifdef HTTP_TRACING
	forget_thread(id);
#endif
	if (key.tgid != key.tid)
		return;
	exec_identities.delete(&key.tgid);
	struct process_info *info = processes.lookup(&key.tgid);
	if (!info)
		return;
#ifdef HTTP_TRACING
	close_all_connections(key.tgid);
#endif
	__u32 zero = 0;
	struct process_notice *notice = notice_scratch.lookup(&zero);
	if (notice && !(info->flags & PROCESS_ANNOUNCE))
		send_process_notice(notice, NOTICE_PROCESS_EXIT, info->seq, 0, 0, 0, 0);
	processes.delete(&key.tgid);
}
