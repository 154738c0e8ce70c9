/* The maps of http.bpf.c, each with what it keeps track of. */
#ifndef OTEL_EBPF_HTTP_MAPS_H
#define OTEL_EBPF_HTTP_MAPS_H

/* What a syscall in progress on a thread of a watched process works on, kept from its entry to its exit,
 * where its result is known. Keyed by pid_tgid: a thread is in one syscall at a time. */
enum io_op {
	IO_READ = 1,             /* buf: the buffer (read, recvfrom) */
	IO_READV,                /* buf: the iovec array (readv) */
	IO_RECVMSG,              /* buf: the msghdr (recvmsg) */
	IO_WRITE,                /* write, sendto */
	IO_WRITEV,               /* writev */
	IO_SENDMSG,              /* sendmsg */
	IO_SENDFILE,             /* sendfile, splice: file data, nothing to read */
	IO_TLS_WRITE,            /* a write of ciphertext inside SSL_write: when it returns, the response is out */
	IO_ACCEPT,               /* buf: the peer's sockaddr (accept, accept4) */
	IO_DUP,                  /* fd: the descriptor duplicated (dup, dup2, dup3, fcntl F_DUPFD) */
	IO_PEERNAME,             /* buf: the sockaddr getpeername fills in, for a socket accepted without one */
	IO_CONNECT,              /* buf: the sockaddr connect was given */
};

struct pending_io {
	__u64 buf;
	__u32 fd;
	__u16 op;                /* enum io_op */
	__u16 tls;               /* 1: the plaintext of an OpenSSL call (tls.bpf.c), not a syscall's */
};
BPF_HASH(pending_io, __u64, struct pending_io, MAX_THREADS);

struct connection_key {
	__u32 tgid;
	__u32 fd;
};

/* One end of a TCP connection. */
struct endpoint {
	__u8 addr[16];           /* AF_INET: the first 4 bytes */
	__u16 port;              /* host byte order */
	__u16 pad;
};

/* The accepted sockets of watched processes, with both ends' addresses: only their reads can begin a
 * request. Set at accept's exit, copied by dup, removed at close and close_range, when open or socket reuses
 * the number, and at the process's exit. LRU: a descriptor closed where otel-ebpf cannot see it (past
 * SWEPT_FDS at an exit) cannot stay forever; what the LRU pushes out is counted (COUNTER_SOCKETS_*). */
struct socket_info {
	__u32 process_seq;       /* of the process that accepted it: its forks may serve it too */
	__u16 family;            /* AF_INET, AF_INET6, or 0 when accept was not given a sockaddr */
	__u16 protocol;          /* SOCKET_* */
	struct endpoint peer;
	struct endpoint local;   /* port 0: not known */
	__u32 held;              /* the bytes of a read shorter than HELD_BYTES, for the next read */
	__u32 held_length;
};
BPF_TABLE("lru_hash", struct connection_key, struct socket_info, sockets, MAX_THREADS);

/* socket_info.protocol */
#define SOCKET_HTTP1 0           /* accepted: its reads may begin requests */
#define SOCKET_HTTP2 1           /* accepted, and its first read was HTTP/2's client preface */
#define SOCKET_CLIENT 2          /* connected by the process: its writes may begin outbound requests */
#define SOCKET_HTTP2_CLIENT 3    /* connected, and its first write was HTTP/2's client preface */

/* Where an http2_notice is put together, its data gathered across iovecs (`spill`: what the last copy may write
 * past the end of data, for the verifier's sake). */
struct http2_scratch {
	struct http2_notice notice;
	__u8 spill[2 * HTTP2_CAPTURE];
};
BPF_PERCPU_ARRAY(http2_scratch, struct http2_scratch, 1);

/* One past the highest descriptor number of a socket in `sockets`, per watched process (tgid): what its exit
 * sweeps. */
BPF_HASH(socket_fd_limits, __u32, __u32, MAX_PROCESSES);

/* The local end of every TCP connection the kernel established passively, keyed by the peer's end (struct
 * endpoint_key), from the inet_sock_set_state tracepoint: it fires in softirq, before any process has the
 * connection, so accept picks its socket's local address up here by the peer address it returns. LRU: most
 * connections are other processes'. */
struct endpoint_key {
	__u16 family;
	__u16 pad;
	struct endpoint peer;
};
BPF_TABLE("lru_hash", struct endpoint_key, struct endpoint, passive_opens, MAX_THREADS);

/* The request in flight per connection. LRU, pushing out is counted (COUNTER_REQUESTS_*). */
BPF_TABLE("lru_hash", struct connection_key, struct request_context, requests, MAX_THREADS);

/* The outbound request in flight per connected socket (span_id: of its CLIENT span; writes: reads of its
 * response so far). LRU, what it pushes out is not counted: a response not seen ends the span at the close. */
BPF_TABLE("lru_hash", struct connection_key, struct request_context, client_requests, MAX_THREADS);

/* Where the calls of each goroutine of a Go program start their trace (key: goroutine, tgid, tid 0, as its
 * call stack's): the request it read, which it serves (removed when the connection closes: the goroutine then
 * exits and its g can be reused), or, for a goroutine started while its creator had a probed call in flight or
 * a request, that call (span_id) or request (set, or removed, at every runtime.newproc1: each g is reused
 * through it). Go's calls nest per goroutine, and goroutines move between threads: a thread's request says
 * nothing about them. */
BPF_TABLE("lru_hash", struct stack_key, struct request_context, goroutine_requests, MAX_THREADS);

/* The goroutine calling runtime.newproc1 on each thread (its callergp argument), and whether the goroutine it
 * starts runs a function of go_stream_starts, from its entry to its return, where the new goroutine's g is
 * known. Keyed by pid_tgid: newproc1 runs on the system stack, on one thread. */
struct spawn {
	__u64 creator;
	__u32 stream_start;
	__u32 pad;
};
BPF_HASH(spawning, __u64, struct spawn, MAX_THREADS);

/* Entry addresses of the functions Go's HTTP/2 servers start each stream's goroutine with (gRPC-Go's handler
 * closure, net/http's runHandler), in the Go executables being probed (not position-independent ones: their
 * addresses are the symbols'), set by user space. */
BPF_HASH(go_stream_starts, __u64, __u32, 64);

/* The HTTP/2 server connection each goroutine of a Go program reads (a read of it, the preface's too), or
 * that the goroutine that started it read: gRPC-Go's connection goroutine reads the preface, and the one it
 * starts reads the streams (by the key of its call stack). LRU: goroutines end unseen. */
BPF_TABLE("lru_hash", struct stack_key, __u32, h2_readers, MAX_THREADS);

/* Requests Go's net/http client was given in a goroutine ((*Transport).roundTrip), by the *Request, until the
 * goroutine writing it to the connection takes them ((*Request).write): what their CLIENT spans are children of
 * (span_id: the parent; zeros: none). LRU: a request never written (a dial that failed) cannot stay. */
struct go_request_key {
	__u64 request;
	__u32 tgid;
	__u32 pad;
};
BPF_TABLE("lru_hash", struct go_request_key, struct request_context, go_requests, MAX_THREADS);

/* The goroutine writing a request go_requests had, by its call stack's key, until its write begins the CLIENT
 * span: a connection's writing goroutine serves one caller after another, and its own context is stale. */
BPF_TABLE("lru_hash", struct stack_key, struct request_context, go_writers, MAX_THREADS);

/* The request each thread is serving, by pid_tgid: probed calls starting there become its children. LRU,
 * pushing out is counted (COUNTER_THREAD_REQUESTS_*). */
BPF_TABLE("lru_hash", __u64, struct request_context, thread_requests, MAX_THREADS);

/* An OpenSSL call (SSL_read, SSL_write and their _ex variants) in progress on a thread of a followed process:
 * its arguments, and the socket its ciphertext goes through, told by the syscalls inside it. Keyed by
 * pid_tgid. */
struct tls_call {
	__u64 ssl;
	__u64 buf;
	__u64 out;               /* the _ex variants: where the byte count goes */
	__u32 op;                /* TLS_* */
	__s32 fd;                /* -1 until known */
	__u32 depth;             /* OpenSSL calls made inside this one */
	__u32 pad;
	__u64 written_ns;        /* SSL_write: when its last write of ciphertext returned */
};
BPF_HASH(tls_calls, __u64, struct tls_call, MAX_THREADS);

/* The socket of each SSL object, from its first call that did I/O: a later SSL_read that finds its plaintext
 * already buffered makes no syscall. LRU: an SSL freed behind our back cannot stay forever. */
struct tls_key {
	__u64 ssl;
	__u32 tgid;
	__u32 pad;
};
BPF_TABLE("lru_hash", struct tls_key, __s32, tls_sockets, MAX_THREADS);

#endif
