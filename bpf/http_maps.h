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
	IO_ACCEPT,               /* buf: the peer's sockaddr (accept, accept4) */
	IO_DUP,                  /* fd: the descriptor duplicated (dup, dup2, dup3, fcntl F_DUPFD) */
	IO_PEERNAME,             /* buf: the sockaddr getpeername fills in, for a socket accepted without one */
};

struct pending_io {
	__u64 buf;
	__u32 fd;
	__u32 op;                /* enum io_op */
};
BPF_HASH(pending_io, __u64, struct pending_io, MAX_THREADS);

struct connection_key {
	__u32 tgid;
	__u32 fd;
};

/* The accepted sockets of watched processes, with their peer's address: only their reads can begin a
 * request. Set at accept's exit, copied by dup, removed at close (and when open reuses the number). LRU: a
 * descriptor closed behind our back (close_range, exec) cannot stay forever. */
struct socket_info {
	__u32 process_seq;       /* of the process that accepted it: its forks may serve it too */
	__u16 family;            /* the peer's: AF_INET, AF_INET6, or 0 when accept was not given a sockaddr */
	__u16 port;              /* host byte order */
	__u8 addr[16];
};
BPF_TABLE("lru_hash", struct connection_key, struct socket_info, sockets, MAX_THREADS);

/* The request in flight per connection. */
BPF_TABLE("lru_hash", struct connection_key, struct request_context, requests, MAX_THREADS);

/* The request each thread is serving, by pid_tgid: probed calls starting there become its children. */
BPF_TABLE("lru_hash", __u64, struct request_context, thread_requests, MAX_THREADS);

#endif
