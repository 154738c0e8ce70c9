/* HTTPS as OpenSSL sees it, part of otel_ebpf.bpf.c when HTTP_TRACING is set: uprobes (COOKIE_TLS, attached in
 * followed processes only) on SSL_read, SSL_write and their _ex variants hand their plaintext to the same
 * request and response capture as socket reads and writes (http.bpf.c). Which socket an SSL object uses comes
 * from SSL_set_fd and from the syscalls made inside its calls (inside_tls_call), which carry ciphertext and
 * are otherwise left alone. */

static __always_inline void tls_entry(struct pt_regs *ctx, __u64 cookie)
{
	__u64 id = bpf_get_current_pid_tgid();
	if ((cookie & COOKIE_PROBE_ID_MASK) == TLS_SET_FD) {
		/* A new connection: the SSL object may sit where a closed connection's did. */
		struct tls_key key = {.ssl = PT_REGS_PARM1(ctx), .tgid = id >> 32};
		__s32 fd = PT_REGS_PARM2(ctx);
		tls_sockets.update(&key, &fd);
		return;
	}
	struct tls_call *call = tls_calls.lookup(&id);
	if (call) {
		call->depth++; /* an OpenSSL call made inside another: the outer one reports */
		return;
	}
	struct tls_call fresh = {.ssl = PT_REGS_PARM1(ctx), .buf = PT_REGS_PARM2(ctx), .out = PT_REGS_PARM4(ctx),
				 .op = cookie & COOKIE_PROBE_ID_MASK, .fd = -1};
	struct tls_key key = {.ssl = fresh.ssl, .tgid = id >> 32};
	__s32 *fd = tls_sockets.lookup(&key);
	if (fd)
		fresh.fd = *fd;
	tls_calls.update(&id, &fresh);
}

static __always_inline void tls_return(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct tls_call *call = tls_calls.lookup(&id);
	if (!call)
		return;
	if (call->depth) {
		call->depth--;
		return;
	}
	struct tls_call done = *call;
	tls_calls.delete(&id);
	int ret = PT_REGS_RC(ctx); /* an int: the upper half of the register is not part of it */
	__u64 bytes = ret > 0 ? ret : 0;
	if (done.op == TLS_READ_EX || done.op == TLS_WRITE_EX) {
		bytes = 0;
		if (ret == 1 && done.out)
			bpf_probe_read_user(&bytes, sizeof(bytes), (void *)done.out);
	}
	if (!bytes || done.fd < 0)
		return;
	struct pending_io io = {.buf = done.buf, .fd = done.fd, .op = done.op == TLS_READ || done.op == TLS_READ_EX ?
				IO_READ : IO_WRITE, .tls = 1};
	if (io.op == IO_READ) {
		read_request(id, &io, bytes, HTTP_TLS);
	} else {
		/* Done when its ciphertext was handed to the socket, as a plain write is at its syscall's exit. */
		write_response(id, &io, bytes, done.written_ns ? done.written_ns : bpf_ktime_get_ns());
	}
}
