/* HTTP/1.x SERVER spans from syscall tracepoints, part of otel_ebpf.bpf.c when HTTP_TRACING is set.
 *
 * What a descriptor is comes from the syscalls themselves (never from kernel structs, whose layout changes
 * between kernels): accept makes a socket, with its peer's address, dup copies it, close and open forget
 * it. On those sockets of watched processes a read that starts with an HTTP method begins a request; its
 * reads and the writes of its response go to user space, which parses the one and finds where the other
 * ends (RFC 9112). Requests are kept per connection: an event loop that reads B before answering A keeps
 * both. A thread serves the request it last read, until it has written some of the response and then
 * waits for events or reads again, or the connection closes; probed calls there are its children.
 *
 * A connection whose first read is HTTP/2's client preface has its reads and writes handed over whole (as far
 * as HTTP2_CAPTURE goes) for user space to follow its frames. A socket the process connects carries outbound
 * requests: a write that starts like one begins a CLIENT span, the child of the thread's (Go: goroutine's)
 * innermost probed call in flight (current_context), and the reads of its response go to user space like a
 * server's writes; one whose first write is the preface is followed as HTTP/2, each write with that context.
 *
 * The LRU maps' entries are put in and taken out through the helpers below, which count both: user space
 * tells from the counts what was pushed out to make room. */

#define AF_INET_FAMILY 2
#define AF_INET6_FAMILY 10
#define F_DUPFD_CMD 0
#define F_DUPFD_CLOEXEC_CMD 1030
#define CLOSE_RANGE_CLOEXEC_FLAG 4
#define EINPROGRESS_ERRNO 115
#define TCP_ESTABLISHED_STATE 1
#define TCP_SYN_RECV_STATE 3
#define IPPROTO_TCP_NUMBER 6
/* Descriptors a close_range or a process's exit looks at for sockets, from the lowest: servers' numbers are
 * dense (beyond, the LRU pushes stale ones out). */
#define SWEPT_FDS 4096
/* Of a writev's iovecs, how many are looked at to find the last bytes it wrote. */
#define TAIL_IOVECS 8
/* Of a read's or write's iovecs on an HTTP/2 connection, how many are copied from (gRPC writes a slice per
 * frame header, header block and message). */
#define HTTP2_IOVECS 64
/* Reads shorter than this are held for the next one (a power of two). */
#define HELD_BYTES 4
#define HTTP2_PREFACE_HEAD 0x20495250 /* "PRI ", the start of "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" */

struct user_iovec {
	__u64 base;
	__u64 len;
};

/* The result of an insert into a counted LRU map: 0 (a new entry) is counted in `slot`; else the caller updates
 * the entry that is there. */
static __always_inline int exists(int inserted, __u32 slot)
{
	if (!inserted)
		count(slot);
	return inserted;
}

/* The result of a delete from a counted LRU map: 0 (an entry went) is counted in `slot`. */
static __always_inline void removed(int deleted, __u32 slot)
{
	if (!deleted)
		count(slot);
}

static __always_inline void keep_socket(struct connection_key *conn, struct socket_info *sock)
{
	if (exists(sockets.insert(conn, sock), COUNTER_SOCKETS_ADDED)) {
		sockets.update(conn, sock);
		return;
	}
	__u32 limit = conn->fd + 1;
	__u32 *known = socket_fd_limits.lookup(&conn->tgid);
	if (!known || *known < limit)
		socket_fd_limits.update(&conn->tgid, &limit);
}

static __always_inline void forget_socket(struct connection_key *conn)
{
	removed(sockets.delete(conn), COUNTER_SOCKETS_REMOVED);
}

static __always_inline void keep_request(struct connection_key *conn, struct request_context *request)
{
	if (exists(requests.insert(conn, request), COUNTER_REQUESTS_ADDED))
		requests.update(conn, request);
}

static __always_inline void forget_request(struct connection_key *conn)
{
	removed(requests.delete(conn), COUNTER_REQUESTS_REMOVED);
}

static __always_inline void serve_request(__u64 *thread, struct request_context *request)
{
	if (exists(thread_requests.insert(thread, request), COUNTER_THREAD_REQUESTS_ADDED))
		thread_requests.update(thread, request);
}

static __always_inline void stop_serving(__u64 *thread)
{
	removed(thread_requests.delete(thread), COUNTER_THREAD_REQUESTS_REMOVED);
}

/* Where a goroutine's calls start (goroutine_requests). */
static __always_inline void start_goroutine_from(struct stack_key *goroutine, struct request_context *context)
{
	if (exists(goroutine_requests.insert(goroutine, context), COUNTER_GOROUTINE_REQUESTS_ADDED))
		goroutine_requests.update(goroutine, context);
}

static __always_inline void forget_goroutine(struct stack_key *goroutine)
{
	removed(goroutine_requests.delete(goroutine), COUNTER_GOROUTINE_REQUESTS_REMOVED);
}

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

/* A syscall on socket `fd` made inside an OpenSSL call carries ciphertext: its plaintext is read at the call's
 * return (tls.bpf.c). It tells which socket the SSL object uses. */
static __always_inline int inside_tls_call(__u64 id, int fd)
{
	struct tls_call *call = tls_calls.lookup(&id);
	if (!call)
		return 0;
	if (call->fd != fd) {
		call->fd = fd;
		struct tls_key key = {.ssl = call->ssl, .tgid = id >> 32};
		tls_sockets.update(&key, &fd);
	}
	return 1;
}

static __always_inline void remember_io(int fd, const void *buf, __u32 op)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io = {.buf = (__u64)buf, .fd = fd, .op = op};
	pending_io.update(&id, &io);
}

/* The socket `fd` of process `tgid` if otel-ebpf saw it accepted or connected there or in the parent it was
 * forked from. */
static __always_inline struct socket_info *known_socket(__u32 tgid, int fd, struct process_info *info)
{
	struct connection_key conn = {.tgid = tgid, .fd = fd};
	struct socket_info *sock = sockets.lookup(&conn);
	if (sock && sock->process_seq != info->seq && sock->process_seq != info->parent_seq)
		return NULL; /* a descriptor of the program before an exec */
	return sock;
}

/* A thread that wrote part of its request's response and now reads a connection or waits for events again is
 * done with it (a file it reads meanwhile may be the rest of the response). */
static __always_inline void leave_answered_request(__u64 id)
{
	struct request_context *serving = thread_requests.lookup(&id);
	if (serving && serving->writes)
		stop_serving(&id);
}

/* A thread waits for events: done with an answered request; and a forked server worker, which waits long
 * before its first connection, is announced now, so that its OpenSSL uprobes are there for that connection. */
static __always_inline void on_wait(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	leave_answered_request(id);
	__u32 tgid = id >> 32;
	struct process_info *info = current_process(tgid);
	if (info)
		announce_fork(tgid, info);
}

static __always_inline void remember_read(int fd, const void *buf, __u32 op)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct process_info *info = current_process(tgid);
	if (!info)
		return;
	announce_fork(tgid, info);
	if (!known_socket(tgid, fd, info))
		return;
	leave_answered_request(id);
	if (!inside_tls_call(id, fd))
		remember_io(fd, buf, op);
}

/* Writes are kept only on connections with a request in flight, HTTP/2 connections and connected sockets. */
static __always_inline void remember_write(int fd, const void *buf, __u32 op)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct connection_key conn = {.tgid = id >> 32, .fd = fd};
	if (!requests.lookup(&conn)) {
		struct socket_info *sock = sockets.lookup(&conn);
		if (!sock || sock->protocol == SOCKET_HTTP1)
			return;
	}
	remember_io(fd, buf, inside_tls_call(id, fd) ? IO_TLS_WRITE : op);
}

/* The arguments remembered at the syscall's entry, if they are of one of ops [first, last]: each serves one
 * exit. */
static __always_inline int take_pending(__u64 id, __u32 first, __u32 last, struct pending_io *io)
{
	struct pending_io *pending = pending_io.lookup(&id);
	if (!pending)
		return 0;
	*io = *pending;
	pending_io.delete(&id);
	return io->op >= first && io->op <= last;
}

/* Where the first bytes of the data are, and how many: a buffer, or the first of an iovec array. */
static __always_inline __u64 first_buffer(struct pending_io *io, long ret, __u64 *length)
{
	__u64 vec = io->buf;
	*length = ret;
	if (io->op == IO_READ || io->op == IO_WRITE)
		return io->buf;
	if (io->op == IO_RECVMSG || io->op == IO_SENDMSG) {
		if (bpf_probe_read_user(&vec, sizeof(vec), (void *)(io->buf + 16))) /* msghdr.msg_iov */
			return 0;
	}
	struct user_iovec iov = {};
	if (bpf_probe_read_user(&iov, sizeof(iov), (void *)vec))
		return 0;
	if (iov.len < *length)
		*length = iov.len;
	return iov.base;
}

/* The last bytes of what the write wrote (or the read read), `ret` bytes from its buffer or across its iovecs. */
static __always_inline __u32 read_tail(struct pending_io *io, __u64 ret, __u8 *tail)
{
	__u64 end = 0;
	if (io->op == IO_WRITE || io->op == IO_READ) {
		end = io->buf + ret;
	} else if (io->op == IO_WRITEV || io->op == IO_SENDMSG || io->op == IO_READV || io->op == IO_RECVMSG) {
		__u64 vec = io->buf;
		if ((io->op == IO_SENDMSG || io->op == IO_RECVMSG) &&
		    bpf_probe_read_user(&vec, sizeof(vec), (void *)(io->buf + 16)))
			return 0;
		__u64 left = ret;
		for (int i = 0; i < TAIL_IOVECS; i++) {
			struct user_iovec iov = {};
			if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(vec + i * sizeof(iov))))
				return 0;
			if (left <= iov.len) {
				end = iov.base + left;
				ret = left; /* the tail lies in this buffer */
				break;
			}
			left -= iov.len;
		}
	}
	__u64 n = ret < HTTP_RESPONSE_TAIL ? ret : HTTP_RESPONSE_TAIL;
	asm volatile("" : "+r"(n));
	if (!end || n == 0 || n > HTTP_RESPONSE_TAIL || bpf_probe_read_user(tail, n, (void *)(end - n)))
		return 0;
	return n;
}

/* The g of the goroutine making the current syscall of a Go program: r14 under Go's register ABI, in the user
 * registers the syscall saved. */
static __always_inline __u64 current_goroutine(void)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	__u64 g = 0;
	bpf_probe_read_kernel(&g, sizeof(g), &regs->r14);
	return g;
}

/* The innermost probed call in flight on `stack` (NULL: none), as a context: its trace, sampled, span_id. */
static __always_inline struct frame *innermost_call(struct call_stack *stack, struct request_context *context)
{
	if (!stack || !stack->depth)
		return NULL;
	__u32 top = stack->depth - 1;
	if (top > MAX_DEPTH - 1)
		top = MAX_DEPTH - 1; /* deeper calls are not recorded: the deepest that is */
	asm volatile("" : "+r"(top));
	if (top >= MAX_DEPTH)
		return NULL;
	context->trace_id[0] = stack->trace_id[0];
	context->trace_id[1] = stack->trace_id[1];
	context->sampled = stack->sampled;
	context->span_id = stack->frames[top].span_id;
	return &stack->frames[top];
}

/* runtime.newproc1(fn, callergp, callerpc, ...) begins: remember the creating goroutine (ABIInternal: its
 * second argument is in rbx) and whether the function it starts (fn, a funcval in rax: its first word) begins
 * an HTTP/2 stream's goroutine. The process is a Go program. */
static __always_inline void spawn_entry(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct spawn spawn = {.creator = ctx->bx};
	__u64 function = 0;
	if (!bpf_probe_read_user(&function, sizeof(function), (void *)ctx->ax) && go_stream_starts.lookup(&function))
		spawn.stream_start = 1;
	spawning.update(&id, &spawn);
	__u32 tgid = id >> 32;
	struct process_info *info = processes.lookup(&tgid);
	if (info)
		info->flags |= PROCESS_GO; /* the runtime starts goroutines before main: known before any request */
}

static __always_inline __u32 current_seq(void);

/* The goroutine `child` serves the next stream of HTTP/2 connection `fd`: its calls start a trace of their own
 * under the stream's SERVER span, whose ids user space learns here (and replaces, with a traceparent). */
static __always_inline void start_stream(struct stack_key *child, __u32 fd)
{
	struct request_context stream = {.span_id = random_id(), .fd = fd};
	stream.trace_id[0] = random_id();
	stream.trace_id[1] = random_id();
#ifdef PARENT_BASED
	stream.sampled = 1; /* a traceparent header may decide; user space applies the rule */
#else
	stream.sampled = sample_root(stream.trace_id[1]);
#endif
	start_goroutine_from(child, &stream);
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	struct go_stream_notice *event = notices.ringbuf_reserve(sizeof(struct go_stream_notice));
	if (!event) {
		count(COUNTER_NOTICES_LOST);
		return;
	}
	event->header.kind = NOTICE_GO_STREAM;
	event->header.length = sizeof(*event);
	event->fd = fd;
	event->pid = ns.tgid;
	event->process_seq = current_seq();
	event->sampled = stream.sampled;
	event->ns = bpf_ktime_get_ns();
	event->trace_id[0] = stream.trace_id[0];
	event->trace_id[1] = stream.trace_id[1];
	event->span_id = stream.span_id;
	notices.ringbuf_submit(event, 0);
}

/* runtime.newproc1 returns the new goroutine's g (rax). A stream's goroutine started by a reader of its
 * connection serves that stream; any other goroutine's calls start from the creator's innermost probed call in
 * flight, else from the creator's own start (a request it serves, a call of its creator's). A reader's
 * goroutines read its connection too, as far as anyone knows. */
static __always_inline void spawn_return(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct spawn *spawn = spawning.lookup(&id);
	if (!spawn)
		return;
	struct stack_key parent = {.goroutine = spawn->creator, .tgid = id >> 32};
	struct stack_key child = {.goroutine = ctx->ax, .tgid = id >> 32};
	__u32 stream_start = spawn->stream_start;
	spawning.delete(&id);
	__u32 *reader = h2_readers.lookup(&parent);
	if (reader) {
		__u32 fd = *reader;
		if (exists(h2_readers.insert(&child, &fd), COUNTER_H2_READERS_ADDED))
			h2_readers.update(&child, &fd);
		if (stream_start) {
			start_stream(&child, fd);
			return;
		}
	} else {
		removed(h2_readers.delete(&child), COUNTER_H2_READERS_REMOVED);
	}
	struct request_context context = {};
	struct request_context *inherited = goroutine_requests.lookup(&parent);
	if (!innermost_call(call_stacks.lookup(&parent), &context)) {
		if (!inherited) {
			forget_goroutine(&child);
			return;
		}
		context = *inherited;
		context.goroutine = 0; /* not the one that read it: the connection's close leaves this one */
	}
	start_goroutine_from(&child, &context);
}

/* Whose calls a syscall of the current thread makes: the thread's, or in a Go program its goroutine's. */
static __always_inline struct stack_key syscall_key(__u64 id, struct process_info *info)
{
	struct stack_key key = {.goroutine = 0, .tgid = id >> 32, .tid = (__u32)id};
	if (info && info->flags & PROCESS_GO) {
		key.goroutine = current_goroutine();
		key.tid = 0;
	}
	return key;
}

/* The span something `key`'s thread or goroutine starts now is a child of, in `context` (its trace, sampled)
 * and *parent: the innermost probed call in flight (which must then be emitted, whatever its duration), else
 * the request it serves (Go: the goroutine's), else the process's TRACEPARENT. 0 when there is none. */
static __always_inline int current_context(struct stack_key *key, struct request_context *context, __u64 *parent)
{
	__u64 own = context->span_id;
	struct frame *call = innermost_call(call_stacks.lookup(key), context);
	if (call) {
		*parent = context->span_id;
		context->span_id = own;
		call->child_emitted = 1;
		return 1;
	}
	__u64 thread = (__u64)key->tgid << 32 | key->tid;
	struct request_context *serving = key->goroutine ? goroutine_requests.lookup(key) : thread_requests.lookup(&thread);
	if (serving) {
		context->trace_id[0] = serving->trace_id[0];
		context->trace_id[1] = serving->trace_id[1];
		context->sampled = serving->sampled;
		*parent = serving->span_id;
		return 1;
	}
	struct process_info *info = processes.lookup(&key->tgid);
	if (info && info->flags & PROCESS_HAS_PARENT) {
		context->trace_id[0] = info->trace_id[0];
		context->trace_id[1] = info->trace_id[1];
		context->sampled = !!(info->flags & PROCESS_PARENT_SAMPLED);
		*parent = info->span_id;
		return 1;
	}
	return 0;
}

/* The context of an outbound request the current thread writes now (as current_context), in `context` and
 * *parent: in Go, the one its caller had when it handed the request to this goroutine (go_writers), if it did;
 * 0 when there is none. */
static __always_inline int outbound_context(__u64 id, struct request_context *context, __u64 *parent)
{
	__u32 tgid = id >> 32;
	struct stack_key key = syscall_key(id, processes.lookup(&tgid));
	struct request_context *handed = key.goroutine ? go_writers.lookup(&key) : NULL;
	if (handed) {
		int known = handed->trace_id[0] || handed->trace_id[1];
		context->trace_id[0] = handed->trace_id[0];
		context->trace_id[1] = handed->trace_id[1];
		context->sampled = handed->sampled;
		*parent = handed->span_id;
		removed(go_writers.delete(&key), COUNTER_GO_WRITERS_REMOVED);
		return known;
	}
	return current_context(&key, context, parent);
}

/* Go's net/http client: (*Transport).roundTrip(req) begins in the caller's goroutine (ABIInternal: the receiver
 * in rax, req in rbx), which hands the request to the connection's writing goroutine: what its CLIENT span is a
 * child of is known only here. Kept by request (zeros: none) for that goroutine's (*Request).write. */
static __always_inline void round_trip_entry(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stack_key caller = {.goroutine = ctx->r14, .tgid = id >> 32};
	struct request_context context = {};
	__u64 parent = 0;
	if (current_context(&caller, &context, &parent))
		context.span_id = parent;
	else
		__builtin_memset(&context, 0, sizeof(context));
	struct go_request_key request = {.request = ctx->bx, .tgid = id >> 32};
	if (exists(go_requests.insert(&request, &context), COUNTER_GO_REQUESTS_ADDED))
		go_requests.update(&request, &context);
}

/* (*Request).write(w, ...) begins (the request in rax): the goroutine writes a request; if roundTrip handed it
 * over, the writes to come take the caller's context. */
static __always_inline void request_write_entry(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct go_request_key request = {.request = ctx->ax, .tgid = id >> 32};
	struct request_context *context = go_requests.lookup(&request);
	if (!context)
		return;
	struct stack_key writer = {.goroutine = ctx->r14, .tgid = id >> 32};
	if (exists(go_writers.insert(&writer, context), COUNTER_GO_WRITERS_ADDED))
		go_writers.update(&writer, context);
	removed(go_requests.delete(&request), COUNTER_GO_REQUESTS_REMOVED);
}

static __always_inline void go_hook_entry(struct pt_regs *ctx, __u32 hook)
{
	if (hook == GO_HOOK_NEWPROC)
		spawn_entry(ctx);
	else if (hook == GO_HOOK_ROUND_TRIP)
		round_trip_entry(ctx);
	else if (hook == GO_HOOK_REQUEST_WRITE)
		request_write_entry(ctx);
}

/* The first bytes of a request at `buf` (`length` of them there), as many as a notice keeps: how many. */
static __always_inline __u32 copy_request_head(__u8 *data, __u64 buf, __u64 length)
{
	__u32 n = length < HTTP_REQUEST_CAPTURE ? length : HTTP_REQUEST_CAPTURE;
	asm volatile("" : "+r"(n));
	if (n > HTTP_REQUEST_CAPTURE)
		n = HTTP_REQUEST_CAPTURE;
	return bpf_probe_read_user(data, n, (void *)buf) ? 0 : n;
}

/* The process_seq of the current process, 0 if it is not followed. */
static __always_inline __u32 current_seq(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct process_info *info = processes.lookup(&tgid);
	return info ? info->seq : 0;
}

/* `held`: bytes of the socket's previous read that begin the request (socket_info.held). */
static __always_inline void send_request_notice(struct request_context *request, struct socket_info *sock,
						__u64 buf, __u64 length, __u32 read, __u16 flags, __u32 held)
{
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	struct http_request_notice *event = notices.ringbuf_reserve(sizeof(struct http_request_notice));
	if (!event) {
		count(COUNTER_NOTICES_LOST);
		return;
	}
	__u32 n = copy_request_head(event->data, buf, length);
	event->header.kind = NOTICE_HTTP_REQUEST;
	event->header.length = sizeof(*event);
	event->fd = request->fd;
	event->start_ns = bpf_ktime_get_ns();
	event->trace_id[0] = request->trace_id[0];
	event->trace_id[1] = request->trace_id[1];
	event->span_id = request->span_id;
	event->pid = ns.tgid;
	event->tid = ns.pid;
	event->length = n;
	event->sampled = request->sampled;
	event->read = read;
	event->flags = flags;
	event->family = sock->family;
	event->peer_port = sock->peer.port;
	__builtin_memcpy(event->peer_addr, sock->peer.addr, sizeof(event->peer_addr));
	event->local_port = sock->local.port;
	__builtin_memcpy(event->local_addr, sock->local.addr, sizeof(event->local_addr));
	event->held_length = held;
	__u32 held_bytes = held ? sock->held : 0;
	__builtin_memcpy(event->held, &held_bytes, sizeof(event->held));
	event->process_seq = current_seq();
	notices.ringbuf_submit(event, 0);
}

/* The iovec array of a readv/writev, recvmsg/sendmsg (0: io->buf is the data itself). */
static __always_inline __u64 iovecs(struct pending_io *io)
{
	__u64 vec = io->buf;
	if (io->op == IO_READ || io->op == IO_WRITE)
		return 0;
	if ((io->op == IO_RECVMSG || io->op == IO_SENDMSG) &&
	    bpf_probe_read_user(&vec, sizeof(vec), (void *)(io->buf + 16))) /* msghdr.msg_iov */
		return 0;
	return vec;
}

/* A read or write of `ret` bytes on an HTTP/2 connection: its first HTTP2_CAPTURE bytes, gathered across
 * iovecs, to user space. */
static __always_inline void send_http2_notice(struct socket_info *sock, struct pending_io *io, __u64 ret,
					      __u16 direction, __u16 flags, __u64 ns)
{
	__u32 zero = 0;
	struct http2_scratch *scratch = http2_scratch.lookup(&zero);
	struct bpf_pidns_info ns_ids = {};
	if (!scratch || visible_ids(&ns_ids))
		return;
	struct http2_notice *event = &scratch->notice;
	__u64 vec = iovecs(io);
	__u64 limit = ret < HTTP2_CAPTURE ? ret : HTTP2_CAPTURE;
	if (io->op == IO_SENDFILE)
		limit = 0; /* file data (a DATA payload): counted, not read */
	asm volatile("" : "+r"(limit));
	if (limit > HTTP2_CAPTURE)
		limit = HTTP2_CAPTURE;
	__u32 captured = 0;
	if (!vec) {
		if (!bpf_probe_read_user(event->data, limit, (void *)io->buf))
			captured = limit;
	}
	/* Few branches per iteration: the verifier walks each iteration's paths. `at` and `take` are masked for
	 * it (at < HTTP2_CAPTURE, take < 2 * HTTP2_CAPTURE: within data and spill); they are already smaller. */
#pragma clang loop unroll(disable)
	for (int i = 0; vec && i < HTTP2_IOVECS; i++) {
		struct user_iovec iov;
		if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(vec + i * sizeof(iov))))
			break;
		__u32 at = captured;
		asm volatile("" : "+r"(at));
		at &= HTTP2_CAPTURE - 1;
		__u64 take = limit - at;
		if (iov.len < take)
			take = iov.len;
		asm volatile("" : "+r"(take));
		take &= 2 * HTTP2_CAPTURE - 1;
		if (bpf_probe_read_user(event->data + at, take, (void *)iov.base))
			break;
		captured = at + take;
		if (captured >= limit)
			break;
	}
	event->trace_id[0] = 0;
	event->trace_id[1] = 0;
	event->parent_span_id = 0;
	event->sampled = 0;
	event->pad2 = 0;
	if (sock->protocol == SOCKET_HTTP2_CLIENT) {
		flags |= HTTP2_OUTBOUND;
		struct request_context context = {};
		__u64 parent = 0;
		if (direction == HTTP2_SENT && outbound_context(bpf_get_current_pid_tgid(), &context, &parent)) {
			event->trace_id[0] = context.trace_id[0];
			event->trace_id[1] = context.trace_id[1];
			event->parent_span_id = parent;
			event->sampled = context.sampled;
		}
	}
	event->header.kind = NOTICE_HTTP2;
	event->fd = io->fd;
	event->pid = ns_ids.tgid;
	event->tid = ns_ids.pid;
	event->process_seq = current_seq();
	event->ns = ns;
	event->length = ret;
	event->direction = direction;
	event->flags = flags;
	event->family = sock->family;
	event->peer_port = sock->peer.port;
	event->local_port = sock->local.port;
	__builtin_memcpy(event->peer_addr, sock->peer.addr, sizeof(event->peer_addr));
	__builtin_memcpy(event->local_addr, sock->local.addr, sizeof(event->local_addr));
	__u32 size = offsetof(struct http2_notice, data) + (captured < limit ? captured : limit);
	asm volatile("" : "+r"(size));
	if (size > sizeof(*event))
		size = sizeof(*event);
	event->captured = size - offsetof(struct http2_notice, data);
	event->header.length = size;
	if (notices.ringbuf_output(event, size, 0))
		count(COUNTER_NOTICES_LOST);
}

/* A goroutine of a Go program read HTTP/2 server connection `fd`: the stream goroutines it starts serve its
 * streams. */
static __always_inline void note_h2_reader(__u64 id, struct process_info *info, __u32 fd)
{
	if (!(info->flags & PROCESS_GO))
		return;
	struct stack_key reader = syscall_key(id, info);
	if (exists(h2_readers.insert(&reader, &fd), COUNTER_H2_READERS_ADDED))
		h2_readers.update(&reader, &fd);
}

static __always_inline void response_read(__u64 id, struct pending_io *io, __u64 ret);

/* `ret` bytes came in on descriptor io->fd (from the socket, or in plaintext from SSL_read): the start of a
 * request, more of one, HTTP/2 frames, or nothing of HTTP. */
static __always_inline void read_request(__u64 id, struct pending_io *io, __u64 ret, __u16 flags)
{
	__u32 tgid = id >> 32;
	struct process_info *info = processes.lookup(&tgid);
	if (!info)
		return;
	int fd = io->fd;
	struct socket_info *sock = known_socket(tgid, fd, info);
	if (!sock)
		return;
	if (sock->protocol == SOCKET_CLIENT) {
		response_read(id, io, ret);
		return;
	}
	if (sock->protocol == SOCKET_HTTP2 || sock->protocol == SOCKET_HTTP2_CLIENT) {
		send_http2_notice(sock, io, ret, HTTP2_RECEIVED, flags, bpf_ktime_get_ns());
		if (sock->protocol == SOCKET_HTTP2)
			note_h2_reader(id, info, fd);
		return;
	}
	__u64 length;
	__u64 buf = first_buffer(io, ret, &length);
	if (!buf)
		return;
	struct connection_key conn = {.tgid = tgid, .fd = fd};
	struct request_context *request = requests.lookup(&conn);
	if (request && !request->writes) {
		/* More of a request not yet answered: the rest of its header section, or its body. */
		if (request->reads < HTTP_REQUEST_READS)
			send_request_notice(request, sock, buf, length, request->reads++, flags, 0);
		return;
	}
	/* A read of a few bytes may be the start of the next request: Go's server reads one byte in the background
	 * once it answered, to see the client go. Held, they join the next read. */
	__u32 held = sock->held_length;
	sock->held_length = 0;
	if (!held && length < HELD_BYTES) {
		sock->held = 0;
		if (!bpf_probe_read_user(&sock->held, length & (HELD_BYTES - 1), (void *)buf))
			sock->held_length = length;
		return;
	}
	__u32 head = 0;
	if (bpf_probe_read_user(&head, sizeof(head), (void *)buf))
		return;
	if (held) /* little-endian: the held bytes first, then this read's */
		head = sock->held | head << (8 * (held & (HELD_BYTES - 1)));
	if (head == HTTP2_PREFACE_HEAD && !held) { /* net/http reads "PRI * HTTP/2.0" alone (14 bytes) first */
		sock->protocol = SOCKET_HTTP2;
		send_http2_notice(sock, io, ret, HTTP2_RECEIVED, flags, bpf_ktime_get_ns());
		note_h2_reader(id, info, fd);
		return;
	}
	/* the shortest request line, "GET / HTTP/1.1\n", is 15 bytes */
	if (length + held < 16 || !starts_like_http(head))
		return;
	struct request_context fresh = {.span_id = random_id(), .thread = id, .fd = fd, .reads = 1};
	fresh.trace_id[0] = random_id();
	fresh.trace_id[1] = random_id();
#ifdef PARENT_BASED
	fresh.sampled = 1; /* a traceparent header may decide; user space applies the rule */
#else
	fresh.sampled = sample_root(fresh.trace_id[1]);
#endif
	if (info->flags & PROCESS_GO)
		fresh.goroutine = current_goroutine();
	send_request_notice(&fresh, sock, buf, length, 0, flags, held);
	keep_request(&conn, &fresh);
	if (fresh.goroutine) {
		struct stack_key serving = {.goroutine = fresh.goroutine, .tgid = tgid};
		start_goroutine_from(&serving, &fresh);
	}
	serve_request(&id, &fresh);
}

static __always_inline void on_read(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io;
	if (!take_pending(id, IO_READ, IO_RECVMSG, &io) || ret <= 0)
		return;
	read_request(id, &io, ret, 0);
}

/* A response write (data: its first bytes and last bytes), or the close of the connection (closed). */
static __always_inline void send_response_notice(struct request_context *request, struct pending_io *io,
						 long ret, int closed, __u64 end_ns)
{
	struct bpf_pidns_info ns = {};
	visible_ids(&ns);
	int head = !closed && io->op != IO_SENDFILE && request->writes < HTTP_RESPONSE_HEAD_WRITES;
	struct http_response_notice *event;
	if (head)
		event = notices.ringbuf_reserve(sizeof(struct http_response_notice));
	else
		event = notices.ringbuf_reserve(offsetof(struct http_response_notice, data));
	if (!event) {
		count(COUNTER_NOTICES_LOST);
		return;
	}
	event->header.kind = NOTICE_HTTP_RESPONSE;
	event->header.length = head ? sizeof(*event) : offsetof(struct http_response_notice, data);
	event->fd = request->fd;
	event->end_ns = end_ns;
	event->span_id = request->span_id;
	event->pid = ns.tgid;
	event->tid = ns.pid;
	event->written = closed ? 0 : ret;
	event->write = request->writes;
	event->closed = closed;
	event->length = 0;
	event->tail_length = closed ? 0 : read_tail(io, ret, event->tail);
	if (head) {
		__u64 length;
		__u64 buf = first_buffer(io, ret, &length);
		__u32 n = length < HTTP_RESPONSE_CAPTURE ? length : HTTP_RESPONSE_CAPTURE;
		asm volatile("" : "+r"(n));
		if (n > HTTP_RESPONSE_CAPTURE)
			n = HTTP_RESPONSE_CAPTURE;
		if (buf && n && !bpf_probe_read_user(event->data, n, (void *)buf))
			event->length = n;
	}
	notices.ringbuf_submit(event, 0);
}

/* A write on a connected socket: an outbound request if it starts like one (a CLIENT span), unless the
 * connection's previous request has not had a response read yet (then it is more of that one). */
static __always_inline void request_written(__u64 id, struct socket_info *sock, struct pending_io *io, long ret,
					    __u64 end_ns)
{
	struct connection_key conn = {.tgid = id >> 32, .fd = io->fd};
	struct request_context *previous = client_requests.lookup(&conn);
	if (previous && !previous->writes)
		return;
	__u64 length;
	__u64 buf = first_buffer(io, ret, &length);
	__u32 head = 0;
	if (!buf || length < 16 || bpf_probe_read_user(&head, sizeof(head), (void *)buf))
		return;
	if (head == HTTP2_PREFACE_HEAD) {
		sock->protocol = SOCKET_HTTP2_CLIENT;
		send_http2_notice(sock, io, ret, HTTP2_SENT, io->tls ? HTTP_TLS : 0, end_ns);
		return;
	}
	if (!starts_like_http(head))
		return;
	struct request_context outbound = {.span_id = random_id(), .thread = id, .fd = io->fd};
	__u64 parent = 0;
	if (!outbound_context(id, &outbound, &parent)) {
		outbound.trace_id[0] = random_id();
		outbound.trace_id[1] = random_id();
		outbound.sampled = sample_root(outbound.trace_id[1]);
	}
	if (exists(client_requests.insert(&conn, &outbound), COUNTER_CLIENT_REQUESTS_ADDED))
		client_requests.update(&conn, &outbound);
	struct bpf_pidns_info ns = {};
	if (visible_ids(&ns))
		return;
	struct http_client_notice *event = notices.ringbuf_reserve(sizeof(struct http_client_notice));
	if (!event) {
		count(COUNTER_NOTICES_LOST);
		return;
	}
	__u32 n = copy_request_head(event->data, buf, length);
	event->header.kind = NOTICE_HTTP_CLIENT;
	event->header.length = sizeof(*event);
	event->fd = io->fd;
	event->pid = ns.tgid;
	event->tid = ns.pid;
	event->process_seq = current_seq();
	event->start_ns = end_ns;
	event->trace_id[0] = outbound.trace_id[0];
	event->trace_id[1] = outbound.trace_id[1];
	event->span_id = outbound.span_id;
	event->parent_span_id = parent;
	event->sampled = outbound.sampled;
	event->length = n;
	event->family = sock->family;
	event->peer_port = sock->peer.port;
	event->flags = io->tls ? HTTP_TLS : 0;
	event->pad = 0;
	__builtin_memcpy(event->peer_addr, sock->peer.addr, sizeof(event->peer_addr));
	notices.ringbuf_submit(event, 0);
}

/* A read on a connected socket with an outbound request in flight: part of its response. */
static __always_inline void response_read(__u64 id, struct pending_io *io, __u64 ret)
{
	struct connection_key conn = {.tgid = id >> 32, .fd = io->fd};
	struct request_context *outbound = client_requests.lookup(&conn);
	if (!outbound)
		return;
	send_response_notice(outbound, io, ret, 0, bpf_ktime_get_ns());
	if (outbound->writes < 0xffffffff)
		outbound->writes++;
}

/* A write of `ret` bytes on io->fd (to the socket, or in plaintext to SSL_write), done at end_ns: part of a
 * response, if the connection has a request in flight. */
static __always_inline void write_response(__u64 id, struct pending_io *io, long ret, __u64 end_ns)
{
	struct connection_key conn = {.tgid = id >> 32, .fd = io->fd};
	struct request_context *request = requests.lookup(&conn);
	if (!request) {
		struct socket_info *sock = sockets.lookup(&conn);
		if (sock && (sock->protocol == SOCKET_HTTP2 || sock->protocol == SOCKET_HTTP2_CLIENT))
			send_http2_notice(sock, io, ret, HTTP2_SENT, io->tls ? HTTP_TLS : 0, end_ns);
		else if (sock && sock->protocol == SOCKET_CLIENT)
			request_written(id, sock, io, ret, end_ns);
		return;
	}
	send_response_notice(request, io, ret, 0, end_ns);
	if (request->writes < 0xffffffff)
		request->writes++;
	struct request_context *serving = thread_requests.lookup(&id);
	if (serving && serving->span_id == request->span_id)
		serving->writes = 1;
}

static __always_inline void on_write(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io;
	if (!take_pending(id, IO_WRITE, IO_TLS_WRITE, &io) || ret <= 0)
		return;
	if (io.op != IO_TLS_WRITE) {
		write_response(id, &io, ret, bpf_ktime_get_ns());
		return;
	}
	struct tls_call *call = tls_calls.lookup(&id);
	if (call)
		call->written_ns = bpf_ktime_get_ns();
}

static __always_inline void remember_accept(int fd, const void *peer)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (current_process(tgid))
		remember_io(fd, peer, IO_ACCEPT);
}

/* The local end of a connection just accepted, as its establishment told (passive_opens). */
static __always_inline void find_local_end(struct socket_info *sock)
{
	struct endpoint_key key = {.family = sock->family, .peer = sock->peer};
	struct endpoint *local = passive_opens.lookup(&key);
	if (!local)
		return;
	sock->local = *local;
	passive_opens.delete(&key);
}

/* The peer's address from a sockaddr accept or getpeername filled in; family 0 if it is not IP. */
static __always_inline void read_peer(__u64 sockaddr, struct socket_info *sock)
{
	struct {
		__u16 family;
		__u16 port; /* network byte order */
		__u32 v4_or_flowinfo;
		__u8 v6[16];
	} addr = {};
	if (!sockaddr || bpf_probe_read_user(&addr, sizeof(addr), (void *)sockaddr))
		return;
	if (addr.family == AF_INET_FAMILY) {
		sock->family = AF_INET_FAMILY;
		__builtin_memcpy(sock->peer.addr, &addr.v4_or_flowinfo, 4);
	} else if (addr.family == AF_INET6_FAMILY) {
		sock->family = AF_INET6_FAMILY;
		__builtin_memcpy(sock->peer.addr, addr.v6, 16);
	} else {
		return;
	}
	sock->peer.port = (addr.port >> 8) | (addr.port << 8);
}

/* A TCP connection to this host is established (softirq: no process has it yet): its local end, by its
 * peer's, for the accept that will return it. */
static __always_inline void on_passive_open(__u16 family, __u16 local_port, __u16 peer_port, const __u8 *local4,
					    const __u8 *peer4, const __u8 *local6, const __u8 *peer6)
{
	struct endpoint_key key = {.family = family, .peer = {.port = peer_port}};
	struct endpoint local = {.port = local_port};
	if (family == AF_INET_FAMILY) {
		__builtin_memcpy(key.peer.addr, peer4, 4);
		__builtin_memcpy(local.addr, local4, 4);
	} else if (family == AF_INET6_FAMILY) {
		__builtin_memcpy(key.peer.addr, peer6, 16);
		__builtin_memcpy(local.addr, local6, 16);
	} else {
		return;
	}
	passive_opens.update(&key, &local);
}

/* A connection accepted: a socket whose reads may begin requests, and its peer's address (unless accept was
 * given no sockaddr, or was already waiting when tracing began: then getpeername, if the server calls it). */
static __always_inline void on_accept(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io = {};
	if (!take_pending(id, IO_ACCEPT, IO_ACCEPT, &io))
		io.buf = 0;
	__u32 tgid = id >> 32;
	struct process_info *info = ret < 0 ? NULL : processes.lookup(&tgid);
	if (!info)
		return;
	struct socket_info sock = {.process_seq = info->seq};
	read_peer(io.buf, &sock);
	find_local_end(&sock);
	struct connection_key conn = {.tgid = tgid, .fd = ret};
	keep_socket(&conn, &sock);
}

static __always_inline void remember_peername(int fd, const void *peer)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct connection_key conn = {.tgid = id >> 32, .fd = fd};
	struct socket_info *sock = sockets.lookup(&conn);
	if (sock && !sock->family)
		remember_io(fd, peer, IO_PEERNAME);
}

static __always_inline void on_peername(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io;
	if (!take_pending(id, IO_PEERNAME, IO_PEERNAME, &io) || ret < 0)
		return;
	struct connection_key conn = {.tgid = id >> 32, .fd = io.fd};
	struct socket_info *sock = sockets.lookup(&conn);
	if (sock) {
		read_peer(io.buf, sock);
		find_local_end(sock);
	}
}

static __always_inline void remember_connect(int fd, const void *server)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (current_process(tgid))
		remember_io(fd, server, IO_CONNECT);
}

/* A watched process connected a socket (or began to: a non-blocking connect returns -EINPROGRESS): its writes
 * may begin outbound requests. Only TCP/IP ones are kept. */
static __always_inline void on_connect(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io;
	if (!take_pending(id, IO_CONNECT, IO_CONNECT, &io) || (ret != 0 && ret != -EINPROGRESS_ERRNO))
		return;
	__u32 tgid = id >> 32;
	struct process_info *info = processes.lookup(&tgid);
	if (!info)
		return;
	struct socket_info sock = {.process_seq = info->seq, .protocol = SOCKET_CLIENT};
	read_peer(io.buf, &sock);
	if (!sock.family)
		return;
	struct connection_key conn = {.tgid = tgid, .fd = io.fd};
	keep_socket(&conn, &sock);
}

static __always_inline void remember_dup(__u32 fd)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (current_process(tgid))
		remember_io(fd, NULL, IO_DUP);
}

/* dup and fcntl(F_DUPFD): the new descriptor is whatever the old one is. */
static __always_inline void on_dup(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io;
	if (!take_pending(id, IO_DUP, IO_DUP, &io) || ret < 0 || ret == io.fd)
		return;
	struct connection_key old = {.tgid = id >> 32, .fd = io.fd};
	struct connection_key copy = {.tgid = id >> 32, .fd = ret};
	struct socket_info *sock = sockets.lookup(&old);
	if (sock) {
		struct socket_info same = *sock;
		keep_socket(&copy, &same);
	} else {
		forget_socket(&copy);
	}
}

/* A new file or socket takes a number a socket closed where otel-ebpf could not see it (a closed-on-exec
 * socket, one past SWEPT_FDS in a close_range) may have left behind. */
static __always_inline void on_open(long ret)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (ret < 0 || !processes.lookup(&tgid))
		return;
	struct connection_key conn = {.tgid = tgid, .fd = ret};
	forget_socket(&conn);
}

/* The thread is gone (or exec'd): its request and syscall in progress with it. */
static __always_inline void forget_thread(__u64 id)
{
	stop_serving(&id);
	pending_io.delete(&id);
	tls_calls.delete(&id);
}

/* A thread started while its creator serves a request serves it too. */
static __always_inline void inherit_request(__u32 tgid, __u32 child_tid)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct request_context *serving = thread_requests.lookup(&id);
	if (!serving)
		return;
	struct request_context copy = *serving;
	__u64 child = (__u64)tgid << 32 | child_tid;
	serve_request(&child, &copy);
}

/* Descriptor `fd` of process `tgid` closes: the request on it ends, for user space's sake, and the socket is
 * forgotten. */
static __always_inline void close_connection(__u32 tgid, __u32 fd)
{
	struct connection_key conn = {.tgid = tgid, .fd = fd};
	struct socket_info *sock = sockets.lookup(&conn);
	struct pending_io none = {.fd = fd, .op = IO_SENDFILE};
	if (sock && (sock->protocol == SOCKET_HTTP2 || sock->protocol == SOCKET_HTTP2_CLIENT))
		send_http2_notice(sock, &none, 0, HTTP2_CLOSED, 0, bpf_ktime_get_ns());
	struct request_context *outbound = client_requests.lookup(&conn);
	if (outbound) {
		send_response_notice(outbound, &none, 0, 1, bpf_ktime_get_ns());
		removed(client_requests.delete(&conn), COUNTER_CLIENT_REQUESTS_REMOVED);
	}
	forget_socket(&conn);
	struct request_context *request = requests.lookup(&conn);
	if (!request)
		return;
	if (request->goroutine) {
		struct stack_key serving = {.goroutine = request->goroutine, .tgid = tgid};
		forget_goroutine(&serving);
	}
	send_response_notice(request, &none, 0, 1, bpf_ktime_get_ns());
	struct request_context *serving = thread_requests.lookup(&request->thread);
	if (serving && serving->span_id == request->span_id)
		stop_serving(&request->thread);
	forget_request(&conn);
}

static __always_inline void on_close(int fd)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (processes.lookup(&tgid))
		close_connection(tgid, fd);
}

/* Descriptors [first, last] of process `tgid` close at once: its sockets among them below SWEPT_FDS are
 * forgotten, and user space ends the requests on them. The loop body has one branch, for the verifier's sake
 * (its states grow with iterations times branches): a delete's result (0, or -ENOENT: -2) is counted as
 * (result + 2) / 2. */
static __always_inline void close_connections(__u32 tgid, __u32 first, __u32 last)
{
	__u32 *limit = socket_fd_limits.lookup(&tgid);
	if (!limit || first >= *limit)
		return;
	__u32 end = last < *limit ? last + 1 : *limit;
	__u64 sockets_removed = 0, requests_removed = 0, clients_removed = 0;
	for (__u32 fd = first, n = 0; n < SWEPT_FDS; fd++, n++) {
		if (fd >= end)
			break;
		struct connection_key conn = {.tgid = tgid, .fd = fd};
		sockets_removed += (__u64)(sockets.delete(&conn) + 2) >> 1;
		requests_removed += (__u64)(requests.delete(&conn) + 2) >> 1;
		clients_removed += (__u64)(client_requests.delete(&conn) + 2) >> 1;
	}
	count_n(COUNTER_SOCKETS_REMOVED, sockets_removed);
	count_n(COUNTER_REQUESTS_REMOVED, requests_removed);
	count_n(COUNTER_CLIENT_REQUESTS_REMOVED, clients_removed);
	struct bpf_pidns_info ns = {};
	visible_ids(&ns);
	struct fds_closed_notice *event = notices.ringbuf_reserve(sizeof(struct fds_closed_notice));
	if (!event) {
		count(COUNTER_NOTICES_LOST);
		return;
	}
	event->header.kind = NOTICE_FDS_CLOSED;
	event->header.length = sizeof(*event);
	event->pid = ns.tgid;
	event->first = first;
	event->last = last;
	event->end_ns = bpf_ktime_get_ns();
	notices.ringbuf_submit(event, 0);
}

static __always_inline void on_close_range(__u32 first, __u32 last, __u32 flags)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!(flags & CLOSE_RANGE_CLOEXEC_FLAG) && processes.lookup(&tgid))
		close_connections(tgid, first, last);
}

/* A watched process exits: its sockets close without a close call. */
static __always_inline void close_all_connections(__u32 tgid)
{
	close_connections(tgid, 0, 0xffffffff);
	socket_fd_limits.delete(&tgid);
}
