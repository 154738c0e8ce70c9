/* HTTP/1.x SERVER spans from syscall tracepoints, part of otel_ebpf.bpf.c when HTTP_TRACING is set.
 *
 * On sockets of watched processes only: the first read of a connection that starts with an HTTP method
 * begins a request (its first bytes go to user space, which parses them), and the next write on that
 * connection (or its close) ends it. While a request is in flight, the thread that read it carries its
 * trace context, so probed calls there become children of the SERVER span. */

/* The first four bytes of every HTTP/1.x method user space knows, little-endian. */
static __always_inline int starts_like_http(__u32 head)
{
	switch (head) {
	case 0x20544547: /* "GET " */
	case 0x54534f50: /* "POST" */
	case 0x20545550: /* "PUT " */
	case 0x44414548: /* "HEAD" */
	case 0x454c4544: /* "DELE"TE */
	case 0x43544150: /* "PATC"H */
	case 0x4954504f: /* "OPTI"ONS */
	case 0x4e4e4f43: /* "CONN"ECT */
	case 0x43415254: /* "TRAC"E */
		return 1;
	}
	return 0;
}

/* Reads are kept on watched processes; writes only on connections with a request in flight. */
static __always_inline void remember_read(int fd, const void *buf)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct process_info *info = current_process(tgid);
	if (!info)
		return;
	announce_fork(tgid, info);
	struct pending_io io = {.buf = (__u64)buf, .fd = fd};
	pending_reads.update(&id, &io);
}

static __always_inline void remember_write(int fd, const void *buf)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct connection_key conn = {.tgid = id >> 32, .fd = fd};
	if (!requests.lookup(&conn))
		return;
	struct pending_io io = {.buf = (__u64)buf, .fd = fd};
	pending_writes.update(&id, &io);
}

/* The arguments remembered at the syscall's entry, if any: each serves one exit. */
static __always_inline int take_pending(int write, __u64 id, struct pending_io *io)
{
	struct pending_io *pending = write ? pending_writes.lookup(&id) : pending_reads.lookup(&id);
	if (!pending)
		return 0;
	*io = *pending;
	if (write)
		pending_writes.delete(&id);
	else
		pending_reads.delete(&id);
	return 1;
}

static __always_inline void on_read(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io;
	if (!take_pending(0, id, &io))
		return;
	if (ret < 16) /* the shortest request line, "GET / HTTP/1.1\n", is 15 bytes */
		return;
	struct connection_key conn = {.tgid = id >> 32, .fd = io.fd};
	if (requests.lookup(&conn))
		return; /* more of a request already seen: its body */
	__u32 head = 0;
	if (bpf_probe_read_user(&head, sizeof(head), (void *)io.buf) || !starts_like_http(head))
		return;

	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	struct http_request_notice *event = notices.ringbuf_reserve(sizeof(struct http_request_notice));
	if (!event) {
		count(COUNTER_NOTICES_LOST);
		return;
	}
	struct request_context request = {.span_id = random_id(), .thread = id};
	request.trace_id[0] = random_id();
	request.trace_id[1] = random_id();
#ifdef PARENT_BASED
	request.sampled = 1; /* a traceparent header may decide; user space applies the rule */
#else
	request.sampled = sample_root(request.trace_id[1]);
#endif
	__u32 length = ret < HTTP_REQUEST_CAPTURE ? ret : HTTP_REQUEST_CAPTURE;
	asm volatile("" : "+r"(length));
	if (length > HTTP_REQUEST_CAPTURE)
		length = HTTP_REQUEST_CAPTURE;
	if (bpf_probe_read_user(event->data, length, (void *)io.buf))
		length = 0;
	event->header.kind = NOTICE_HTTP_REQUEST;
	event->header.length = sizeof(*event);
	event->fd = io.fd;
	event->start_ns = bpf_ktime_get_ns();
	event->trace_id[0] = request.trace_id[0];
	event->trace_id[1] = request.trace_id[1];
	event->span_id = request.span_id;
	event->pid = ns.tgid;
	event->tid = ns.pid;
	event->length = length;
	event->sampled = request.sampled;
	__u32 tgid = id >> 32;
	struct process_info *info = processes.lookup(&tgid);
	event->process_seq = info ? info->seq : 0;
	notices.ringbuf_submit(event, 0);
	requests.update(&conn, &request);
	thread_requests.update(&id, &request);
}

/* The end of the request on `fd`: its response (the written bytes), or none when length is 0. */
static __always_inline void finish_request(int fd, const void *buf, long length)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct connection_key conn = {.tgid = id >> 32, .fd = fd};
	struct request_context *request = requests.lookup(&conn);
	if (!request)
		return;
	struct bpf_pidns_info ns = {};
	visible_ids(&ns);
	struct http_response_notice *event = notices.ringbuf_reserve(sizeof(struct http_response_notice));
	if (event) {
		__u32 n = length < HTTP_RESPONSE_CAPTURE ? length : HTTP_RESPONSE_CAPTURE;
		asm volatile("" : "+r"(n));
		if (n > HTTP_RESPONSE_CAPTURE)
			n = HTTP_RESPONSE_CAPTURE;
		if (n && bpf_probe_read_user(event->data, n, buf))
			n = 0;
		event->header.kind = NOTICE_HTTP_RESPONSE;
		event->header.length = sizeof(*event);
		event->fd = fd;
		event->end_ns = bpf_ktime_get_ns();
		event->span_id = request->span_id;
		event->pid = ns.tgid;
		event->tid = ns.pid;
		event->length = n;
		notices.ringbuf_submit(event, 0);
	} else {
		count(COUNTER_NOTICES_LOST);
	}
	thread_requests.delete(&request->thread);
	requests.delete(&conn);
}

static __always_inline void on_write(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io;
	if (!take_pending(1, id, &io))
		return;
	if (ret > 0)
		finish_request(io.fd, (void *)io.buf, ret);
}

/* The thread is gone (or exec'd): its request and syscalls in progress with it. */
static __always_inline void forget_thread(__u64 id)
{
	thread_requests.delete(&id);
	pending_reads.delete(&id);
	pending_writes.delete(&id);
}

/* A descriptor closes: a request still open on it ends without a response. */
static __always_inline void on_close(int fd)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (processes.lookup(&tgid))
		finish_request(fd, NULL, 0);
}
